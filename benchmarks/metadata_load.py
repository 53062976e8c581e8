"""Rank 0's `.metadata` load, step by step, on synthetic DCP metadata of a real model shape (benchmarks/scale.py's).

    python benchmarks/metadata_load.py [--model llama-3.1-405b] [--ranks 4096] [--sample 200000]

Builds DCP's own `Metadata` for a sample of the model's tensors saved by FSDP2 on `--ranks` ranks (laid out as
DCP writes it), pickles it as DCP does, and times, in CPU seconds per chunk (best of three, the cyclic collector
paused as the loaders pause it), then scaled to the whole model's chunk count:

- `pickle.loads` with DCP's own classes (what DCP's reader does), and freeing what it built;
- the light loader finalize uses: `LightUnpickler`, then `model_table` (the bulk check), the per-chunk check
  alone on the same objects (`checked_table`, what runs when the bulk check meets something irregular), and
  freeing the loaded objects;
- the strict loader (`load_metadata`: inspect, verify, --keep-optimizer) and the --keep-optimizer plan over it
  (`plan_optimizer_copy`, every entry taken as optimizer state).
"""

from __future__ import annotations

import argparse
import gc
import io
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import MODELS, fsdp2_metadata, row_shards

from distfinalize.commit.keep import plan_optimizer_copy
from distfinalize.sources.dcp import _model_name
from distfinalize.sources.dcp_metadata import LightUnpickler, load_metadata, no_gc
from distfinalize.sources.dcp_table import checked_table, model_table


def sample_of(model: str, world: int, limit: int) -> tuple[list[tuple[str, tuple]], int, int]:
    """The first tensors of `model` up to `limit` chunks, their chunk count, and the whole model's."""
    shapes = list(MODELS[model]())
    sample, n = [], 0
    for name, shape in shapes:
        k = len(row_shards(shape[0], world))
        if n and n + k > limit:
            break
        sample.append((name, shape))
        n += k
    return sample, n, sum(len(row_shards(shape[0], world)) for _, shape in shapes)


def best(steps: Callable[[], dict[str, float]], repeats: int = 3) -> dict[str, float]:
    """Each step's least CPU seconds over `repeats` runs of `steps`."""
    out: dict[str, float] = {}
    for _ in range(repeats):
        gc.collect()
        for step, seconds in steps().items():
            out[step] = min(seconds, out.get(step, seconds))
    return out


def measure(data: bytes, folder: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    clock = time.process_time
    with no_gc():
        start = clock()
        real = pickle.loads(data)
        times["pickle.loads, DCP's classes"] = clock() - start
        start = clock()
        del real
        times["  freeing them"] = clock() - start
        start = clock()
        loaded = LightUnpickler(io.BytesIO(data)).load()
        times["LightUnpickler load"] = clock() - start
        start = clock()
        shared, table = model_table(loaded, folder, _model_name)
        times["model_table (bulk check)"] = clock() - start
        start = clock()
        checked_table(loaded, list(shared.tensors), folder)
        times["  the per-chunk check instead"] = clock() - start
        start = clock()
        del loaded
        times["freeing the loaded objects"] = clock() - start
        del shared, table
        start = clock()
        strict = load_metadata(folder)
        times["load_metadata (strict loader)"] = clock() - start
        start = clock()
        plan_optimizer_copy(folder, strict, True)
        times["--keep-optimizer plan over it"] = clock() - start
        del strict
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-405b", choices=sorted(MODELS))
    parser.add_argument("--ranks", type=int, default=4096)
    parser.add_argument("--sample", type=int, default=200_000, help="chunks built and timed")
    args = parser.parse_args()
    sample, n, total = sample_of(args.model, args.ranks, args.sample)
    data = pickle.dumps(fsdp2_metadata(sample, args.ranks))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / ".metadata").write_bytes(data)
        times = best(lambda: measure(data, folder))
    print(f"{args.model} saved by {args.ranks} ranks: {n:,} of {total:,} chunks timed, {len(data) / n:.0f} B each")
    print(f"| step | µs per chunk | s at {total:,} chunks |\n|---|---:|---:|")
    for step, seconds in times.items():
        print(f"| {step.strip()} | {seconds / n * 1e6:.2f} | {seconds / n * total:.1f} |")


if __name__ == "__main__":
    main()
