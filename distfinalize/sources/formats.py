"""The input formats, by name: the registry the locator searches, first match winning."""

from __future__ import annotations

from pathlib import Path

from distfinalize.sources import Source, SourceFormat
from distfinalize.sources.accelerate_ranks import ACCELERATE_RANKS_FORMAT
from distfinalize.sources.dcp import DCP_FORMAT
from distfinalize.sources.deepspeed.source import DEEPSPEED_FORMAT
from distfinalize.sources.verl import VERL_FORMAT

FORMATS: dict[str, SourceFormat] = {
    fmt.name: fmt for fmt in (DCP_FORMAT, DEEPSPEED_FORMAT, VERL_FORMAT, ACCELERATE_RANKS_FORMAT)
}


def detect_format(path: Path) -> SourceFormat | None:
    """The first format that recognises `path` as a checkpoint folder."""
    return next((fmt for fmt in FORMATS.values() if fmt.detect(path)), None)


def format_of(source: Source) -> SourceFormat:
    """The registry entry of an opened source (what it can do)."""
    return FORMATS[source.info.format]
