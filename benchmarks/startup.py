"""Fixed costs on a small checkpoint: distfinalize (one process, 2 ranks under torchrun, 2 ranks under
`distfinalize run`) and `--help` against the single-process peer (dcp.load + save_file), interleaved.

    python benchmarks/startup.py --size-gib 0.28 [--reps 3] [--baseline DIR] [--work startup-work] [--report MD]

Each repetition runs every tool once, one after the other, so a machine whose load changes during the run
affects every tool alike; the median of --reps is reported, with the ratio to the peer. --baseline DIR also
times the distfinalize in DIR (another checkout: its package dir is put first on PYTHONPATH), in the same run.
The checkpoint is warm (in the page cache); every output is checked against the peer's, bit for bit. The model
check's cache starts empty (WORK/spec-cache): each tool's first run builds the model, later runs read the cache;
the "runs" column lists every run in order, so the first is the cold-cache figure. The CPU column is the user +
system time of each tool's whole process tree (launcher and ranks), median of --reps: on a shared machine it
moves less with the load than the wall time, and the load averages before and after the run are reported. Run it
from a directory without a distfinalize/ package in it (python -m puts the current directory first).

Both checkouts' packages are byte-compiled first, as `pip install` does: an editable install run with
PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module of distfinalize from source in every process (about
0.07 s each). "torchrun" is `torchrun --standalone` (a c10d rendezvous, whose first round starts after a random
0-0.3 s wait); "torchrun, static" is `torchrun --master-port PORT` on the same node (torchrun's static rendezvous).
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import sys
from datetime import date
from pathlib import Path

from measure import finalize_cmd, free_port, run_measured, torchrun
from run import append_section, same_tensors

HERE = Path(__file__).resolve().parent


def tools(ckpt: Path, out: Path, shard: str, label: str, with_run: bool = True) -> dict[str, list[str]]:
    """The distfinalize commands timed; `with_run`: the checkout has `distfinalize run`."""
    py = sys.executable
    run2 = [py, "-m", "distfinalize", "run", "--nproc-per-node", "2", str(ckpt), str(out), "-q"]
    torchrun2 = finalize_cmd(2, ckpt, out, "--max-shard-size", shard)
    static = [*torchrun2[:3], f"--master-port={free_port()}", *torchrun2[4:]]  # instead of --standalone
    found = {
        f"{label}distfinalize, --help": [py, "-m", "distfinalize", "--help"],
        f"{label}distfinalize, 1 process": finalize_cmd(1, ckpt, out, "--max-shard-size", shard, plain=True),
        f"{label}distfinalize, 2 ranks, torchrun": torchrun2,
        f"{label}distfinalize, 2 ranks, torchrun, static": static,
    }
    if with_run:
        found[f"{label}distfinalize run, 2 ranks"] = [*run2, "--max-shard-size", shard]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=0.28)
    parser.add_argument("--save-ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-shard-size", default="256MB")
    parser.add_argument("--baseline", type=Path, help="another checkout of distfinalize to time in the same run")
    parser.add_argument("--work", type=Path, default=Path("startup-work"))
    parser.add_argument("--report", type=Path, default=HERE / "results" / f"{date.today()}-startup.md")
    args = parser.parse_args()
    work = args.work.resolve()
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTFINALIZE_CACHE_DIR=str(work / "spec-cache"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    made = run_measured(
        torchrun(args.save_ranks, str(HERE / "make_synthetic.py"), str(work / "src"), "--size-gib", str(args.size_gib)),
        env,
    )
    if made.returncode:
        sys.exit(made.output)
    ckpt, out, ref = work / "src" / "ckpt", work / "out", work / "reference"
    gib = sum(p.stat().st_size for p in ckpt.glob("*.distcp")) / 2**30
    peer = "dcp.load + save_file"
    cmds = {peer: [sys.executable, str(HERE / "peers.py"), "dcp-load-save-file", str(ckpt), str(ref)]}
    cmds[peer] += ["--max-shard-size", args.max_shard_size]
    envs = dict.fromkeys(cmds, env)
    for name, cmd in tools(ckpt, out, args.max_shard_size, "").items():
        cmds[name], envs[name] = cmd, env
    for package in (HERE.parent / "distfinalize", *([args.baseline / "distfinalize"] if args.baseline else [])):
        compileall.compile_dir(package, quiet=1)  # what pip install does; see the module docstring
    if args.baseline is not None:
        base_env = dict(env, PYTHONPATH=str(args.baseline.resolve()))
        with_run = (args.baseline / "distfinalize" / "commands" / "run.py").is_file()
        for name, cmd in tools(ckpt, out, args.max_shard_size, "baseline: ", with_run).items():
            cmds[name], envs[name] = cmd, base_env
    walls: dict[str, list[float]] = {name: [] for name in cmds}
    cpus: dict[str, list[float]] = {name: [] for name in cmds}
    rss: dict[str, int] = dict.fromkeys(cmds, 0)
    load_before = os.getloadavg()
    for rep in range(args.reps):
        for name, cmd in cmds.items():
            shutil.rmtree(out if name != peer else ref, ignore_errors=True)
            result = run_measured(cmd, envs[name])
            if result.returncode:
                sys.exit(f"{name} failed:\n{result.output[-4000:]}")
            if name != peer and "--help" not in cmd and not same_tensors(ref, out):
                sys.exit(f"{name} wrote different tensors from the peer")
            walls[name].append(result.wall_s)
            cpus[name].append(result.cpu_s)
            rss[name] = max(rss[name], result.peak_rss_bytes)
            print(f"rep {rep + 1}: {name:45} {result.wall_s:6.2f} s, CPU {result.cpu_s:6.2f} s", flush=True)
    load_after = os.getloadavg()
    base, base_cpu = statistics.median(walls[peer]), statistics.median(cpus[peer])
    table = [
        "| tool | seconds (median) | runs | time vs peer | CPU s (median) | CPU vs peer | peak RSS / process (GiB) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, times in walls.items():
        median, cpu = statistics.median(times), statistics.median(cpus[name])
        runs = ", ".join(f"{t:.2f}" for t in times)
        table.append(
            f"| {name} | {median:.2f} | {runs} | {median / base:.2f} | {cpu:.2f} | {cpu / base_cpu:.2f} | "
            f"{rss[name] / 2**30:.2f} |"
        )
    loads = " / ".join(f"{x:.1f}" for x in (*load_before, *load_after))
    facts = [
        f"checkpoint: {gib:.2f} GiB bf16, saved by {args.save_ranks} ranks, warm",
        f"reps: {args.reps}",
        f"load average (1, 5, 15 min) before / after: {loads}",
    ]
    figures = {
        "medians_s": {n: statistics.median(t) for n, t in walls.items()},
        "cpu_medians_s": {n: statistics.median(t) for n, t in cpus.items()},
    }
    rows = []
    append_section(args.report, "start-up", facts, table, figures, rows)


if __name__ == "__main__":
    main()
