"""Which weights --quantize quantizes, the config.json block and the card's list of what stays unquantized.

Pure, from the prepared metadata. Runs on: all ranks (the plan), rank 0 (config.json, card).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from distfinalize.config import FinalizeConfig
from distfinalize.transform.keymap import TIE_CANDIDATES

if TYPE_CHECKING:
    from distfinalize.pipeline import Prepared


def embedding_names(prepared: Prepared) -> list[str]:
    """The input and output embedding matrices (whichever the output holds)."""
    if prepared.spec is not None:
        return [n for n in (prepared.spec.input_embedding, prepared.spec.output_embedding) if n]
    return [name for pair in TIE_CANDIDATES for name in reversed(pair)]


def quantization_rules(config: FinalizeConfig, prepared: Prepared) -> dict[str, Any]:
    """The keyword arguments of quantize.quantizable / ignored_modules for this model."""
    from distfinalize.transform.quantize import get_recipe

    spec = prepared.spec
    tied = set(spec.tied) | set(spec.tied.values()) if spec is not None else set()
    if prepared.tied:
        tied |= set(embedding_names(prepared))
    return {
        "spec_output_embedding": spec.output_embedding if spec is not None else TIE_CANDIDATES[0][0],
        "recipe": get_recipe(config.quantize),
        "spec_input_embedding": spec.input_embedding if spec is not None else TIE_CANDIDATES[0][1],
        "tied": tied,
        "ignore": (*config.quantize_ignore, *nonfinite_patterns(prepared.nonfinite)),
    }


def nonfinite_patterns(names: Iterable[str]) -> list[str]:
    """Anchored module-name regexes of weights left unquantized for holding NaN or Inf (--quantize-skip-nonfinite).
    Pure."""
    from distfinalize.transform.quantize import module_of

    return [f"^{re.escape(module_of(name))}$" for name in sorted(names)]


def quantized_tensors(config: FinalizeConfig, prepared: Prepared) -> dict[str, str]:
    """Which tensors --quantize quantizes (name -> recipe). Pure. Runs on: all ranks."""
    if config.quantize is None:
        return {}
    from distfinalize.transform.quantize import quantizable

    rules = quantization_rules(config, prepared)
    output_embedding = rules.pop("spec_output_embedding")
    return {t.name: config.quantize for t in prepared.tensors
            if quantizable(t.name, tuple(t.shape), output_embedding, **rules)}  # fmt: skip


def quantization_config(config: FinalizeConfig, prepared: Prepared) -> dict | None:
    """The recipe's config.json block, listing the 2-D weights left unquantized."""
    if config.quantize is None:
        return None
    from distfinalize.transform.quantize import get_recipe

    return get_recipe(config.quantize).config_block(unquantized_modules(config, prepared))


def unquantized_modules(config: FinalizeConfig, prepared: Prepared) -> list[str]:
    """Module names of the Linear weights --quantize leaves as they are (config block and card). Pure."""
    if config.quantize is None:
        return []
    from distfinalize.transform.quantize import ignored_modules

    rules = quantization_rules(config, prepared)
    output_embedding = rules.pop("spec_output_embedding")
    tensors = [(t.name, tuple(t.shape)) for t in prepared.tensors]
    if prepared.tied and output_embedding not in {name for name, _ in tensors}:
        tensors.append((output_embedding, ()))  # written once as the input embedding; listed as ignored too
    input_embedding = rules["spec_input_embedding"]
    linears = [(n, s) for n, s in tensors if s and n != input_embedding]  # an embedding is not a Linear
    return ignored_modules(linears, output_embedding, **rules)
