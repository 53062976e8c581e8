"""A checkpoint's DCP `.metadata` is a pickle: distfinalize loads it without running any of its code.

The hostile files are real checkpoints' metadata with one object added whose `__reduce__` runs code (a shell
command, or Python through `exec`) that writes a marker file; plain `pickle.load` of them does write it (checked).
finalize and inspect (one error line) and verify --source (its failed "source tensors" check), through the real
CLI, must refuse them naming the file and the global, without a traceback, leaving no marker, no DEST and SRC
byte-identical. And every real metadata
file the fixtures (and tests/trust/dcp_saves.py) write loads through the safe loader exactly as pickle loads it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    REPO,
    TIMEOUT_S,
    check_ok,
    env,
    error_lines,
    finalize,
    no_traceback,
    torchrun,
    tree_digest,
)

from distfinalize.errors import SourceError
from distfinalize.sources.dcp_metadata import LIGHT_GLOBALS, PLAIN_GLOBALS, allowed_globals, load_metadata

CKPT = Path("checkpoints") / "checkpoint-3"
PAYLOADS = {"posix.system": "system", "builtins.exec": "exec"}  # the global each payload names -> its kind


class Payload:
    """An object that, unpickled, runs `reduce` (what a hostile checkpoint would carry)."""

    def __init__(self, reduce: tuple) -> None:
        self.reduce = reduce

    def __reduce__(self) -> tuple:
        return self.reduce


def payload(kind: str, marker: Path) -> Payload:
    if kind == "system":
        return Payload((os.system, (f"touch {marker}",)))
    return Payload((exec, (f"open({str(marker)!r}, 'w').close()",)))


def poison(meta_path: Path, kind: str, marker: Path) -> None:
    """Add a code-running object to a real `.metadata` (in planner_data, where DCP keeps arbitrary values)."""
    metadata = pickle.loads(meta_path.read_bytes())
    metadata.planner_data = {**(metadata.planner_data or {}), "model.evil": payload(kind, marker)}
    meta_path.write_bytes(pickle.dumps(metadata))
    # The file is really hostile: plain pickle (what DCP's FileSystemReader does) runs the payload.
    code = f"import pickle; pickle.load(open({str(meta_path)!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, timeout=TIMEOUT_S, check=False)
    assert marker.exists(), "the crafted metadata did not run its payload under plain pickle"
    marker.unlink()


def cli(command: str, *args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distfinalize", command, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False)


def check_refused(result: subprocess.CompletedProcess, meta_path: Path, name: str, marker: Path) -> None:
    """Non-zero exit, one error line naming the file and the global, no traceback, no marker."""
    assert not marker.exists(), "the checkpoint's code ran"
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stderr}"
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"refusing to load DCP metadata: it names '{name}', which a DCP checkpoint never holds" in lines[0]
    assert str(meta_path) in lines[0]
    assert no_traceback(result), result.stderr


# ------------------------------------------------------------------------------------------------ pure


@pytest.mark.parametrize(
    "reduce",
    [
        lambda m: (os.system, (f"touch {m}",)),
        lambda m: (eval, (f"open({str(m)!r}, 'w')",)),
        lambda m: (subprocess.Popen, (["touch", str(m)],)),
        lambda m: (Path.touch, (m,)),  # a method of an allowed module's class: pathlib.Path.touch
        lambda m: (getattr, (Path(m), "touch")),
        lambda m: (pickle.loads, (b"",)),
    ],
)
def test_refuses_any_other_global_without_running_it(tmp_path: Path, reduce) -> None:
    """Every global outside the allowlist is refused, by name, before anything is called."""
    marker = tmp_path / "PWNED"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(reduce(marker))))
    with pytest.raises(SourceError, match="refusing to load DCP metadata: it names") as caught:
        load_metadata(tmp_path)
    assert not marker.exists()
    assert (caught.value.where == tmp_path / ".metadata") and "never holds" in str(caught.value)
    assert caught.value.hint and "trust" in caught.value.hint


def test_allowlist_holds_no_callable_that_reaches_code() -> None:
    """The allowlist is data types, their constructors and torch's layout lookup: no module-level function
    besides `_get_layout`, nothing from os, subprocess, builtins' eval/exec/getattr/open, or torch.load."""
    allowed = allowed_globals()
    functions = {f"{m}.{n}" for (m, n), v in allowed.items() if not isinstance(v, type) and callable(v)}
    assert functions == {"torch.serialization._get_layout"}
    modules = {m for m, _ in allowed}
    assert modules <= {
        "torch",
        "torch.serialization",
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "pathlib",
        "pathlib._local",
        "collections",
        "builtins",
    }
    assert {n for m, n in allowed if m == "builtins"} == {"set", "frozenset", "complex"}
    # finalize's light loader resolves exactly the same names, DCP's own to stand-ins that run no code of theirs
    assert set(LIGHT_GLOBALS) | set(PLAIN_GLOBALS) == set(allowed)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated or not a DCP metadata pickle"),
        (pickle.dumps({"state_dict_metadata": {}})[:-3], "truncated or not a DCP metadata pickle"),
        (pickle.dumps({"state_dict_metadata": {}, "storage_data": {}}), "not a DCP metadata file"),
    ],
)
def test_broken_metadata_is_one_source_error(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / ".metadata").write_bytes(content)
    with pytest.raises(SourceError, match=message):
        load_metadata(tmp_path)


# ------------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def other_saves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP1 ShardedTensor, every kind of state-dict value, and a no_dist save (tests/trust/dcp_saves.py)."""
    out = tmp_path_factory.mktemp("dcp-saves")
    check_ok(torchrun(2, REPO / "tests" / "trust" / "dcp_saves.py", out))
    return out


@pytest.mark.dist
def test_real_metadata_loads_as_pickle_loads_it(
    fsdp2_runs: Path, dtensor_run: Path, accelerate_runs: Path, lora_runs: Path, other_saves: Path
) -> None:
    """Every `.metadata` of FSDP2 (model, model + optim), DTensor, Accelerate (model and optimizer_0), peft LoRA,
    FSDP1 ShardedTensor, every value kind and no_dist saves: the safe loader gives what pickle gives."""
    found = [
        p
        for root in (fsdp2_runs, dtensor_run, accelerate_runs, lora_runs, other_saves)
        for p in sorted(root.rglob(".metadata"))
    ]
    assert len(found) >= 4 + 1 + 4 + 2 + 3, found
    for meta_path in found:
        with open(meta_path, "rb") as f:
            expected = pickle.load(f)  # the fixtures' own, trusted files
        assert load_metadata(meta_path.parent) == expected, meta_path
    kinds = {type(v).__name__ for p in found for v in pickle.loads(p.read_bytes()).state_dict_metadata.values()}
    assert kinds == {"TensorStorageMetadata", "BytesStorageMetadata"}


@pytest.fixture
def run(fsdp2_runs: Path, tmp_path: Path) -> Path:
    """A private copy of the FSDP2 run with optimizer state."""
    out = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-optim", out)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("name", PAYLOADS)
def test_hostile_metadata_runs_nowhere(run: Path, tmp_path: Path, name: str) -> None:
    """finalize (2 ranks), inspect and verify --source refuse it; no code runs, DEST is untouched or absent.
    verify, by its contract, reports the refusal as its failed "source tensors" check, not as an error line."""
    good = tmp_path / "good"
    check_ok(finalize(run, good))
    good_digest = tree_digest(good)
    meta_path, marker = run / CKPT / ".metadata", tmp_path / "PWNED"
    poison(meta_path, PAYLOADS[name], marker)
    before = tree_digest(run)

    dest = tmp_path / "dest"
    check_refused(finalize(run, dest, nproc=2), meta_path, name, marker)
    assert not dest.exists() and not list(tmp_path.glob("dest*"))
    check_refused(cli("inspect", run), meta_path, name, marker)
    # verify reports a source it cannot open as its failed "source tensors" row (its contract: no error line)
    result = cli("verify", good, "--source", run, "--json")
    assert not marker.exists() and result.returncode == 1 and not error_lines(result.stderr), result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["checks"]}
    assert [n for n, row in rows.items() if row["status"] == "fail"] == ["source tensors"], result.stdout
    detail = rows["source tensors"]["detail"]
    assert f"cannot open the source: refusing to load DCP metadata: it names '{name}'" in detail, detail
    assert str(meta_path) in detail and no_traceback(result), result.stderr
    assert tree_digest(good) == good_digest
    assert tree_digest(run) == before


@pytest.mark.dist
def test_hostile_accelerate_optimizer_metadata(accelerate_runs: Path, tmp_path: Path) -> None:
    """Accelerate's optimizer_0/.metadata is read by --keep-optimizer and by inspect: through the same loader."""
    run = tmp_path / "run"
    shutil.copytree(accelerate_runs / "accelerate-untied", run)
    meta_path, marker = run / CKPT / "optimizer_0" / ".metadata", tmp_path / "PWNED"
    poison(meta_path, "system", marker)
    before = tree_digest(run)
    dest = tmp_path / "dest"
    check_refused(finalize(run, dest, "--keep-checkpoint", "--keep-optimizer"), meta_path, "posix.system", marker)
    assert not dest.exists()
    check_refused(cli("inspect", run), meta_path, "posix.system", marker)
    assert tree_digest(run) == before


@pytest.mark.dist
def test_hostile_kept_optimizer_metadata_in_a_model_dir(run: Path, tmp_path: Path) -> None:
    """`inspect DEST` reads the kept optimizer's metadata of a finalized dir: through the same loader."""
    dest = tmp_path / "dest"
    check_ok(finalize(run, dest, "--keep-checkpoint", "--keep-optimizer"))
    meta_path, marker = dest / CKPT / "optimizer" / ".metadata", tmp_path / "PWNED"
    assert sorted(p.name for p in meta_path.parent.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    poison(meta_path, "exec", marker)
    check_refused(cli("inspect", dest), meta_path, "builtins.exec", marker)
