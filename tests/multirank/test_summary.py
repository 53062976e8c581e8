"""The closing summary and --report FILE.json: the figures match what is in DEST, at 1 and 2 ranks; and a plain
run prints only distfinalize's own lines (no third-party import-time noise). Marked `dist`: real runs, the 2-rank
one under torchrun, with the demo's arguments (scripts/demo.sh step 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import check_ok, finalize, read_json

pytestmark = pytest.mark.dist

OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d \[rank\d+\] (DEBUG|INFO|WARNING|ERROR) \S")
PHASES = {"startup", "prepare", "read", "transform", "write", "commit", "write_step", "total"}


@pytest.mark.parametrize("nproc", [1, 2])
def test_summary_figures_match_dest(fsdp2_runs: Path, tmp_path: Path, nproc: int) -> None:
    dest, report_path = tmp_path / "out", tmp_path / "report.json"
    result = check_ok(
        finalize(fsdp2_runs / "untied-optim", dest, "--max-shard-size", "200KB", "--report", report_path, nproc=nproc)
    )
    report = read_json(report_path)
    files = [p for p in dest.rglob("*") if p.is_file() and not p.is_symlink()]
    weights = list(dest.glob("*.safetensors"))
    assert report["schema"] == "distfinalize.report/1" and report["dest"] == str(dest)
    assert report["files"] == len(files) and report["bytes"] == sum(p.stat().st_size for p in files)
    assert report["weight_files"] == len(weights) > 1
    assert report["weight_bytes"] == sum(p.stat().st_size for p in weights)
    in_process = {"startup"} if nproc == 1 else set()  # support.finalize runs one rank through cli.main in-process
    assert set(report["seconds"]) == PHASES - in_process and all(v >= 0 for v in report["seconds"].values())
    assert report["seconds"]["total"] >= report["seconds"]["write_step"] > 0
    assert report["gib_per_s"]["read"] > 0 and report["gib_per_s"]["write"] > 0
    assert report["world_size"] == nproc and [r["rank"] for r in report["ranks"]] == list(range(nproc))
    rss = [r["peak_rss_bytes"] for r in report["ranks"]]
    assert report["peak_rss_bytes"]["min"] == min(rss) > 2**20 and report["peak_rss_bytes"]["max"] == max(rss)
    assert report["peak_rss_bytes"]["max_rank"] == rss.index(max(rss))
    # every rank wrote its share: the tensor bytes add up to the weight files less their headers
    shares = [r["written_bytes"] for r in report["ranks"]]
    assert all(s > 0 for s in shares) and 0 < report["weight_bytes"] - sum(shares) < 64 * 1024 * len(weights)
    assert sum(r["read_bytes"] for r in report["ranks"]) == report["read_bytes"] > 0
    assert f"wrote {len(files)} file(s)" in result.stderr
    assert ("peak RSS per rank: min" if nproc == 2 else "peak RSS: ") in result.stderr
    if nproc == 2:  # a plain run prints its own lines only (logs are plain when stderr is not a terminal)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert [line for line in lines if not OUR_LINE.match(line)] == []
