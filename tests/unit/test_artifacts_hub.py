"""Pushing DEST to the Hub.

The Hub cannot be reached from the test machines. Only the network boundary is faked: `RecordingHfApi`
subclasses huggingface_hub's real `HfApi` and overrides the methods that send HTTP requests
(`create_repo`, `create_branch`, `upload_folder`, and `_validate_yaml`, upload_folder's README check).
The fake `upload_folder` selects its files with huggingface_hub's own folder listing
(`HfApi._prepare_upload_folder_additions`) and the arguments push_to_hub passed, so the list asserted is the
list the real library would upload. The no-network tests at the end use no fake at all: a real `HfApi` at an
unreachable endpoint, and a real `HfApi()` under `HF_HUB_OFFLINE=1` in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import CommitInfo, RepoUrl

from distfinalize.artifacts.card import CardInfo, write_model_card
from distfinalize.artifacts.hub import DEFAULT_COMMIT_MESSAGE, HubOptions, hub_preview, push_to_hub, upload_files
from distfinalize.errors import DestinationError, DistfinalizeError

ENDPOINT = "https://hub.invalid"
USER = "fake-user"
HTTP = importlib.import_module(HTTPError.__module__.split(".")[0])  # httpx2 (huggingface_hub 2.x) or httpx (1.x)

# What DEST holds after a --keep-checkpoint finalize with remote code, and what must be uploaded.
EXPECTED_FILES = [
    "README.md",
    "checkpoints/checkpoint-3/manifest.json",
    "checkpoints/checkpoint-3/model.safetensors",
    "config.json",
    "generation_config.json",
    "model.safetensors",  # a relative symlink into checkpoints/: uploaded as its content
    "modeling_tiny.py",
    "notes[v1].txt",  # glob characters in a name must not break the exact file selection
    "tokenizer.json",
    "tokenizer_config.json",
]


def make_dest(tmp_path: Path) -> Path:
    dest = tmp_path / "tiny-sft"
    (dest / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (dest / "checkpoints" / "checkpoint-3" / "model.safetensors").write_bytes(b"\0" * 64)
    (dest / "checkpoints" / "checkpoint-3" / "manifest.json").write_text("{}")
    (dest / "model.safetensors").symlink_to(Path("checkpoints/checkpoint-3/model.safetensors"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (dest / name).write_text("{}")
    (dest / "modeling_tiny.py").write_text("pass\n")
    (dest / "notes[v1].txt").write_text("n")
    (dest / ".git").mkdir()
    (dest / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # never uploaded (huggingface_hub's rule)
    (dest / ".cache" / "huggingface").mkdir(parents=True)
    (dest / ".cache" / "huggingface" / "upload.lock").write_text("")
    write_model_card(dest, CardInfo("dcp", "run/step-3", 3, 2, "bfloat16", None, None, training_method="sft"))
    return dest


def tree(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


class RecordingHfApi(HfApi):
    """The real HfApi with its network methods replaced: records every call; `fail` maps a method to an error."""

    def __init__(self, fail: dict[str, BaseException] | None = None, token: str | None = "hf_fake_token") -> None:
        super().__init__(endpoint=ENDPOINT, token=token)
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: list[str] = []
        self.fail = fail or {}

    def _record(self, method: str, *args: object, **kwargs: object) -> None:
        self.calls.append((method, args, kwargs))
        if method in self.fail:
            raise self.fail[method]

    def create_repo(self, repo_id: str, **kwargs: object) -> RepoUrl:  # type: ignore[override]
        self._record("create_repo", repo_id, **kwargs)
        full_id = repo_id if "/" in repo_id else f"{USER}/{repo_id}"  # the Hub puts a bare name under the user
        return RepoUrl(f"{ENDPOINT}/{full_id}", endpoint=ENDPOINT)

    def create_branch(self, repo_id: str, **kwargs: object) -> None:  # type: ignore[override]
        self._record("create_branch", repo_id, **kwargs)

    def _validate_yaml(self, content: str, **kwargs: object) -> None:  # a POST to /api/validate-yaml
        ModelCard(content)  # what we can check offline: the metadata parses

    def upload_folder(self, **kwargs: object) -> CommitInfo:  # type: ignore[override]
        self._record("upload_folder", **kwargs)
        from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

        ops = self._prepare_upload_folder_additions(  # the real library's file selection
            kwargs["folder_path"],
            kwargs.get("path_in_repo") or "",
            allow_patterns=kwargs.get("allow_patterns"),
            ignore_patterns=[*(kwargs.get("ignore_patterns") or []), *DEFAULT_IGNORE_PATTERNS],
            repo_type=kwargs.get("repo_type"),
        )
        self.uploaded = [op.path_in_repo for op in ops]
        url = f"{ENDPOINT}/{kwargs['repo_id']}/commit/{'a' * 40}"
        return CommitInfo(url, kwargs.get("commit_message") or "", "", "a" * 40, _endpoint=ENDPOINT)


def call_names(api: RecordingHfApi) -> list[str]:
    return [name for name, _, _ in api.calls]


def test_push_with_branch_private_and_message(tmp_path: Path) -> None:
    dest = make_dest(tmp_path)
    before = tree(dest)
    options = HubOptions("alice/tiny-sft", private=True, revision="sft-run-3", commit_message="SFT step 3")
    api = RecordingHfApi()
    url = push_to_hub(dest, options, api=api)
    assert url == f"{ENDPOINT}/alice/tiny-sft/commit/{'a' * 40}"
    assert call_names(api) == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1:] == (("alice/tiny-sft",), {"private": True, "exist_ok": True, "repo_type": "model"})
    assert api.calls[1][1:] == (("alice/tiny-sft",), {"branch": "sft-run-3", "exist_ok": True, "repo_type": "model"})
    upload = api.calls[2][2]
    assert upload["repo_id"] == "alice/tiny-sft"
    assert upload["repo_type"] == "model"
    assert upload["revision"] == "sft-run-3"
    assert upload["commit_message"] == "SFT step 3"
    assert Path(upload["folder_path"]) == dest
    assert api.uploaded == EXPECTED_FILES
    assert tree(dest) == before  # DEST is only read


def test_push_to_main_creates_no_branch(tmp_path: Path) -> None:
    dest = make_dest(tmp_path)
    for revision in (None, "main"):
        api = RecordingHfApi()
        push_to_hub(dest, HubOptions("tiny-sft", revision=revision), api=api)
        assert call_names(api) == ["create_repo", "upload_folder"]
        assert api.calls[0][1:] == (("tiny-sft",), {"private": False, "exist_ok": True, "repo_type": "model"})
        upload = api.calls[1][2]
        assert (upload["repo_id"], upload["revision"]) == ("fake-user/tiny-sft", revision)
        assert upload["commit_message"] == DEFAULT_COMMIT_MESSAGE
        assert api.uploaded == EXPECTED_FILES


def test_preview_lists_what_push_uploads(tmp_path: Path) -> None:
    dest = make_dest(tmp_path)
    options = HubOptions("alice/tiny-sft", private=True, revision="sft-run-3")
    assert hub_preview(dest, options) == {
        "repo_id": "alice/tiny-sft",
        "repo_type": "model",
        "private": True,
        "revision": "sft-run-3",
        "commit_message": DEFAULT_COMMIT_MESSAGE,
        "files": EXPECTED_FILES,
    }
    assert upload_files(dest) == EXPECTED_FILES
    assert hub_preview(tmp_path / "not-yet-written", options)["files"] == []  # dry run: DEST does not exist


def http_error(status: int) -> HfHubHTTPError:
    response = HTTP.Response(status, request=HTTP.Request("POST", f"{ENDPOINT}/api/repos/create"))
    return HfHubHTTPError(f"{status} Client Error\nRequest ID: xyz\nmore detail", response=response)


@pytest.mark.parametrize(
    ("method", "error", "reason"),
    [
        ("create_repo", HTTP.ConnectError("[Errno 111] Connection refused"), "could not be reached (ConnectError"),
        ("create_repo", http_error(401), "refused the token (HTTP 401)"),
        ("create_branch", http_error(403), "refused the token (HTTP 403)"),
        ("create_branch", http_error(500), "the Hub answered: 500 Client Error"),
        ("upload_folder", OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE is set"),
        ("upload_folder", HTTP.ReadTimeout("timed out"), "could not be reached (ReadTimeout: timed out)"),
        ("upload_folder", RuntimeError("xet: upload aborted\ndetails"), "RuntimeError: xet: upload aborted"),
    ],
)
def test_hub_failure_is_one_clear_error(tmp_path: Path, method: str, error: BaseException, reason: str) -> None:
    dest = make_dest(tmp_path)
    before = tree(dest)
    api = RecordingHfApi(fail={method: error})
    with pytest.raises(DistfinalizeError) as info:
        push_to_hub(dest, HubOptions("alice/tiny-sft", revision="v2"), api=api)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot push to the Hub (could not ")
    assert ": alice/tiny-sft. " in message
    assert reason in message
    assert (
        f"DEST is complete on disk at {dest}; push it later with `hf upload alice/tiny-sft {dest} --revision v2`"
        in (message)
    )
    assert info.value.__cause__ is error
    assert call_names(api)[-1] == method  # nothing after the failed call
    assert tree(dest) == before


def test_nothing_to_push(tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match="not a directory"):
        push_to_hub(tmp_path / "missing", HubOptions("alice/x"), api=RecordingHfApi())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DestinationError, match="DEST is empty"):
        push_to_hub(tmp_path / "empty", HubOptions("alice/x"), api=RecordingHfApi())


@pytest.mark.parametrize("repo_id", ["a/b/c", "has space/x", "", "-bad/x"])
def test_bad_repo_id_is_refused(repo_id: str) -> None:
    with pytest.raises(ValueError, match="is not a repo id"):
        HubOptions(repo_id)


def test_unreachable_endpoint_fails_fast_without_fakes(tmp_path: Path) -> None:
    """A real HfApi pointed at a closed local port: the real connection error becomes the clear error."""
    dest = make_dest(tmp_path)
    start = time.monotonic()
    with pytest.raises(DistfinalizeError, match=r"could not create the repo.*could not be reached") as info:
        push_to_hub(dest, HubOptions("alice/tiny-sft"), api=HfApi(endpoint="http://127.0.0.1:9", token="hf_fake"))
    assert time.monotonic() - start < 30
    assert "DEST is complete on disk" in str(info.value)


def test_offline_and_no_token_with_the_default_api(tmp_path: Path) -> None:
    """No fake: push_to_hub's own HfApi() in a fresh process with an empty HF_HOME and HF_HUB_OFFLINE=1.

    Without a token the error comes before any request (else it would be the offline error); with HF_TOKEN set,
    the real offline refusal of create_repo becomes the clear error."""
    dest = make_dest(tmp_path)
    script = (
        "import json, os, sys\n"
        "from pathlib import Path\n"
        "from distfinalize.artifacts.hub import HubOptions, push_to_hub\n"
        "out = []\n"
        "for token in (None, 'hf_fake_token'):\n"
        "    if token:\n"
        "        os.environ['HF_TOKEN'] = token\n"
        "    try:\n"
        "        push_to_hub(Path(sys.argv[1]), HubOptions('alice/tiny-sft'))\n"
        "        out.append('pushed?!')\n"
        "    except Exception as exc:\n"
        "        out.append(f'{type(exc).__name__}: {exc}')\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    done = subprocess.run(
        [sys.executable, "-c", script, str(dest)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    no_token, offline = json.loads(done.stdout.strip().splitlines()[-1])
    assert no_token.startswith("DistfinalizeError: cannot push to the Hub: no Hugging Face token: alice/tiny-sft.")
    assert offline.startswith("DistfinalizeError: cannot push to the Hub (could not create the repo): alice/tiny-sft.")
    assert "HF_HUB_OFFLINE is set" in offline
    assert f"push it later with `hf upload alice/tiny-sft {dest}`" in offline
