"""A Hugging Face Hub cache holding a model, built from a real save_pretrained dir, for tests that run with
HF_HUB_OFFLINE=1: the Hub is out of reach here, and that network boundary is all that is faked. The layout is the
one huggingface_hub's downloads leave (models--ORG--NAME/{refs/main, blobs/ETAG, snapshots/COMMIT/FILE -> blob}:
git blob ids for small files, sha256 for LFS ones), and `scan_cache_dir` must read it back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model")


def etag(data: bytes, lfs: bool) -> str:
    """The name the Hub's ETag gives a file's blob: sha256 for LFS files, the git blob id otherwise."""
    return hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def populate(cache: Path, repo_id: str, model_dir: Path, skip: tuple[str, ...] = ()) -> Path:
    """Put every file of `model_dir` (but those named in `skip`) into `cache` as revision `main` of `repo_id`;
    returns the snapshot dir."""
    files = {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file() and p.name not in skip}
    commit = hashlib.sha1(b"".join(name.encode() + etag(d, False).encode() for name, d in files.items())).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / etag(data, name.endswith(LFS_SUFFIXES))
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot
