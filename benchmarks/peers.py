"""What users run today to turn a DCP checkpoint into Hugging Face safetensors, as one-process baselines.

    python benchmarks/peers.py dcp-to-torch-save CKPT OUT [--max-shard-size 5GB]
    python benchmarks/peers.py dcp-load-save-file CKPT OUT [--max-shard-size 5GB]

dcp-to-torch-save: torch's `dcp_to_torch_save` to a .pt, `torch.load` (mmap) it, split with huggingface_hub's
                   `split_torch_state_dict_into_shards`, `save_file` each shard, write the index.
dcp-load-save-file: preallocate every tensor, `dcp.load(..., no_dist=True)` into them, then the same split
                   and `save_file`.
(`accelerate merge-weights CKPT OUT` is run as it is, from its own console script.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata


def save_sharded(state: dict[str, torch.Tensor], out: Path, max_shard_size: str) -> None:
    """Shard like save_pretrained and write each file with safetensors."""
    out.mkdir(parents=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def via_torch_save(ckpt: Path, out: Path, max_shard_size: str) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pt = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(ckpt), str(pt))
        state = torch.load(pt, weights_only=True, mmap=True)
        save_sharded(state, out, max_shard_size)


def via_dcp_load(ckpt: Path, out: Path, max_shard_size: str) -> None:
    metadata = FileSystemReader(str(ckpt)).read_metadata()
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    save_sharded(state, out, max_shard_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=["dcp-to-torch-save", "dcp-load-save-file"])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    run = via_torch_save if args.tool == "dcp-to-torch-save" else via_dcp_load
    run(args.ckpt, args.out, args.max_shard_size)


if __name__ == "__main__":
    main()
