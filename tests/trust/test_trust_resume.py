"""--resume reuses files only for the very source they were made from: a checkpoint re-saved in place (same path,
new weights) is refused; an untouched one is reused. Real DCP saves, a real rank killed at the commit."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from support import error_lines, finished_text, our_traceback, tree_digest
from trust_runs import ARGS, finished_records, one_error_line, run, staging_of, verify

from distfinalize.commit.staging import source_identity

SRC = "untied-model"
CKPT = Path("checkpoints") / "checkpoint-3"


def resave_in_place(ckpt: Path, seed: int) -> None:
    """Load the DCP checkpoint, move every floating tensor, and dcp.save it again into the same folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = ckpt.parent / "whole.pt"
    dcp_to_torch_save(ckpt, whole)
    state = torch.load(whole, weights_only=False)
    whole.unlink()
    generator = torch.Generator().manual_seed(seed)

    def perturb(value):
        if isinstance(value, dict):
            return {k: perturb(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value + 0.1 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        return value

    for stale in [*ckpt.glob("*.distcp"), ckpt / ".metadata"]:
        stale.unlink()
    dcp.save(perturb(state), checkpoint_id=str(ckpt), no_dist=True)


@pytest.fixture
def own_src(fsdp2_runs: Path, tmp_path: Path) -> Path:
    src = tmp_path / "run"
    shutil.copytree(fsdp2_runs / SRC, src)
    return src


def kill_at_commit(src: Path, dest: Path, log: Path) -> int:
    """A 2-rank run whose rank 0 dies just before its rename: every file is finished in the staging dir."""
    code, out = run(src, dest, *ARGS, fail_at="0:commit:kill", log=log)
    assert code != 0 and not dest.exists(), out
    line = one_error_line(out)
    assert line.startswith("[rank1] ") and "rank 0 failed during commit" in line, line
    assert f"--resume will reuse the {finished_text(staging_of(dest))} kept in" in line, line
    return finished_records(dest)


@pytest.mark.dist
def test_resume_after_the_source_was_resaved_is_refused(own_src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    assert kill_at_commit(own_src, dest, tmp_path / "killed.log") == 11  # 10 files, one in two ranks' pieces
    resave_in_place(own_src / CKPT, seed=1)

    code, out = run(own_src, dest, *ARGS, "--resume", log=tmp_path / "resume.log")
    assert code == 1 and not dest.exists() and staging_of(dest).is_dir(), out
    line = one_error_line(out)
    assert "the source changed since the staging dir was made" in line and str(staging_of(dest)) in line, line
    assert "remove the staging dir and run again without --resume" in line, line
    assert "resume: reusing" not in out and not our_traceback(out), out

    shutil.rmtree(staging_of(dest))  # what the line says to do
    code, out = run(own_src, dest, *ARGS, log=tmp_path / "fresh.log")
    assert code == 0, out
    checked = verify(dest, "--source", str(own_src))  # DEST holds the new weights
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.dist
def test_resume_with_the_source_untouched_reuses_every_file(own_src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "fresh" / "out"
    code, out = run(own_src, dest, *ARGS, log=tmp_path / "fresh.log")
    assert code == 0, out
    resumed = tmp_path / "resumed" / "out"  # the same name: the card is titled after it
    files = kill_at_commit(own_src, resumed, tmp_path / "killed.log")
    code, out = run(own_src, resumed, *ARGS, "--resume", log=tmp_path / "resume.log")
    assert code == 0 and error_lines(out) == [], out
    assert out.count("resume: reusing") == files == 11, out  # 10 files, one in two ranks' pieces
    assert tree_digest(resumed) == tree_digest(dest)


def test_source_identity_reads_metadata_and_stats_only(tmp_path: Path) -> None:
    """Names, sizes and mtimes of every file; the bytes of .metadata and JSON; a torch.save zip's pickle."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(b"metadata-1")
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 100)
    torch.save({"step": 1}, ckpt / "mp_rank_00_model_states.pt")
    base = source_identity([ckpt])
    assert source_identity([ckpt]) == base  # nothing changed, nothing read differently

    def changed(edit) -> str:
        stats = {p: p.stat() for p in ckpt.iterdir()}
        edit()
        for path, stat in stats.items():  # same mtimes as before: only the content differs
            if path.exists():
                os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return source_identity([ckpt])

    assert changed(lambda: (ckpt / ".metadata").write_bytes(b"metadata-2")) != base  # same size, same mtime
    base = source_identity([ckpt])
    assert changed(lambda: torch.save({"step": 2}, ckpt / "mp_rank_00_model_states.pt")) != base
    base = source_identity([ckpt])
    with zipfile.ZipFile(ckpt / "mp_rank_00_model_states.pt") as archive:
        assert any(n.endswith("data.pkl") for n in archive.namelist())
    data = ckpt / "__0_0.distcp"
    stat = data.stat()
    data.write_bytes(b"y" * 100)  # a data file is never read: same size and mtime, same identity...
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_identity([ckpt]) == base
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # ...a new mtime (a re-save) changes it
    assert source_identity([ckpt]) != base
    base = source_identity([ckpt])
    (ckpt / "__1_0.distcp").write_bytes(b"z")  # a new file too
    assert source_identity([ckpt]) != base
