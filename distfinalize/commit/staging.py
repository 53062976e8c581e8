"""The staging directory beside DEST, its lock, and the atomic commit. Runs on: rank 0 (unless said otherwise).

Files are written into `<DEST>.distfinalize-staging` on the same file system as DEST; when every rank
succeeded it is renamed to DEST in one step, so DEST never exists half-written. Rank 0 holds an exclusive lock
on `.progress/lock` for the whole run, so two runs never share a staging dir. `.progress/` also records what the
staging dir was made from: the plan (`plan.sha256`) and the source's identity (`source.sha256`), which --resume
must find unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distfinalize.errors import DestinationError

log = logging.getLogger(__name__)
STAGING_SUFFIX = ".distfinalize-staging"
PROGRESS_DIR = ".progress"  # per-file records of an unfinished run, removed at the commit
PLAN_RECORD = "plan.sha256"
SOURCE_RECORD = "source.sha256"
LOCK_FILE = "lock"
HASHED_SUFFIXES = (".json",)  # small files whose bytes are part of the identity, besides DCP's .metadata
PICKLE_SUFFIX = ".pt"  # torch.save zips (DeepSpeed): their pickle record is hashed, not their tensor data


def staging_path(dest: Path) -> Path:
    """Where the files are written before the commit. Pure."""
    return dest.parent / (dest.name + STAGING_SUFFIX)


@dataclass
class StagingLock:
    """The exclusive lock (fcntl.flock) on the staging dir, held by rank 0 until the run ends."""

    fd: int | None
    path: Path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None


def lock_staging(staging: Path) -> StagingLock:
    """Take the staging dir's lock, or refuse: another run (pid N on host H) holds it. Runs on: rank 0."""
    path = staging / PROGRESS_DIR / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # no .progress: being made, or being committed, by another run
        raise DestinationError(
            "another distfinalize run is writing to",
            where=f"{staging} (it has no {PROGRESS_DIR})",
            hint="wait for it to finish; two runs cannot share a staging dir",
        ) from None
    except OSError as exc:
        raise DestinationError("cannot lock the staging dir", where=path, hint=exc.strerror) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise DestinationError(
            "another distfinalize run is writing to",
            where=f"{staging} ({holder})",
            hint="wait for it to finish, or stop it; two runs cannot share a staging dir",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
    return StagingLock(fd, path)


def create_staging(dest: Path, fingerprint: str, identity: str = "", resume: bool = False) -> StagingLock:
    """Create the staging dir (and DEST's parents), or, with `resume`, take over an interrupted one; either way
    lock it. Refuses when DEST exists, when another run holds the staging dir, when a stale staging dir is there
    without `resume`, and when it was made for a different plan (`fingerprint`) or from a source that changed
    since (`identity`, see source_identity). Runs on: rank 0.
    """
    staging = staging_path(dest)
    progress = staging / PROGRESS_DIR
    if dest.exists():
        raise DestinationError("destination already exists", where=dest, hint="choose a new DEST")
    if staging.exists():
        lock = lock_staging(staging)
        try:
            check_resumable(staging, fingerprint, identity, resume)
        except BaseException:
            lock.release()
            raise
        log.info("resuming into %s", staging)
        return lock
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        progress.mkdir()
    except OSError as exc:
        raise DestinationError("cannot create the staging dir", where=staging, hint=exc.strerror) from exc
    lock = lock_staging(staging)
    try:
        (progress / PLAN_RECORD).write_text(fingerprint)
        (progress / SOURCE_RECORD).write_text(identity)
    except OSError as exc:
        lock.release()
        raise DestinationError("cannot create the staging dir", where=staging, hint=exc.strerror) from exc
    return lock


def check_resumable(staging: Path, fingerprint: str, identity: str, resume: bool) -> None:
    """A stale staging dir may be taken over only with --resume, for the same plan and an unchanged source."""
    if not resume:
        raise DestinationError(
            "a staging dir from an interrupted run is in the way",
            where=staging,
            hint="pass --resume to reuse its finished files, or remove it (nothing in it is final)",
        )
    progress = staging / PROGRESS_DIR
    if _read(progress / PLAN_RECORD) != fingerprint:
        raise DestinationError(
            "the staging dir was made for a different output plan",
            where=staging,
            hint="resume with the same SRC and options, or remove the staging dir",
        )
    if _read(progress / SOURCE_RECORD) != identity:
        raise DestinationError(
            "the source changed since the staging dir was made (re-saved or modified in place)",
            where=staging,
            hint="its files hold the old weights: remove the staging dir and run again without --resume",
        )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def source_identity(dirs: Sequence[Path]) -> str:
    """A digest of what the inputs hold, without reading their data: for each file at the top of each dir (the
    checkpoint folder, --base-model), its name, size and mtime_ns; the bytes of DCP's `.metadata` and of JSON
    files; the pickle record (`data.pkl`) inside each torch.save zip (DeepSpeed's `*.pt`). A re-save in place
    changes it. Runs on: rank 0, at the stage step."""
    entries = []
    for directory in dirs:
        files = sorted((e for e in os.scandir(directory) if e.is_file()), key=lambda e: e.name)
        for entry in files:
            stat, digest = entry.stat(), _content_digest(Path(entry.path))
            entries.append([str(directory), entry.name, stat.st_size, stat.st_mtime_ns, digest])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _content_digest(path: Path) -> str | None:
    """sha256 of a small file's bytes (.metadata, *.json), or of a torch.save zip's pickle record."""
    if path.name == ".metadata" or path.name.endswith(HASHED_SUFFIXES):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.name.endswith(PICKLE_SUFFIX):
        try:
            with zipfile.ZipFile(path) as archive:
                record = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                return hashlib.sha256(archive.read(record)).hexdigest() if record else None
        except (zipfile.BadZipFile, OSError):
            return None  # a legacy (non-zip) torch.save: its size and mtime stand for it
    return None


def finished_files(staging: Path) -> str:
    """What the staging dir records as finished (what --resume would reuse): "N finished file(s)", and the pieces
    of files several ranks write ("file@start-stop" records); "" when nothing is. Runs on: any rank."""
    try:
        names = [p.stem for p in (staging / PROGRESS_DIR).glob("*.json")]
    except OSError:
        return ""
    pieces = sum(1 for n in names if "@" in n)
    files = len(names) - pieces
    if not names:
        return ""
    return f"{files} finished file(s)" + (f" and {pieces} finished piece(s) of shared files" if pieces else "")


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
    try:
        _fsync_dir(dest.parent)
    except OSError as exc:  # DEST is there: the commit happened whatever the fsync says
        log.warning("cannot fsync %s after the commit: %s", dest.parent, exc.strerror)


def landed(staging: Path, dest: Path, marker: str) -> bool:
    """Whether rank 0's rename happened, as the file system shows it: DEST holds `marker`, the staging dir is
    gone. Runs on: a rank that lost contact with rank 0 during the commit."""
    return (dest / marker).is_file() and not staging.exists()


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
