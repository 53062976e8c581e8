"""Bad input never loses data: one clear line, non-zero exit, nothing at DEST (no staging left), SRC unchanged.

Real runs (some under torchrun with 2 ranks, where only one rank reads the broken file). Disk-full and
read-only destinations are real tmpfs mounts (the tests run as root); the unreadable source is a real
permission check, run as the `nobody` user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import error_lines, finalize, our_traceback, read_json, run_as_nobody, tree_digest

pytestmark = pytest.mark.dist

CKPT = Path("checkpoints") / "checkpoint-3"


@pytest.fixture
def run(fsdp2_runs: Path, tmp_path: Path) -> Path:
    """A private copy of a trained FSDP2 run (model + optimizer) that a test may break."""
    out = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-optim", out)
    return out


def assert_clean_failure(
    result: subprocess.CompletedProcess, dest: Path, src: Path, before: dict, *words: str, code: int | None = None
) -> None:
    assert result.returncode != 0 if code is None else result.returncode == code, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not our_traceback(result.stderr), result.stderr
    assert not dest.exists() and not dest.with_name(dest.name + ".distfinalize-staging").exists()
    assert tree_digest(src) == before


def biggest_distcp(run: Path) -> Path:
    return max((run / CKPT).glob("*.distcp"), key=lambda p: p.stat().st_size)


def lm_head_chunk(run: Path):
    """Where DCP's metadata places the first chunk of lm_head (a model tensor)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(run / CKPT)).read_metadata()
    return next(s for i, s in metadata.storage_data.items() if i.fqn == "model.lm_head.weight")


def truncate_in_tensor(run: Path) -> None:
    info = lm_head_chunk(run)
    os.truncate(run / CKPT / info.relative_path, info.offset + info.length // 2)


def flip_tensor_bytes(run: Path) -> None:
    """Flip two bytes in the middle of a model tensor's chunk."""
    info = lm_head_chunk(run)
    path = run / CKPT / info.relative_path
    data = bytearray(path.read_bytes())
    for offset in (info.offset + info.length // 2, info.offset + info.length // 2 + 5):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


BREAKAGES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "metadata-missing": (lambda r: (r / CKPT / ".metadata").unlink(), ("no checkpoint found",)),
    "metadata-truncated": (lambda r: os.truncate(r / CKPT / ".metadata", 100), ("truncated or not a DCP metadata",)),
    "metadata-garbage": (
        lambda r: (r / CKPT / ".metadata").write_bytes(b"not a pickle" * 10),
        ("truncated or not a DCP metadata", ".metadata"),
    ),
    "distcp-missing": (lambda r: biggest_distcp(r).unlink(), ("a checkpoint file is missing", ".distcp")),
    "distcp-truncated": (truncate_in_tensor, ("a checkpoint file is corrupt", "truncated")),
    "distcp-bytes-flipped": (flip_tensor_bytes, ("a checkpoint file is corrupt", "checksum")),
    "config-shape-mismatch": (
        lambda r: (r / "config.json").write_text(
            (r / "config.json").read_text().replace('"intermediate_size": 160', '"intermediate_size": 128')
        ),
        ("has shape", "config.json"),
    ),
}


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_source(run: Path, tmp_path: Path, breakage: str, nproc: int) -> None:
    breaks, words = BREAKAGES[breakage]
    breaks(run)
    before = tree_digest(run)
    dest = tmp_path / "out"
    result = finalize(run, dest, "--max-shard-size", "60KB", nproc=nproc)
    assert_clean_failure(result, dest, run, before, *words)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (root only); unmounted afterwards."""
    mounted: list[Path] = []

    def make(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_disk_full_while_writing(run: Path, mount: Callable[[str], Path]) -> None:
    small = mount("size=200k")  # the model is ~470 KB in float32
    before = tree_digest(run)
    dest = small / "out"
    result = finalize(run, dest, "--max-shard-size", "60KB", nproc=2)
    assert_clean_failure(result, dest, run, before, "No space left on device")
    assert list(small.iterdir()) == []


def test_read_only_destination_parent(run: Path, mount: Callable[[str], Path]) -> None:
    read_only = mount("size=1m,ro")
    before = tree_digest(run)
    dest = read_only / "out"
    result = finalize(run, dest)
    assert_clean_failure(result, dest, run, before, "cannot create the staging dir", "Read-only file system")


def test_destination_parent_is_a_file(run: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    before = tree_digest(run)
    dest = tmp_path / "afile" / "out"
    result = finalize(run, dest)
    assert result.returncode != 0 and len(error_lines(result.stderr)) == 1 and not our_traceback(result.stderr)
    assert (tmp_path / "afile").read_text() == "x" and tree_digest(run) == before


def test_unreadable_source(fsdp2_runs: Path) -> None:
    """Permissions are real: the run is done as `nobody`, against a source only root may read."""
    base = Path(tempfile.mkdtemp(prefix="distfinalize-perm-"))
    try:
        base.chmod(0o777)
        src = base / "run"
        shutil.copytree(fsdp2_runs / "untied-model", src)
        src.chmod(0o700)
        before = tree_digest(src)
        dest = base / "out"
        result = run_as_nobody(base, str(src), str(dest))
        assert_clean_failure(result, dest, src, before, "source is not readable (permission denied)")
    finally:
        shutil.rmtree(base)


def test_merge_lora_without_lora_weights(run: Path, tmp_path: Path) -> None:
    before = tree_digest(run)
    result = finalize(run, tmp_path / "out", "--merge-lora", nproc=2)
    assert_clean_failure(result, tmp_path / "out", run, before, "--merge-lora", "holds no LoRA weights", code=1)


def test_config_vocab_mismatch_names_the_file(run: Path, tmp_path: Path) -> None:
    config = read_json(run / "config.json")
    config["vocab_size"] = 300
    (run / "config.json").write_text(__import__("json").dumps(config))
    before = tree_digest(run)
    result = finalize(run, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", run, before, "model.embed_tokens.weight", str(run / "config.json"))
