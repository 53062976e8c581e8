"""--base-model as a Hub id: resolved to its snapshot dir in the Hugging Face cache, with huggingface_hub's own
snapshot_download (allow_patterns: config, tokenizer, generation config, model code, and the weights when
--merge-lora must take base weights from it). HF_HUB_OFFLINE, HF_HUB_CACHE / HF_HOME and HF_TOKEN apply as
everywhere in huggingface_hub.

Rank 0 downloads (`fetch(..., download=True)`); then every rank reads the cache (`download=False`), so a job of
any size makes one set of Hub requests. Runs on: rank 0 (download), then all ranks (the cache).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from distfinalize.config import FinalizeConfig
from distfinalize.errors import SourceError
from distfinalize.hfnames import INDEX_FILE, SINGLE_FILE

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext

log = logging.getLogger(__name__)

CONFIG_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "*.py",
)
WEIGHT_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/[^/]+/?$")


def hub_id(config: FinalizeConfig) -> str | None:
    """The Hub id --base-model names: a value that is no local path and reads as `name` or `org/name`."""
    given = config.base_model
    if given is None or given.exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = given.as_posix()
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def snapshot_id(path: Path | None) -> str | None:
    """The Hub id of a local dir that is a snapshot in the Hugging Face cache (models--org--name/snapshots/SHA)."""
    if path is None:
        return None
    match = SNAPSHOT.search(path.resolve().as_posix())
    return match.group("repo").replace("--", "/") if match else None


def snapshot_repo(path: Path | None) -> Path | None:
    """The cache's repo dir (models--org--name) of a snapshot dir: its files link into the repo's blobs/."""
    return path.resolve().parent.parent if snapshot_id(path) else None


def card_base_model(dirs: Iterable[Path]) -> str | None:
    """The Hub id a trainer's model card names as `base_model` (TRL and the Trainer write README.md into the run's
    output_dir; a local base is left out there): the first README.md among `dirs` whose front matter has one."""
    import yaml

    for directory in dirs:
        try:
            text = (directory / "README.md").read_text(encoding="utf-8")[:65536]
            data = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
        except (OSError, ValueError, IndexError, yaml.YAMLError):
            continue
        base = data.get("base_model") if isinstance(data, dict) else None
        base = base[0] if isinstance(base, list) and len(base) == 1 else base
        if isinstance(base, str) and base and base != "None":
            return base
    return None


def base_model_hint(dirs: Iterable[Path]) -> str:
    """What to pass as --base-model: the model card's base model when there is one."""
    named = card_base_model(dirs)
    return f"the run's model card names base_model {named}: pass --base-model {named}" if named else ""


def has_weights(path: Path) -> bool:
    """Whether a base model dir holds safetensors weights (a Hub snapshot fetched without them does not)."""
    return (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()


def needs_weights(config: FinalizeConfig) -> bool:
    """--merge-lora of an adapter-only checkpoint takes its base weights from --base-model. Runs on: rank 0
    (metadata only: the checkpoint's names)."""
    if not config.lora.merge:
        return False
    from distfinalize.sources.locate import locate

    located = locate(config.src, config.checkpoint, config.tag)
    names = [t.name for t in located.format.open(located.path, located.step).tensors]
    return not any(".base_layer." in name for name in names)


def fetch(config: FinalizeConfig, repo_id: str, *, download: bool) -> Path:
    """The snapshot dir of `repo_id` holding what this finalize needs: downloaded into the cache (rank 0), or
    as the cache already holds it. Raises SourceError saying what is missing and what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    weights = needs_weights(config) if download else False
    patterns = [*CONFIG_PATTERNS, *(WEIGHT_PATTERNS if weights else ())]
    where = f"--base-model {repo_id} (a Hub id: no local dir has that name)"
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not download))
    except LocalEntryNotFoundError as exc:
        if download:
            hint = (
                "the Hub cannot be reached (or HF_HUB_OFFLINE is set) and the Hugging Face cache does not hold it: "
                f"run `hf download {repo_id}` where the Hub is reachable (same HF_HUB_CACHE), or pass a local dir"
            )
        else:
            hint = "rank 0 downloaded it, but this rank's Hugging Face cache does not hold it: point HF_HUB_CACHE "
            hint += "at a directory every node shares, or pass a local dir"
        raise SourceError("the base model is not in the Hugging Face cache", where=where, hint=hint) from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        hint = "check the id; for a private or gated model set HF_TOKEN (or `hf auth login`) to a token with access"
        raise SourceError("the Hub refuses the base model", where=where, hint=hint) from exc
    except RevisionNotFoundError as exc:
        raise SourceError("the base model has no such revision", where=where, hint=str(exc)) from exc
    except (HfHubHTTPError, OSError) as exc:
        hint = f"{str(exc).splitlines()[0] if str(exc) else exc!r}; retry, or pass a local dir"
        raise SourceError("cannot download the base model", where=where, hint=hint) from exc
    if not (path / "config.json").is_file():
        raise SourceError(
            "the base model has no config.json", where=f"{where} ({path.name})", hint="pass a transformers model"
        )
    if download:
        log.info("--base-model %s: %s", repo_id, "config, tokenizer and weights" if weights else "config and tokenizer")
    return path


def resolved(config: FinalizeConfig, repo_id: str, path: Path) -> FinalizeConfig:
    """The config with --base-model the snapshot dir, and the card's (and adapter's) base model the Hub id."""
    card = replace(config.card, base_model_id=config.card.base_model_id or repo_id)
    return replace(config, base_model=path, card=card)


def resolve(config: FinalizeConfig, ctx: DistContext, before: Callable[[], None]) -> FinalizeConfig:
    """--base-model as a Hub id becomes its snapshot dir in the Hugging Face cache: rank 0 runs `before` (the cheap
    DEST check), downloads, then every rank reads the cache; a cache snapshot given as a dir names its Hub id. The
    card's and the adapter's base model become the Hub id. Runs on: all ranks."""
    repo_id = hub_id(config)
    if repo_id is None:
        found = snapshot_id(config.base_model)
        return resolved(config, found, config.base_model) if found and config.base_model else config

    def download() -> None:
        before()
        fetch(config, repo_id, download=True)

    ctx.run_step("base model", download, ranks="rank0")
    path = ctx.run_step("base model", lambda: fetch(config, repo_id, download=False))
    return resolved(config, repo_id, path)
