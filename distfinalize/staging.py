"""The staging directory beside DEST and the atomic commit. Runs on: rank 0.

Files are written into `<DEST>.distfinalize-staging` on the same file system as DEST; when every rank
succeeded it is renamed to DEST in one step, so DEST never exists half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from distfinalize.errors import DestinationError

log = logging.getLogger(__name__)
STAGING_SUFFIX = ".distfinalize-staging"


def staging_path(dest: Path) -> Path:
    """Where the files are written before the commit."""
    return dest.parent / (dest.name + STAGING_SUFFIX)


def create_staging(dest: Path, src: Path) -> Path:
    """Create the staging dir (and DEST's parents). Refuses when DEST or a stale staging dir exists."""
    staging = staging_path(dest)
    if dest.exists():
        raise DestinationError("destination already exists", where=dest, hint="choose a new DEST")
    if staging.exists():
        raise DestinationError(
            "a staging dir from an interrupted run is in the way",
            where=staging,
            hint="remove it (nothing in it is final) and run again",
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise DestinationError("cannot create the staging dir", where=staging, hint=exc.strerror) from exc
    return staging


def commit(staging: Path, dest: Path) -> None:
    """fsync the staging dir, rename it to DEST, fsync DEST's parent."""
    _fsync_dir(staging)
    if dest.exists():
        raise DestinationError("destination appeared while writing", where=dest, hint="choose a new DEST")
    try:
        os.rename(staging, dest)
    except OSError as exc:
        raise DestinationError("cannot rename the staging dir to DEST", where=dest, hint=exc.strerror) from exc
    _fsync_dir(dest.parent)


def remove_staging(staging: Path) -> None:
    """Remove the staging dir after a failure (best effort; logs what it could not remove)."""
    if staging.exists():
        shutil.rmtree(staging, onerror=lambda _f, path, exc: log.warning("cannot remove %s: %s", path, exc[1]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
