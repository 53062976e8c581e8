"""What a finalize tells its user on rank 0: the plan before writing, the summary after the commit."""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distfinalize.config import format_bytes
from distfinalize.startup import STARTED
from distfinalize.write.progress import STAGES

if TYPE_CHECKING:
    from distfinalize.artifacts.tokenizer import TokenizerOutcome
    from distfinalize.plan import Plan
    from distfinalize.prepare.prepared import Prepared
    from distfinalize.write.progress import Meter
    from distfinalize.write.rank import WrittenFile

log = logging.getLogger(__name__)
REPORT_SCHEMA = "distfinalize.report/1"
PHASES = ("startup", "prepare", *STAGES, "commit", "write_step")


def log_plan(plan: Plan, prepared: Prepared, tokenizer: TokenizerOutcome, vocab_size: int | None) -> None:
    """Rank 0: what will be done."""
    info = prepared.source.info
    log.info(
        "source: %s checkpoint %s (step %s, saved by %s rank(s)), %d model tensors, %d other entries skipped",
        info.format,
        info.path,
        info.step,
        info.saved_world_size,
        len(prepared.tensors),
        info.skipped,
    )
    log.info(
        "dtype: %s (%s)",
        str(prepared.dtype).removeprefix("torch.") if prepared.dtype else "as stored",
        prepared.dtype_reason,
    )
    if vocab_size is not None:
        log.info("vocabulary: embedding rows -> %d (%d token(s) added)", vocab_size, len(tokenizer.added))
    if prepared.lora is not None:
        lora = prepared.lora.summary()
        log.info(
            "LoRA checkpoint (r=%s, alpha=%s, targets %s; settings from %s): writing %s",
            lora["r"],
            lora["lora_alpha"],
            lora["target_modules"],
            lora["config_from"],
            "the merged model" if prepared.lora.merge else "a PEFT adapter dir",
        )
    log.info("plan: %d file(s), %s, %d rank(s)", len(plan.files), format_bytes(plan.total_size), plan.world_size)


class Clock:
    """Seconds per phase of one rank's run: startup (from the command line's start, when it noted it), prepare,
    write_step, commit."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.phases: dict[str, float] = {"startup": self.last - STARTED[0]} if STARTED else {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase], self.last = now - self.last, now


def progress_mode(log_level: str) -> str:
    """The write step's bar: the job's (info), every rank's own (debug), none (warning, error)."""
    return {"debug": "rank", "info": "job"}.get(log_level, "off")


def rank_figures(rank: int, meter: Meter) -> dict[str, Any]:
    """This rank's figures for the summary, after its write step. Runs on: every rank."""
    return {
        "rank": rank,
        "peak_rss_bytes": peak_rss(),
        "read_bytes": meter.read_bytes,
        "written_bytes": meter.done,
        "busy_s": {k: round(v, 3) for k, v in meter.busy_s.items()},
    }


def peak_rss() -> int:
    """This process's peak resident set size, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(dest: Path, clock: Clock, ranks: list[dict[str, Any]], weights: Sequence[WrittenFile]) -> dict[str, Any]:
    """The run's figures (the --report JSON): every file in DEST, time per phase, GiB/s, peak RSS per rank.

    read/transform/write are the busiest rank's seconds in each stage of the write step; they overlap, so they
    can add up to more than the write step's wall time (write_step). Runs on: rank 0, after the commit.
    """
    ranks = [{**r, "peak_rss_bytes": peak_rss()} if r["rank"] == 0 else r for r in ranks]
    try:
        sizes = [p.lstat().st_size for p in sorted(dest.rglob("*")) if p.is_file() and not p.is_symlink()]
    except OSError:  # DEST is complete; a summary that cannot list it counts the weight files alone
        sizes = [f.size for f in weights]
    write_s = clock.phases.get("write_step", 0.0)
    read_bytes = sum(r["read_bytes"] for r in ranks)
    weight_bytes = sum(f.size for f in weights)
    rss = sorted(ranks, key=lambda r: r["peak_rss_bytes"])
    busy = {stage: max(r["busy_s"][stage] for r in ranks) for stage in STAGES}
    phases = {k: round(v, 3) for k, v in {**clock.phases, **busy}.items()}
    return {
        "schema": REPORT_SCHEMA,
        "dest": str(dest),
        "files": len(sizes),
        "bytes": sum(sizes),
        "weight_files": len({f.filename for f in weights}),  # a file several ranks wrote counts once
        "weight_bytes": weight_bytes,
        "read_bytes": read_bytes,
        "seconds": {k: phases[k] for k in PHASES if k in phases} | {"total": round(sum(clock.phases.values()), 3)},
        "gib_per_s": {
            "read": round(read_bytes / 2**30 / write_s, 3) if write_s > 0 else None,
            "write": round(weight_bytes / 2**30 / write_s, 3) if write_s > 0 else None,
        },
        "peak_rss_bytes": {
            "min": rss[0]["peak_rss_bytes"],
            "min_rank": rss[0]["rank"],
            "max": rss[-1]["peak_rss_bytes"],
            "max_rank": rss[-1]["rank"],
        },
        "world_size": len(ranks),
        "ranks": ranks,
    }


def log_summary(report: dict[str, Any]) -> None:
    """The closing summary, in four lines. Runs on: rank 0."""
    s, rate, rss = report["seconds"], report["gib_per_s"], report["peak_rss_bytes"]
    log.info(
        "wrote %d file(s), %s (%d weight file(s), %s) in %.1f s",
        report["files"],
        format_bytes(report["bytes"]),
        report["weight_files"],
        format_bytes(report["weight_bytes"]),
        s["total"],
    )
    phases = ", ".join(f"{k} {s[k]:.1f} s" for k in PHASES if k in s and k != "write_step")
    log.info("time: %s (read, transform and write overlap in a %.1f s write step)", phases, s["write_step"])
    if rate["read"] is not None:
        log.info("speed: read %.2f GiB/s, written %.2f GiB/s", rate["read"], rate["write"])
    if report["world_size"] == 1:
        log.info("peak RSS: %s", format_bytes(rss["max"]))
        return
    log.info(
        "peak RSS per rank: min %s (rank %d), max %s (rank %d)",
        format_bytes(rss["min"]),
        rss["min_rank"],
        format_bytes(rss["max"]),
        rss["max_rank"],
    )


def write_report(path: Path, report: dict[str, Any]) -> None:
    """--report FILE.json; a file that cannot be written is a warning (DEST is complete). Runs on: rank 0."""
    try:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the report %s: %s; DEST is complete", path, exc.strerror or exc)
