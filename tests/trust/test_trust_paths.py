"""File names stored in a checkpoint's `.metadata` never lead distfinalize outside the checkpoint or DEST.

DCP's storage index names the file of every chunk. Real runs: a real checkpoint's metadata rewritten to name
`../../../../ESCAPED_0.distcp` (with a file really there, so following it would succeed) or the absolute path of
one of SRC's own files, finalized with --keep-checkpoint --keep-optimizer: one clear line, nothing written outside
DEST (the parents are checked), no DEST, SRC byte-identical. A data file that is a symlink out of the checkpoint
is refused too. Pure tests cover the name rule, the byte ranges, and the kept copies' names and opener.
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from support import error_lines, finalize, no_traceback, tree_digest
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

from distfinalize.commit.keep import ByteRange, FileCopy, OptimizerCopy, copy_optimizer_files, plan_optimizer_copy
from distfinalize.errors import SourceError
from distfinalize.sources.dcp_metadata import check_data_file_name, data_file, kept_file_name, load_metadata

CKPT = Path("checkpoints") / "checkpoint-3"
KEEP = ("--keep-checkpoint", "--keep-optimizer")


# ------------------------------------------------------------------------------------------------ pure


@pytest.mark.parametrize("name", ["__0_0.distcp", "__1_0.distcp", "__12_34.distcp"])
def test_names_dcp_writes_are_taken(name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(b"x")
    assert check_data_file_name(name, tmp_path) == name
    assert data_file(tmp_path, name) == tmp_path / name
    assert kept_file_name(name, tmp_path) == name


@pytest.mark.parametrize(
    "name",
    [
        "../../../../ESCAPED_0.distcp",
        "../__0_0.distcp",
        "/etc/__0_0.distcp",
        "sub/__0_0.distcp",
        "__0_0.distcp/x",
        "./__0_0.distcp",
        "__01_0.distcp",
        "__0_0.distcp\n",
        "__0_0.distcp\x00",
        "model.safetensors",
        "",
        ".metadata",
        None,
        3,
        b"__0_0.distcp",
    ],
)
def test_any_other_name_is_refused(name: object, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"not a file name torch\.distributed\.checkpoint writes"):
        check_data_file_name(name, tmp_path)
    with pytest.raises(SourceError, match=r"not a file name torch\.distributed\.checkpoint writes"):
        data_file(tmp_path, name)


def test_a_data_file_symlinked_out_of_the_checkpoint_is_refused(tmp_path: Path) -> None:
    folder, outside = tmp_path / "ckpt", tmp_path / "secret"
    folder.mkdir()
    outside.write_bytes(b"x")
    (folder / "__0_0.distcp").symlink_to(outside)
    with pytest.raises(SourceError, match="leads outside the checkpoint folder"):
        data_file(folder, "__0_0.distcp")
    (folder / "__1_0.distcp").write_bytes(b"x")
    (tmp_path / "link").symlink_to(folder)  # the checkpoint folder itself behind a symlink is fine
    assert data_file(tmp_path / "link", "__1_0.distcp") == tmp_path / "link" / "__1_0.distcp"


def _metadata_with(info: _StorageInfo) -> Metadata:
    key = "optim.state.w.exp_avg"
    return Metadata(state_dict_metadata={key: BytesStorageMetadata()}, storage_data={MetadataIndex(key, (0,)): info})


@pytest.mark.parametrize(
    ("info", "message"),
    [
        (_StorageInfo("../../x/__0_0.distcp", 0, 4), "names the data file '../../x/__0_0.distcp'"),
        (_StorageInfo("/abs/__0_0.distcp", 0, 4), "names the data file '/abs/__0_0.distcp'"),
        (_StorageInfo("__0_0.distcp", -8, 4), "gives a chunk the offset -8"),
        (_StorageInfo("__0_0.distcp", 0, -1), "gives a chunk the length -1"),
        (_StorageInfo("__0_0.distcp", 0, True), "gives a chunk the length True"),
        (_StorageInfo("__0_0.distcp", "0", 4), "gives a chunk the offset '0'"),
        ("__0_0.distcp", "malformed storage entry"),
    ],
)
def test_storage_entries_are_checked_on_load(tmp_path: Path, info: object, message: str) -> None:
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_metadata_with(info)))  # type: ignore[arg-type]
    with pytest.raises(SourceError, match=message) as caught:
        load_metadata(tmp_path)
    assert str(tmp_path / ".metadata") in str(caught.value.where)


def test_kept_copies_are_named_by_distfinalize(tmp_path: Path) -> None:
    """The copy's names (and its metadata's) come from kept_file_name, even if metadata skipped the loader."""
    info = _StorageInfo("__3_1.distcp", 100, 8)
    copy = plan_optimizer_copy(tmp_path, _metadata_with(info), whole=True)
    assert copy.files == (FileCopy("__3_1.distcp", (ByteRange(100, 0, 8),), "__3_1.distcp"),)
    assert [i.relative_path for i in copy.metadata.storage_data.values()] == ["__3_1.distcp"]
    with pytest.raises(SourceError, match="not a file name"):
        plan_optimizer_copy(tmp_path, _metadata_with(replace(info, relative_path="../../__3_1.distcp")), whole=True)


def test_copy_refuses_names_and_symlinks_it_did_not_make(tmp_path: Path) -> None:
    src, dest, victim = tmp_path / "src", tmp_path / "dest", tmp_path / "victim"
    src.mkdir()
    dest.mkdir()
    (src / "__0_0.distcp").write_bytes(b"0123456789")
    victim.write_bytes(b"precious")
    good = FileCopy("__0_0.distcp", (ByteRange(2, 0, 4),), "__0_0.distcp")
    copy = OptimizerCopy(src, (good,), _metadata_with(_StorageInfo("__0_0.distcp", 0, 4)))
    for bad in (
        replace(good, source="../victim"),
        replace(good, target="../victim"),
        replace(good, target=str(victim)),
    ):
        with pytest.raises(SourceError, match="not a file name"):
            copy_optimizer_files(copy, (bad,), dest)
    (dest / "__0_0.distcp").symlink_to(victim)  # a symlink planted where the copy goes is not followed
    with pytest.raises(SourceError, match="cannot copy optimizer state"):
        copy_optimizer_files(copy, (good,), dest)
    assert victim.read_bytes() == b"precious" and list(tmp_path.rglob("*ESCAPED*")) == []
    (dest / "__0_0.distcp").unlink()
    assert copy_optimizer_files(copy, (good,), dest) == 4
    assert (dest / "__0_0.distcp").read_bytes() == b"2345"


# ------------------------------------------------------------------------------------------------ real runs


def rewrite(meta_path: Path, new_path: str, file: str) -> None:
    """Point every optimizer chunk stored in `file` at `new_path`; the model's chunks keep their real file."""
    metadata = pickle.loads(meta_path.read_bytes())
    changed = 0
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith("optim.") and info.relative_path == file:
            metadata.storage_data[index] = replace(info, relative_path=new_path)
            changed += 1
    assert changed
    meta_path.write_bytes(pickle.dumps(metadata))


def check_refused(result, what: str, meta_path: Path) -> None:
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stderr}"
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert what in lines[0] and str(meta_path) in lines[0], lines[0]
    assert no_traceback(result), result.stderr


@pytest.fixture
def layout(fsdp2_runs: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(SRC, DEST) as tmp/src/run and tmp/out/dest: the same depth, so one traversal reaches out of both."""
    run = tmp_path / "src" / "run"
    shutil.copytree(fsdp2_runs / "untied-optim", run)
    (tmp_path / "out").mkdir()
    return run, tmp_path / "out" / "dest"


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [1, 2])
def test_relative_traversal_writes_nothing_outside_dest(layout: tuple[Path, Path], tmp_path: Path, nproc: int) -> None:
    run, dest = layout
    meta_path = run / CKPT / ".metadata"
    name = "../../../../ESCAPED_0.distcp"
    # What the name reaches from SRC's checkpoint folder holds the real chunks, so following it would "work".
    shutil.copy(run / CKPT / "__0_0.distcp", (run / CKPT / name).resolve())
    rewrite(meta_path, name, "__0_0.distcp")
    before, around = tree_digest(run), tree_digest(tmp_path / "src")
    check_refused(finalize(run, dest, *KEEP, nproc=nproc), f"names the data file {name!r}", meta_path)
    assert not (dest.parent / "ESCAPED_0.distcp").exists()  # where DEST's optimizer/ + name would write
    assert sorted(p.name for p in dest.parent.iterdir()) == []  # no DEST, no staging
    assert sorted(p.name for p in tmp_path.rglob("ESCAPED*")) == ["ESCAPED_0.distcp"]  # the decoy only
    assert tree_digest(run) == before and tree_digest(tmp_path / "src") == around


@pytest.mark.dist
def test_absolute_path_to_a_source_file_is_not_truncated(layout: tuple[Path, Path]) -> None:
    run, dest = layout
    meta_path, target = run / CKPT / ".metadata", run / CKPT / "__1_0.distcp"
    rewrite(meta_path, str(target), "__1_0.distcp")
    before = tree_digest(run)
    size = target.stat().st_size
    check_refused(finalize(run, dest, *KEEP, nproc=2), f"names the data file {str(target)!r}", meta_path)
    assert target.stat().st_size == size and tree_digest(run) == before
    assert not dest.exists() and list(dest.parent.iterdir()) == []


@pytest.mark.dist
def test_a_data_file_symlinked_out_of_src_is_not_read(layout: tuple[Path, Path], tmp_path: Path) -> None:
    """A valid name whose file is a symlink out of the checkpoint: refused when read, with or without keep."""
    run, dest = layout
    elsewhere = tmp_path / "elsewhere.distcp"
    shutil.move(run / CKPT / "__1_0.distcp", elsewhere)
    (run / CKPT / "__1_0.distcp").symlink_to(elsewhere)
    before = tree_digest(run)
    for args in ((), KEEP):
        result = finalize(run, dest, *args, nproc=2)
        assert result.returncode == 1, result.stderr
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and "__1_0.distcp leads outside the checkpoint folder" in lines[0], result.stderr
        assert str(run / CKPT / "__1_0.distcp") in lines[0]
        assert no_traceback(result) and not dest.exists()
    assert tree_digest(run) == before
