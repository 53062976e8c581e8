"""Tiny Llama models and the reference files every checkpoint maker writes.

Trainers here run under torchrun (gloo, CPU). Each writes, next to the checkpoint:
  config.json          the transformers config of the trained model
  tokenizer*.json      a real BPE tokenizer (trained here with `tokenizers`), as a training run saves it
  reference.pt         rank 0: the trained model's full state dict (fp32, every key)
  reference_logits.pt  rank 0: logits of the trained model on REFERENCE_INPUT
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import quiet  # noqa: F401  (before transformers: its imports' messages no user can act on)
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

VOCAB = 256


def tiny_config(tie: bool) -> LlamaConfig:
    """A 2-layer Llama small enough to train in seconds on CPU."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def reference_input() -> torch.Tensor:
    """The fixed token ids every test evaluates logits on."""
    return (torch.arange(24).reshape(2, 12) * 7 + 3) % VOCAB


def build_model(tie: bool, seed: int = 0) -> torch.nn.Module:
    """Same weights on every rank (seeded), fp32, on CPU."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(tie), dtype=torch.float32)


def batch(step: int, rank: int) -> torch.Tensor:
    """A deterministic random batch of token ids for one rank and step."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2, 16), generator=gen)


def train(model: torch.nn.Module, optim: torch.optim.Optimizer, steps: int) -> None:
    """A few causal-LM steps on random tokens. Runs on: all ranks."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model.train()
    for step in range(steps):
        ids = batch(step, rank)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()


def save_reference(out: Path, full_state_dict: dict[str, torch.Tensor], tie: bool) -> None:
    """Rank 0: write config.json, reference.pt and reference_logits.pt into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tiny_config(tie).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    state = {k: v.detach().clone().cpu() for k, v in full_state_dict.items()}
    torch.save(state, out / "reference.pt")
    model = build_model(tie, seed=12345)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"reference does not load: missing={missing} unexpected={unexpected}")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=reference_input()).logits
    torch.save(logits, out / "reference_logits.pt")


def trainer_args(doc: str, variants: tuple[str, ...], steps: int = 3) -> argparse.Namespace:
    """The command line every trainer takes: OUT [--variant NAME ...] [--steps N]."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", action="append", choices=variants)
    parser.add_argument("--steps", type=int, default=steps)
    return parser.parse_args()


def init_gloo() -> tuple[int, int]:
    """Init the default process group from torchrun's environment."""
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish() -> None:
    """Destroy the process group and exit hard: gloo's threads can abort a finished rank at interpreter
    teardown ("terminate called without an active exception"), failing a run that succeeded."""
    import sys

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def build_tokenizer(pad: bool = True):
    """A real byte-level BPE trained on a small corpus, wrapped as PreTrainedTokenizerFast, exactly VOCAB long.

    <s>, </s>, <unk>, <pad> are ids 0-3 (<pad> is the pad token only when `pad`); no chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
    corpus += ["finalize sharded checkpoints into hugging face model directories with every rank"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<unk>", "<pad>"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>" if pad else None
    )
    filler = [f"<extra_{i}>" for i in range(VOCAB - len(fast))]
    if filler:
        fast.add_tokens(filler)
    if len(fast) != VOCAB:
        raise RuntimeError(f"tokenizer has {len(fast)} tokens, expected {VOCAB}")
    return fast
