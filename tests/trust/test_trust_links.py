"""A symlink among the files that go from the inputs into DEST (config.json, README.md, model code auto_map names,
tokenizer files, ...) is refused when its target leaves the tree the user gave; one that stays inside is read as
a regular file and DEST gets a regular file. Real CLI runs on a trained FSDP2 run, with real symlinks to a secret
file outside SRC."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from support import check_ok, error_lines, finalize, our_traceback, tree_digest

pytestmark = pytest.mark.dist

CODE = "from transformers import LlamaForCausalLM\n\n\nclass TinyForCausalLM(LlamaForCausalLM):\n    pass\n"


@pytest.fixture
def run(fsdp2_runs: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-model", out)
    return out


@pytest.fixture
def marker() -> str:
    return f"TOPSECRET-{uuid.uuid4().hex}"


def with_auto_map(run: Path) -> None:
    """config.json names local model code, as a remote-code model's does."""
    config = json.loads((run / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (run / "config.json").write_text(json.dumps(config, indent=2))


def secret_like(run: Path, name: str, marker: str, secret_dir: Path) -> Path:
    """A file outside SRC that would pass for `name` (so the old code copied it), holding `marker`."""
    secret_dir.mkdir(exist_ok=True)
    target = secret_dir / f"secret-{name}"
    if name == "modeling_tiny.py":
        target.write_text(f"# {marker}\n{CODE}")
    elif name == "README.md":
        target.write_text(f"# private notes\n\n{marker}\n")
    else:  # a JSON file of the run, with one more key that carries the marker
        data = json.loads((run / name).read_text())
        data["secret_note"] = marker
        if name == "tokenizer.json":
            data["added_tokens"].append(
                {**data["added_tokens"][-1], "id": len(data["model"]["vocab"]) + 999, "content": marker}
            )
        target.write_text(json.dumps(data))
    return target


# What to link, and what to set up around it: (file name in SRC, setup of SRC, extra CLI args).
CASES: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    "code-via-auto-map": ("modeling_tiny.py", with_auto_map, ()),
    "readme": ("README.md", lambda run: None, ()),
    "tokenizer-json": ("tokenizer.json", lambda run: None, ()),
    "tokenizer-config": ("tokenizer_config.json", lambda run: None, ()),
    "config-json": ("config.json", lambda run: None, ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_symlink_out_of_source_is_refused(run: Path, tmp_path: Path, marker: str, case: str) -> None:
    name, setup, args = CASES[case]
    setup(run)
    target = secret_like(run, name, marker, tmp_path / "secret")
    link = run / name
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    before = tree_digest(run)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "model"
    result = finalize(run, dest, *args)
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"{link} -> {target}" in lines[0] and "symlink" in lines[0] and "regular file" in lines[0], lines[0]
    assert not our_traceback(result.stderr), result.stderr
    assert list(out.iterdir()) == []
    assert marker not in result.stdout  # the secret's content is not echoed either
    assert tree_digest(run) == before


def test_symlinked_tokenizer_file_in_tokenizer_dir_is_refused(run: Path, tmp_path: Path, marker: str) -> None:
    """--tokenizer DIR is its own tree: its tokenizer.json linking out of DIR (into SRC, even) is refused."""
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (run / name).exists():
            shutil.copy(run / name, tok / name)
    target = secret_like(run, "tokenizer.json", marker, tmp_path / "secret")
    (tok / "tokenizer.json").symlink_to(target)
    dest = tmp_path / "out" / "model"
    result = finalize(run, dest, "--tokenizer", str(tok), "--dry-run")
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and f"{tok / 'tokenizer.json'} -> {target}" in lines[0], result.stderr
    assert marker not in result.stdout + result.stderr


def test_symlinks_inside_source_are_read_as_regular_files(run: Path, tmp_path: Path) -> None:
    """Links that stay in SRC (one from the checkpoint's parent dir into a sub-dir, one across) are accepted, and
    DEST holds regular files with their content."""
    with_auto_map(run)
    shared = run / "shared"
    shared.mkdir()
    (shared / "modeling_tiny.py").write_text(f"# in-tree model code\n{CODE}")
    (shared / "card.md").write_text("# Tiny\n\nA card kept in the run's shared dir.\n")
    (run / "modeling_tiny.py").symlink_to(Path("shared") / "modeling_tiny.py")  # relative link
    (run / "README.md").symlink_to(shared / "card.md")  # absolute link, still inside SRC
    shutil.move(run / "tokenizer.json", shared / "tokenizer.json")
    (run / "tokenizer.json").symlink_to(shared / "tokenizer.json")
    dest = tmp_path / "out" / "model"
    check_ok(finalize(run, dest))
    for name in ("modeling_tiny.py", "README.md", "tokenizer.json", "config.json"):
        assert (dest / name).is_file() and not (dest / name).is_symlink(), name
    assert not [p for p in dest.rglob("*") if p.is_symlink()]
    assert (dest / "modeling_tiny.py").read_bytes() == (shared / "modeling_tiny.py").read_bytes()
    assert "A card kept in the run's shared dir." in (dest / "README.md").read_text()
    assert (
        json.loads((dest / "tokenizer.json").read_text())["model"]
        == json.loads((shared / "tokenizer.json").read_text())["model"]
    )
