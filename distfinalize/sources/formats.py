"""The input formats, by name: the registry the locator searches, first match winning."""

from __future__ import annotations

from pathlib import Path

from distfinalize.sources import Source, SourceFormat
from distfinalize.sources.accelerate_ranks import ACCELERATE_RANKS_FORMAT
from distfinalize.sources.dcp import DCP_FORMAT
from distfinalize.sources.deepspeed.source import DEEPSPEED_FORMAT
from distfinalize.sources.safetensors_dir import SAFETENSORS_FORMAT
from distfinalize.sources.torchbin import TORCH_BIN_FORMAT
from distfinalize.sources.verl import VERL_FORMAT

_ORDER = (DCP_FORMAT, DEEPSPEED_FORMAT, VERL_FORMAT, ACCELERATE_RANKS_FORMAT, SAFETENSORS_FORMAT, TORCH_BIN_FORMAT)
FORMATS: dict[str, SourceFormat] = {fmt.name: fmt for fmt in _ORDER}


def detect_format(path: Path, fallback: bool | None = None) -> SourceFormat | None:
    """The first format that recognises `path` as a checkpoint folder; `fallback` True or False limits the search
    to the model-weight formats (a Hugging Face model dir) or to the others."""
    found = (fmt for fmt in FORMATS.values() if fallback in (None, fmt.fallback) and fmt.detect(path))
    return next(found, None)


def format_of(source: Source) -> SourceFormat:
    """The registry entry of an opened source (what it can do)."""
    return FORMATS[source.info.format]
