"""Leave out what other libraries log at import time that no user can act on; import before transformers.

Filtered by logger name and message only (distfinalize.logs filters the same messages in the package):
torchao's lines about its optional C++ kernels (CUDA-only builds) and a missing triton, and torch's pytree
deprecation of register_constant() on Enum subclasses (from libraries registering them at import).
"""

from __future__ import annotations

import logging
import re

NOISE = {
    "torchao": r"^Failed to load \S*_C\S*\.so|^Skipping import of cpp extensions",
    "torchao.kernel.intmm": r"Detected no triton",
    "torch.utils._pytree": r"register_constant\(\) on Enum subclasses is deprecated",
}

for _name, _pattern in NOISE.items():
    logging.getLogger(_name).addFilter(lambda record, p=re.compile(_pattern): not p.search(record.getMessage()))
