"""Push the committed DEST to the Hugging Face Hub with huggingface_hub's HfApi.

`create_repo(exist_ok=True)`, `create_branch(exist_ok=True)` when a revision other than `main` is given,
then one `upload_folder` call. upload_folder is the resumable, multi-commit large-folder path in
huggingface_hub >= 2 (with hf_xet); it takes a commit message, and re-running the same push resumes it.
The files to upload are listed by us and passed as exact `allow_patterns`, so `hub_preview` (--dry-run)
reports exactly what `push_to_hub` sends. The token comes from HF_TOKEN or the login cache (HfApi's default).
Any failure (no token, no network, offline mode, HTTP error, an hf_xet upload error) is one DistfinalizeError
naming the step, the reason and the command to push later; DEST stays complete on disk.

Runs on: rank 0.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from distfinalize import __version__
from distfinalize.errors import DestinationError, DistfinalizeError

log = logging.getLogger(__name__)

REPO_TYPE = "model"
DEFAULT_BRANCH = "main"
DEFAULT_COMMIT_MESSAGE = "Upload model finalized with distfinalize"


@dataclass(frozen=True)
class HubOptions:
    """Where and how to push: `--push-to-hub REPO_ID --private --revision BRANCH --commit-message MSG`."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None

    def __post_init__(self) -> None:
        try:
            validate_repo_id(self.repo_id)
        except ValueError as exc:
            raise ValueError(
                f"--push-to-hub {self.repo_id!r} is not a repo id: use 'name' or 'namespace/name' "
                "(letters, digits, '-', '_', '.')"
            ) from exc
        if self.revision is not None and not self.revision.strip():
            raise ValueError("--revision must be a branch name, got an empty string")

    @property
    def message(self) -> str:
        """The commit message that is used."""
        return self.commit_message or DEFAULT_COMMIT_MESSAGE


def upload_files(directory: Path) -> list[str]:
    """The files under `directory` that are uploaded, as repo paths, in upload_folder's order.

    Like upload_folder: every file (symlinks followed, so a kept checkpoint's links upload their content),
    sorted, without `.git/` and `.cache/huggingface/`.
    """
    folder = Path(directory).expanduser().resolve()
    paths = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    return list(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def hub_preview(directory: Path, options: HubOptions) -> dict:
    """What push_to_hub would do (for --dry-run): repo, visibility, revision, message, files. Runs on: rank 0.

    In a dry run DEST does not exist yet; then `files` is empty and the caller lists the planned files.
    """
    files = upload_files(directory) if Path(directory).is_dir() else []
    return {
        "repo_id": options.repo_id,
        "repo_type": REPO_TYPE,
        "private": options.private,
        "revision": options.revision or DEFAULT_BRANCH,
        "commit_message": options.message,
        "files": files,
    }


def push_to_hub(directory: Path, options: HubOptions, *, api: HfApi | None = None) -> str:
    """Upload `directory` (the committed DEST) to `options.repo_id`; returns the commit URL. Runs on: rank 0.

    `api` defaults to `HfApi()` (token from the environment or the login cache).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DestinationError("nothing to push: DEST is not a directory", where=directory)
    api = api or HfApi(library_name="distfinalize", library_version=__version__)
    files = upload_files(directory)
    if not files:
        raise DestinationError("nothing to push: DEST is empty", where=directory)
    if (api.token if api.token is not None else get_token()) is None:
        raise DistfinalizeError(
            "cannot push to the Hub: no Hugging Face token",
            where=options.repo_id,
            hint=f"set HF_TOKEN or run `hf auth login`. {_later(directory, options)}",
        )
    step = "create the repo"
    try:
        repo_id = api.create_repo(options.repo_id, private=options.private, exist_ok=True, repo_type=REPO_TYPE).repo_id
        if options.revision and options.revision != DEFAULT_BRANCH:
            step = f"create the branch {options.revision!r}"
            api.create_branch(repo_id, branch=options.revision, exist_ok=True, repo_type=REPO_TYPE)
        step = f"upload {len(files)} files"
        log.info("pushing %d files from %s to %s (revision %s)", len(files), directory, repo_id, options.revision)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            repo_type=REPO_TYPE,
            revision=options.revision,
            commit_message=options.message,
            allow_patterns=[glob.escape(f) for f in files],
        )
    except Exception as exc:  # any failure past this point leaves DEST complete: say so, whatever raised it
        raise DistfinalizeError(
            f"cannot push to the Hub (could not {step})",
            where=options.repo_id,
            hint=f"{_reason(exc)}. {_later(directory, options)}",
        ) from exc
    url = commit.commit_url
    log.info("pushed to %s", url)
    return url


def _reason(exc: BaseException) -> str:
    """One line saying why the Hub call failed."""
    first = (str(exc).splitlines() or [""])[0].strip().rstrip(".")
    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it to push"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return f"the Hub refused the token (HTTP {status}); check HF_TOKEN or run `hf auth login`"
        return f"the Hub answered: {first}"
    if isinstance(exc, (HTTPError, ConnectionError, TimeoutError)):
        return f"the Hub could not be reached ({type(exc).__name__}: {first})"
    return f"{type(exc).__name__}: {first}"


def _later(directory: Path, options: HubOptions) -> str:
    """The hint for pushing by hand once the problem is fixed."""
    command = f"hf upload {options.repo_id} {directory}"
    if options.revision:
        command += f" --revision {options.revision}"
    if options.private:
        command += " --private"
    return f"DEST is complete on disk at {directory}; push it later with `{command}`"
