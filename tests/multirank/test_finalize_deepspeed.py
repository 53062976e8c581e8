"""Finalize real DeepSpeed ZeRO 1/2/3 checkpoints with 1, 2 and 3 ranks and check every byte against DeepSpeed's
own `get_fp32_state_dict_from_zero_checkpoint`.

The checkpoints are trained here: `deepspeed.initialize` on 2 CPU/gloo ranks under torchrun (bf16, torch AdamW,
two param groups), two steps with a save after each, all variants in one torchrun job. Marked `dist`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import threading
from functools import cache
from pathlib import Path

import common
import pytest
import torch
from support import (
    TRAINERS,
    check_ok,
    env,
    error_lines,
    finalize,
    our_traceback,
    read_json,
    read_output,
    run_cli,
    torchrun,
    tree_digest,
)
from transformers import AutoConfig, AutoModelForCausalLM

from distfinalize.sources.deepspeed import source as ds_source
from distfinalize.sources.deepspeed.source import DeepSpeedSource

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip(
    "deepspeed", reason="needs deepspeed to train the checkpoints: pip install 'distfinalize[deepspeed]'"
)
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

pytestmark = pytest.mark.dist

STAGES = (1, 2, 3)
KINDS = ("tied", "untied", "frozen", "extras")
SHARD = "60KB"  # the tiny model is ~460 KB in float32: several files, more than one per rank
LATEST, EARLIER = "global_step2", "global_step1"


@pytest.fixture(scope="session")
def deepspeed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every variant of examples/trainers/deepspeed_zero.py, trained by one torchrun job on 2 ranks."""
    out = tmp_path_factory.mktemp("deepspeed")
    variants = [a for s in STAGES for k in KINDS for a in ("--variant", f"zero{s}-{k}")]
    check_ok(torchrun(2, TRAINERS / "deepspeed_zero.py", out, *variants, "--steps", "2"))
    return out


@cache
def zero_to_fp32(run: Path, tag: str = LATEST) -> dict[str, torch.Tensor]:
    """DeepSpeed's own reconstruction of the checkpoint (fp32 masters; frozen parameters as saved)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(run), tag=tag)


def expected_state(run: Path, tag: str = LATEST) -> dict[str, torch.Tensor]:
    """zero_to_fp32's tensors, plus the frozen parameters it leaves out of ZeRO-1 checkpoints.

    DeepSpeed records frozen parameters only from ZeRO 2 on; for ZeRO 1 they are in the module weights saved
    with the checkpoint, which reference.pt holds too (untrained, so exact).
    """
    state = dict(zero_to_fp32(run, tag))
    missing = {k: v for k, v in torch.load(run / "reference.pt").items() if k not in state}
    assert not missing or run.name == "zero1-frozen", sorted(missing)
    return {**state, **missing}


def model_logits(run: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Logits of the run's architecture loaded with `state` cast to `dtype`."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run), dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.eval()
    with torch.no_grad():
        return model(input_ids=common.reference_input()).logits


def check_tensors(dest: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype, tied: bool) -> None:
    """Every output tensor is the expected one cast to `dtype` (integers never cast); the index is exact."""
    tensors, where = read_output(dest)
    assert set(tensors) == set(expected) - ({"lm_head.weight"} if tied else set())
    for name, tensor in tensors.items():
        want = expected[name].to(dtype) if expected[name].is_floating_point() else expected[name]
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
    files = sorted(p.name for p in dest.glob("*.safetensors"))
    if len(files) > 1:
        index = read_json(dest / "model.safetensors.index.json")
        assert index["weight_map"] == where
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert sorted(set(where.values())) == files


def check_model(run: Path, dest: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """config.json says what was written; transformers loads DEST and gives the expected state's logits."""
    config = read_json(dest / "config.json")
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert config["tie_word_embeddings"] == read_json(run / "config.json")["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(input_ids=common.reference_input()).logits
    assert torch.equal(logits, model_logits(run, expected, dtype))


# Every stage and every kind is finalized once each by 1, 2 and 3 ranks (the checkpoints were saved by 2).
FLOAT32_CASES = [(s, k, 1 + (s + i) % 3) for s in STAGES for i, k in enumerate(("tied", "untied", "frozen"))]


@pytest.mark.parametrize(
    ("stage", "kind", "nproc"), FLOAT32_CASES, ids=[f"zero{s}-{k}-{n}ranks" for s, k, n in FLOAT32_CASES]
)
def test_float32_is_bit_identical_to_zero_to_fp32(
    deepspeed_runs: Path, tmp_path: Path, stage: int, kind: str, nproc: int
) -> None:
    """--dtype float32: every tensor is zero_to_fp32's; SRC is the DeepSpeed save dir (tag from `latest`)."""
    run = deepspeed_runs / f"zero{stage}-{kind}"
    dest = tmp_path / "out"
    result = check_ok(finalize(run, dest, "--max-shard-size", SHARD, "--dtype", "float32", nproc=nproc))
    assert f"deepspeed checkpoint {run / LATEST}" in result.stderr
    expected = expected_state(run)
    check_tensors(dest, expected, torch.float32, tied=kind == "tied")
    assert len(list(dest.glob("*.safetensors"))) > 1
    check_model(run, dest, expected, torch.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tensor_larger_than_the_read_batch_goes_in_row_blocks(
    deepspeed_runs: Path, tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--read-batch smaller than the biggest tensors: they are read, cast and written a block of rows at a time, so
    no buffer the reader allocates is bigger than the read batch, and the output is still zero_to_fp32's, bit for
    bit, in files that hash as they are written. In process (one rank), the reader's allocations counted."""
    run, dest, batch = deepspeed_runs / "zero3-untied", tmp_path / "out", 8 * 1024
    allocated: list[int] = []
    real = ds_source.DeepSpeedTensorReader._read

    def counting(self, layout, handles, stack):
        if threading.current_thread().name == "distfinalize-feed":  # the write step's reads (not the tie check's)
            allocated.append(sum(p.numel for p in layout.pieces) * layout.dtype.itemsize)
        return real(self, layout, handles, stack)

    monkeypatch.setattr(ds_source.DeepSpeedTensorReader, "_read", counting)
    check_ok(finalize(run, dest, "--dtype", dtype, "--read-batch", str(batch), "--max-shard-size", SHARD))
    biggest = max(t.nbytes for t in DeepSpeedSource(run / LATEST).tensors)
    assert biggest > 2 * batch  # the case at hand: several blocks
    assert 0 < max(allocated) <= batch
    expected = expected_state(run)
    check_tensors(dest, expected, getattr(torch, dtype), tied=False)
    check_ok(run_cli("verify", dest))  # every file's recorded sha256 (computed while writing) is the file's


@pytest.mark.parametrize(("variant", "nproc"), [("zero1-tied", 1), ("zero2-frozen", 2), ("zero3-untied", 1)])
def test_default_dtype_is_the_training_dtype(deepspeed_runs: Path, tmp_path: Path, variant: str, nproc: int) -> None:
    """No --dtype: bf16, as trained; the fp32 masters cast once are exactly the trained bf16 module's weights."""
    run = deepspeed_runs / variant
    dest = tmp_path / "out"
    check_ok(finalize(run, dest, "--max-shard-size", SHARD, nproc=nproc))
    expected = expected_state(run)
    tied = variant.endswith("-tied")
    check_tensors(dest, expected, torch.bfloat16, tied=tied)
    check_tensors(dest, torch.load(run / "reference.pt"), torch.bfloat16, tied=tied)
    check_model(run, dest, expected, torch.bfloat16)


@pytest.mark.parametrize(("stage", "nproc", "dtype"), [(1, 3, "float32"), (2, 1, "float32"), (3, 2, None)])
def test_padding_and_buffers(deepspeed_runs: Path, tmp_path: Path, stage: int, nproc: int, dtype: str | None) -> None:
    """Odd-sized parameters (ZeRO-3 partition padding, ZeRO 1/2 parameter alignment padding), an int64 and a
    float32 persistent buffer. No config.json: with --tensors-only, names are written as stored, and without --dtype
    the bf16 the DeepSpeed config records chooses the output dtype (integers are never cast)."""
    run = deepspeed_runs / f"zero{stage}-extras"
    assert not (run / "config.json").exists()
    dest = tmp_path / "out"
    args = ("--dtype", dtype) if dtype else ()
    result = check_ok(finalize(run, dest, "--max-shard-size", SHARD, "--tensors-only", *args, nproc=nproc))
    expected = expected_state(run)
    assert {"model.step_counter", "model.layers.1.scale"} <= set(expected)
    assert expected["model.norm.weight"].numel() % 2 == 1 and expected["model.step_counter"].dtype == torch.int64
    if dtype is None:
        assert "dtype: bfloat16 (the training dtype recorded in the checkpoint)" in result.stderr
    check_tensors(dest, expected, getattr(torch, dtype or "bfloat16"), tied=False)


def test_trainer_checkpoint_layout_and_tag(deepspeed_runs: Path, tmp_path: Path) -> None:
    """A Hugging Face Trainer output dir (checkpoint-N/ holding `latest` + global_stepN/): the latest checkpoint-N,
    then its `latest` tag; --tag picks the other one. SRC is left untouched."""
    src = tmp_path / "trainer-output"
    shutil.copytree(deepspeed_runs / "zero2-untied", src / "checkpoint-2")
    shutil.copytree(deepspeed_runs / "zero2-untied" / EARLIER, src / "checkpoint-1" / EARLIER)  # an older one
    (src / "checkpoint-1" / "latest").write_text(EARLIER)
    before = tree_digest(src)

    result = check_ok(finalize(src, tmp_path / "latest", "--dtype", "float32"))
    assert f"deepspeed checkpoint {src / 'checkpoint-2' / LATEST}" in result.stderr
    check_tensors(tmp_path / "latest", zero_to_fp32(src / "checkpoint-2", LATEST), torch.float32, tied=False)

    result = check_ok(finalize(src, tmp_path / "earlier", "--dtype", "float32", "--tag", EARLIER, nproc=2))
    assert f"deepspeed checkpoint {src / 'checkpoint-2' / EARLIER}" in result.stderr
    check_tensors(tmp_path / "earlier", zero_to_fp32(src / "checkpoint-2", EARLIER), torch.float32, tied=False)
    assert tree_digest(src) == before


def test_tensor_parallel_is_refused(deepspeed_runs: Path, tmp_path: Path) -> None:
    """An mp_rank_01 file (a tensor-parallel save): one error line naming what was found, nothing at DEST."""
    src = tmp_path / "tp"
    shutil.copytree(deepspeed_runs / "zero2-untied" / LATEST, src / LATEST)
    (src / "latest").write_text(LATEST)
    shutil.copy(src / LATEST / "mp_rank_00_model_states.pt", src / LATEST / "mp_rank_01_model_states.pt")
    dest = tmp_path / "out"
    result = finalize(src, dest, nproc=2)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "tensor-parallel DeepSpeed checkpoint" in lines[0] and "mp_rank_01_model_states.pt" in lines[0]
    assert str(src / LATEST) in lines[0]
    assert not our_traceback(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp"]


def test_exchange_strategy_is_refused(deepspeed_runs: Path, tmp_path: Path) -> None:
    """--strategy exchange moves DCP chunks; on a DeepSpeed checkpoint it is one clear error, nothing at DEST."""
    dest = tmp_path / "out"
    result = finalize(deepspeed_runs / "zero2-untied", dest, "--strategy", "exchange", nproc=2)
    assert result.returncode == 1 and not our_traceback(result.stderr)
    [line] = error_lines(result.stderr)
    assert "--strategy exchange supports DCP checkpoints, not deepspeed" in line and "--strategy read" in line
    assert not dest.exists()


@pytest.mark.parametrize("variant", ["zero1-frozen", "zero2-extras", "zero3-extras", "zero3-tied"])
def test_reader_reads_only_the_bytes_of_its_tensors(
    deepspeed_runs: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: each tensor costs exactly its own bytes (no padding, no neighbours, no whole partitions)."""
    source = DeepSpeedSource(deepspeed_runs / variant / LATEST)
    reads: list[int] = []
    real = ds_source.read_exact

    def counting(handle, offset: int, into: memoryview, path: Path) -> None:
        reads.append(len(into))
        real(handle, offset, into, path)

    monkeypatch.setattr(ds_source, "read_exact", counting)
    expected = expected_state(deepspeed_runs / variant)
    for meta in source.tensors:
        reads.clear()
        tensor = source.reader().read([meta.key])[meta.key]
        assert sum(reads) == meta.nbytes, meta.name
        assert torch.equal(tensor.to(expected[meta.name].dtype), expected[meta.name]), meta.name


@pytest.mark.parametrize("variant", ["zero2-extras", "zero3-untied"])
def test_row_blocks_read_only_their_bytes(deepspeed_runs: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: read_rows gives exactly those rows of zero_to_fp32's tensor, reading just their bytes."""
    source = DeepSpeedSource(deepspeed_runs / variant / LATEST)
    reads: list[int] = []
    real = ds_source.read_exact
    monkeypatch.setattr(ds_source, "read_exact", lambda h, o, into, p: reads.append(len(into)) or real(h, o, into, p))
    expected = expected_state(deepspeed_runs / variant)
    for meta in (m for m in source.tensors if len(m.shape) == 2 and m.shape[0] >= 3):
        rows = meta.shape[0]
        for start, stop in ((0, 1), (1, rows - 1), (rows - 2, rows)):
            reads.clear()
            block = source.reader().read_rows(meta.key, start, stop)
            assert sum(reads) == (stop - start) * meta.nbytes // rows, meta.name
            assert torch.equal(block.to(expected[meta.name].dtype), expected[meta.name][start:stop]), meta.name


def test_reading_needs_no_deepspeed(deepspeed_runs: Path, tmp_path: Path) -> None:
    """A process where `import deepspeed` fails still reads every tensor (DeepSpeed's pickled classes are stubbed)."""
    run, out = deepspeed_runs / "zero2-frozen", tmp_path / "read.pt"
    script = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from distfinalize.sources.deepspeed.source import DeepSpeedSource\n"
        f"source = DeepSpeedSource(Path({str(run / LATEST)!r}))\n"
        "assert 'deepspeed' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
        f"torch.save(source.reader().read([t.key for t in source.tensors]), {str(out)!r})\n"
    )
    check_ok(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), check=False))
    got, expected = torch.load(out), expected_state(run)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k].to(expected[k].dtype), expected[k]) for k in got)
