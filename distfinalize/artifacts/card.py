"""The model card (README.md): Hub metadata plus where the weights came from and how to load them.

Built with huggingface_hub's `ModelCard` / `ModelCardData`, so it parses back with `ModelCard.load`.
A card found in the source keeps its body and its metadata; ours is merged in (tags and datasets extended
without duplicates; `base_model`, `library_name`, `pipeline_tag` set to what the output is), and our
provenance section is appended between markers, replaced rather than repeated when the card is finalized again.

Runs on: rank 0.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from distfinalize.commit.staging import STAGING_SUFFIX
from distfinalize.errors import DestinationError, SourceError

if TYPE_CHECKING:  # imported where a card is built (rank 0): the other ranks never load the Hub client
    from huggingface_hub import ModelCard, ModelCardData

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
LIBRARY_NAME = "transformers"
TAG = "distfinalize"
CORE_LIBRARIES = ("torch", "transformers", "safetensors")
SECTION_START = "<!-- distfinalize:start -->"
SECTION_END = "<!-- distfinalize:end -->"
_SECTION = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END) + r"\n?", re.DOTALL)


@dataclass(frozen=True)
class CardInfo:
    """What the card says about the output. `model_name` titles the card and is the id in the load snippet
    (pass the Hub repo id when pushing); by default the DEST folder's name."""

    source_format: str
    source_path: str
    step: int | None
    saved_world_size: int | None
    dtype: str | None
    quantization: str | None
    base_model_id: str | None
    unquantized: tuple[str, ...] = ()  # Linear modules --quantize left as they are
    datasets: tuple[str, ...] = ()
    training_method: str | None = None
    log_urls: tuple[str, ...] = ()
    pipeline_tag: str = "text-generation"
    extra_libraries: tuple[str, ...] = ()
    model_name: str | None = None
    library_name: str = LIBRARY_NAME  # "peft" for an adapter dir


def card_preview(info: CardInfo, existing: Path | None = None) -> dict:
    """The card's metadata as a dict (what --dry-run reports), merged with `existing` when given. Runs on: rank 0."""
    return _card_data(info, _load_existing(existing)).to_dict()


def write_model_card(directory: Path, info: CardInfo, existing: Path | None = None) -> Path:
    """Write `directory/README.md`; carry the body and metadata of `existing` (a card in the source). Runs on: rank 0.

    Returns the path written. A new card is composed from `ModelCardData` alone: `ModelCard`'s module loads the
    Hub client (about 0.1 s, while the other ranks wait for the finish step); it is what `ModelCard` would write.
    """
    card = _load_existing(existing)
    name = info.model_name or _dest_name(directory)
    section = f"{SECTION_START}\n{card_body(info, name)}{SECTION_END}\n"
    if card is None:
        text = f"\n# {name}\n\n{section}"
    elif SECTION_START in card.text:
        text = _SECTION.sub(lambda _m: section, card.text, count=1)
    else:
        text = card.text.rstrip("\n") + "\n\n" + section
    content = f"---\n{_card_data(info, card).to_yaml()}\n---\n{text}"
    if card is not None:  # ModelCard is loaded already: let it normalize the merged card as it reads it back
        from huggingface_hub import ModelCard

        content = ModelCard(content).content
    path = directory / CARD_NAME
    try:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise DestinationError("cannot write the model card", where=path, hint=exc.strerror) from exc
    log.debug("wrote %s", path)
    return path


def card_body(info: CardInfo, name: str) -> str:
    """The Markdown our section holds: source checkpoint, weights, library versions, logs, how to load."""
    tool = " ".join(filter(None, ("distfinalize", _version("distfinalize"))))
    lines = [f"This model was finalized with {tool} from a training checkpoint."]
    if info.base_model_id:
        lines.append(f"Base model: [{info.base_model_id}](https://huggingface.co/{info.base_model_id}).")
    lines += [
        "",
        "## Source checkpoint",
        "",
        f"- Format: {info.source_format}",
        f"- Path: `{info.source_path}`",
        f"- Step: {_or_unknown(info.step)}",
        f"- Saved with world size: {_or_unknown(info.saved_world_size)}",
        "",
        "## Weights",
        "",
        f"- dtype: {info.dtype or 'as stored'}",
        *quantization_lines(info.quantization, info.unquantized),
        "",
        "## Library versions",
        "",
        "| Library | Version |",
        "|---|---|",
        *(f"| {lib} | {ver} |" for lib, ver in library_versions(info.extra_libraries)),
        "",
    ]
    if info.log_urls:
        lines += ["## Training logs", "", *(f"- <{url}>" for url in info.log_urls), ""]
    auto = "AutoPeftModelForCausalLM" if info.library_name == "peft" else "AutoModelForCausalLM"
    lines += [
        "## How to load",
        "",
        "```python",
        *(["from peft import AutoPeftModelForCausalLM"] if info.library_name == "peft" else []),
        f"from transformers import {'' if info.library_name == 'peft' else 'AutoModelForCausalLM, '}AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def quantization_lines(recipe: str | None, unquantized: tuple[str, ...]) -> list[str]:
    """The card's quantization bullets: the recipe, what it is, and the Linear modules left unquantized."""
    if recipe is None:
        return ["- Quantization: none"]
    from distfinalize.transform.quant.recipes import RECIPES

    known = RECIPES.get(recipe)
    what = f", {known.description} (round-to-nearest, no calibration)" if known is not None else ""
    left = ", ".join(f"`{p}`" if n == 1 else f"`{p}` ({n} modules)" for p, n in group_modules(unquantized))
    return [
        f"- Quantization: {recipe}{what}",
        f"- Left unquantized: embeddings, norms, biases{', and the Linear layers ' + left if left else ''}",
    ]


def group_modules(names: tuple[str, ...] | list[str]) -> list[tuple[str, int]]:
    """Module names grouped by pattern, layer numbers as `*`: [("model.layers.*.mlp.down_proj", 32), ...];
    a pattern only one module matches stays that module's name. Pure."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name), []).append(name)
    return [(members[0], 1) if len(members) == 1 else (p, len(members)) for p, members in groups.items()]


def library_versions(extras: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(name, version) of torch, transformers, safetensors, then of each extra that is installed."""
    out = [(name, _version(name) or "not installed") for name in CORE_LIBRARIES]
    for name in extras:
        version = _version(name)
        if version is not None and name not in CORE_LIBRARIES:
            out.append((name, version))
    return out


def _card_data(info: CardInfo, existing: ModelCard | None) -> ModelCardData:
    """Our metadata, merged into the existing card's when there is one."""
    from huggingface_hub import ModelCardData

    data = existing.data if existing is not None else ModelCardData()
    if info.base_model_id:
        data.base_model = info.base_model_id
    datasets = _merge(_as_list(data.datasets), info.datasets)
    data.datasets = datasets or None
    data.library_name = info.library_name
    data.tags = _merge(_as_list(data.tags), (TAG, *((info.training_method,) if info.training_method else ())))
    data.pipeline_tag = info.pipeline_tag
    return data


def _load_existing(existing: Path | None) -> ModelCard | None:
    if existing is None:
        return None
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(Path(existing))
    except OSError as exc:
        raise SourceError("cannot read the model card in the source", where=existing, hint=exc.strerror) from exc
    except (yaml.YAMLError, ValueError) as exc:  # malformed YAML header, or one that is not a mapping
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(
            "the model card in the source has malformed metadata",
            where=existing,
            hint=f"fix or remove its YAML header ({first})",
        ) from exc


def _merge(current: list[str], ours: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for item in (*current, *ours):
        if item not in out:
            out.append(item)
    return out


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _dest_name(directory: Path) -> str:
    return directory.name.removesuffix(STAGING_SUFFIX)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _or_unknown(value: object) -> str:
    return "unknown" if value is None else str(value)
