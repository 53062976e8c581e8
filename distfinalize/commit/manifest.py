"""distfinalize-manifest.json: the one schema, written at the commit and read back by verify."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distfinalize.config import LoraOptions
from distfinalize.errors import DestinationError
from distfinalize.hfnames import write_json
from distfinalize.prepare.peft import LoraLayout
from distfinalize.transform.keymap import KeyMapRules

MANIFEST = "distfinalize-manifest.json"


def write_manifest(kept: Path, entries: Mapping[str, object]) -> Path:
    """manifest.json: what was kept, where it came from, and what was dropped."""
    return write_json(kept / "manifest.json", dict(entries))


def manifest_record(layout: LoraLayout, base_model: Path | None, src: Path) -> dict[str, Any]:
    """What distfinalize-manifest.json records of a LoRA finalize: enough for `verify --source` to redo it. The
    base model dir is recorded relative to SRC (the manifest is published; no absolute path), or by its Hub id when
    it is a snapshot in the Hugging Face cache."""
    from distfinalize.prepare.basemodel import snapshot_id

    cfg = layout.config
    targets = sorted(cfg.target_modules) if isinstance(cfg.target_modules, set) else cfg.target_modules
    repo_id = snapshot_id(base_model)
    base = os.path.relpath(base_model.resolve(), src.resolve()) if base_model and not repo_id else None
    hub = {"base_model_id": repo_id} if repo_id else {}
    return {
        "merge": layout.merge,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "target_modules": targets,
        "base_model": Path(base).as_posix() if base else None,
        **hub,
    }


def recorded_options(record: Mapping[str, Any], src: Path) -> tuple[LoraOptions, Path | None]:
    """The LoRA options and base model dir a manifest's record stands for (see manifest_record); a relative base
    model path is taken relative to `src`."""
    targets = record.get("target_modules")
    options = LoraOptions(
        merge=bool(record.get("merge")),
        r=record.get("r"),
        alpha=record.get("lora_alpha"),
        target_modules=tuple(targets) if isinstance(targets, list) else (),
        use_rslora=record.get("use_rslora"),
    )
    base, repo_id = record.get("base_model"), record.get("base_model_id")
    if isinstance(repo_id, str):  # a Hub id: the snapshot the Hugging Face cache holds
        from huggingface_hub import snapshot_download

        try:
            return options, Path(snapshot_download(repo_id, local_files_only=True))
        except (OSError, ValueError):
            return options, None
    return options, src / base if isinstance(base, str) else None


@dataclass(frozen=True)
class Quantization:
    """What --quantize did, as DEST's manifest records it."""

    recipe: str
    ignore: tuple[str, ...] = ()


def recorded_quantization(manifest: Mapping[str, Any] | None) -> Quantization | None:
    """The manifest's "quantization" entry; DestinationError when it is there but not one finalize writes."""
    entry = (manifest or {}).get("quantization")
    if entry is None:
        return None
    from distfinalize.transform.quant.recipes import RECIPES

    ignore = entry.get("ignore", []) if isinstance(entry, dict) else None
    nonfinite = entry.get("nonfinite", []) if isinstance(entry, dict) else None  # weights left for NaN/Inf
    if (
        not isinstance(entry, dict)
        or entry.get("recipe") not in RECIPES
        or not isinstance(ignore, list)
        or not isinstance(nonfinite, list)
        or not all(isinstance(p, str) for p in ignore + nonfinite)
    ):
        raise DestinationError(
            f"{MANIFEST} records a quantization this version does not know: {entry!r}",
            hint=f"known recipes: {', '.join(RECIPES)}",
        )
    from distfinalize.transform.quant.selection import nonfinite_patterns

    return Quantization(entry["recipe"], (*ignore, *nonfinite_patterns(nonfinite)))


def recorded_key_map(manifest: Mapping[str, Any] | None) -> str | KeyMapRules | None:
    """The key map finalize used when the user chose one (a name, or a file's rules recorded in the manifest)."""
    entry = (manifest or {}).get("key_map")
    if entry is None or isinstance(entry, str):
        return entry
    try:
        return KeyMapRules.from_mapping(entry, f"{MANIFEST} key_map")
    except ValueError as exc:
        raise DestinationError(str(exc), hint="DEST's manifest was changed after finalize") from exc
