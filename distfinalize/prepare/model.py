"""What the model that config.json describes expects: tensor names, shapes, tied aliases.

The architecture is instantiated on the meta device (no memory, no weights), so names are checked
against transformers itself rather than guessed. Runs on: all ranks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distfinalize.errors import SourceError
from distfinalize.hfnames import read_json_object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """The tensors a saved transformers model holds, in the model's own order."""

    config_path: Path
    architecture: str
    names: tuple[str, ...]  # saved tensors, tied aliases excluded
    shapes: Mapping[str, tuple[int, ...]]
    tied: Mapping[str, str]  # alias -> the name that is saved
    ignorable: frozenset[str]  # non-persistent buffers: never saved, dropped when a checkpoint has them
    config_dtype: str | None
    raw_config: Mapping[str, object] = field(default_factory=dict)  # config.json as read
    input_embedding: str | None = None  # e.g. model.embed_tokens.weight
    output_embedding: str | None = None  # e.g. lm_head.weight (may be a tied alias)

    @property
    def known(self) -> frozenset[str]:
        return frozenset(self.names) | frozenset(self.tied) | self.ignorable


def load_model_spec(config_path: Path) -> ModelSpec:
    """Instantiate config.json's architecture on the meta device and describe its state dict."""
    import transformers

    raw = read_json_object(config_path, SourceError, "config.json")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.from_pretrained(str(config_path.parent))
    except (ValueError, KeyError, OSError) as exc:
        raise SourceError(
            "transformers cannot read config.json",
            where=config_path,
            hint=f"{exc}".splitlines()[0] if str(exc) else "check the file",
        ) from exc
    architecture = (raw.get("architectures") or [None])[0]
    model = instantiate_on_meta(config, architecture, config_path)
    state = model.state_dict()
    tied: dict[str, str] = {}
    canonical: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        first = canonical.setdefault(id(tensor), name)
        if first != name:
            tied[name] = first
    names = tuple(n for n in state if n not in tied)
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    embeddings = [_weight_name(model, getter) for getter in (model.get_input_embeddings, model.get_output_embeddings)]
    return ModelSpec(
        config_path=config_path,
        architecture=type(model).__name__,
        names=names,
        shapes={n: tuple(t.shape) for n, t in state.items()},
        tied=tied,
        ignorable=frozenset(buffers - set(state)),
        config_dtype=_config_dtype(raw),
        raw_config=raw,
        input_embedding=embeddings[0],
        output_embedding=embeddings[1],
    )


def _weight_name(model: torch.nn.Module, getter: Callable[[], torch.nn.Module | None]) -> str | None:
    """The state-dict name of the weight of the module `getter` returns (an embedding), or None."""
    try:
        module = getter()
    except (NotImplementedError, AttributeError):
        return None
    return next((f"{name}.weight" for name, m in model.named_modules() if m is module and module is not None), None)


def instantiate_on_meta(config: object, architecture: str | None, config_path: Path) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, architecture, None) if architecture else None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if cls is not None:
                return cls(config)
            return transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise SourceError(
            f"cannot build the architecture {architecture or config.model_type!r} from config.json",
            where=config_path,
            hint=f"{exc}".splitlines()[0] if str(exc) else None,
        ) from exc


def _config_dtype(raw: Mapping[str, object]) -> str | None:
    value = raw.get("dtype") or raw.get("torch_dtype")
    return value if isinstance(value, str) and value != "auto" else None
