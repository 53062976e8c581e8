"""How distfinalize's coordination scales with ranks: pure, no I/O, on synthetic DCP metadata of real model shapes.

    python benchmarks/scale.py [--models llama-8b,...] [--ranks 8,64,512,4096] [--report benchmarks/results/X.md]

Each checkpoint is saved as FSDP2 saves it: every tensor in fp32, row-sharded (`Shard(0)`) over the same world
size that finalizes it, one `__<rank>_0.distcp` file per training rank. The script builds DCP's own `Metadata`
for it and runs the project's own code over it: the metadata loader rank 0 runs (`LightUnpickler`, `model_table`:
every chunk checked), the shared tensor table and the chunk lists each rank receives (`plan_parts`,
`reading_parts`), `build_plan`, and the exchange schedule rank 0 builds and splits (`exchange_schedule`,
`split_schedule`). It reports, per model and world size:

- the `.metadata` pickle rank 0 alone reads, and its CPU to load, check and tabulate it and free the loaded
  objects (measured on a sample of the tensors and scaled by the chunk count: both are linear in chunks;
  `benchmarks/metadata_load.py` breaks it down);
- the metadata every other rank receives: the tensor table broadcast once, plus the largest rank's own chunk lists
  (`--strategy read`: those of the tensors it writes; `exchange`: those stored in the files it reads, plus its
  part of the schedule where the schedule is built); and the bytes the step collectives move (the status byte
  vector of each step, the tokenizer outcome broadcast from rank 0, the write results gathered to rank 0);
- CPU per rank: a rank other than 0 unpickles what it receives and runs `build_plan`; rank 0 also loads the
  metadata and, for `exchange`, builds the whole schedule;
- max/mean output bytes per rank and ranks with nothing to write (either strategy: both follow one plan);
- exchange rounds against the ideal (the busiest rank's bytes over the round budget), when the schedule's chunk
  objects fit this machine (`--max-schedule-chunks`), and the most bytes of stored chunks larger than a round
  one rank holds between rounds (its reader sends them in slices of rows);
- the per-rank memory bound of the `read` write step: twice `--read-batch`, or the largest piece a rank holds
  (fp32 in and bf16 out) when that is larger: a tensor larger than the read batch moves in blocks of rows, and a
  block is at least one stored chunk (a tensor's rows over the saving ranks). With `exchange` it is twice
  `--read-batch` plus the chunks held.
"""

from __future__ import annotations

import argparse
import io
import math
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from distfinalize.artifacts.tokenizer import FinalTokenizer, TokenizerOutcome
from distfinalize.plan import Plan, build_plan
from distfinalize.prepare.chunks import plan_parts, reading_parts
from distfinalize.sources import TensorMeta
from distfinalize.sources.dcp import DcpSource, _model_name
from distfinalize.sources.dcp_metadata import LightUnpickler, no_gc
from distfinalize.sources.dcp_table import ChunkTable, DcpShared, StoredChunk, model_table
from distfinalize.write.rank import DataPath, WrittenFile, exchange_schedule, split_schedule

GB = 10**9
SAMPLE_CHUNKS = 200_000  # chunks of metadata built and timed per model and world size (the rest is scaled)


def llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> Iterator[tuple[str, tuple]]:
    head = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (heads * head, hidden)
        yield p + "self_attn.k_proj.weight", (kv * head, hidden)
        yield p + "self_attn.v_proj.weight", (kv * head, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * head)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def qwen3_moe() -> Iterator[tuple[str, tuple]]:
    """Qwen3-235B-A22B: 94 layers, 128 experts of 1536, GQA 64/4 heads of 128, q/k norms."""
    hidden, head, heads, kv, experts, inter, vocab = 4096, 128, 64, 4, 128, 1536, 151936
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(94):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (heads * head, hidden)
        yield p + "self_attn.k_proj.weight", (kv * head, hidden)
        yield p + "self_attn.v_proj.weight", (kv * head, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * head)
        yield p + "self_attn.q_norm.weight", (head,)
        yield p + "self_attn.k_norm.weight", (head,)
        yield p + "mlp.gate.weight", (experts, hidden)
        for e in range(experts):
            yield p + f"mlp.experts.{e}.gate_proj.weight", (inter, hidden)
            yield p + f"mlp.experts.{e}.up_proj.weight", (inter, hidden)
            yield p + f"mlp.experts.{e}.down_proj.weight", (hidden, inter)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def deepseek_v3() -> Iterator[tuple[str, tuple]]:
    """DeepSeek-V3 (671B): 61 layers (3 dense), MLA, 256 routed experts of 2048 and one shared (MTP layer left out)."""
    hidden, heads, vocab, experts, inter, dense = 7168, 128, 129280, 256, 2048, 18432
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(61):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_a_proj.weight", (1536, hidden)
        yield p + "self_attn.q_a_layernorm.weight", (1536,)
        yield p + "self_attn.q_b_proj.weight", (heads * 192, 1536)
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (576, hidden)
        yield p + "self_attn.kv_a_layernorm.weight", (512,)
        yield p + "self_attn.kv_b_proj.weight", (heads * 256, 512)
        yield p + "self_attn.o_proj.weight", (hidden, heads * 128)
        if i < 3:
            yield p + "mlp.gate_proj.weight", (dense, hidden)
            yield p + "mlp.up_proj.weight", (dense, hidden)
            yield p + "mlp.down_proj.weight", (hidden, dense)
        else:
            yield p + "mlp.gate.weight", (experts, hidden)
            yield p + "mlp.gate.e_score_correction_bias", (experts,)
            for e in [*range(experts), "shared"]:
                q = p + (f"mlp.experts.{e}." if e != "shared" else "mlp.shared_experts.")
                yield q + "gate_proj.weight", (inter, hidden)
                yield q + "up_proj.weight", (inter, hidden)
                yield q + "down_proj.weight", (hidden, inter)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


MODELS = {
    "llama-3.1-8b": lambda: llama(4096, 14336, 32, 32, 8, 128256),
    "llama-3.1-70b": lambda: llama(8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-405b": lambda: llama(16384, 53248, 126, 128, 8, 128256),
    "qwen3-235b-a22b": qwen3_moe,
    "deepseek-v3-671b": deepseek_v3,
}


def row_shards(rows: int, world: int) -> list[tuple[int, int]]:
    """(start, rows) of each non-empty Shard(0) piece, as DTensor splits dim 0 (torch.chunk: ceil-sized pieces)."""
    step = math.ceil(rows / world)
    return [(s, min(step, rows - s)) for s in range(0, rows, step)]


def fsdp2_metadata(shapes: list[tuple[str, tuple]], world: int) -> Metadata:
    """DCP's Metadata for these fp32 tensors saved by FSDP2 on `world` ranks (one data file per rank), laid out as
    DCP lays it out: each chunk list in rank order, its storage keys carrying the chunk's place in the list, and
    the storage index rank by rank (FileSystemWriter.finish merges the ranks' write results in rank order)."""
    sd, by_rank, ends = {}, [{} for _ in range(world)], [0] * world
    props = TensorProperties(dtype=torch.float32)
    for name, shape in shapes:
        chunks = []
        rest = math.prod(shape[1:])
        for rank, (start, rows) in enumerate(row_shards(shape[0], world)):
            offsets, sizes = (start, *[0] * (len(shape) - 1)), (rows, *shape[1:])
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            length = rows * rest * 4
            index = MetadataIndex(name, offsets, len(chunks) - 1)
            by_rank[rank][index] = _StorageInfo(f"__{rank}_0.distcp", ends[rank], length)
            ends[rank] += length
        sd[name] = TensorStorageMetadata(props, torch.Size(shape), chunks)
    storage = {index: info for part in by_rank for index, info in part.items()}
    return Metadata(sd, planner_data={n: (n,) for n, _ in shapes}, storage_data=storage)


def chunk_count(shapes: list[tuple[str, tuple]], world: int) -> int:
    return sum(len(row_shards(shape[0], world)) for _, shape in shapes)


def load_and_table(data: bytes) -> float:
    """Seconds for rank 0 to load and check a `.metadata` pickle and build its chunk table, as `read_table` does:
    the collector paused until the loaded objects are freed (their freeing counted, the table kept)."""
    start = time.process_time()
    with no_gc():
        table = model_table(LightUnpickler(io.BytesIO(data)).load(), Path("."), _model_name)
        elapsed = time.process_time() - start
        del table
    return elapsed


def shared_table(shapes: list[tuple[str, tuple]], world: int) -> DcpShared:
    """The tensor table rank 0 broadcasts (DcpSource.shared), without building any chunk."""
    tensors = tuple(TensorMeta(name, name, shape, torch.float32) for name, shape in shapes)
    return DcpShared(tensors, 0, {f"__{rank}_0.distcp": rank for rank in range(world)})


def chunks_of(name: str, shape: tuple, world: int, ranks: set[int] | None = None) -> tuple[StoredChunk, ...]:
    """A tensor's StoredChunks as fsdp2_metadata lays them out (byte offsets left 0: their size is what counts),
    only those in the files of `ranks` when given."""
    rest = math.prod(shape[1:])
    return tuple(
        StoredChunk(
            rank, (start, *[0] * (len(shape) - 1)), (rows, *shape[1:]), f"__{rank}_0.distcp", 0, rows * rest * 4
        )
        for rank, (start, rows) in enumerate(row_shards(shape[0], world))
        if ranks is None or rank in ranks
    )


def largest_read_part(plan: Plan, shapes: dict[str, tuple], world: int) -> ChunkTable:
    """The `--strategy read` part of the rank with the most chunks to receive (the chunk lists of its tensors)."""
    counts, keys = [0] * world, [set() for _ in range(world)]
    for f in plan.files:
        for t in f.tensors:
            keys[f.rank].add(t.source_key)
            counts[f.rank] += len(row_shards(shapes[t.source_key][0], world))
    busiest = counts.index(max(counts))
    return {key: chunks_of(key, shapes[key], world) for key in keys[busiest]}


def reading_part(shapes: dict[str, tuple], world: int) -> ChunkTable:
    """The `--strategy exchange` part of rank 0 (the largest: every tensor has a row shard in its file)."""
    return {key: chunks_of(key, shape, world, {0}) for key, shape in shapes.items()}


def tokenizer_bytes() -> int:
    """The tokenizer step's broadcast: the outcome as the other ranks receive it (FinalTokenizer's pickle)."""
    outcome = TokenizerOutcome(
        Path("/ckpt/tokenizer"),
        128257,
        added=(("<|pad|>", 128256),),
        special_ids={"bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128256},
        has_chat_template=True,
        vocab={f"tok{i}": i for i in range(128257)},  # rank 0 keeps it; the others do not get it
    )
    return len(pickle.dumps(FinalTokenizer(outcome)))


def results_bytes(plan: Plan, rank: int) -> int:
    files = [WrittenFile(f.filename, rank, f.nbytes, len(f.tensors), "0" * 64) for f in plan.files_for(rank)]
    return len(pickle.dumps(files))


def measure(model: str, world: int, args: argparse.Namespace) -> dict:
    shapes = list(MODELS[model]())
    total_chunks = chunk_count(shapes, world)
    sample, n = [], 0
    for name, shape in shapes:
        if n and n + len(row_shards(shape[0], world)) > SAMPLE_CHUNKS:
            break
        sample.append((name, shape))
        n += len(row_shards(shape[0], world))
    data = pickle.dumps(fsdp2_metadata(sample, world))
    scale = total_chunks / n
    metadata_bytes = int(len(data) * scale)
    load_s = load_and_table(data) * scale
    shared = pickle.dumps(shared_table(shapes, world))
    tensors = [TensorMeta(name, name, shape, torch.float32) for name, shape in shapes]
    start = time.process_time()
    plan = build_plan(tensors, dtype=torch.bfloat16, max_shard_size=args.max_shard_size, world_size=world)
    plan_s = time.process_time() - start
    by_key = dict(shapes)
    read_part = pickle.dumps(largest_read_part(plan, by_key, world))
    exchange_part = pickle.dumps(reading_part(by_key, world))
    start = time.process_time()
    pickle.loads(shared), pickle.loads(read_part)
    receive_s = time.process_time() - start
    per_rank = [0] * world
    largest = [0] * world
    for f in plan.files:
        for p in f.ranges:  # a file's pieces: one rank each (a tensor cut between ranks streams in row blocks)
            per_rank[p.rank] += p.nbytes
            largest[p.rank] = max([largest[p.rank], *(piece_bytes(t, world, args.read_batch) for t in f.tensors)])
    mean = sum(per_rank) / world
    rounds = ideal = alone = schedule_s = schedule_part = split_s = held = None
    read_bytes = len(read_part)
    if total_chunks <= args.max_schedule_chunks:
        with no_gc():
            full = DcpSource.__new__(DcpSource)  # rank 0's source, without a file: its table built from the shapes
            full.shared, full.tensors = shared_table(shapes, world), tuple(tensors)
            full.table = {name: chunks_of(name, shape, world) for name, shape in shapes}
            start = time.process_time()
            schedule = exchange_schedule(plan, full, DataPath("exchange", args.read_batch))  # every transfer
            parts = split_schedule(schedule, world)
            schedule_s = time.process_time() - start
            start = time.process_time()
            sizes = [len(pickle.dumps(p)) for p in plan_parts(plan)(full)]  # what rank 0 scatters (read)
            split_s = time.process_time() - start
            read_bytes = max(sizes)  # exact where every part is built; else the rank with the most chunks
            assert len(pickle.dumps(reading_parts(world)(full)[0])) == len(exchange_part)
            schedule_part = max(len(pickle.dumps(p)) for p in parts)
        rounds = len(schedule.rounds)
        sent, received = [0] * world, [0] * world
        for rnd in schedule.rounds:
            for t in rnd.transfers:
                sent[t.src] += t.nbytes
                received[t.dst] += t.nbytes
        ideal = max(1, math.ceil(max(*sent, *received) / schedule.budget))
        held = held_chunks(schedule)
        order = {rank: [p for rnd in schedule.rounds for p in rnd.pieces_for(rank)] for rank in range(world)}
        alone = max(packed_rounds([p.nbytes for p in order[rank]], schedule.budget) for rank in range(world))
    steps = 8  # prepare, tie check, tokenizer, stage, write, finish, commit; + the exchange plan
    status = world * steps
    results = [results_bytes(plan, r) for r in range(world)]
    return {
        "model": model,
        "ranks": world,
        "tensors": len(shapes),
        "chunks": total_chunks,
        "metadata_bytes": metadata_bytes,
        "received_read": len(shared) + read_bytes,
        "received_exchange": len(shared) + len(exchange_part) + (schedule_part or 0),
        "schedule_part": schedule_part,
        "collective_in_per_rank": status + tokenizer_bytes(),
        "collective_in_rank0": status + sum(results),
        "load_s": load_s,
        "receive_s": receive_s,
        "plan_s": plan_s,
        "split_s": split_s,
        "schedule_s": schedule_s,
        "max_over_mean": max(per_rank) / mean if mean else 0.0,
        "idle": sum(1 for b in per_rank if b == 0),
        "rounds": rounds,
        "ideal": ideal,
        "alone": alone,
        "memory_bound": max(2 * args.read_batch, max(largest)),
        "held": held,
    }


def held_chunks(schedule) -> int:
    """The most bytes of stored chunks one rank holds between exchange rounds: those larger than a round, which
    their reader reads whole and sends in slices of rows over several rounds, from the round of their first slice
    for a receiver to that of their last, where it lets go of them before reading the round's new chunks
    (feed.pack). One pass over the transfers."""
    spans: dict = {}
    for number, rnd in enumerate(schedule.rounds):
        for t in rnd.transfers:
            if t.rows is not None and t.chunk.nbytes > schedule.budget:
                spans[t.src, t.chunk, t.dst] = (spans.get((t.src, t.chunk, t.dst), (number,))[0], number)
    events: dict[int, list[tuple[int, int]]] = {}
    for (rank, chunk, _), (first, last) in spans.items():
        if first < last:
            events.setdefault(rank, []).extend([(first, chunk.nbytes), (last, -chunk.nbytes)])
    most = 0
    for changes in events.values():
        now = 0
        for _, delta in sorted(changes):  # in a round, a chunk let go before one is read
            now += delta
            most = max(most, now)
    return most


def piece_bytes(t, world: int, read_batch: int) -> int:
    """Bytes the largest piece of `t` holds in flight (source and output): the whole tensor within the read batch,
    else a block of rows of at most the read batch, or one stored chunk (its rows over `world`) when larger."""
    if t.source_nbytes <= read_batch:
        return t.source_nbytes + t.nbytes
    rows = t.shape[0]
    block = max(read_batch, -(-rows // world) * (t.source_nbytes // rows))
    return block + block * t.nbytes // t.source_nbytes


def packed_rounds(sizes: list[int], budget: int) -> int:
    """Rounds one rank needs for its own pieces alone (tensors, or blocks of rows of the larger ones), in order
    within `budget` (a bigger one alone): the fewest any schedule that moves those pieces can give it."""
    rounds, load = 0, budget
    for n in sizes:
        if load + n > budget and load > 0:
            rounds, load = rounds + 1, 0
        load += n
    return rounds


def size(n: float) -> str:
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def table(rows: list[dict]) -> str:
    head = (
        "| model | ranks | chunks | rank 0: .metadata read | rank 0: load CPU s | other ranks: metadata in (read) "
        "| other ranks: metadata in (exchange) | other ranks: CPU s | plan s | rank 0: split s (read) "
        "| rank 0: schedule s (exchange) | collectives in / rank | max/mean bytes | idle ranks "
        "| rounds / ideal / pieces alone | memory bound | exchange: chunks held |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        rounds = f"{r['rounds']} / {r['ideal']} / {r['alone']}" if r["rounds"] is not None else "n/a"
        opt = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
        exchange = size(r["received_exchange"]) + ("" if r["schedule_part"] is not None else " + schedule n/a")
        lines.append(
            f"| {r['model']} | {r['ranks']} | {r['chunks']:,} | {size(r['metadata_bytes'])} | {r['load_s']:.2f} "
            f"| {size(r['received_read'])} | {exchange} | {r['receive_s'] + r['plan_s']:.2f} | {r['plan_s']:.2f} "
            f"| {opt(r['split_s'])} | {opt(r['schedule_s'])} | {size(r['collective_in_per_rank'])} "
            f"| {r['max_over_mean']:.2f} | {r['idle']} | {rounds} | {size(r['memory_bound'])} "
            f"| {size(r['held']) if r['held'] is not None else 'n/a'} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ranks", default="8,64,512,4096")
    parser.add_argument("--read-batch", type=int, default=256 * 2**20, help="bytes (the --read-batch default)")
    parser.add_argument("--max-shard-size", type=int, default=5 * GB)
    parser.add_argument("--max-schedule-chunks", type=int, default=600_000, help="skip bigger exchange schedules")
    parser.add_argument("--report", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for world in map(int, args.ranks.split(",")):
            rows.append(measure(model, world, args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if args.report is not None:
        with args.report.open("a") as out:
            command = f"python benchmarks/scale.py --ranks {args.ranks}"
            out.write(f"\n## Scale (pure, no I/O)\n\n```\n{command}\n```\n\n{text}")


if __name__ == "__main__":
    main()
