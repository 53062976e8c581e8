"""Wall time of a finalize with more and more ranks over one tiny checkpoint, against the launch alone.

    python benchmarks/ranks.py [--save-ranks 32] [--ranks 4,16,32] [--reps 3] [--work /tmp/ranks-work]

The checkpoint is the repo's FSDP2 trainer's (examples/trainers/fsdp2.py, a 2-layer Llama) saved by
`--save-ranks` ranks, so it has that many `.distcp` writers. Each rank count runs twice under torchrun on this
machine: the finalize (`--max-shard-size 8KB`, so that every rank writes files), and a baseline that only starts
the same number of processes, imports distfinalize and forms the gloo group. On a tiny checkpoint the difference
is the coordination: the steps' agreements, the gather of results, the commit; a cost in ranks x ranks would
make it grow faster than the rank count. Reports the median of `--reps` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "import distfinalize.pipeline, torch.distributed as d; d.init_process_group('gloo'); d.barrier()"


def torchrun(nproc: int, *args: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    start = time.monotonic()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save-ranks", type=int, default=32)
    parser.add_argument("--ranks", default="4,16,32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ranks-work"))
    args = parser.parse_args()
    run = args.work / "untied-model"
    if not (run / "reference.pt").is_file():
        trainer = str(REPO / "examples" / "trainers" / "fsdp2.py")
        torchrun(args.save_ranks, trainer, str(args.work), "--variant", "untied-model", "--steps", "1")
    rows = ["| ranks | finalize s | launch + group only s | difference s |", "|---:|---:|---:|---:|"]
    for nproc in map(int, args.ranks.split(",")):
        final, base = [], []
        for _ in range(args.reps):
            dest = args.work / "model"
            shutil.rmtree(dest, ignore_errors=True)
            final.append(torchrun(nproc, "-m", "distfinalize", str(run), str(dest), "--max-shard-size", "8KB"))
            base.append(torchrun(nproc, "--no-python", sys.executable, "-c", BASELINE))
        f, b = statistics.median(final), statistics.median(base)
        rows.append(f"| {nproc} | {f:.1f} | {b:.1f} | {f - b:.1f} |")
        print(rows[-1], flush=True)
    print(f"checkpoint saved by {args.save_ranks} ranks; median of {args.reps}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
