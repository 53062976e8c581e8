"""Benchmark distfinalize against DeepSpeed's `zero_to_fp32`, in one run, on one ZeRO-3 checkpoint.

    python benchmarks/run_deepspeed.py --size-gib 1 --save-ranks 2 --ranks 1,2 [--steps 0] [--reps 3] [--work DIR]
        [--report MD] [--checkpoint OUT]

1. builds a DeepSpeed ZeRO-3 checkpoint of a Llama-shaped model of --size-gib GiB of bf16 weights, saved by
   --save-ranks ranks (benchmarks/make_deepspeed.py under torchrun; --steps training steps first, default none);
2. measures the disk: write with fsync, and cold read, of a file as big as the checkpoint (capped at 4 GiB);
3. times, with a cold page cache (the checkpoint's pages evicted) and then warm, each tool --reps times, the
   tools taking turns (the median is reported, with the highest peak RSS):
   `python -m deepspeed.utils.zero_to_fp32 CKPT OUT --safe_serialization --max_shard_size S` and
   `torchrun --nproc_per_node=K -m distfinalize CKPT OUT --dtype float32 --max-shard-size S` for K in --ranks;
4. checks that every output holds the same tensors as zero_to_fp32's first output, bit for bit;
5. prints a table and appends it, with the command, the machine and the date, to --report (default:
   benchmarks/results/DATE-deepspeed.md).

Reported: wall seconds, GiB/s (checkpoint bytes, i.e. the tag folder's files, / wall), peak RSS of the biggest
process of the run (torchrun's ranks included), and the time ratio to zero_to_fp32 (< 1 means faster).
Both tools write float32 (the ZeRO master weights) in shards of at most --max-shard-size.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from datetime import date
from pathlib import Path

from measure import Measurement, disk_write_read, evict, finalize_cmd, run_measured, torchrun
from run import HERE, Tool, append_section, median_run, same_tensors

ZERO_TO_FP32 = "zero_to_fp32"


def tools(ckpt: Path, out: Path, ranks: list[int], shard: str) -> list[Tool]:
    """zero_to_fp32 first (the reference output), then distfinalize with each world size in `ranks`."""
    py = sys.executable
    found = [
        Tool(
            ZERO_TO_FP32,
            [
                py,
                "-m",
                "deepspeed.utils.zero_to_fp32",
                str(ckpt),
                str(out),
                "--safe_serialization",
                "--max_shard_size",
                shard,
            ],
            True,
        )
    ]
    found += [
        Tool(
            f"distfinalize, {n} rank(s)",
            finalize_cmd(n, ckpt, out, "--dtype", "float32", "--max-shard-size", shard),
            False,
        )
        for n in ranks
    ]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="model size in bf16 GiB")
    parser.add_argument("--save-ranks", type=int, default=2, help="ranks of the DeepSpeed job that saves")
    parser.add_argument("--steps", type=int, default=0, help="training steps before saving (0: no Adam moments)")
    parser.add_argument("--ranks", default="1,2", help="comma-separated distfinalize world sizes")
    parser.add_argument("--max-shard-size", default="256MB")
    parser.add_argument("--work", type=Path, default=Path("bench-work") / "deepspeed")
    parser.add_argument("--report", type=Path, default=HERE / "results" / f"{date.today()}-deepspeed.md")
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (checkpoint and outputs)")
    parser.add_argument("--reps", type=int, default=1, help="runs of each tool per cache state; the median is reported")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="reuse make_deepspeed.py's OUT folder (its ds/ and config.json) instead of building",
    )
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    src = args.checkpoint.resolve() if args.checkpoint else work / "src"
    if args.checkpoint is None:
        made = run_measured(
            torchrun(
                args.save_ranks,
                str(HERE / "make_deepspeed.py"),
                str(src),
                "--size-gib",
                str(args.size_gib),
                "--steps",
                str(args.steps),
            ),
            env,
        )
        if made.returncode:
            sys.exit(made.output[-4000:])
        wrote = next((line for line in made.output.splitlines() if line.startswith("wrote ")), "")
        built = wrote.partition(": ")[2].rpartition(", ")[0]  # the model and job, without the path and the time
        build = f"built in {made.wall_s:.1f} s, peak RSS {made.peak_rss_bytes / 2**30:.2f} GiB / process"
        print(f"{wrote}\n{build}")
    else:
        built, build = f"reused from {src}", "not rebuilt"
    ckpt = src / "ds"
    tag = (ckpt / "latest").read_text().strip()
    ckpt_bytes = sum(p.stat().st_size for p in (ckpt / tag).iterdir() if p.is_file())
    gib = ckpt_bytes / 2**30
    buffered_bw, direct_bw, read_bw = disk_write_read(work, min(ckpt_bytes, 4 * 2**30))
    write_bw = max(buffered_bw, direct_bw or 0.0)
    print(f"checkpoint: {gib:.2f} GiB; disk: write+fsync {write_bw:.2f} GiB/s, cold read {read_bw:.2f} GiB/s")

    out = work / "out"
    rows: list[tuple[str, str, Measurement]] = []
    reference: Path | None = None
    largest_file = out_bytes = 0
    all_tools = tools(ckpt, out, ranks, args.max_shard_size)
    for cache in ["warm"] if args.warm_only else ["cold", "warm"]:
        results: dict[str, list[Measurement]] = {tool.name: [] for tool in all_tools}
        for rep in range(args.reps):  # tools take turns, so a change in the machine's load hits them alike
            for tool in all_tools:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # the previous run's dirty pages are written back now, not during this run
                if cache == "cold":
                    evict([ckpt])
                else:
                    evict([])  # warm: the previous run left the checkpoint in the page cache
                result = run_measured(tool.cmd, env)
                if result.returncode:
                    sys.exit(f"{tool.name} failed:\n{result.output[-4000:]}")
                results[tool.name].append(result)
                print(f"{cache:4} {tool.name:24} run {rep + 1}: {result.wall_s:7.2f} s", flush=True)
                if reference is None:
                    reference = work / "reference-out"
                    shutil.copytree(out, reference)
                    sizes = [p.stat().st_size for p in reference.glob("*.safetensors")]
                    largest_file, out_bytes = max(sizes), sum(sizes)
                elif rep == 0 and not same_tensors(reference, out):
                    sys.exit(f"{tool.name} wrote different tensors from {ZERO_TO_FP32}")
        for tool in all_tools:
            result = median_run(results[tool.name])
            rows.append((cache, tool.name, result))
            print(
                f"{cache:4} {tool.name:24} {result.wall_s:7.2f} s {gib / result.wall_s:6.2f} GiB/s "
                f"peak RSS {result.peak_rss_bytes / 2**30:6.2f} GiB"
            )

    table = [
        f"| cache | tool | seconds | GiB/s | peak RSS / process (GiB) | time vs {ZERO_TO_FP32} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for cache in dict.fromkeys(r[0] for r in rows):
        base = next(m.wall_s for c, n, m in rows if c == cache and n == ZERO_TO_FP32)
        for c, name, m in rows:
            if c == cache:
                table.append(
                    f"| {c} | {name} | {m.wall_s:.2f} | {gib / m.wall_s:.2f} | "
                    f"{m.peak_rss_bytes / 2**30:.2f} | {m.wall_s / base:.2f} |"
                )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    title = f"DeepSpeed ZeRO-3 checkpoint, {gib:.2f} GiB, saved by {args.save_ranks} ranks"
    facts = [
        f"disk (same run): write + fsync {write_bw:.2f} GiB/s, cold read {read_bw:.2f} GiB/s",
        f"command: `{command}`",
        f"checkpoint: {built}; tag folder {gib:.2f} GiB "
        f"({'no Adam moments' if args.steps == 0 else 'with Adam moments'}); {build}",
        f"output: float32, `--max-shard-size {args.max_shard_size}`, {out_bytes / 2**30:.2f} GiB, "
        f"largest file {largest_file / 2**30:.3f} GiB; all outputs checked bit-identical to {ZERO_TO_FP32}'s",
        "GiB/s: checkpoint (tag folder) bytes / wall seconds; peak RSS: the biggest process of the run",
        f"each figure: the median of {args.reps} run(s) (peak RSS: the highest)",
    ]
    figures = {"checkpoint_bytes": ckpt_bytes, "output_bytes": out_bytes, "largest_output_file_bytes": largest_file}
    append_section(args.report, title, facts, table, figures, rows)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
