"""distfinalize: sharded training checkpoints -> Hugging Face model directories, every rank at once.

    distfinalize.finalize(src, dest, **options)   finalize from Python (inside a training job, or alone)
    distfinalize.FinalizeCallback(dest, **options) a transformers TrainerCallback that finalizes on train end

Both are imported on first use, so `import distfinalize` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DistfinalizeError", "FinalizeCallback", "__version__", "finalize"]

if TYPE_CHECKING:
    from distfinalize.api import finalize
    from distfinalize.callback import FinalizeCallback
    from distfinalize.errors import DistfinalizeError

_LAZY = {
    "finalize": ("distfinalize.api", "finalize"),
    "FinalizeCallback": ("distfinalize.callback", "FinalizeCallback"),
    "DistfinalizeError": ("distfinalize.errors", "DistfinalizeError"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'distfinalize' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
