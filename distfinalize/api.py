"""`distfinalize.finalize(src, dest, **options)`: a finalize from Python, inside a training job or alone.

The options are the command line's, spelled as keywords (`base_model="Qwen/Qwen2.5-0.5B"`, `merge_lora=True`,
`max_shard_size="2GB"`, `dataset=["a", "b"]`), validated exactly as the command line validates them. Inside a job
whose process group is already initialized (torchrun, accelerate, the Trainer), every rank of that group must call
it, and the group is used as it is: never destroyed, never re-formed. Without one, it forms the group its
launcher's environment describes (and tears it down again), or runs as a single process. It never exits the
process: a failure is a DistfinalizeError on every rank (the failing rank's own, a RankFailure on the others), with
nothing at DEST.

Runs on: all ranks.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from distfinalize.errors import UsageError

if TYPE_CHECKING:
    from distfinalize.config import FinalizeConfig
    from distfinalize.pipeline import Outcome


def finalize(src: str | os.PathLike, dest: str | os.PathLike, **options: Any) -> Outcome:
    """Finalize `src` into `dest` with every rank of the current job; returns what was done (rank 0's view).

    Raises UsageError for a bad option and DistfinalizeError for every other failure. Runs on: all ranks."""
    from distfinalize.dist.context import DistContext
    from distfinalize.logs import setup_logging
    from distfinalize.pipeline import run

    config = config_from(src, dest, options)
    ctx = DistContext.from_env(config.device, config.timeout_s)
    if not logging.getLogger("distfinalize").handlers:
        setup_logging(config.log_level, ctx.rank, ctx.world_size)
    try:
        return run(config, ctx)
    except KeyboardInterrupt as exc:
        raise ctx.interruption(exc, "nothing was written to DEST") from None
    finally:
        ctx.close()  # tears down only a group it formed itself


def config_from(src: str | os.PathLike, dest: str | os.PathLike, options: Mapping[str, Any]) -> FinalizeConfig:
    """The FinalizeConfig the command line `distfinalize SRC DEST --opt ...` would build. Pure but for argparse."""
    from distfinalize.commands.finalize import build_parser, parse_config

    parser = build_parser()

    def refuse(message: str) -> None:
        raise UsageError(message, hint="options are the command line's, as keywords: base_model=..., merge_lora=True")

    parser.error = refuse  # type: ignore[method-assign]  # one exception, not a usage message and exit 2
    return parse_config(parser, [os.fspath(src), os.fspath(dest), *argv_of(parser, options)])


def argv_of(parser: argparse.ArgumentParser, options: Mapping[str, Any]) -> list[str]:
    """Keyword options as command-line words: True -> the flag, False / None -> left out, a list -> the option
    repeated (append options) or joined by commas (A,B options)."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None or flag == "--help":
            raise UsageError(f"unknown option {key!r}", hint=f"run `distfinalize --help` for the options ({flag})")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            if isinstance(action, argparse._AppendAction):
                argv += [word for item in value for word in (flag, _word(item))]
            else:
                argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, _word(value)]
    return argv


def _word(value: Any) -> str:
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
