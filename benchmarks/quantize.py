"""Benchmark --quantize: finalize one checkpoint with and without each recipe, and raw quantization throughput.

    python benchmarks/quantize.py --size-gib 2 --save-ranks 4 --ranks 2 [--recipes fp8,int4] [--report MD]

1. builds a synthetic Llama-shaped bf16 DCP checkpoint (make_synthetic.py) with --save-ranks ranks;
2. reads it once so every run finds it in the page cache;
3. times distfinalize (--ranks ranks, on the GPU when there is one: --device auto) without --quantize, then with
   each recipe, in one run, --finalize-reps times each (the median; peak RSS: the highest), and reports each
   recipe's time and peak RSS over the unquantized one's;
4. times Recipe.quantize alone on bf16 weights of --shape, on the CPU and on CUDA when present: GiB/s of bf16
   input (outputs left on the device; the finalize adds the copy back to the host);
5. prints the tables and appends them, with the command, the machine and the date, to --report (default:
   benchmarks/results/DATE-quantize.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import torch
from measure import Measurement, finalize_cmd, run_measured, torchrun
from run import append_section, median_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from distfinalize.transform.quant.recipes import RECIPES  # noqa: E402


def read_through(paths: list[Path]) -> None:
    """Bring files into the page cache (every run then reads from memory, as the warm runs of run.py do)."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass


def throughput(recipe: str, device: torch.device, shape: tuple[int, int], reps: int) -> float:
    """GiB/s of bf16 input through Recipe.quantize on `device` (after one warm-up call)."""
    quant = RECIPES[recipe]
    w = torch.randn(shape, dtype=torch.bfloat16, device=device)
    quant.quantize("x.weight", w, torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        quant.quantize("x.weight", w, torch.bfloat16)
    sync()
    return reps * w.numel() * w.element_size() / 2**30 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--save-ranks", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2, help="distfinalize world size")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated --quantize recipes")
    parser.add_argument("--max-shard-size", default="256MB")
    parser.add_argument("--shape", default="4096,14336", help="weight shape for the raw throughput")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the raw throughput loop")
    parser.add_argument(
        "--finalize-reps",
        type=int,
        default=1,
        help="finalize runs per recipe (and unquantized); the median is reported",
    )
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--report", type=Path, default=HERE / "results" / f"{date.today()}-quantize.md")
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    made = run_measured(
        torchrun(args.save_ranks, str(HERE / "make_synthetic.py"), str(work / "src"), "--size-gib", str(args.size_gib)),
        env,
    )
    if made.returncode:
        sys.exit(made.output)
    ckpt = work / "src" / "ckpt"
    files = sorted(ckpt.glob("*.distcp"))
    gib = sum(p.stat().st_size for p in files) / 2**30
    read_through(files)

    rows: list[tuple[str, str, Measurement]] = []
    results: dict[str | None, list[Measurement]] = {recipe: [] for recipe in [None, *recipes]}
    out = work / "out"
    for _ in range(args.finalize_reps):  # recipes take turns, so a change in the machine's load hits them alike
        for recipe in results:
            shutil.rmtree(out, ignore_errors=True)
            quantize = ["--quantize", recipe] if recipe else []
            cmd = finalize_cmd(args.ranks, ckpt, out, "--max-shard-size", args.max_shard_size, *quantize)
            results[recipe].append(run_measured(cmd, env))
            if results[recipe][-1].returncode:
                sys.exit(f"--quantize {recipe} failed:\n{results[recipe][-1].output[-4000:]}")
            print(f"{recipe or 'none':14} {results[recipe][-1].wall_s:7.2f} s", flush=True)
    for recipe, measured in results.items():
        rows.append(("warm", recipe or "none", median_run(measured)))
    base, base_rss = rows[0][2].wall_s, rows[0][2].peak_rss_bytes
    table = [
        "| --quantize | seconds | GiB/s (checkpoint) | time vs unquantized | peak RSS / process (GiB) | "
        "peak RSS vs unquantized |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {m.wall_s:.2f} | {gib / m.wall_s:.3g} | {m.wall_s / base:.2f} | "
            f"{m.peak_rss_bytes / 2**30:.2f} | {m.peak_rss_bytes / base_rss:.2f} |"
            for _, name, m in rows
        ),
    ]

    shape = tuple(int(d) for d in args.shape.split(","))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    speeds = {f"{r} on {d.type}": float(f"{throughput(r, d, shape, args.reps):.4g}") for r in recipes for d in devices}
    table += [
        "",
        f"Raw quantization throughput, bf16 {list(shape)} weights (GiB/s of bf16 input):",
        "",
        "| recipe | " + " | ".join(d.type for d in devices) + " |",
        "|---|" + "---:|" * len(devices),
        *(f"| {r} | " + " | ".join(f"{speeds[f'{r} on {d.type}']:.3g}" for d in devices) + " |" for r in recipes),
    ]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    facts = [
        f"command: `{command}`",
        f"each finalize figure: the median of {args.finalize_reps} run(s) (peak RSS: the highest)",
        f"{args.ranks} rank(s), device auto (the GPU when there is one), checkpoint in the page cache, "
        f"`--max-shard-size {args.max_shard_size}`, torch threads {torch.get_num_threads()} for the throughput",
    ]
    title = f"--quantize on a {gib:.2f} GiB bf16 checkpoint saved by {args.save_ranks} ranks"
    append_section(args.report, title, facts, table, {"throughput_gib_s": speeds}, rows)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
