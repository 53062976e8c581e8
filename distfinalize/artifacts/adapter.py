"""adapter_config.json of a PEFT adapter dir: peft's own LoraConfig.save_pretrained, with sets written as sorted
lists so that the bytes do not depend on the process's string hashing. Runs on: rank 0."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distfinalize.prepare.peft import LoraLayout


def adapter_config_preview(layout: LoraLayout) -> dict[str, Any]:
    """adapter_config.json as data (sets as sorted lists), for --dry-run."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in layout.config.to_dict().items()}


def write_adapter_config(layout: LoraLayout, directory: Path) -> None:
    """adapter_config.json, written by peft's LoraConfig.save_pretrained. Runs on: rank 0."""
    config = copy.copy(layout.config)
    vars(config).update({k: sorted(v) for k, v in vars(config).items() if isinstance(v, set)})
    config.save_pretrained(str(directory))
