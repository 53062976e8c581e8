"""`distfinalize SRC DEST [options]`: arguments -> FinalizeConfig -> pipeline.run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from distfinalize.commands.runner import PROG, add_log_options, add_timeout_option, emit, log_level, run_guarded
from distfinalize.config import (
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_READ_BATCH,
    DEFAULT_WRITE_THREADS,
    DEVICES,
    STRATEGIES,
    CardOptions,
    FinalizeConfig,
    GenerationOptions,
    LoraOptions,
    TokenizerOptions,
    parse_size,
)
from distfinalize.errors import UsageError
from distfinalize.hfnames import DTYPE_NAMES

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a sharded training checkpoint (PyTorch DCP from FSDP2, torchtitan or Accelerate) into a "
        "Hugging Face model directory, with every rank of the job writing its own files.",
        epilog="Run alone, or under torchrun: torchrun --nproc_per_node=N -m distfinalize SRC DEST. "
        "Also: distfinalize inspect SRC; distfinalize verify DEST [--source SRC].",
    )
    parser.add_argument(
        "src",
        type=Path,
        metavar="SRC",
        help="checkpoint folder, or a training output dir holding checkpoints (the latest is used)",
    )
    parser.add_argument("dest", type=Path, metavar="DEST", help="output directory; must not exist")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="the checkpoint to finalize (a path, or relative to SRC); default: the latest",
    )
    parser.add_argument(
        "--tag", help="DeepSpeed checkpoint tag (e.g. global_step500) instead of the one named in `latest`"
    )
    parser.add_argument(
        "--key-map",
        metavar="NAME|FILE",
        help="how checkpoint names map to Hugging Face names: hf, torchtitan-llama (default: detected), or a YAML "
        "file of ordered regex renames and a drop list",
    )
    parser.add_argument(
        "--quantize",
        nargs="?",
        const="fp8",
        metavar="RECIPE",
        help="quantize Linear weights on the device while writing: fp8 (the default recipe; compressed-tensors "
        "float-quantized, per channel), fp8-block (transformers fp8, 128x128), int8 (W8A16), int4 (W4A16, group 128); "
        "torchao-int8, torchao-fp8, torchao-int4 (torchao's own safetensors format)",
    )
    parser.add_argument(
        "--quantize-ignore",
        action="append",
        default=[],
        metavar="REGEX",
        help="module names (regex) to leave unquantized, besides embeddings, lm_head, norms and routers (repeatable)",
    )
    parser.add_argument(
        "--quantize-skip-nonfinite",
        action="store_true",
        help="leave a weight that holds NaN or Inf unquantized (the whole tensor, in the output dtype, listed in "
        "config.json's ignore list) instead of failing; every weight --quantize would quantize is read once more "
        "to find them",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPE_NAMES),
        help="output dtype of floating tensors (default: config.json's dtype, else as stored)",
    )
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help="largest output file, e.g. 5GB, 500MB, 2GiB (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where tensors are cast (auto: this rank's GPU when there is one)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FILE.json",
        help="also write the closing summary's figures (files, bytes, seconds per phase, GiB/s, peak RSS per rank) "
        "as JSON",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished, checksum-verified files of an interrupted run's staging dir",
    )
    add_log_options(parser)
    add_timeout_option(parser)
    add_data_path_options(parser)
    add_contract_options(parser)
    return parser


def add_data_path_options(parser: argparse.ArgumentParser) -> None:
    """How bytes reach the writing rank, and how much is in flight."""
    path = parser.add_argument_group("data path")
    path.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="read",
        help="read: each rank reads the byte ranges it writes (shared file systems; default); exchange: each rank "
        "reads only its share of the source files and the chunks travel to their writer over the process group "
        "(checkpoints on node-local disks; DCP only)",
    )
    path.add_argument(
        "--read-batch",
        default=DEFAULT_READ_BATCH,
        metavar="SIZE",
        help="source bytes read at once, and bytes a rank sends and receives per exchange round (half each); a rank "
        "holds at most twice this in flight, whatever the largest tensor (default: %(default)s)",
    )
    path.add_argument(
        "--write-threads",
        type=int,
        default=DEFAULT_WRITE_THREADS,
        metavar="N",
        help="output files each rank writes at once (default: %(default)s)",
    )


def add_contract_options(parser: argparse.ArgumentParser) -> None:
    """Tokenizer, configs, model card, kept checkpoint and Hub options."""
    tok = parser.add_argument_group("tokenizer and vocabulary")
    tok.add_argument("--tokenizer", type=Path, metavar="PATH", help="tokenizer dir (default: found in SRC)")
    tok.add_argument("--chat-template", type=Path, metavar="FILE", help="a Jinja2 chat template to apply")
    tok.add_argument("--add-tokens", type=Path, metavar="YAML", help="tokens to add, with their row init")
    tok.add_argument("--skip-default-tokens", action="store_true", help="do not add a PAD token when missing")
    tok.add_argument("--pad-vocab-to-multiple-of", type=int, metavar="N", help="round embedding rows up to N")
    cfg = parser.add_argument_group("configs")
    cfg.add_argument(
        "--base-model",
        type=Path,
        metavar="DIR|HUB_ID",
        help="the model the run started from: a local Hugging Face dir or a Hub id (downloaded by rank 0 into the "
        "Hugging Face cache; HF_HUB_OFFLINE, HF_HUB_CACHE and HF_TOKEN apply); its config, tokenizer and generation "
        "config are used when SRC has none, and its weights by --merge-lora of an adapter-only checkpoint",
    )
    cfg.add_argument(
        "--tensors-only",
        action="store_true",
        help="when no config.json is found, write the tensors under their stored names without one (transformers "
        "cannot load such a dir) instead of failing",
    )
    cfg.add_argument(
        "--generation-config",
        default="carry",
        metavar="carry|none|PATH",
        help="carry the source's (default), write none, or load a preset JSON",
    )
    cfg.add_argument("--stop-tokens", metavar="A,B", help="extra end-of-turn tokens merged into eos_token_id")
    cfg.add_argument(
        "--no-auto-stop-tokens",
        action="store_true",
        help="do not merge <|im_end|>, <|eot_id|>, <|eot|>, <|end_of_turn|> into eos_token_id",
    )
    card = parser.add_argument_group("model card")
    card.add_argument("--base-model-id", metavar="REPO", help="the Hub id of the base model")
    card.add_argument("--dataset", action="append", default=[], metavar="ID", help="a training dataset (repeatable)")
    card.add_argument("--training-method", metavar="NAME", help="e.g. sft, dpo, pretraining")
    card.add_argument("--log-url", action="append", default=[], metavar="URL", help="training logs (repeatable)")
    lora = parser.add_argument_group("LoRA / PEFT checkpoints (detected from the names)")
    lora.add_argument(
        "--merge-lora",
        action="store_true",
        help="write the full model with the adapter merged (W + scale*B@A in float32) instead of a PEFT adapter dir; "
        "base weights from the checkpoint, else from --base-model DIR",
    )
    lora.add_argument(
        "--lora-r", type=int, metavar="N", help="LoRA rank (default: adapter_config.json, else the shapes)"
    )
    lora.add_argument("--lora-alpha", type=float, metavar="ALPHA", help="LoRA alpha (default: adapter_config.json)")
    lora.add_argument(
        "--lora-target-modules", metavar="A,B", help="adapted modules (default: adapter_config.json, else the names)"
    )
    lora.add_argument(
        "--lora-rslora",
        action="store_true",
        default=None,
        help="the adapter was trained with use_rslora (scale alpha/sqrt(r))",
    )
    keep = parser.add_argument_group("checkpoint layout")
    keep.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="also keep a resumable checkpoint in DEST/checkpoints/checkpoint-N (root: symlinks)",
    )
    keep.add_argument("--keep-optimizer", action="store_true", help="keep the optimizer state there too (DCP)")
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="upload DEST from rank 0 after the commit")
    hub.add_argument("--private", action="store_true", help="create the repo private")
    hub.add_argument("--revision", metavar="BRANCH", help="branch to push to")
    hub.add_argument("--commit-message", metavar="TEXT")


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> FinalizeConfig:
    """Parse and validate; a bad value exits 2 with argparse's usage line."""
    args = parser.parse_args(argv)
    try:
        key_map = None
        if args.key_map is not None:  # imported only then: --help and usage errors answer without torch
            from distfinalize.transform.keymap import resolve_key_map

            key_map = resolve_key_map(args.key_map)
        return FinalizeConfig(
            src=args.src,
            dest=args.dest,
            checkpoint=args.checkpoint,
            tag=args.tag,
            dtype=args.dtype,
            key_map=key_map,
            quantize=args.quantize,
            quantize_ignore=tuple(args.quantize_ignore),
            quantize_skip_nonfinite=args.quantize_skip_nonfinite,
            max_shard_size=parse_size(args.max_shard_size),
            device=args.device,
            dry_run=args.dry_run,
            log_level=log_level(parser, args),
            timeout_s=args.timeout,
            read_batch_bytes=parse_size(args.read_batch, "--read-batch"),
            strategy=args.strategy,
            write_threads=args.write_threads,
            base_model=args.base_model,
            tensors_only=args.tensors_only,
            tokenizer=TokenizerOptions(
                path=args.tokenizer,
                chat_template=args.chat_template,
                add_tokens=args.add_tokens,
                default_tokens=not args.skip_default_tokens,
                pad_vocab_multiple=args.pad_vocab_to_multiple_of,
            ),
            generation=GenerationOptions(
                mode=args.generation_config,
                stop_tokens=comma_list(args.stop_tokens),
                auto_stop_tokens=not args.no_auto_stop_tokens,
            ),
            card=CardOptions(
                base_model_id=args.base_model_id,
                datasets=tuple(args.dataset),
                training_method=args.training_method,
                log_urls=tuple(args.log_url),
            ),
            lora=LoraOptions(
                merge=args.merge_lora,
                r=args.lora_r,
                alpha=args.lora_alpha,
                target_modules=comma_list(args.lora_target_modules),
                use_rslora=args.lora_rslora,
            ),
            resume=args.resume,
            keep_checkpoint=args.keep_checkpoint,
            keep_optimizer=args.keep_optimizer,
            hub=hub_options(args),
            report=args.report,
        )
    except (ValueError, UsageError) as exc:
        parser.error(str(exc))


def comma_list(text: str | None) -> tuple[str, ...]:
    """--stop-tokens / --lora-target-modules "A,B" -> ("A", "B")."""
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def hub_options(args: argparse.Namespace):
    """HubOptions when --push-to-hub is given."""
    if args.push_to_hub is None:
        if args.private or args.revision or args.commit_message:
            raise ValueError("--private, --revision and --commit-message need --push-to-hub")
        return None
    from distfinalize.artifacts.hub import HubOptions

    return HubOptions(
        args.push_to_hub, private=args.private, revision=args.revision, commit_message=args.commit_message
    )


def format_plan(plan) -> str:
    """The dry-run plan as a table: file, rank, tensors, bytes."""
    width = max(len(f.filename) for f in plan.files)
    ranks = [f"{f.ranges[0].rank}-{f.ranges[-1].rank}" if f.shared else str(f.rank) for f in plan.files]
    rank_width = max(4, *(len(r) for r in ranks))
    lines = [f"{'file':<{width}}  {'rank':>{rank_width}}  tensors  bytes"]
    for f, r in zip(plan.files, ranks, strict=True):
        lines.append(f"{f.filename:<{width}}  {r:>{rank_width}}  {len(f.tensors):>7}  {f.nbytes}")
        if f.shared:  # written by several ranks: each piece's bytes of the data region
            lines += [f"  piece: rank {p.rank} bytes [{p.start}, {p.stop})" for p in f.ranges]
    per_rank = ", ".join(f"rank {r}: {plan.bytes_for(r)}" for r in range(plan.world_size))
    lines.append(
        f"total: {len(plan.tensors)} tensors, {plan.total_size} bytes in {len(plan.files)} file(s); {per_rank}"
    )
    for f in plan.files:
        lines += [f"  {f.filename}: {t.name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in f.tensors]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """`distfinalize SRC DEST [options]`: parse, then run the pipeline under the guarded runner. Runs on: all
    ranks."""
    config = parse_config(build_parser(), argv)

    def finalize(ctx: DistContext) -> int:
        from distfinalize.pipeline import run

        outcome = run(config, ctx)
        if ctx.is_rank0 and outcome.dry_run:
            emit(format_plan(outcome.plan))
            emit(json.dumps({k: v for k, v in outcome.report.items() if k != "plan"}, indent=2))
        return 0

    return run_guarded(finalize, log_level=config.log_level, device=config.device, timeout_s=config.timeout_s)
