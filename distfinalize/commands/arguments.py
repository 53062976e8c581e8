"""The argument parsers of `distfinalize inspect` and `distfinalize verify`, apart from the commands themselves:
this module imports neither torch nor any other heavy library, so --help and usage errors answer at once
(commands/__init__.py parses here before it loads the command's module). Runs on: every rank, first thing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from distfinalize.commands.runner import add_timeout_option
from distfinalize.config import DEFAULT_MAX_SHARD_SIZE, LOG_LEVELS, parse_size
from distfinalize.hfnames import DTYPE_NAMES


def inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distfinalize inspect",
        description="Show what a checkpoint holds (format, step, saved world size, model/optimizer bytes by dtype), "
        "the plan a finalize would use, and what is missing. Reads metadata (and the tokenizer); writes nothing.",
    )
    parser.add_argument("src", type=Path, metavar="SRC", help="checkpoint folder, training output dir or model dir")
    parser.add_argument("--checkpoint", type=Path, metavar="PATH", help="the checkpoint to inspect (default: latest)")
    parser.add_argument("--tag", help="DeepSpeed checkpoint tag (e.g. global_step500)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--world-size", type=int, metavar="N", help="plan for N ranks (default: this job's)")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help="largest output file of the plan (default: %(default)s)",
    )
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), help="output dtype of the plan")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="warning",
        help="default: %(default)s (info adds the dry run's own log lines)",
    )
    add_timeout_option(parser)
    return parser


def inspect_args(argv: Sequence[str]) -> argparse.Namespace:
    """inspect's arguments, checked (a usage error exits 2); `max_shard_size` parsed to bytes."""
    parser = inspect_parser()
    args = parser.parse_args(argv)
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    try:
        args.max_shard_size = parse_size(args.max_shard_size)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distfinalize verify",
        description="Check a finalized model dir: safetensors headers, the index, the manifest's checksums, dtypes, "
        "and (with --source) every tensor against the training checkpoint; config, tokenizer and generation "
        "config load with transformers. Exit 1 when a check fails.",
        epilog="Run alone, or under torchrun to split the files over ranks: "
        "torchrun --nproc_per_node=N -m distfinalize verify DEST --source SRC",
    )
    parser.add_argument("dest", type=Path, metavar="DEST", help="the finalized model directory")
    parser.add_argument("--source", type=Path, metavar="SRC", help="the training checkpoint DEST was made from")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="the checkpoint under SRC (default: the one the manifest records, else the latest)",
    )
    parser.add_argument("--tag", help="DeepSpeed tag (global_stepN) under SRC")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPE_NAMES),
        help="the dtype the floating tensors must have (default: what DEST declares)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    add_timeout_option(parser)
    return parser


def verify_args(argv: Sequence[str]) -> argparse.Namespace:
    """verify's arguments, checked (a usage error exits 2)."""
    parser = verify_parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is not None or args.tag is not None) and args.source is None:
        parser.error("--checkpoint and --tag need --source")
    return args
