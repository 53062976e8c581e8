"""Where a 2-rank torchrun finalize spends its time, per process and phase (the timeline hook in
benchmarks/timeline/), median of --reps interleaved runs, for this checkout and optionally --baseline DIR, under
`torchrun --standalone` and under `torchrun --master-port PORT --monitor-interval 0.02` (static rendezvous).

    python benchmarks/phases.py CKPT [--reps 7] [--baseline DIR] [--work phases-work]

CKPT: a DCP checkpoint dir (e.g. startup.py's WORK/src/ckpt). Prints a markdown table. Run it from a directory
without a distfinalize/ package in it.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import free_port

HERE = Path(__file__).resolve().parent
LAUNCHERS = {"--standalone": ["--standalone"], "static": ["--master-port", "PORT", "--monitor-interval", "0.02"]}


def timeline(cmd: list[str], env: dict[str, str], folder: Path) -> tuple[float, dict[tuple[str, str], float]]:
    """Run `cmd` with the hook; (its start time, {(who, event): first time})."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    hook = str(HERE / "timeline")
    env = dict(env, TIMELINE_DIR=str(folder), PYTHONPATH=os.pathsep.join(filter(None, [hook, env.get("PYTHONPATH")])))
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    end = time.time()
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    events: dict[tuple[str, str], float] = {("wall", "end"): end - start}
    for log in folder.glob("*.log"):
        for line in log.read_text().splitlines():
            stamp, who, what = line.split(" ", 2)
            events.setdefault((who, what.split(" [cpu")[0]), float(stamp) - start)
    return start, events


def phases(ev: dict[tuple[str, str], float]) -> dict[str, float]:
    """Durations of the phases of one run."""
    r0 = lambda what: ev[("rank0", what)]  # noqa: E731
    spawned = ev[("agent", "_initialize_workers end")]
    exits = [t for (who, what), t in ev.items() if who.startswith("rank") and what.startswith("os._exit")]
    return {
        "torchrun: start, `import torch`": ev[("agent", "_initialize_workers start")],
        "torchrun: rendezvous, start the ranks": spawned - ev[("agent", "_initialize_workers start")],
        "rank 0: interpreter, CLI modules": r0("import torch start") - spawned,
        "rank 0: `import torch`": r0("import torch end") - r0("import torch start"),
        "rank 0: process group": r0("from_env end") - r0("from_env start"),
        "rank 0: `import distfinalize.pipeline`": r0("import distfinalize.pipeline end")
        - r0("import distfinalize.pipeline start"),
        "rank 0: steps before the write step": r0("step write start") - r0("import distfinalize.pipeline end"),
        "... of which the tie check": r0("step tie check end") - r0("step tie check start"),
        "rank 0: write step": r0("step write end") - r0("step write start"),
        "rank 0: finish step": r0("step finish end") - r0("step finish start"),
        "rank 0: commit, summary, close": r0("os._exit(0)") - r0("step finish end"),
        "ranks: first start to last exit": max(exits) - spawned,
        "torchrun: notices the exit": ev[("agent", "_exit_barrier start")] - max(exits),
        "torchrun: exit barrier to its last `atexit`": ev[("agent", "atexit (last)")]
        - ev[("agent", "_exit_barrier start")],
        "torchrun: interpreter teardown": ev[("wall", "end")] - ev[("agent", "atexit (last)")],
        "wall": ev[("wall", "end")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--work", type=Path, default=Path("phases-work"))
    args = parser.parse_args()
    work = args.work.resolve()
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTFINALIZE_CACHE_DIR=str(work / "spec-cache"))
    env.pop("PYTHONPATH", None)
    checkouts = {"this checkout": env}
    if args.baseline is not None:
        checkouts["baseline"] = dict(env, PYTHONPATH=str(args.baseline.resolve()))
    for package in (HERE.parent / "distfinalize", *([args.baseline / "distfinalize"] if args.baseline else [])):
        compileall.compile_dir(package, quiet=1)  # as pip install does (see startup.py)
    results: dict[str, list[dict[str, float]]] = {}
    load_before = os.getloadavg()
    for _ in range(args.reps):
        for label, launcher in LAUNCHERS.items():
            for name, run_env in checkouts.items():
                flags = [str(free_port()) if flag == "PORT" else flag for flag in launcher]
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "torch.distributed.run", *flags, "--nproc_per_node=2", "-m"]
                cmd += ["distfinalize", str(args.ckpt), str(out), "--log-level", "warning", "--max-shard-size", "256MB"]
                _, events = timeline(cmd, run_env, work / "timeline")
                results.setdefault(f"{name}, {label}", []).append(phases(events))
    loads = " / ".join(f"{x:.1f}" for x in (*load_before, *os.getloadavg()))
    print(f"median of {args.reps}; load average (1, 5, 15 min) before / after: {loads}\n")
    print("| phase | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for phase in next(iter(results.values()))[0]:
        cells = " | ".join(f"{statistics.median(run[phase] for run in runs):.3f}" for runs in results.values())
        print(f"| {phase} | {cells} |")


if __name__ == "__main__":
    main()
