"""DEST never overlaps an input: not inside SRC, the checkpoint folder, --checkpoint, --base-model or --tokenizer
(symlinked parents followed), and no input inside DEST's staging dir. Real CLI runs on a trained FSDP2 run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import error_lines, finalize, our_traceback, tree_digest

pytestmark = pytest.mark.dist

CKPT = Path("checkpoints") / "checkpoint-3"
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def run(fsdp2_runs: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-model", out)
    return out


def hf_dir(run: Path, where: Path) -> Path:
    """A local Hugging Face dir (config.json and tokenizer), as --base-model or --tokenizer take."""
    where.mkdir(parents=True)
    for name in HF_FILES:
        shutil.copy(run / name, where / name)
    return where


def assert_refused(
    result: subprocess.CompletedProcess, dest: Path, trees: list[Path], before: list[dict], *words: str
) -> None:
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not our_traceback(result.stderr), result.stderr
    assert not dest.exists() and not dest.with_name(dest.name + ".distfinalize-staging").exists()
    assert [tree_digest(t) for t in trees] == before


def test_dest_inside_checkpoint_folder_with_src_elsewhere(run: Path, tmp_path: Path) -> None:
    """SRC is an unrelated dir; --checkpoint (absolute) names the DCP folder, and DEST lies inside it."""
    other = hf_dir(run, tmp_path / "elsewhere")
    ckpt = run / CKPT
    dest = ckpt / "final"
    before = [tree_digest(run)]
    result = finalize(other, dest, "--checkpoint", str(ckpt))
    assert_refused(result, dest, [run], before, "destination lies inside the checkpoint folder", str(dest))


def test_dest_inside_relative_checkpoint(run: Path) -> None:
    """--checkpoint given relative to SRC, DEST inside it (and so inside SRC too): refused before any write."""
    dest = run / CKPT / "out"
    before = [tree_digest(run)]
    result = finalize(run, dest, "--checkpoint", str(CKPT))
    assert_refused(result, dest, [run], before, "destination lies inside")


def test_dest_inside_base_model(run: Path, tmp_path: Path) -> None:
    base = hf_dir(run, tmp_path / "base")
    dest = base / "final"
    before = [tree_digest(run), tree_digest(base)]
    result = finalize(run, dest, "--base-model", str(base))
    assert_refused(result, dest, [run, base], before, "destination lies inside --base-model")


def test_dest_inside_tokenizer(run: Path, tmp_path: Path) -> None:
    tok = hf_dir(run, tmp_path / "tok")
    dest = tok / "nested" / "final"
    before = [tree_digest(run), tree_digest(tok)]
    result = finalize(run, dest, "--tokenizer", str(tok))
    assert_refused(result, dest, [run, tok], before, "destination lies inside --tokenizer")


def test_dest_through_symlinked_parent_into_source(run: Path, tmp_path: Path) -> None:
    """DEST's parent is a symlink into the checkpoint folder: resolved, it lies inside SRC."""
    link = tmp_path / "link"
    link.symlink_to(run / CKPT, target_is_directory=True)
    dest = link / "final"
    before = [tree_digest(run)]
    result = finalize(run, dest, "--checkpoint", str(CKPT))
    assert_refused(result, dest, [run], before, "destination lies inside the source")
    assert not (run / CKPT / "final").exists()


def test_source_inside_staging_dir(run: Path, tmp_path: Path) -> None:
    """SRC lies inside `<DEST>.distfinalize-staging`: a failed (or --resume'd) run would remove it."""
    dest = tmp_path / "model"
    staging = tmp_path / "model.distfinalize-staging"
    staging.mkdir()
    src = staging / "run"
    shutil.move(run, src)
    before = [tree_digest(src)]
    for extra in ((), ("--resume",)):
        result = finalize(src, dest, *extra)
        assert result.returncode == 1, result.stderr
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and "the source lies inside the destination's staging dir" in lines[0], result.stderr
        assert not dest.exists() and [tree_digest(src)] == before


def test_dest_beside_inputs_is_accepted(run: Path, tmp_path: Path) -> None:
    """The check refuses overlaps only: DEST beside --base-model and --tokenizer (same parent) is fine."""
    base = hf_dir(run, tmp_path / "base")
    dest = tmp_path / "base-final"  # shares a name prefix with --base-model, not a path
    result = finalize(run, dest, "--base-model", str(base), "--tokenizer", str(base), "--dry-run")
    assert result.returncode == 0, result.stderr
