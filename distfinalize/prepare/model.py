"""What the model that config.json describes expects: tensor names, shapes, tied aliases.

The architecture is instantiated on the meta device (no memory, no weights), so names are checked
against transformers itself rather than guessed. Runs on: all ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distfinalize.errors import SourceError
from distfinalize.hfnames import read_json_object

log = logging.getLogger(__name__)
SPEC_CACHE_ENV = "DISTFINALIZE_CACHE_DIR"


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


def cached_model_spec(config_path: Path) -> ModelSpec:
    """load_model_spec, remembered: the same config.json bytes under the same transformers, torch and distfinalize
    versions describe the same model, so a later run (the next checkpoint of a training run) skips importing
    transformers and building the model. Models with their own code (`auto_map`) are never cached. The cache is
    $DISTFINALIZE_CACHE_DIR (empty or "off": none), else $XDG_CACHE_HOME/distfinalize, else ~/.cache/distfinalize.
    A cache that cannot be read or written is ignored. Runs on: rank 0."""
    try:
        raw = config_path.read_bytes()
    except OSError:
        raw = b""
    folder = spec_cache_dir()
    if folder is None or not raw or b'"auto_map"' in raw:
        return load_model_spec(config_path)
    path = folder / f"{hashlib.sha256(raw + _versions()).hexdigest()}.json"
    try:
        return _spec_from_json(json.loads(path.read_text(encoding="utf-8")), config_path)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    spec = load_model_spec(config_path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_spec_to_json(spec)), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("model spec cache not written (%s)", exc)
    return spec


def spec_cache_dir() -> Path | None:
    value = os.environ.get(SPEC_CACHE_ENV)
    if value is not None:
        return None if value.strip() in ("", "off") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distfinalize" / "model-specs"


def _versions() -> bytes:
    from importlib.metadata import version

    from distfinalize import __version__

    return f"|transformers {version('transformers')}|torch {torch.__version__}|distfinalize {__version__}".encode()


def _spec_to_json(spec: ModelSpec) -> dict[str, object]:
    return {
        "architecture": spec.architecture,
        "names": list(spec.names),
        "shapes": {n: list(s) for n, s in spec.shapes.items()},
        "tied": dict(spec.tied),
        "ignorable": sorted(spec.ignorable),
        "config_dtype": spec.config_dtype,
        "input_embedding": spec.input_embedding,
        "output_embedding": spec.output_embedding,
    }


def _spec_from_json(data: dict, config_path: Path) -> ModelSpec:
    return ModelSpec(
        config_path=config_path,
        architecture=data["architecture"],
        names=tuple(data["names"]),
        shapes={n: tuple(s) for n, s in data["shapes"].items()},
        tied=dict(data["tied"]),
        ignorable=frozenset(data["ignorable"]),
        config_dtype=data["config_dtype"],
        raw_config=read_json_object(config_path, SourceError, "config.json"),
        input_embedding=data["input_embedding"],
        output_embedding=data["output_embedding"],
    )
