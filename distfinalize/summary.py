"""What a finalize tells its user on rank 0: the plan before writing, the summary after the commit."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from distfinalize.config import format_bytes

if TYPE_CHECKING:
    from distfinalize.artifacts.tokenizer import TokenizerOutcome
    from distfinalize.plan import Plan
    from distfinalize.prepare.prepared import Prepared

log = logging.getLogger(__name__)


def log_plan(plan: Plan, prepared: Prepared, tokenizer: TokenizerOutcome, vocab_size: int | None) -> None:
    """Rank 0: what will be done."""
    info = prepared.source.info
    log.info(
        "source: %s checkpoint %s (step %s, saved by %s rank(s)), %d model tensors, %d other entries skipped",
        info.format,
        info.path,
        info.step,
        info.saved_world_size,
        len(prepared.tensors),
        info.skipped,
    )
    log.info(
        "dtype: %s (%s)",
        str(prepared.dtype).removeprefix("torch.") if prepared.dtype else "as stored",
        prepared.dtype_reason,
    )
    if vocab_size is not None:
        log.info("vocabulary: embedding rows -> %d (%d token(s) added)", vocab_size, len(tokenizer.added))
    if prepared.lora is not None:
        lora = prepared.lora.summary()
        log.info(
            "LoRA checkpoint (r=%s, alpha=%s, targets %s; settings from %s): writing %s",
            lora["r"],
            lora["lora_alpha"],
            lora["target_modules"],
            lora["config_from"],
            "the merged model" if prepared.lora.merge else "a PEFT adapter dir",
        )
    log.info("plan: %d file(s), %s, %d rank(s)", len(plan.files), format_bytes(plan.total_size), plan.world_size)
