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
PROGRESS_DIR = ".progress"  # per-file records of an unfinished run, removed at the commit
PLAN_RECORD = "plan.sha256"


def staging_path(dest: Path) -> Path:
    """Where the files are written before the commit."""
    return dest.parent / (dest.name + STAGING_SUFFIX)


def create_staging(dest: Path, fingerprint: str, resume: bool = False) -> Path:
    """Create the staging dir (and DEST's parents), or, with `resume`, take over an interrupted one.

    Refuses when DEST exists, when a stale staging dir is there without `resume`, and when the staging dir
    was made for a different plan. Runs on: rank 0.
    """
    staging = staging_path(dest)
    progress = staging / PROGRESS_DIR
    if dest.exists():
        raise DestinationError("destination already exists", where=dest, hint="choose a new DEST")
    if staging.exists():
        if not resume:
            raise DestinationError(
                "a staging dir from an interrupted run is in the way",
                where=staging,
                hint="pass --resume to reuse its finished files, or remove it (nothing in it is final)",
            )
        recorded = (progress / PLAN_RECORD).read_text() if (progress / PLAN_RECORD).is_file() else None
        if recorded != fingerprint:
            raise DestinationError(
                "the staging dir was made for a different output plan",
                where=staging,
                hint="resume with the same SRC and options, or remove the staging dir",
            )
        log.info("resuming into %s", staging)
        return staging
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        progress.mkdir()
        (progress / PLAN_RECORD).write_text(fingerprint)
    except OSError as exc:
        raise DestinationError("cannot create the staging dir", where=staging, hint=exc.strerror) from exc
    return staging


def commit(staging: Path, dest: Path) -> None:
    """Drop the progress records, fsync the staging dir, rename it to DEST, fsync DEST's parent."""
    shutil.rmtree(staging / PROGRESS_DIR, ignore_errors=True)
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
