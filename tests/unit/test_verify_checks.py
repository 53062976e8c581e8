"""verify's and inspect's pure parts: strict safetensors headers, bit comparisons, the index, checksum and dtype
rows, and the plan for another world size."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distfinalize.commands.checks import (
    FAIL,
    PASS,
    SKIP,
    Check,
    FileFindings,
    checksums_check,
    dtype_check,
    index_check,
)
from distfinalize.commands.compare import Expectation, compare, differing_elements
from distfinalize.commands.hfdir import (
    Header,
    HeaderError,
    Survey,
    TensorEntry,
    WeightFile,
    read_header,
    read_json_strict,
    survey,
)
from distfinalize.commands.inspect import replan
from distfinalize.commands.verify import format_table
from distfinalize.commit.manifest import recorded_quantization
from distfinalize.errors import DistfinalizeError
from distfinalize.plan import TensorPlan, build_plan
from distfinalize.sources import TensorMeta

TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}


def raw_file(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with exactly this header (no padding rules, duplicates allowed via raw text)."""
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_header_of_a_library_file(tmp_path: Path) -> None:
    save_file(TENSORS, tmp_path / "m.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "m.safetensors")
    assert header.metadata == {"format": "pt"}
    assert header.tensors == {"a": TensorEntry("F32", (2, 3), 24), "b": TensorEntry("BF16", (4,), 8)}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "the tensors cover 32 bytes but the file holds 31"),
        (lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "runs past"),
        (lambda p: p.write_bytes(b"abc"), "too short"),
        (lambda p: raw_file(p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "spans 4"),
        (lambda p: raw_file(p, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "starts at"),
        (lambda p: raw_file(p, {"x": {"dtype": "F32", "shape": "1"}}, b""), "malformed"),
        (lambda p: raw_file(p, [1, 2], b""), "not a JSON object"),
    ],
)
def test_broken_headers(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file(TENSORS, path)
    make(path)
    with pytest.raises(HeaderError, match=message):
        read_header(path)


def test_a_name_twice_is_an_error(tmp_path: Path) -> None:
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    body = f'{{"x":{entry},"x":{entry}}}'.encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    with pytest.raises(HeaderError, match="'x' appears twice"):
        read_header(path)
    (tmp_path / "i.json").write_text('{"weight_map": {"x": "a", "x": "b"}}')
    with pytest.raises(ValueError, match="appears twice"):
        read_json_strict(tmp_path / "i.json")


def test_bits_not_values() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    assert differing_elements(nan, nan.clone()) == (0, None)
    assert differing_elements(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])) == (1, 0)
    a = torch.arange(10, dtype=torch.bfloat16)
    b = a.clone()
    b[7] = 100
    assert differing_elements(a, b) == (1, 7)
    assert differing_elements(torch.tensor([True, False]), torch.tensor([True, True])) == (1, 1)


def test_compare_casts_and_first_rows() -> None:
    source = torch.randn(4, 3)
    plan = TensorPlan("w", "k", (4, 3), torch.float32, torch.bfloat16)
    want = Expectation(plan, rows_may_grow=True)
    assert compare({"w": source.to(torch.bfloat16)}, source, want) == (None, False)
    grown = torch.cat([source, torch.zeros(2, 3)]).to(torch.bfloat16)
    assert compare({"w": grown}, source, want) == (None, True)
    problem, _ = compare({"w": source}, source, want)
    assert problem == "is float32, expected bfloat16"
    fixed = Expectation(plan)
    problem, _ = compare({"w": grown}, source, fixed)
    assert problem == "has shape [6, 3], the source's is [4, 3]"
    off = source.to(torch.bfloat16).clone()
    off[2, 1] += 1
    problem, _ = compare({"w": off}, source, want)
    assert problem == "differs from the source in 1 of 12 element(s) (first at flat index 7)"


def test_compare_quantized_weight_within_its_bound() -> None:
    pytest.importorskip("torchao", reason="torchao is the `quant` extra: pip install 'distfinalize[quant]'")
    from distfinalize.transform.quant.recipes import get_recipe

    source = torch.randn(32, 16, dtype=torch.bfloat16)
    plan = TensorPlan("m.weight", "k", (32, 16), torch.bfloat16, torch.bfloat16, quant="fp8")
    outputs = get_recipe("fp8").quantize("m.weight", source)
    assert compare(outputs, source, Expectation(plan)) == (None, False)
    data = outputs["m.weight"].view(torch.uint8).clone()
    data[3, 5] ^= 0x08  # the lowest e4m3 exponent bit: the value doubles or halves, far beyond the bound
    problem, _ = compare({**outputs, "m.weight": data.view(torch.float8_e4m3fn)}, source, Expectation(plan))
    assert problem == (
        "dequantized, lies outside the fp8 rounding bound of the source in 1 of 512 element(s) (first at flat index 53)"
    )
    problem, _ = compare({**outputs, "m.weight_scale": outputs["m.weight_scale"].half()}, source, Expectation(plan))
    assert problem == "is stored with 'm.weight_scale' as float16 [32, 1]; the fp8 recipe stores it as float32 [32, 1]"


def test_recorded_quantization() -> None:
    assert recorded_quantization({"quantization": None}) is None
    recorded = recorded_quantization({"quantization": {"recipe": "int4", "ignore": ["a"]}})
    assert (recorded.recipe, recorded.ignore) == ("int4", ("a",))
    with pytest.raises(DistfinalizeError, match="records a quantization this version does not know"):
        recorded_quantization({"quantization": {"recipe": "fp3", "ignore": []}})


def finding(name: str, tensors: dict[str, tuple[str, int]], sha: str = "0" * 64, size: int = 100) -> FileFindings:
    header = Header({t: TensorEntry(code, (n,), n * 4) for t, (code, n) in tensors.items()}, {"format": "pt"})
    return FileFindings(name, 0, size, sha, header)


def found(files: list[FileFindings], index: dict | None, manifest: dict | None = None, missing=()) -> Survey:
    weights = tuple(WeightFile(f.name, Path(f.name), f.size, f.name) for f in files)
    return Survey(Path("dest"), weights, tuple(missing), index, None, manifest, None, {"dtype": "float32"})


def test_index_rows() -> None:
    files = [finding("m1", {"a": ("F32", 2), "b": ("F32", 3)}), finding("m2", {"c": ("F32", 1)})]
    index = {"metadata": {"total_size": 24}, "weight_map": {"a": "m1", "b": "m1", "c": "m2"}}
    assert index_check(found(files, index), files).status == PASS
    wrong = {"metadata": {"total_size": 25}, "weight_map": {"a": "m2", "b": "m1"}}
    row = index_check(found(files, wrong), files)
    assert row.status == FAIL
    assert "'a' is mapped to m2 but lives in m1" in row.detail
    assert "'c' (in m2) is not in the index" in row.detail
    assert "metadata.total_size is 25, the tensors hold 24 bytes" in row.detail
    twice = [*files, finding("m3", {"a": ("F32", 2)})]
    assert "'a' is in 2 files (m1, m3)" in index_check(found(twice, index), twice).detail
    single = [finding("model.safetensors", {"a": ("F32", 2)})]
    assert index_check(found(single, None), single).status == PASS
    assert "no model.safetensors.index.json, but 2 weight files" in index_check(found(files, None), files).detail


def test_checksum_rows() -> None:
    files = [finding("m1", {"a": ("F32", 2)}, sha="a" * 64), finding("m2", {"b": ("F32", 2)}, sha="b" * 64)]
    manifest = {"files": {"m1": {"size": 100, "sha256": "a" * 64}, "m2": {"size": 100, "sha256": "b" * 64}}}
    assert checksums_check(found(files, None, manifest), files).status == PASS
    changed = {"files": {"m1": {"size": 100, "sha256": "c" * 64}, "m3": {"size": 1, "sha256": "d" * 64}}}
    row = checksums_check(found(files, None, changed), files)
    assert row.status == FAIL
    assert "m1: sha256 differs from the manifest" in row.detail
    assert "m2 is not in the manifest" in row.detail and "m3, listed in the manifest, is missing" in row.detail
    assert checksums_check(found(files, None, None), files).status == SKIP


def test_dtype_row() -> None:
    files = [finding("m1", {"a": ("F32", 2), "ids": ("I64", 2)}), finding("m2", {"b": ("BF16", 2)})]
    row = dtype_check(found(files, None, {"files": {}, "dtype": "float32"}), files, torch.float32, "the manifest")
    assert row.status == FAIL and "m2: 1 floating tensor(s) are not float32, e.g. 'b' (bfloat16)" in row.detail
    assert dtype_check(found(files[:1], None), files[:1], torch.float32, "config.json").status == PASS
    disagree = found(files[:1], None, {"files": {}, "dtype": "bfloat16"})
    assert "says bfloat16 but config.json says float32" in dtype_check(disagree, files[:1], torch.float32, "x").detail


def test_survey_follows_symlinks_to_the_manifest_keys(tmp_path: Path) -> None:
    kept = tmp_path / "checkpoints" / "checkpoint-3"
    kept.mkdir(parents=True)
    save_file(TENSORS, kept / "model.safetensors")
    (tmp_path / "model.safetensors").symlink_to("checkpoints/checkpoint-3/model.safetensors")
    (tmp_path / "distfinalize-manifest.json").write_text(json.dumps({"files": {}}))
    result = survey(tmp_path)
    assert [(f.name, f.manifest_key) for f in result.files] == [
        ("model.safetensors", "checkpoints/checkpoint-3/model.safetensors")
    ]
    assert result.manifest == {"files": {}} and result.missing == ()


def test_table_and_verdict() -> None:
    checks = [Check("index", PASS, "ok"), Check("checksums", FAIL, "m1 differs"), Check("tokenizer", SKIP, "none")]
    text = format_table(checks, "title")
    assert text.splitlines()[-1] == "verify: FAILED (1 of 3 checks failed: checksums)"
    assert "checksums  fail    m1 differs" in text


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_replan_is_the_plan_for_that_world_size(world: int) -> None:
    tensors = [TensorMeta(f"k{i}", f"w{i}", (10 * (i % 4 + 1), 8), torch.float32) for i in range(12)]
    one = build_plan(tensors, dtype=torch.bfloat16, max_shard_size=1000, world_size=1)
    assert replan(one, world) == build_plan(tensors, dtype=torch.bfloat16, max_shard_size=1000, world_size=world)
