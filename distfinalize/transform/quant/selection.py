"""Which weights --quantize quantizes, the config.json block and the card's list of what stays unquantized.

Pure, from the prepared metadata. Runs on: all ranks (the plan), rank 0 (config.json, card).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from distfinalize.config import FinalizeConfig
from distfinalize.errors import DeviceError
from distfinalize.transform.names import TIE_CANDIDATES
from distfinalize.transform.quant.base import DEFAULT_IGNORE, Recipe, module_of
from distfinalize.transform.quant.recipes import RECIPES

if TYPE_CHECKING:
    from distfinalize.prepare.prepared import Prepared


def embedding_names(prepared: Prepared) -> list[str]:
    """The input and output embedding matrices (whichever the output holds)."""
    if prepared.spec is not None:
        return [n for n in (prepared.spec.input_embedding, prepared.spec.output_embedding) if n]
    return [name for pair in TIE_CANDIDATES for name in reversed(pair)]


@dataclass(frozen=True)
class QuantSelection:
    """Which weights a --quantize run quantizes: the recipe, and what it leaves as it is. Pure."""

    recipe: Recipe
    output_embedding: str | None
    input_embedding: str | None = None
    tied: frozenset[str] = frozenset()  # aliases and what they alias: nothing tied is quantized
    ignore: tuple[str, ...] = ()  # module-name regexes: --quantize-ignore, then weights holding NaN/Inf

    def quantizes(self, name: str, shape: tuple[int, ...]) -> bool:
        return quantizable(
            name,
            shape,
            self.output_embedding,
            recipe=self.recipe,
            spec_input_embedding=self.input_embedding,
            tied=self.tied,
            ignore=self.ignore,
        )

    def ignored(self, tensors: Iterable[tuple[str, tuple[int, ...]]]) -> list[str]:
        """Module names of the 2-D weights left unquantized (config block and card)."""
        return ignored_modules(
            tensors,
            self.output_embedding,
            recipe=self.recipe,
            spec_input_embedding=self.input_embedding,
            tied=self.tied,
            ignore=self.ignore,
        )


def quant_selection(config: FinalizeConfig, prepared: Prepared) -> QuantSelection:
    """The selection for this model: its embeddings, its tied weights, the user's and the NaN/Inf ignores."""
    from distfinalize.transform.quant.recipes import get_recipe

    spec = prepared.spec
    tied = set(spec.tied) | set(spec.tied.values()) if spec is not None else set()
    if prepared.tied:
        tied |= set(embedding_names(prepared))
    return QuantSelection(
        recipe=get_recipe(config.quantize),
        output_embedding=spec.output_embedding if spec is not None else TIE_CANDIDATES[0][0],
        input_embedding=spec.input_embedding if spec is not None else TIE_CANDIDATES[0][1],
        tied=frozenset(tied),
        ignore=(*config.quantize_ignore, *nonfinite_patterns(prepared.nonfinite)),
    )


def nonfinite_patterns(names: Iterable[str]) -> list[str]:
    """Anchored module-name regexes of weights left unquantized for holding NaN or Inf (--quantize-skip-nonfinite).
    Pure."""
    from distfinalize.transform.quant.base import module_of

    return [f"^{re.escape(module_of(name))}$" for name in sorted(names)]


def quantized_tensors(config: FinalizeConfig, prepared: Prepared) -> dict[str, str]:
    """Which tensors --quantize quantizes (name -> recipe). Pure. Runs on: all ranks."""
    if config.quantize is None:
        return {}

    selection = quant_selection(config, prepared)
    return {t.name: config.quantize for t in prepared.tensors if selection.quantizes(t.name, tuple(t.shape))}


def quantization_config(config: FinalizeConfig, prepared: Prepared) -> dict | None:
    """The recipe's config.json block, listing the 2-D weights left unquantized."""
    if config.quantize is None:
        return None
    from distfinalize.transform.quant.recipes import get_recipe

    return get_recipe(config.quantize).config_block(unquantized_modules(config, prepared))


def unquantized_modules(config: FinalizeConfig, prepared: Prepared) -> list[str]:
    """Module names of the Linear weights --quantize leaves as they are (config block and card). Pure."""
    if config.quantize is None:
        return []

    selection = quant_selection(config, prepared)
    tensors = [(t.name, tuple(t.shape)) for t in prepared.tensors]
    if prepared.tied and selection.output_embedding not in {name for name, _ in tensors}:
        tensors.append((selection.output_embedding, ()))  # written once as the input embedding; ignored too
    linears = [(n, s) for n, s in tensors if s and n != selection.input_embedding]  # an embedding is no Linear
    return selection.ignored(linears)


def check_requirement(recipe: Recipe, device: torch.device, dtype: torch.dtype | None, where: str) -> None:
    """Refuse up front a recipe the rank's device or the model dtype cannot run (DeviceError).

    Runs on: every rank, in the prepare step, before anything is written.
    """
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    problem = recipe.requires.problem(device.type, capability, dtype)
    if problem is None:
        return
    others = [r.name for r in RECIPES.values() if r.requires.problem(device.type, capability, dtype) is None]
    raise DeviceError(
        f"--quantize {recipe.name} {problem}",
        where=where,
        hint=f"{recipe.requires.needed_by + '; ' if recipe.requires.needed_by else ''}run it where that holds, "
        f"or choose a recipe this machine runs: {', '.join(others)}",
    )


def quantizable(
    name: str,
    shape: tuple[int, ...],
    spec_output_embedding: str | None,
    *,
    recipe: Recipe,
    spec_input_embedding: str | None = None,
    tied: Collection[str] = (),
    ignore: Sequence[str] = (),
) -> bool:
    """Whether the recipe quantizes this tensor (pure, from metadata). Runs on: all ranks (the plan).

    Left unquantized: anything not a 2-D ``.weight`` (biases, norms, 1-D tensors, fused 3-D experts); the input
    and output embeddings; every name in `tied` (aliases and what they alias: nothing tied is quantized); modules
    matching DEFAULT_IGNORE (lm_head, embed, norm, router, gate) or a user `ignore` regex (re.search on the module
    name); and shapes the recipe cannot divide (Recipe.supports).
    """
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    if name in (spec_output_embedding, spec_input_embedding):
        return False
    if name in tied:
        return False
    module = module_of(name)
    if any(re.search(p, module) for p in (*DEFAULT_IGNORE, *ignore)):
        return False
    return recipe.supports(tuple(shape))


def ignored_modules(
    tensors: Iterable[tuple[str, tuple[int, ...]]],
    spec_output_embedding: str | None,
    *,
    recipe: Recipe,
    spec_input_embedding: str | None = None,
    tied: Collection[str] = (),
    ignore: Sequence[str] = (),
) -> list[str]:
    """Module names of the 2-D weights left unquantized: the list config_block() and the card record. Pure."""
    kwargs = {"recipe": recipe, "spec_input_embedding": spec_input_embedding, "tied": tied, "ignore": ignore}
    return [
        module_of(name)
        for name, shape in tensors
        if name.endswith(".weight")
        and len(shape) == 2
        and not quantizable(name, shape, spec_output_embedding, **kwargs)
    ]
