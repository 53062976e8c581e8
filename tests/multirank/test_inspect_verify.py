"""`distfinalize inspect` and `distfinalize verify` on real FSDP2 checkpoints and real finalize outputs, alone and
under torchrun. Expected numbers come from the trainer's reference state dict and DCP's own metadata reader.
Marked `dist`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import common
import pytest
import torch
from support import TIMEOUT_S, check_ok, env, error_lines, finalize, our_traceback, read_json, read_output, torchrun
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

pytestmark = pytest.mark.dist

SHARD = "60KB"  # ~400 KB of float32: 10 files, so ranks get several each
ROWS = (
    "manifest",
    "safetensors headers",
    "index",
    "checksums",
    "dtype",
    "source tensors",
    "config.json",
    "tokenizer",
    "generation_config.json",
)


def cli(command: str, *args: str | Path, nproc: int = 1) -> subprocess.CompletedProcess:
    """`distfinalize COMMAND ARGS` in a plain process, or under torchrun with `nproc` ranks."""
    if nproc > 1:
        return torchrun(nproc, "-m", "distfinalize", command, *args)
    cmd = [sys.executable, "-m", "distfinalize", command, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False)


def rows(result: subprocess.CompletedProcess) -> dict[str, dict]:
    """The checks of a `verify --json` run, by name."""
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def failed(result: subprocess.CompletedProcess) -> set[str]:
    return {name for name, row in rows(result).items() if row["status"] == "fail"}


def check_failure(result: subprocess.CompletedProcess, expected: set[str]) -> dict[str, dict]:
    """A failed verify: exit 1, exactly the `expected` rows failed, no traceback, no error line."""
    assert result.returncode == 1, result.stderr
    assert failed(result) == expected, result.stdout
    assert not our_traceback(result.stderr) and not error_lines(result.stderr)
    return rows(result)


@pytest.fixture(scope="module")
def finalized(fsdp2_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untied FSDP2 run with optimizer state, finalized by one process into 10 files."""
    dest = tmp_path_factory.mktemp("finalized") / "out"
    check_ok(finalize(fsdp2_runs / "untied-optim", dest, "--max-shard-size", SHARD))
    return dest


@pytest.fixture
def damaged(finalized: Path, tmp_path: Path) -> Path:
    """A copy of the finalized dir, for a test to break."""
    copy = tmp_path / "copy"
    shutil.copytree(finalized, copy, symlinks=True)
    return copy


# ------------------------------------------------------------------------------------------------ inspect


def expected_bytes(run: Path) -> dict[str, dict]:
    """Model and optimizer tensors and bytes, worked out two ways: from the trained model's full state dict
    (AdamW keeps exp_avg and exp_avg_sq like each parameter, and a float32 step scalar per parameter), and from
    the checkpoint's metadata, read with DCP's own reader (keys under model./optim.)."""
    reference = torch.load(run / "reference.pt")
    model = sum(t.numel() * t.element_size() for t in reference.values())
    by_reference = {
        "model": {"tensors": len(reference), "bytes": model},
        "optimizer": {"tensors": 3 * len(reference), "bytes": 2 * model + 4 * len(reference)},
    }
    metadata = FileSystemReader(str(run / "checkpoints" / "checkpoint-3")).read_metadata()
    by_metadata = {kind: {"tensors": 0, "bytes": 0} for kind in ("model", "optimizer")}
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            kind = "model" if key.startswith("model.") else "optimizer"
            by_metadata[kind]["tensors"] += 1
            by_metadata[kind]["bytes"] += entry.size.numel() * entry.properties.dtype.itemsize
    assert by_metadata == by_reference
    return by_reference


def test_inspect_fsdp2_with_optimizer(fsdp2_runs: Path, finalized: Path) -> None:
    run = fsdp2_runs / "untied-optim"
    want = expected_bytes(run)
    data = json.loads(check_ok(cli("inspect", run, "--json", "--max-shard-size", SHARD)).stdout)
    assert data["format"] == "dcp" and data["format_name"] == "DCP (torch.distributed.checkpoint)"
    assert data["checkpoint"] == str(run / "checkpoints" / "checkpoint-3")
    assert data["step"] == 3 and data["saved_world_size"] == 2
    for kind in ("model", "optimizer"):
        got = data["tensors"][kind]
        assert (got["tensors"], got["bytes"]) == (want[kind]["tensors"], want[kind]["bytes"]), kind
        assert got["by_dtype"] == {"float32": want[kind]["bytes"]}
    assert data["tensors"]["optimizer"]["objects"] == 12  # AdamW's hyperparameters, stored as bytes
    assert data["tensors"]["other"]["bytes"] == 0
    assert data["tensors"]["total"]["bytes"] == want["model"]["bytes"] + want["optimizer"]["bytes"]

    plan = data["plan"]  # exactly what the real finalize wrote
    tensors, where = read_output(finalized)
    written = sorted(p.name for p in finalized.glob("*.safetensors"))
    assert [f["file"] for f in plan["files"]] == written
    assert [f["tensors"] for f in plan["files"]] == [sum(w == name for w in where.values()) for name in written]
    assert plan["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert plan["world_size"] == 1 and plan["output_dtype"] == "float32"
    assert data["found"]["config.json"] == str(run / "config.json") and data["found"]["tokenizer"] == str(run)
    assert data["missing"] == ["chat template", "generation_config.json"]

    text = check_ok(cli("inspect", run, "--max-shard-size", SHARD, "--world-size", "3")).stdout
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "DCP" in lines["format"] and lines["step"].split()[1] == "3" and "2 rank(s)" in lines["saved"]
    assert f"{want['model']['bytes']} B" in lines["model"] and f"{want['optimizer']['bytes']} B" in lines["optimizer"]
    assert f"{len(written)} file(s)" in lines["plan"] and "3 rank(s)" in lines["plan"]
    assert "rank 2:" in text and "missing           chat template" in text


def test_inspect_under_torchrun(fsdp2_runs: Path) -> None:
    """2 ranks: the JSON is printed once, and the plan is for the job's 2 ranks."""
    run = fsdp2_runs / "untied-optim"
    result = check_ok(cli("inspect", run, "--json", "--max-shard-size", SHARD, nproc=2))
    data = json.loads(result.stdout)  # one document: rank 1 printed nothing
    assert data["plan"]["world_size"] == 2 and len(data["plan"]["bytes_per_rank"]) == 2
    assert {f["rank"] for f in data["plan"]["files"]} == {0, 1}
    assert data["tensors"]["model"]["bytes"] == expected_bytes(run)["model"]["bytes"]


def test_inspect_missing_files_and_model_dirs(fsdp2_runs: Path, finalized: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(fsdp2_runs / "untied-model" / "checkpoints", bare / "checkpoints")
    data = json.loads(check_ok(cli("inspect", bare, "--json")).stdout)
    assert data["missing"] == ["config.json", "tokenizer", "chat template", "generation_config.json"]
    assert data["tensors"]["optimizer"]["tensors"] == 0 and data["tensors"]["model"]["tensors"] == 21

    data = json.loads(check_ok(cli("inspect", finalized, "--json")).stdout)
    assert data["format"] == "hf" and data["plan"] is None and data["step"] == 3
    assert data["tensors"]["model"]["tensors"] == 21 and data["missing"] == ["chat template"]
    assert data["manifest"]["path"] == "checkpoints/checkpoint-3"  # relative to SRC: DEST names no local path

    result = cli("inspect", tmp_path / "nothing")
    assert result.returncode == 1 and error_lines(result.stderr) == [
        line for line in result.stderr.splitlines() if line.strip()
    ]
    assert "source does not exist" in result.stderr and not our_traceback(result.stderr)


# ------------------------------------------------------------------------------------------------ verify


def test_verify_passes_on_a_fresh_finalize(fsdp2_runs: Path, finalized: Path) -> None:
    result = check_ok(cli("verify", finalized, "--source", fsdp2_runs / "untied-optim"))
    table = result.stdout.splitlines()
    assert table[-1] == "verify: passed (9 passed, 0 skipped)"
    assert [line.split("  ")[0] for line in table[2:-1]] == list(ROWS)
    assert "21 tensors bit-exact against dcp checkpoint" in result.stdout


def test_verify_under_torchrun_with_a_kept_checkpoint(fsdp2_runs: Path, tmp_path: Path) -> None:
    """Finalized by 2 ranks with --keep-checkpoint (weights behind symlinks), verified by 2 ranks."""
    run, dest = fsdp2_runs / "tied-optim", tmp_path / "out"
    check_ok(finalize(run, dest, "--max-shard-size", SHARD, "--keep-checkpoint", nproc=2))
    result = check_ok(cli("verify", dest, "--source", run, "--json", nproc=2))
    data = json.loads(result.stdout)
    assert data["passed"] and all(c["status"] == "pass" for c in data["checks"])
    assert {f["rank"] for f in data["files"]} == {0, 1}
    assert rows(result)["source tensors"]["detail"].startswith("20 tensors bit-exact")  # lm_head is tied


def test_verify_compares_the_first_rows_of_grown_embeddings(fsdp2_runs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-optim", run)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (run / name).unlink()
    common.build_tokenizer(pad=False).save_pretrained(run)  # finalize adds <|pad|>: 257 rows, padded to 264
    dest = tmp_path / "out"
    check_ok(finalize(run, dest, "--pad-vocab-to-multiple-of", "8", "--max-shard-size", SHARD))
    result = check_ok(cli("verify", dest, "--source", run, "--json"))
    assert "2 embedding(s) with new token rows" in rows(result)["source tensors"]["detail"]


def flip_byte_in_a_tensor(dest: Path) -> tuple[str, str]:
    """Flip one bit in the middle of the first tensor of a file; returns (file, tensor)."""
    index = read_json(dest / "model.safetensors.index.json")
    name, file = sorted(index["weight_map"].items())[3]
    path = dest / file
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + header_len])[name]
    start, end = entry["data_offsets"]
    data[8 + header_len + (start + end) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    return file, name


@pytest.mark.parametrize("nproc", [1, 2])
def test_verify_finds_a_flipped_byte(fsdp2_runs: Path, damaged: Path, nproc: int) -> None:
    file, name = flip_byte_in_a_tensor(damaged)
    result = cli("verify", damaged, "--source", fsdp2_runs / "untied-optim", "--json", nproc=nproc)
    found = check_failure(result, {"checksums", "source tensors"})
    assert found["checksums"]["detail"] == f"{file}: sha256 differs from the manifest (the file changed after finalize)"
    assert f"{file}: {name!r} differs from the source in 1 of" in found["source tensors"]["detail"]


def test_verify_finds_a_deleted_file(damaged: Path) -> None:
    victim = sorted(damaged.glob("*.safetensors"))[4].name
    (damaged / victim).unlink()
    result = cli("verify", damaged)
    assert result.returncode == 1 and not our_traceback(result.stderr)
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert "fail" in lines["index"] and f"{victim}, named by the index, is missing" in lines["index"]
    assert "fail" in lines["checksums"] and f"{victim}, listed in the manifest, is missing" in lines["checksums"]
    assert result.stdout.splitlines()[-1] == "verify: FAILED (2 of 9 checks failed: index, checksums)"


def edit_index(dest: Path, how: str) -> None:
    path = dest / "model.safetensors.index.json"
    index = read_json(path)
    name = sorted(index["weight_map"])[0]
    if how == "drop":
        del index["weight_map"][name]
    elif how == "total_size":
        index["metadata"]["total_size"] += 4
    text = json.dumps(index, indent=2)
    if how == "twice":  # a tensor named twice: json.loads would silently keep one
        first = text.index(f'"{name}"')
        text = text[:first] + f'"{name}": "model-00001-of-00010.safetensors",\n    ' + text[first:]
    path.write_text(text)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("drop", "is not in the index"),
        ("total_size", "metadata.total_size is 476420, the tensors hold 476416 bytes"),
        ("twice", "appears twice"),
    ],
)
def test_verify_finds_an_edited_index(damaged: Path, how: str, message: str) -> None:
    edit_index(damaged, how)
    found = check_failure(cli("verify", damaged, "--json"), {"index"})
    assert message in found["index"]["detail"]


def test_verify_without_manifest_or_config(fsdp2_runs: Path, damaged: Path) -> None:
    (damaged / "distfinalize-manifest.json").unlink()
    (damaged / "config.json").unlink()
    found = check_failure(
        cli("verify", damaged, "--source", fsdp2_runs / "untied-optim", "--json"), {"manifest", "config.json"}
    )
    assert found["checksums"]["status"] == "skip" and found["dtype"]["status"] == "skip"
    assert found["source tensors"]["status"] == "pass"  # names mapped through the source's own config.json


def test_verify_with_another_dtype(fsdp2_runs: Path, tmp_path: Path) -> None:
    """A bfloat16 finalize is a correct output (the source cast to bfloat16, bit for bit), but not a float32 one;
    and bfloat16 weights under a float32 DEST's manifest and config fail even with matching checksums."""
    run = fsdp2_runs / "untied-optim"
    half, full = tmp_path / "half", tmp_path / "full"
    check_ok(finalize(run, half, "--dtype", "bfloat16"))
    check_ok(finalize(run, full))
    assert rows(check_ok(cli("verify", half, "--source", run, "--json")))["dtype"]["detail"].startswith(
        "every floating tensor is bfloat16"
    )
    found = check_failure(
        cli("verify", half, "--source", run, "--dtype", "float32", "--json"), {"dtype", "source tensors"}
    )
    assert "'lm_head.weight' is bfloat16, expected float32" in found["source tensors"]["detail"]

    shutil.copy(half / "model.safetensors", full / "model.safetensors")
    manifest = read_json(full / "distfinalize-manifest.json")
    data = (full / "model.safetensors").read_bytes()
    manifest["files"]["model.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (full / "distfinalize-manifest.json").write_text(json.dumps(manifest))
    found = check_failure(cli("verify", full, "--source", run, "--json"), {"dtype", "source tensors"})
    assert "21 floating tensor(s) are not float32" in found["dtype"]["detail"]


def test_verify_bad_dest_is_one_line(tmp_path: Path) -> None:
    result = cli("verify", tmp_path / "missing", nproc=2)
    assert result.returncode != 0 and not our_traceback(result.stderr)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "DEST is not a directory" in lines[0] and result.stdout == ""


# ------------------------------------------------------------------------------------------------ verify quantized


@pytest.fixture(scope="module")
def quantized(fsdp2_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int8 output of 2 ranks, with one user --quantize-ignore pattern the manifest must carry to verify."""
    pytest.importorskip("torchao", reason="torchao is the `quant` extra: pip install 'distfinalize[quant]'")
    dest = tmp_path_factory.mktemp("quantized") / "out"
    check_ok(
        finalize(
            fsdp2_runs / "untied-optim",
            dest,
            "--quantize",
            "int8",
            "--quantize-ignore",
            r"\.1\.mlp",
            "--max-shard-size",
            SHARD,
            nproc=2,
        )
    )
    return dest


def test_verify_quantized_output_within_the_recipe_bound(fsdp2_runs: Path, quantized: Path) -> None:
    result = check_ok(cli("verify", quantized, "--source", fsdp2_runs / "untied-optim", "--json", nproc=2))
    found = rows(result)
    assert all(row["status"] == "pass" for row in found.values()), result.stdout
    # 2 layers x 7 Linears, less the 3 of layer 1's mlp left out by the user pattern
    assert found["source tensors"]["detail"].startswith(
        "10 tensors bit-exact and 11 quantized weight(s) within the recipe's rounding bound"
    )
    assert "11 weight(s) stored as the int8 recipe stores them" in found["dtype"]["detail"]


def test_verify_torchao_output(fsdp2_runs: Path, tmp_path: Path) -> None:
    """torchao's serialization (tensor-subclass fields, header metadata), finalized in bfloat16 by 2 ranks."""
    pytest.importorskip("torchao", reason="torchao is the `quant` extra: pip install 'distfinalize[quant]'")
    run, dest = fsdp2_runs / "untied-optim", tmp_path / "out"
    check_ok(
        finalize(run, dest, "--quantize", "torchao-int8", "--dtype", "bfloat16", "--max-shard-size", SHARD, nproc=2)
    )
    found = rows(check_ok(cli("verify", dest, "--source", run, "--json", nproc=2)))
    assert all(row["status"] == "pass" for row in found.values()), found
    assert found["source tensors"]["detail"].startswith(
        "7 tensors bit-exact and 14 quantized weight(s) within the recipe's rounding bound"
    )


def rewrite_tensor(dest: Path, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """Replace one tensor of DEST by change(tensor) in the file that holds it; returns the file's name."""
    from safetensors.torch import load_file, save_file

    file = read_json(dest / "model.safetensors.index.json")["weight_map"][name]
    tensors = load_file(dest / file)
    tensors[name] = change(tensors[name])
    save_file(tensors, dest / file, metadata={"format": "pt"})
    return file


@pytest.mark.parametrize(
    ("change", "failing", "message"),
    [
        (lambda t: t * 1.5, {"checksums", "source tensors"}, "lies outside the int8 rounding bound of the source"),
        (
            lambda t: t.half(),
            {"index", "checksums", "dtype", "source tensors"},
            "as float16 [64, 1]; the int8 recipe stores it as float32 [64, 1]",
        ),
    ],
    ids=["scale", "dtype"],
)
def test_verify_finds_a_damaged_quantized_weight(
    fsdp2_runs: Path, quantized: Path, tmp_path: Path, change: Callable, failing: set[str], message: str
) -> None:
    dest = tmp_path / "out"
    shutil.copytree(quantized, dest)
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    file = rewrite_tensor(dest, name, change)
    found = check_failure(cli("verify", dest, "--source", fsdp2_runs / "untied-optim", "--json"), failing)
    assert f"{file}: 'model.layers.0.self_attn.q_proj.weight'" in found["source tensors"]["detail"]
    assert message in found["source tensors"]["detail"]
