"""`distfinalize run [--nproc-per-node N] [--nnodes M --rdzv-endpoint HOST:PORT] SRC DEST [options]`: one command
that starts the ranks itself (torch.distributed's elastic agent, as torchrun does) and runs a finalize on each.
The launcher options mean what torchrun's options of the same names mean.

The finalize arguments are checked here first, so a usage error is one line before any rank starts. A failed
rank's one error line is the run's; no launcher traceback or failure table follows (dist/agent.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from distfinalize.commands.runner import PROG, report_line
from distfinalize.errors import DistfinalizeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} run",
        description="Start N ranks on this node (and join the other nodes' ranks) and finalize SRC into DEST with "
        "all of them. Takes every option of `distfinalize SRC DEST` after SRC DEST.",
        epilog="Example: distfinalize run --nproc-per-node 8 /ckpt/run1 /models/run1 --dtype bfloat16. "
        "Multi-node: the same command on every node, with --nnodes M --rdzv-endpoint HOST:PORT.",
    )
    parser.add_argument(
        "--nproc-per-node", type=int, metavar="N", help="ranks on this node (default: one per GPU, else 1)"
    )
    parser.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes in the job (default: 1)")
    parser.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="where the nodes meet (a c10d store on HOST; needed with --nnodes > 1); default: this node alone",
    )
    parser.add_argument(
        "--rdzv-id", metavar="ID", help="the job's id at the rendezvous (default: $SLURM_JOB_ID, else random)"
    )
    parser.add_argument(
        "--rdzv-conf",
        metavar="KEY=VALUE,...",
        help="rendezvous settings, as torchrun's --rdzv-conf (e.g. join_timeout=900: how long the nodes wait for each "
        "other, default 600 s)",
    )
    parser.add_argument(
        "--log-dir", type=Path, metavar="DIR", help="also write each rank's stdout and stderr to files under DIR"
    )
    parser.add_argument(
        "--tee",
        choices=("0", "1", "2", "3"),
        metavar="0|1|2|3",
        help="with --log-dir, which of each rank's streams also reach the console: 0 none, 1 stdout, 2 stderr, 3 both "
        "(default: 3)",
    )
    parser.add_argument(
        "--local-ranks-filter",
        metavar="A,B",
        help="show only these local ranks' output on the console, e.g. 0 (with --log-dir the files still get every "
        "rank's; without it the other ranks' output is dropped)",
    )
    parser.add_argument("finalize", nargs=argparse.REMAINDER, metavar="SRC DEST [options]")
    return parser


def main(argv: Sequence[str]) -> int:
    """Check the arguments, then launch the ranks. Runs on: the launching process (one per node)."""
    import socket

    from distfinalize.commands.finalize import build_parser as finalize_parser
    from distfinalize.commands.finalize import parse_config
    from distfinalize.dist.agent import AgentOptions, default_nproc, launch
    from distfinalize.startup import profile_as

    profile_as(f"launcher-{socket.gethostname()}")  # DISTFINALIZE_PROFILE: not rank 0's files
    parser = build_parser()
    args = parser.parse_args(argv)
    config = parse_config(finalize_parser(), args.finalize)  # a usage error exits 2 here, before any rank
    try:
        options = AgentOptions(
            nproc_per_node=default_nproc() if args.nproc_per_node is None else args.nproc_per_node,
            nnodes=args.nnodes,
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_id=args.rdzv_id,
            rdzv_conf=parse_rdzv_conf(args.rdzv_conf),
            log_dir=args.log_dir,
            tee=None if args.tee is None else int(args.tee),
            local_ranks=parse_local_ranks(args.local_ranks_filter),
            verbose=config.log_level == "debug",
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        code, line = launch(options, list(args.finalize))
    except DistfinalizeError as exc:
        code, line = exc.exit_code, str(exc)
    except KeyboardInterrupt:
        code, line = 130, "interrupted"
    if line is not None:
        report_line(line, 0)
    return code


def parse_rdzv_conf(text: str | None) -> tuple[tuple[str, str], ...]:
    """--rdzv-conf "a=1,b=2" -> (("a", "1"), ("b", "2")); ValueError names a malformed item."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--rdzv-conf takes KEY=VALUE pairs separated by commas, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def parse_local_ranks(text: str | None) -> frozenset[int] | None:
    """--local-ranks-filter "0,3" -> {0, 3}; ValueError names a bad item."""
    if text is None:
        return None
    try:
        ranks = frozenset(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"--local-ranks-filter takes local ranks separated by commas, got {text!r}") from None
    if not ranks or min(ranks) < 0:
        raise ValueError(f"--local-ranks-filter takes local ranks separated by commas, got {text!r}")
    return ranks
