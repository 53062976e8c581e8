"""LoRA / PEFT checkpoints: the adapter's LoraConfig, the PeftModel it describes, and what to write.

The LoraConfig comes from an adapter_config.json beside the checkpoint (searched like config.json), with
--lora-* flags overriding it, or, when there is none, from the names and shapes plus --lora-alpha. peft itself
then applies it to config.json's model on the meta device, which checks the checkpoint's names and shapes and
gives, with peft's own code, the adapter's save names (get_peft_model_state_dict) and each layer's scale.
Default: the adapter tensors under PEFT's names, for adapter_model.safetensors. With --merge-lora: the merged
model's tensors (base weights from the checkpoint, else from --base-model) and what to merge into each.
Runs on: all ranks (metadata only, deterministic).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from distfinalize.config import FinalizeConfig
from distfinalize.errors import KeyMappingError, MissingDependencyError, SourceError, UsageError
from distfinalize.hfnames import ADAPTER_CONFIG, read_json_object
from distfinalize.logs import log_rank0
from distfinalize.prepare.basemodel import base_model_hint, has_weights
from distfinalize.prepare.model import ModelSpec, instantiate_on_meta
from distfinalize.sources import Source, TensorMeta
from distfinalize.sources.hf import BASE_KEY_PREFIX, HFModelDir, WithBaseModel
from distfinalize.transform.lora import (
    PEFT_PREFIX,
    LoraMerge,
    adapter_names,
    is_lora_checkpoint,
    is_lora_weight,
    is_saved_format,
    merged_name,
    peft_name,
)
from distfinalize.transform.names import CONTAINER_PREFIXES, strip_wrappers

log = logging.getLogger(__name__)

MAX_NAMES = 4


@dataclass(frozen=True)
class LoraLayout:
    """A LoRA checkpoint, understood: its LoraConfig and the tensors to write (PEFT save names for an adapter,
    Hugging Face names for a merge, with `merges` keyed by the base weight's source key)."""

    merge: bool
    adapter: str
    config: Any  # peft.LoraConfig, as adapter_config.json will say it
    config_from: str  # the adapter_config.json it came from, or "flags and checkpoint names"
    source: Source
    tensors: tuple[TensorMeta, ...]
    merges: Mapping[str, LoraMerge] = field(default_factory=dict)
    alpha_known: bool = True

    def summary(self) -> dict[str, Any]:
        """What inspect, --dry-run and the log say about the adapter."""
        cfg = self.config
        return {
            "mode": "merge" if self.merge else "adapter",
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha if self.alpha_known else None,
            "use_rslora": cfg.use_rslora,
            "target_modules": sorted(cfg.target_modules) if cfg.target_modules else None,
            "modules_to_save": sorted(cfg.modules_to_save) if cfg.modules_to_save else None,
            "config_from": self.config_from,
        }


def prepare_lora(
    config: FinalizeConfig, source: Source, spec: ModelSpec | None, search: list[Path] | tuple[Path, ...]
) -> LoraLayout:
    """Understand a LoRA checkpoint. Raises SourceError / UsageError with what to do. Runs on: all ranks."""
    if spec is None:
        raise SourceError(
            "a LoRA checkpoint needs its base model's config.json",
            where=source.info.path,
            hint=base_model_hint(search)
            or "put config.json beside the checkpoint or pass --base-model DIR|HUB_ID, the model the run started from",
        )
    if not config.lora.merge:
        check_adapter_options(config)
    adapters = adapter_names(t.name for t in source.tensors)
    if len(adapters) != 1:
        raise SourceError(
            f"the checkpoint holds {len(adapters)} LoRA adapters ({', '.join(sorted(adapters))})",
            where=source.info.path,
            hint="finalize a checkpoint with one adapter",
        )
    adapter = adapters.pop()
    found = next((d / ADAPTER_CONFIG for d in search if (d / ADAPTER_CONFIG).is_file()), None)
    base_name = config.card.base_model_id  # a Hub id (--base-model-id, or --base-model's); never a local path
    lora_config = load_lora_config(config, found, inferred_settings(source.tensors, spec), base_name)
    model = peft_model_on_meta(spec, lora_config, adapter)
    mapped, expected = match_names(source.tensors, model, spec, adapter)
    config_from = str(found) if found is not None else "flags and checkpoint names"
    alpha_known = found is not None or config.lora.alpha is not None
    if not config.lora.merge:
        tensors, source = adapter_output(model, mapped, expected, adapter, source, config.base_model)
        return LoraLayout(False, adapter, lora_config, config_from, source, tensors, alpha_known=alpha_known)
    tensors, from_base = merged_tensors(mapped, expected, adapter, spec, config.base_model, source)
    merges = layer_merges(model, mapped, adapter, {t.name: t for t in tensors}, spec)
    if from_base is not None:
        source = WithBaseModel(source, from_base, tensors)
        count = sum(t.key.startswith(BASE_KEY_PREFIX) for t in tensors)
        log_rank0(log, "LoRA merge: %d base tensor(s) from %s", count, from_base.path)
    return LoraLayout(True, adapter, lora_config, config_from, source, tensors, merges, alpha_known)


def adapter_output(
    model: torch.nn.Module,
    mapped: dict[str, TensorMeta],
    expected: dict[str, torch.Tensor],
    adapter: str,
    source: Source,
    base_model: Path | None,
) -> tuple[tuple[TensorMeta, ...], Source]:
    """The adapter file's tensors, with the frozen base tensors peft would add taken from --base-model (when the
    checkpoint lacks them), and the source to read them all from."""
    tensors, frozen = adapter_tensors(model, mapped, expected, adapter, source)
    base = HFModelDir(base_model) if frozen and base_model is not None and has_weights(base_model) else None
    lacking = [name for name, hf in frozen if base is None or hf not in base.tensors]
    if base is not None and len(lacking) < len(frozen):
        tensors += tuple(replace(base.tensors[hf], name=name) for name, hf in frozen if name not in lacking)
        source = WithBaseModel(source, base, tensors)
    if lacking:
        log_rank0(
            log,
            "peft's save_pretrained also stores the base weights of adapted embeddings (%s); the "
            "checkpoint lacks them, so the adapter is written without them (it loads on the same base "
            "model). Pass --base-model DIR to include them",
            ", ".join(lacking),
            level=logging.WARNING,
        )
    return tensors, source


def check_adapter_options(config: FinalizeConfig) -> None:
    """Options that change a full model make no sense for an adapter dir."""
    conflicts = [
        flag
        for flag, on in (
            ("--quantize", config.quantize),
            ("--keep-checkpoint", config.keep_checkpoint),
            ("--add-tokens", config.tokenizer.add_tokens),
            ("--pad-vocab-to-multiple-of", config.tokenizer.pad_vocab_multiple),
        )
        if on
    ]
    if conflicts:
        raise UsageError(
            f"{', '.join(conflicts)} cannot apply to a LoRA adapter dir",
            hint="add --merge-lora to write the full model, or drop those options",
        )


def inferred_settings(tensors: tuple[TensorMeta, ...], spec: ModelSpec) -> dict[str, Any]:
    """LoraConfig fields the checkpoint itself tells: r (rank_pattern where ranks differ), the adapted and the
    fully trained modules (by their last name segment), and the task type."""
    ranks: dict[str, int] = {}
    saved: set[str] = set()
    saved_format = is_saved_format(t.name for t in tensors)
    for t in tensors:
        name = strip_wrappers(t.name) + "."
        for marker in (".lora_A.", ".lora_embedding_A."):
            if marker in name:
                ranks[name.split(marker)[0].split(PEFT_PREFIX)[-1]] = t.shape[0]
        if ".modules_to_save." in name:
            saved.add(name.split(".modules_to_save.")[0].rsplit(".", 1)[-1])
        elif saved_format and not is_lora_checkpoint([t.name]) and ".base_layer." not in name:
            saved.add(name.rsplit(".", 2)[-3].rsplit(".", 1)[-1])  # a trained copy, saved under the module's name
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    out: dict[str, Any] = {
        "r": r,
        "rank_pattern": {module: rank for module, rank in ranks.items() if rank != r},
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in ranks}),
        "modules_to_save": sorted(saved) or None,
    }
    if spec.architecture.endswith("ForCausalLM"):
        out["task_type"] = "CAUSAL_LM"
    return out


def load_lora_config(config: FinalizeConfig, found: Path | None, inferred: dict[str, Any], base_name: str | None):
    """The adapter's LoraConfig: adapter_config.json (or the inferred settings), then the --lora-* flags."""
    LoraConfig = _peft().LoraConfig
    if found is not None:
        peft_type = read_json_object(found, SourceError, ADAPTER_CONFIG).get("peft_type")
        if peft_type not in (None, "LORA"):
            raise SourceError(
                f"the adapter is {peft_type}, not LoRA", where=found, hint="only LoRA adapters are supported"
            )
        loaded = LoraConfig.from_pretrained(str(found.parent))
        settings = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded) if f.init}
    else:
        if config.lora.alpha is None and config.lora.require_alpha:
            raise SourceError(
                "the LoRA checkpoint has no adapter_config.json, so lora_alpha is unknown",
                hint="pass --lora-alpha (and --lora-rslora if it was trained so), or put the "
                "adapter_config.json of the run beside the checkpoint",
            )
        settings = dict(inferred)
    settings.update(config.lora.overrides)
    settings["inference_mode"] = True
    if base_name is not None:
        settings["base_model_name_or_path"] = base_name
    try:
        return LoraConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise SourceError("invalid LoRA settings", where=found or "--lora-* flags", hint=str(exc)) from exc


def peft_model_on_meta(spec: ModelSpec, lora_config: Any, adapter: str) -> torch.nn.Module:
    """config.json's model with the adapter applied by peft, on the meta device (no memory)."""
    import transformers

    peft = _peft()
    config = transformers.AutoConfig.from_pretrained(str(spec.config_path.parent))
    base = instantiate_on_meta(config, spec.architecture, spec.config_path)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(base, copy.deepcopy(lora_config), adapter_name=adapter)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise SourceError(
            "peft cannot apply the LoRA settings to config.json's model",
            where=spec.config_path,
            hint=f"{str(exc).splitlines()[0] if str(exc) else exc!r}; check target_modules "
            "(adapter_config.json or --lora-target-modules)",
        ) from exc


def match_names(
    tensors: tuple[TensorMeta, ...], model: torch.nn.Module, spec: ModelSpec, adapter: str
) -> tuple[dict[str, TensorMeta], dict[str, torch.Tensor]]:
    """The checkpoint's tensors by their PeftModel name (container prefix chosen to match), and the PeftModel's
    state dict (meta). PEFT's saved format is read through the names peft's own get_peft_model_state_dict gives
    (as set_peft_model_state_dict reads it). Raises KeyMappingError naming unknown tensors or wrong shapes."""
    expected = model.state_dict()
    in_model: dict[str, str] = {}
    if is_saved_format(t.name for t in tensors):
        in_model = {save: name for name, save in save_names(model, expected, adapter).items()}
    best: dict[str, TensorMeta] = {}
    for prefix in CONTAINER_PREFIXES:
        mapped = {in_model.get(n, n): t for t in tensors if (n := peft_name(t.name, prefix))}
        if len(mapped) == len(tensors) and len(mapped.keys() & expected.keys()) > len(best.keys() & expected.keys()):
            best = mapped
    unknown = [n for n in best if n not in expected] if best else [t.name for t in tensors]
    wrong = [
        f"{n} {list(t.shape)} (expected {list(expected[n].shape)})"
        for n, t in best.items()
        if n in expected and tuple(t.shape) != tuple(expected[n].shape)
    ]
    if unknown or wrong:
        what = f"{len(unknown)} tensor(s) unknown to it, e.g. {_sample(unknown)}" if unknown else ""
        what += ("; " if what else "") + (f"wrong shapes: {_sample(wrong)}" if wrong else "")
        raise KeyMappingError(
            f"the LoRA checkpoint does not match the PEFT model its settings describe ({what})",
            where=spec.config_path,
            hint="check r, target_modules and modules_to_save "
            "(adapter_config.json, or --lora-r / --lora-target-modules)",
        )
    return best, expected


def adapter_tensors(
    model: torch.nn.Module,
    mapped: dict[str, TensorMeta],
    expected: dict[str, torch.Tensor],
    adapter: str,
    source: Source,
) -> tuple[tuple[TensorMeta, ...], list[tuple[str, str]]]:
    """The adapter's tensors, named as get_peft_model_state_dict names them (its "auto" embedding rule included),
    and the frozen base tensors it names that the checkpoint lacks: (save name, Hugging Face name) pairs."""
    out, missing, frozen = [], [], []
    for name, save_name in save_names(model, expected, adapter).items():
        t = mapped.get(name)
        if t is not None:
            out.append(replace(t, name=save_name))
        elif is_lora_weight(name) or ".modules_to_save." in name:
            missing.append(name)
        else:
            frozen.append((save_name, merged_name(name, adapter)))
    if missing:
        raise SourceError(
            f"the LoRA checkpoint lacks {len(missing)} adapter tensor(s), e.g. {_sample(missing)}",
            where=source.info.path,
            hint="the checkpoint is incomplete, or the LoRA settings do not belong to it",
        )
    return tuple(out), frozen


def save_names(model: torch.nn.Module, expected: dict[str, torch.Tensor], adapter: str) -> dict[str, str]:
    """PeftModel name -> the name get_peft_model_state_dict saves it under, for the tensors it saves."""
    peft = _peft()
    model.peft_config[adapter].base_model_name_or_path = None  # "auto" then decides without a Hub lookup
    placeholders = {name: torch.empty(0, device="meta") for name in expected}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = peft.get_peft_model_state_dict(model, state_dict=placeholders, adapter_name=adapter)
    by_id = {id(tensor): name for name, tensor in placeholders.items()}
    return {by_id[id(tensor)]: save_name for save_name, tensor in saved.items()}


def merged_tensors(
    mapped: dict[str, TensorMeta],
    expected: dict[str, torch.Tensor],
    adapter: str,
    spec: ModelSpec,
    base_model: Path | None,
    source: Source,
):
    """The merged model's tensors under Hugging Face names: each from the checkpoint when it is there (the trained
    copy of a modules_to_save module), else from --base-model. Returns (tensors, the base dir or None)."""
    tensors: list[TensorMeta] = []
    wanted: list[str] = []
    for name in expected:
        hf = merged_name(name, adapter)
        if hf is None or is_lora_weight(name):
            continue
        t = mapped.get(name)
        if t is not None:
            tensors.append(replace(t, name=hf))
        elif hf not in spec.tied:  # a tied alias the base dir does not store either
            wanted.append(hf)
    if not wanted:
        return tuple(tensors), None
    if base_model is None:
        raise SourceError(
            f"--merge-lora needs the base weights, and the checkpoint lacks {len(wanted)} of them "
            f"(e.g. {_sample(wanted)}): it holds the adapter only",
            where=source.info.path,
            hint="pass --base-model DIR, a local Hugging Face dir of the base model",
        )
    base = HFModelDir(base_model)
    absent = [n for n in wanted if n not in base.tensors]
    if absent:
        raise SourceError(
            f"--base-model lacks {len(absent)} tensor(s) the merge needs, e.g. {_sample(absent)}",
            where=base_model,
            hint="pass the base model this adapter was trained on",
        )
    tensors += [base.tensors[n] for n in wanted]
    return tuple(tensors), base


def layer_merges(
    model: torch.nn.Module,
    mapped: dict[str, TensorMeta],
    adapter: str,
    by_name: dict[str, TensorMeta],
    spec: ModelSpec,
) -> dict[str, LoraMerge]:
    """For each adapted layer: its base weight's source key -> A, B and the scale peft computed for the layer."""
    from peft.tuners.lora import Embedding, Linear, LoraLayer

    lora_config = model.peft_config[adapter]
    if lora_config.use_dora or lora_config.lora_bias:
        raise UsageError(
            "--merge-lora does not support DoRA or lora_bias adapters",
            hint="drop --merge-lora to write the adapter, and merge it with peft",
        )
    merges: dict[str, LoraMerge] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.scaling:
            continue
        if isinstance(layer, Embedding):
            a, b = f"{name}.lora_embedding_A.{adapter}", f"{name}.lora_embedding_B.{adapter}"
        elif isinstance(layer, Linear):
            a, b = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
        else:
            raise UsageError(
                f"--merge-lora supports LoRA on Linear and Embedding layers, not {type(layer).__name__}",
                where=name,
                hint="drop --merge-lora to write the adapter",
            )
        weight = merged_name(f"{name}.base_layer.weight", adapter)
        if weight in spec.tied or weight not in by_name:
            raise UsageError(
                f"--merge-lora cannot merge into {weight}: it is tied to {spec.tied.get(weight)}",
                hint="drop --merge-lora to write the adapter",
            )
        base = by_name[weight]
        transpose = isinstance(layer, Embedding) or bool(getattr(layer, "fan_in_fan_out", False))
        merges[base.key] = LoraMerge(
            mapped[a].key, mapped[b].key, float(layer.scaling[adapter]), transpose, mapped[a].nbytes + mapped[b].nbytes
        )
    return merges


def _peft():
    try:
        import peft
    except ImportError as exc:
        hint = "pip install 'distfinalize[lora]' (or pip install peft)"
        raise MissingDependencyError("LoRA checkpoints need peft", hint=hint) from exc
    return peft


def _sample(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:MAX_NAMES]) + (", ..." if len(names) > MAX_NAMES else "")
