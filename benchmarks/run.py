"""Benchmark distfinalize against the tools users run today, in one run, on one synthetic checkpoint.

    python benchmarks/run.py --size-gib 2 --save-ranks 4 --ranks 1,2 [--work bench-work] [--report BENCHMARKS.md]

1. builds a synthetic Llama-shaped bf16 DCP checkpoint (DTensor Shard(0), like FSDP2) with --save-ranks ranks;
2. measures the disk: write with fsync, and cold read, of a file as big as the checkpoint (capped at 4 GiB);
3. times, with a cold page cache (the checkpoint's pages evicted) and then warm:
   distfinalize with each of --ranks, `dcp_to_torch_save` + sharding + save_file, `dcp.load` into
   preallocated tensors + save_file, and `accelerate merge-weights`;
4. checks that every output holds the same tensors, bit for bit;
5. prints a table and appends it, with the command, the machine and the date, to --report.

Reported: wall seconds, GiB/s (checkpoint bytes / wall), peak RSS of the biggest process of the run
(torchrun's ranks included), and the time ratio to the best peer (< 1 means faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from measure import Measurement, disk_write_read, evict, run_measured
from safetensors import safe_open

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Tool:
    name: str
    cmd: list[str]
    peer: bool


def tools(ckpt: Path, out: Path, ranks: list[int], shard: str) -> list[Tool]:
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone"]
    found = [
        Tool(
            f"distfinalize, {n} rank(s)",
            [
                *torchrun,
                f"--nproc_per_node={n}",
                "-m",
                "distfinalize",
                str(ckpt),
                str(out),
                "--max-shard-size",
                shard,
                "--log-level",
                "warning",
            ],
            False,
        )
        for n in ranks
    ]
    found += [
        Tool(
            "dcp_to_torch_save + save_file",
            [py, str(HERE / "peers.py"), "dcp-to-torch-save", str(ckpt), str(out), "--max-shard-size", shard],
            True,
        ),
        Tool(
            "dcp.load + save_file",
            [py, str(HERE / "peers.py"), "dcp-load-save-file", str(ckpt), str(out), "--max-shard-size", shard],
            True,
        ),
        Tool(
            "accelerate merge-weights",
            [str(Path(sys.executable).with_name("accelerate")), "merge-weights", str(ckpt), str(out)],
            True,
        ),
    ]
    return found


def read_all(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                tensors[name] = f.get_tensor(name)
    return tensors


def same_tensors(a: Path, b: Path) -> bool:
    x, y = read_all(a), read_all(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def append_section(report: Path, title: str, facts: list[str], table: list[str], figures: dict, rows: list) -> None:
    """Print the table and append a dated section (machine, facts, table, every run as JSON) to `report`."""
    runs = [{"cache": c, "tool": n, "wall_s": round(m.wall_s, 3), "peak_rss_bytes": m.peak_rss_bytes}
            for c, n, m in rows]  # fmt: skip
    section = [
        f"## {datetime.date.today().isoformat()}: {title}",
        "",
        f"- machine: {machine()}",
        *(f"- {fact}" for fact in facts),
        "",
        *table,
        "",
        "```json",
        json.dumps({**figures, "runs": runs}, indent=1),
        "```",
        "",
    ]
    print("\n".join(table))
    with open(report, "a") as f:
        f.write("\n".join(section) + "\n")


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = (
        int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        / 2**20
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, {gpu}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--save-ranks", type=int, default=4)
    parser.add_argument("--ranks", default="1,2", help="comma-separated distfinalize world sizes")
    parser.add_argument("--max-shard-size", default="256MB")
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--report", type=Path, default=HERE.parent / "BENCHMARKS.md")
    parser.add_argument("--warm-only", action="store_true")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    made = run_measured(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.save_ranks}",
            str(HERE / "make_synthetic.py"),
            str(work / "src"),
            "--size-gib",
            str(args.size_gib),
        ],
        env,
    )
    if made.returncode:
        sys.exit(made.output)
    ckpt = work / "src" / "ckpt"
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.distcp"))
    gib = ckpt_bytes / 2**30
    write_bw, read_bw = disk_write_read(work, min(ckpt_bytes, 4 * 2**30))
    print(f"checkpoint: {gib:.2f} GiB; disk: write+fsync {write_bw:.2f} GiB/s, cold read {read_bw:.2f} GiB/s")

    rows: list[tuple[str, str, Measurement]] = []
    reference: Path | None = None
    for cache in ["warm"] if args.warm_only else ["cold", "warm"]:
        for tool in tools(ckpt, work / "out", ranks, args.max_shard_size):
            shutil.rmtree(work / "out", ignore_errors=True)
            if cache == "cold":
                evict([ckpt])
            else:
                evict([])  # warm: the previous run left the checkpoint in the page cache
            result = run_measured(tool.cmd, env)
            if result.returncode:
                sys.exit(f"{tool.name} failed:\n{result.output[-4000:]}")
            if reference is None:
                reference = work / "reference-out"
                shutil.copytree(work / "out", reference)
            elif not same_tensors(reference, work / "out"):
                sys.exit(f"{tool.name} wrote different tensors from {rows[0][1]}")
            rows.append((cache, tool.name, result))
            print(
                f"{cache:4} {tool.name:34} {result.wall_s:7.2f} s {gib / result.wall_s:6.2f} GiB/s "
                f"peak RSS {result.peak_rss_bytes / 2**30:6.2f} GiB"
            )
    peers = {t.name for t in tools(ckpt, work / "out", ranks, args.max_shard_size) if t.peer}
    table = [
        "| cache | tool | seconds | GiB/s | peak RSS / process (GiB) | time vs best peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for cache in dict.fromkeys(r[0] for r in rows):
        best = min(m.wall_s for c, n, m in rows if c == cache and n in peers)
        for c, name, m in rows:
            if c == cache:
                table.append(
                    f"| {c} | {name} | {m.wall_s:.2f} | {gib / m.wall_s:.2f} | "
                    f"{m.peak_rss_bytes / 2**30:.2f} | {m.wall_s / best:.2f} |"
                )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    title = f"{gib:.2f} GiB bf16 checkpoint saved by {args.save_ranks} ranks"
    facts = [
        f"disk (same run): write + fsync {write_bw:.2f} GiB/s, cold read {read_bw:.2f} GiB/s",
        f"command: `{command}`",
        f"output: `--max-shard-size {args.max_shard_size}`; all outputs checked bit-identical",
    ]
    append_section(args.report, title, facts, table, {"checkpoint_bytes": ckpt_bytes}, rows)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
