"""model.safetensors.index.json, as transformers writes it. Runs on: rank 0."""

from __future__ import annotations

from pathlib import Path

from distfinalize.hfnames import INDEX_FILE, write_json
from distfinalize.plan import Plan


def write_index(plan: Plan, directory: Path) -> Path | None:
    """Write the index when the model spans several files; one file needs none (like save_pretrained)."""
    if not plan.sharded:
        return None
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(plan.weight_map.items()))}
    return write_json(directory / INDEX_FILE, index)
