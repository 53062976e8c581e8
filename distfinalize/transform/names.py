"""Checkpoint name spelling: wrapper segments and container prefixes. Pure."""

from __future__ import annotations

import re

WRAPPER_SEGMENTS = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")

# Prefixes a trainer may put in front of the model's own names (DDP/DeepSpeed `module.`, a wrapping `model.`).
CONTAINER_PREFIXES = ("", "module.", "model.", "module.model.")

# Output-embedding / input-embedding pairs checked for tying when config.json does not say.
TIE_CANDIDATES = (("lm_head.weight", "model.embed_tokens.weight"),)


def strip_wrappers(name: str) -> str:
    """Remove torch.compile / FSDP1 / activation-checkpointing wrapper segments from a name."""
    return WRAPPER_SEGMENTS.sub("", name)
