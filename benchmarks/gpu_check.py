"""The one-command check for a machine with a GPU: the `gpu` tests, a finalize + `verify` of each path, and the
benchmark against the peers. Run through `scripts/gpu-check.sh`, which installs what the machine lacks first.

    python benchmarks/gpu_check.py --out DIR [--size-gib 8] [--ranks 8] [--verify-gib 1]

1. tests: `pytest -m gpu tests/unit` (on a machine without CUDA they are skipped, and counted as such);
2. paths: a synthetic checkpoint of --verify-gib saved by --ranks ranks, finalized with --ranks ranks by each of
   `--strategy read`, `--strategy exchange` and `--quantize fp8`, then `distfinalize verify --source` on each;
3. benchmark: `benchmarks/run.py` with --size-gib, --ranks (and 1 rank), read and exchange, unquantized and fp8,
   cold and warm, against `dcp_to_torch_save`, `dcp.load + save_file` and `accelerate merge-weights`.

Writes DIR/gpu-check.json and DIR/gpu-check.md after every stage, so a run cut short still reports what it
finished; the benchmark's own table goes to DIR/benchmark.md. Exit 1 when a test, a finalize or a verify fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from measure import finalize_cmd, run_measured, torchrun

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PATHS = {
    "read": ("--strategy", "read"),
    "exchange": ("--strategy", "exchange"),
    "read, fp8": ("--strategy", "read", "--quantize", "fp8"),
}


def machine() -> dict[str, object]:
    """What the check ran on: torch, CUDA and the device, cores."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "no GPU",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cpu_cores": os.cpu_count(),
    }


def gpu_tests(out: Path) -> dict[str, object]:
    """Run the tests marked `gpu`; counts from pytest's JUnit XML."""
    xml = out / "gpu-tests.xml"
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            str(ROOT / "tests" / "unit"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    (out / "gpu-tests.log").write_text(proc.stdout)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts} if suite is not None else counts
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "passed": passed, "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}


def paths(work: Path, size_gib: float, ranks: int) -> list[dict[str, object]]:
    """Finalize one synthetic checkpoint by each path, then verify each output against it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    made = run_measured(
        torchrun(ranks, str(HERE / "make_synthetic.py"), str(work / "src"), "--size-gib", str(size_gib)), env
    )
    if made.returncode:
        return [{"path": "make checkpoint", "ok": False, "output": made.output[-2000:]}]
    ckpt = work / "src" / "ckpt"
    results = []
    for name, options in PATHS.items():
        dest = work / f"out-{name.replace(', ', '-')}"
        done = run_measured(finalize_cmd(ranks, ckpt, dest, "--max-shard-size", "1GB", *options), env)
        row: dict[str, object] = {
            "path": name,
            "ranks": ranks,
            "finalize_s": round(done.wall_s, 2),
            "peak_rss_gib": round(done.peak_rss_bytes / 2**30, 2),
            "ok": done.returncode == 0,
        }
        if done.returncode == 0:
            checked = run_measured([sys.executable, "-m", "distfinalize", "verify", str(dest), "--source", str(ckpt)])
            row |= {"verify_s": round(checked.wall_s, 2), "ok": checked.returncode == 0}
            if checked.returncode:
                row["output"] = checked.output[-2000:]
        else:
            row["output"] = done.output[-2000:]
        results.append(row)
        shutil.rmtree(dest, ignore_errors=True)
    return results


def benchmark(work: Path, out: Path, size_gib: float, ranks: int) -> dict[str, object]:
    """benchmarks/run.py against the peers; its table is appended to DIR/benchmark.md."""
    report = out / "benchmark.md"
    cmd = [
        sys.executable,
        str(HERE / "run.py"),
        "--size-gib",
        str(size_gib),
        "--save-ranks",
        str(ranks),
        "--ranks",
        f"1,{ranks}",
        "--strategies",
        "read,exchange",
        "--work",
        str(work / "bench"),
        "--report",
        str(report),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (out / "benchmark.log").write_text(proc.stdout)
    return {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "report": report.name,
    }


def markdown(facts: dict[str, object]) -> str:
    """The check's figures as a markdown summary."""
    lines = ["# distfinalize GPU check", "", "machine: " + ", ".join(f"{k} {v}" for k, v in facts["machine"].items())]
    if "tests" in facts:
        t = facts["tests"]
        lines += [
            "",
            f"gpu tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
            f"{t['skipped']} skipped ({t['seconds']} s)",
        ]
    if "paths" in facts:
        header = "| path | ranks | finalize s | peak RSS / process GiB | verify s | ok |"
        lines += ["", header, "|---|---:|---:|---:|---:|---|"]
        lines += [
            f"| {p['path']} | {p.get('ranks', '')} | {p.get('finalize_s', '')} | {p.get('peak_rss_gib', '')} | "
            f"{p.get('verify_s', '')} | {'yes' if p['ok'] else 'NO'} |"
            for p in facts["paths"]
        ]
    if "benchmark" in facts:
        b = facts["benchmark"]
        lines += ["", f"benchmark: exit {b['returncode']} after {b['seconds']} s; table in {b['report']}"]
    return "\n".join(lines) + "\n"


def save(out: Path, facts: dict[str, object]) -> None:
    (out / "gpu-check.json").write_text(json.dumps(facts, indent=1) + "\n")
    (out / "gpu-check.md").write_text(markdown(facts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where gpu-check.json/.md and the logs go")
    parser.add_argument("--size-gib", type=float, default=8.0, help="the benchmark's checkpoint size")
    parser.add_argument("--verify-gib", type=float, default=1.0, help="the checkpoint size of the verified runs")
    parser.add_argument("--ranks", type=int, default=8, help="ranks that save and finalize")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work" / "gpu-check")
    parser.add_argument("--skip-benchmark", action="store_true", help="tests and verified paths only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    facts: dict[str, object] = {"machine": machine()}
    save(args.out, facts)
    print(f"gpu check: the gpu tests, then {len(PATHS)} verified finalizes with {args.ranks} ranks", flush=True)
    facts["tests"] = gpu_tests(args.out)
    save(args.out, facts)
    facts["paths"] = paths(args.work, args.verify_gib, args.ranks)
    save(args.out, facts)
    if not args.skip_benchmark:
        print(f"gpu check: the benchmark, {args.size_gib} GiB (its log: {args.out / 'benchmark.log'})", flush=True)
        facts["benchmark"] = benchmark(args.work, args.out, args.size_gib, args.ranks)
        save(args.out, facts)
    print(markdown(facts), flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    failed = facts["tests"]["returncode"] not in (0, 5) or not all(p["ok"] for p in facts["paths"])
    return 1 if failed or facts.get("benchmark", {}).get("returncode", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
