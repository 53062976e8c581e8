"""Benchmark distfinalize against the tools users run today, in one run, on one synthetic checkpoint.

    python benchmarks/run.py --size-gib 8 --save-ranks 8 [--ranks 1,2,4,8] [--strategies read,exchange] [--no-fp8]
        [--streams 8] [--reps 3] [--work bench-work] [--report MD]

1. builds a synthetic Llama-shaped bf16 DCP checkpoint (DTensor Shard(0), like FSDP2) with --save-ranks ranks;
2. measures the machine's limits: write with fsync and cold read over 1 and --streams parallel streams (as
   many bytes as the checkpoint, capped at 4 GiB), and pinned host<->device copies when there is a GPU;
3. times, with a cold page cache (the checkpoint's pages evicted) and then warm:
   distfinalize with each of --ranks (capped by the cores) and --strategies, unquantized and `--quantize fp8`,
   `dcp_to_torch_save` + sharding + save_file, `dcp.load` into preallocated tensors + save_file, and
   `accelerate merge-weights`;
4. checks that every output holds the same tensors, bit for bit (fp8 outputs against each other);
5. prints a table and appends it, with the command, the machine and the date, to --report (default:
   benchmarks/results/DATE-dcp.md).

Reported: wall seconds, GiB/s (checkpoint bytes / wall), peak RSS of the biggest process of the run
(torchrun's ranks included), the time ratio to the best peer (< 1 means faster), and the ratio to the disk
floor: the larger of reading the checkpoint at the best cold-read bandwidth and writing the output at the best
write bandwidth measured in the same run.
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
from datetime import date
from pathlib import Path

import torch
from measure import Measurement, disk_write_read, evict, finalize_cmd, pinned_copy, run_measured, torchrun
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
PEERS = {
    "dcp_to_torch_save + save_file": "torch-save",
    "dcp.load + save_file": "dcp-load",
    "accelerate merge-weights": "accelerate",
}


@dataclass(frozen=True)
class Tool:
    name: str
    cmd: list[str]
    peer: bool


def tools(
    ckpt: Path,
    out: Path,
    ranks: list[int],
    shard: str,
    strategies: list[str] = ("read",),
    quantize: tuple[bool, ...] = (False,),
    peers: tuple[str, ...] = PEERS,
    one_process: bool = False,
) -> list[Tool]:
    """distfinalize with every world size, strategy and (un)quantized, then the peers. With `one_process`, the
    1-rank run is a plain `python -m distfinalize` (no torchrun)."""
    py = sys.executable
    found = [
        Tool(
            f"distfinalize, {'1 process' if n == 1 and one_process else f'{n} rank(s)'}, {strategy}"
            + (", fp8" if fp8 else ""),
            finalize_cmd(
                n,
                ckpt,
                out,
                "--max-shard-size",
                shard,
                "--strategy",
                strategy,
                *(["--quantize", "fp8"] if fp8 else []),
                plain=n == 1 and one_process,
            ),
            False,
        )
        for fp8 in quantize
        for strategy in strategies
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
    return [t for t in found if not t.peer or PEERS[t.name] in peers]


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


def median_run(results: list[Measurement]) -> Measurement:
    """The run of median wall time (the lower middle one for an even count), with the highest peak RSS seen."""
    ordered = sorted(results, key=lambda m: m.wall_s)
    middle = ordered[(len(ordered) - 1) // 2]
    return Measurement(middle.wall_s, max(m.peak_rss_bytes for m in results), middle.returncode, middle.output)


def append_section(report: Path, title: str, facts: list[str], table: list[str], figures: dict, rows: list) -> None:
    """Print the table and append a dated section (machine, facts, table, every run as JSON) to `report`."""
    runs = [
        {"cache": c, "tool": n, "wall_s": round(m.wall_s, 3), "peak_rss_bytes": m.peak_rss_bytes} for c, n, m in rows
    ]
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
    parser.add_argument("--ranks", default="1,2,4,8", help="distfinalize world sizes (capped by the cores)")
    parser.add_argument("--strategies", default="read,exchange", help="comma-separated --strategy values")
    parser.add_argument("--no-fp8", action="store_true", help="skip the --quantize fp8 runs")
    parser.add_argument("--streams", type=int, default=8, help="parallel streams of the disk probe")
    parser.add_argument("--max-shard-size", default="256MB")
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--report", type=Path, default=HERE / "results" / f"{date.today()}-dcp.md")
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--reps", type=int, default=1, help="runs of each tool per cache state; the median is reported")
    parser.add_argument("--peers", default=",".join(PEERS.values()), help="comma-separated peers to time")
    parser.add_argument("--one-process", action="store_true", help="1 rank as `python -m distfinalize`, no torchrun")
    args = parser.parse_args()
    ranks = sorted({min(int(r), os.cpu_count() or 1) for r in args.ranks.split(",")})
    strategies = args.strategies.split(",")
    quantize = (False,) if args.no_fp8 else (False, True)
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
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.distcp"))
    gib = ckpt_bytes / 2**30
    probe = min(ckpt_bytes, 4 * 2**30)
    disk = {n: disk_write_read(work, probe, n) for n in sorted({1, args.streams})}
    write_bw = max(max(w, d or 0.0) for w, d, _ in disk.values())
    read_bw = max(r for _, _, r in disk.values())
    limits = [
        f"disk, {n} stream(s): write+fsync {w:.2f} GiB/s (page cache), "
        f"{f'{d:.2f} GiB/s' if d else 'n/a'} (O_DIRECT), cold read {r:.2f} GiB/s"
        for n, (w, d, r) in disk.items()
    ]
    copy = pinned_copy()
    if copy is not None:
        limits.append(f"pinned copy: host-to-device {copy[0]:.1f} GiB/s, device-to-host {copy[1]:.1f} GiB/s")
    print(f"checkpoint: {gib:.2f} GiB; " + "; ".join(limits))

    rows: list[tuple[str, str, Measurement]] = []
    floors: dict[str, float] = {}  # tool -> the disk's floor: max(read the input, write the output)
    references: dict[bool, Path] = {}  # quantized or not -> the first output, that every later one must match
    all_tools = tools(
        ckpt,
        work / "out",
        ranks,
        args.max_shard_size,
        strategies,
        quantize,
        tuple(args.peers.split(",")),
        args.one_process,
    )
    for cache in ["warm"] if args.warm_only else ["cold", "warm"]:
        for tool in all_tools:
            results = []
            for _ in range(args.reps):
                shutil.rmtree(work / "out", ignore_errors=True)
                if cache == "cold":
                    evict([ckpt])
                else:
                    evict([])  # warm: the previous run left the checkpoint in the page cache
                results.append(run_measured(tool.cmd, env))
                if results[-1].returncode:
                    sys.exit(f"{tool.name} failed:\n{results[-1].output[-4000:]}")
            result = median_run(results)
            fp8 = tool.name.endswith("fp8")
            if fp8 not in references:
                references[fp8] = work / f"reference-out-{fp8}"
                shutil.copytree(work / "out", references[fp8])
            elif not same_tensors(references[fp8], work / "out"):
                sys.exit(f"{tool.name} wrote different tensors from the first {'fp8 ' if fp8 else ''}run")
            out_bytes = sum(p.stat().st_size for p in (work / "out").glob("*.safetensors"))
            floors[tool.name] = max(ckpt_bytes / 2**30 / read_bw, out_bytes / 2**30 / write_bw)
            rows.append((cache, tool.name, result))
            print(
                f"{cache:4} {tool.name:40} {result.wall_s:7.2f} s {gib / result.wall_s:6.2f} GiB/s "
                f"peak RSS {result.peak_rss_bytes / 2**30:6.2f} GiB, {result.wall_s / floors[tool.name]:.2f}x floor"
            )
    peers = {t.name for t in all_tools if t.peer}
    table = [
        "| cache | tool | seconds | GiB/s | peak RSS / process (GiB) | time vs best peer | time vs disk floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for cache in dict.fromkeys(r[0] for r in rows):
        best = min(m.wall_s for c, n, m in rows if c == cache and n in peers)
        for c, name, m in rows:
            if c == cache:
                table.append(
                    f"| {c} | {name} | {m.wall_s:.2f} | {gib / m.wall_s:.2f} | "
                    f"{m.peak_rss_bytes / 2**30:.2f} | {m.wall_s / best:.2f} | {m.wall_s / floors[name]:.2f} |"
                )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    title = f"{gib:.2f} GiB bf16 checkpoint saved by {args.save_ranks} ranks"
    facts = [
        *(f"{limit} (same run)" for limit in limits),
        "disk floor: max(checkpoint bytes / best cold read, output bytes / best write+fsync, page cache or O_DIRECT)",
        f"command: `{command}`",
        f"output: `--max-shard-size {args.max_shard_size}`; all outputs checked bit-identical",
        f"each figure: the median of {args.reps} run(s) (peak RSS: the highest)",
    ]
    append_section(args.report, title, facts, table, {"checkpoint_bytes": ckpt_bytes}, rows)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
