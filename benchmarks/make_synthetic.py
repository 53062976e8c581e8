"""Write a synthetic Llama-shaped DCP checkpoint, laid out like FSDP2 + get_model_state_dict.

    torchrun --standalone --nproc_per_node=N benchmarks/make_synthetic.py OUT --size-gib G [--dtype bfloat16]

Every tensor is a DTensor sharded Shard(0) over init_device_mesh("cpu", (N,)); each rank draws only its
own rows from a seeded generator (the full model never exists on one rank), then torch.distributed
.checkpoint.save writes OUT/ckpt/. Rank 0 writes OUT/config.json (a LlamaConfig with these shapes).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

HEAD_DIM = 128
VOCAB = 32000
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llama_shapes(hidden: int, layers: int, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """HF Llama parameter names and shapes (untied, GQA with 4 query heads per kv head when possible)."""
    heads = hidden // HEAD_DIM
    kv = heads // 4 if heads % 4 == 0 else heads
    inter = _intermediate(hidden)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * HEAD_DIM, hidden),
            p + "self_attn.k_proj.weight": (kv * HEAD_DIM, hidden),
            p + "self_attn.v_proj.weight": (kv * HEAD_DIM, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * HEAD_DIM),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def _intermediate(hidden: int) -> int:
    return -(-hidden * 8 // 3 // 128) * 128  # ~8/3 hidden, rounded up to a multiple of 128


def _numel(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values())


def choose_dims(size_gib: float, itemsize: int) -> tuple[int, int]:
    """(hidden, layers) whose model is closest to size_gib; layers ~ hidden / 128 like real Llamas."""
    target = size_gib * 2**30 / itemsize
    best = None
    for hidden in range(256, 16384 + 1, 128):
        for layers in range(max(2, hidden // 128 - 8), hidden // 128 + 9):
            err = abs(_numel(llama_shapes(hidden, layers)) - target)
            if best is None or err < best[0]:
                best = (err, hidden, layers)
    return best[1], best[2]


def llama_config(hidden: int, layers: int, dtype: str):
    """The transformers LlamaConfig of `llama_shapes(hidden, layers)`."""
    from transformers import LlamaConfig

    heads = hidden // HEAD_DIM
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=_intermediate(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 4 if heads % 4 == 0 else heads,
        head_dim=HEAD_DIM,
        tie_word_embeddings=False,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def local_shard(name: str, shape: tuple[int, ...], rank: int, world: int, dtype: torch.dtype) -> torch.Tensor:
    """This rank's Shard(0) rows (torch.chunk split, like FSDP2), drawn from a (name, rank)-seeded generator."""
    chunk = -(-shape[0] // world)
    rows = max(0, min(chunk, shape[0] - rank * chunk))
    local_shape = (rows, *shape[1:])
    if name.endswith("norm.weight"):
        return torch.ones(local_shape, dtype=dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1024 + rank)
    return torch.randn(local_shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size-gib", type=float, required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    hidden, layers = choose_dims(args.size_gib, dtype.itemsize)
    shapes = llama_shapes(hidden, layers)

    state = {}
    for name, shape in shapes.items():
        local = local_shard(name, shape, rank, world, dtype)
        stride = torch.empty(shape, device="meta").stride()
        state[name] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
        )
    dcp.save(state, checkpoint_id=str(args.out / "ckpt"))

    if rank == 0:
        llama_config(hidden, layers, args.dtype).save_pretrained(args.out)
        nbytes = _numel(shapes) * dtype.itemsize
        print(
            f"wrote {args.out}/ckpt: {len(shapes)} tensors, {nbytes / 2**30:.3f} GiB {args.dtype}, "
            f"hidden={hidden} intermediate={_intermediate(hidden)} layers={layers}, {world} ranks"
        )
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown, where gloo's threads can abort a finished rank


if __name__ == "__main__":
    main()
