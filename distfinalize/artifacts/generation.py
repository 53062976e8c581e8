"""generation_config.json: carried from the source, synthesized, or from a preset; ids from the final tokenizer.

End-of-turn tokens (auto-detected ones and --stop-tokens) are merged into `eos_token_id` as a list.
config.json's own eos_token_id is not changed. Runs on: rank 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from distfinalize.artifacts.tokenizer import TokenizerOutcome
from distfinalize.config import GenerationOptions
from distfinalize.errors import SourceError, UsageError
from distfinalize.hfnames import read_json_object

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
AUTO_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eot|>", "<|end_of_turn|>")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p")


def read_preset(path: Path) -> dict:
    """A preset JSON: `max_tokens` becomes `max_new_tokens`; `do_sample` is inferred when absent."""
    data = read_json_object(path, UsageError, "the --generation-config preset")
    if "max_tokens" in data:
        data.setdefault("max_new_tokens", data.pop("max_tokens"))
    if "do_sample" not in data:
        greedy = data.get("temperature") == 0
        data["do_sample"] = not greedy and any(k in data for k in SAMPLING_KEYS)
        if greedy:
            data.pop("temperature")
    return data


def eos_ids(tokenizer: TokenizerOutcome, base_eos: object, options: GenerationOptions) -> int | list[int] | None:
    """The tokenizer's eos plus end-of-turn tokens, deduplicated; a list when there is more than one."""
    ids: list[int] = []
    for value in base_eos if isinstance(base_eos, list) else [base_eos]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    candidates = [*(AUTO_STOP_TOKENS if options.auto_stop_tokens else ()), *options.stop_tokens]
    for token in candidates:
        token_id = tokenizer.token_id(token)
        if token_id is None:
            if token in options.stop_tokens:
                raise UsageError(f"stop token {token!r} is not in the tokenizer's vocabulary", where="--stop-tokens")
            continue
        if token_id not in ids:
            ids.append(token_id)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def generation_config(
    carried: Path | None, tokenizer: TokenizerOutcome, model_config: Mapping[str, object], options: GenerationOptions
) -> dict | None:
    """The generation config to write, or None for --generation-config none."""
    if options.mode == "none":
        return None
    if options.preset is not None:
        data = read_preset(options.preset)
    elif carried is not None:
        data = read_json_object(carried, SourceError, "generation_config.json")
    else:
        data = {}
    ids = dict(tokenizer.special_ids) if tokenizer.path is not None else {}
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = ids.get(key)
        if value is None:
            value = data.get(key, model_config.get(key))
        if value is not None:
            data[key] = value
    merged = eos_ids(tokenizer, data.get("eos_token_id"), options)
    if merged is not None:
        data["eos_token_id"] = merged
    return data


def write_generation_config(directory: Path, data: Mapping[str, object]) -> Path:
    """Validate through transformers' GenerationConfig and save it (normalized) into `directory`.

    Remembered in the model check's cache (prepare/model.py): the same values under the same transformers and
    distfinalize versions give the same file, so a later run writes the cached bytes without importing
    transformers. Only valid configs are cached; a cache that cannot be read or written is ignored."""
    target = directory / GENERATION_CONFIG
    cached = _cache_path(data)
    if cached is not None:
        with contextlib.suppress(OSError):
            target.write_bytes(cached.read_bytes())
            return target
    from transformers import GenerationConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = GenerationConfig.from_dict(dict(data))
            config.validate(strict=True)
    except (ValueError, TypeError) as exc:
        raise UsageError("the generation config is not valid", hint=str(exc).splitlines()[0]) from exc
    config.save_pretrained(directory)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(target.read_bytes())
            os.replace(tmp, cached)
        except OSError as exc:
            log.debug("generation config cache not written (%s)", exc)
    return target


def _cache_path(data: Mapping[str, object]) -> Path | None:
    """Where the file written for `data` is cached: named by the values and the versions; None without a cache
    (or for values JSON cannot hold exactly)."""
    from importlib.metadata import PackageNotFoundError, version

    from distfinalize import __version__
    from distfinalize.prepare.model import spec_cache_dir

    folder = spec_cache_dir()
    if folder is None:
        return None
    try:
        key = json.dumps(dict(data), sort_keys=True, allow_nan=False)
        versions = f"|transformers {version('transformers')}|distfinalize {__version__}"
    except (TypeError, ValueError, PackageNotFoundError):
        return None
    return folder / f"generation-{hashlib.sha256((key + versions).encode()).hexdigest()}.json"


def find_generation_config(config_path: Path | None) -> Path | None:
    """The source's generation_config.json, next to its config.json."""
    if config_path is None:
        return None
    candidate = config_path.parent / "generation_config.json"
    return candidate if candidate.is_file() else None
