"""Checkpoint tensor names -> Hugging Face names, checked against the model config.json describes.

Key maps live in a registry (by model family / trainer); anything else is described by a YAML file of ordered
regex renames and a drop list (--key-map FILE, KeyMapRules). Wrapper segments that training adds
(`_orig_mod.` from torch.compile, `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`, DDP's
leading `module.`) are always removed. With a ModelSpec, the map and the container prefix are chosen
so the names match the architecture exactly; otherwise the names are taken as they are. Pure: runs on
all ranks, no I/O.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distfinalize.errors import KeyMappingError, SourceError, UsageError
from distfinalize.prepare.model import ModelSpec
from distfinalize.sources import TensorMeta
from distfinalize.transform.names import CONTAINER_PREFIXES, TIE_CANDIDATES, strip_wrappers

log = logging.getLogger(__name__)

MAX_NAMES_IN_ERROR = 4


@dataclass(frozen=True)
class KeyMap:
    """A registry entry: a rename from a trainer's names to Hugging Face names (None drops the tensor), and,
    for layouts that differ, how many heads a Hugging Face tensor's rows must be rotary-permuted by."""

    name: str
    rename: Callable[[str], str | None]
    description: str
    rope_heads: Callable[[str, Mapping[str, object]], int | None] = lambda name, config: None


KEY_MAPS: dict[str, KeyMap] = {}


def register_key_map(key_map: KeyMap) -> KeyMap:
    """Add a key map to the registry."""
    KEY_MAPS[key_map.name] = key_map
    return key_map


register_key_map(KeyMap("hf", lambda name: name, "Hugging Face names, as transformers saves them"))

# torchtitan's Llama 3 names (both the older `attention.wq` / `output` and 0.3's `attention.qkv_linear.wq` /
# `lm_head`), as torchtitan's own Llama3StateDictAdapter maps them.
TORCHTITAN_LLAMA = tuple(
    (re.compile(pattern), target)
    for pattern, target in (
        (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
        (r"layers\.(\d+)\.attention\.(?:qkv_linear\.)?wq\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
        (r"layers\.(\d+)\.attention\.(?:qkv_linear\.)?wk\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
        (r"layers\.(\d+)\.attention\.(?:qkv_linear\.)?wv\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
        (r"layers\.(\d+)\.attention\.wo\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
        (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
        (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
        (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
        (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"norm\.weight", "model.norm.weight"),
        (r"(?:output|lm_head)\.weight", "lm_head.weight"),
    )
)
TORCHTITAN_DROPPED = re.compile(r"(?:.*\.)?freqs_cis")


def torchtitan_llama_name(name: str) -> str | None:
    """torchtitan Llama 3 name -> Hugging Face Llama name (unknown names pass through to be reported)."""
    if TORCHTITAN_DROPPED.fullmatch(name):
        return None
    for pattern, target in TORCHTITAN_LLAMA:
        if pattern.fullmatch(name):
            return pattern.sub(target, name)
    return name


def llama_rope_heads(name: str, config: Mapping[str, object]) -> int | None:
    """q/k projections are stored in torchtitan's rotary layout; Hugging Face's needs them permuted per head."""
    heads = config.get("num_attention_heads")
    if name.endswith("self_attn.q_proj.weight"):
        return int(heads)
    if name.endswith("self_attn.k_proj.weight"):
        return int(config.get("num_key_value_heads") or heads)
    return None


register_key_map(
    KeyMap("torchtitan-llama", torchtitan_llama_name, "torchtitan's Llama 3 names and q/k layout", llama_rope_heads)
)


@dataclass(frozen=True)
class KeyMapRules:
    """A user's key map (--key-map FILE): names matching a `drop` pattern are left out; the others get the first
    `rename` rule whose pattern matches (re.search), substituted with re.sub, as transformers' `key_mapping`
    does; names no rule matches are kept. Pure: the file is read by load_key_map_file."""

    rename: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    path: str = "key map"  # where the rules came from, for messages

    def __post_init__(self) -> None:
        for pattern in (*(p for p, _ in self.rename), *self.drop):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{self.path}: {pattern!r} is not a regular expression ({exc})") from None

    @classmethod
    def from_mapping(cls, data: object, path: str) -> KeyMapRules:
        """From the YAML/JSON form: {rename: [[PATTERN, REPLACEMENT], ...], drop: [PATTERN, ...]}. ValueError
        names what is wrong."""
        shape = "a mapping with 'rename' (a list of [PATTERN, REPLACEMENT] pairs) and/or 'drop' (a list of PATTERNs)"
        if not isinstance(data, dict) or not data or set(data) - {"rename", "drop"}:
            raise ValueError(f"{path}: a key map file holds {shape}")
        rename, drop = data.get("rename") or [], data.get("drop") or []
        pairs = [
            tuple(r)
            for r in rename
            if isinstance(r, list | tuple) and len(r) == 2 and all(isinstance(x, str) for x in r)
        ]
        if not isinstance(rename, list) or len(pairs) != len(rename):
            raise ValueError(f"{path}: 'rename' must be a list of [PATTERN, REPLACEMENT] string pairs")
        if not isinstance(drop, list) or not all(isinstance(p, str) for p in drop):
            raise ValueError(f"{path}: 'drop' must be a list of PATTERN strings")
        return cls(tuple(pairs), tuple(drop), path)

    def to_mapping(self) -> dict[str, Any]:
        """The YAML/JSON form (recorded in the manifest, so that `verify` maps names the same way)."""
        return {"rename": [list(pair) for pair in self.rename], "drop": list(self.drop)}

    def apply(self, name: str) -> str | None:
        """One name through the rules: None when dropped."""
        if any(re.search(p, name) for p in self.drop):
            return None
        for pattern, replacement in self.rename:
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                return renamed
        return name

    def key_map(self) -> KeyMap:
        return KeyMap(f"file {self.path}", self.apply, f"{len(self.rename)} rename(s), {len(self.drop)} drop(s)")


def load_key_map_file(path: Path) -> KeyMapRules:
    """Read --key-map FILE (YAML, of which JSON is a subset). Raises UsageError naming the file. Runs on: all
    ranks (a few lines)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
        return KeyMapRules.from_mapping(data, str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError("cannot read the --key-map file", where=path, hint=str(exc).splitlines()[0]) from exc
    except ValueError as exc:
        raise UsageError(str(exc).removeprefix(f"{path}: "), where=path, hint=KEY_MAP_FILE_HINT) from exc


KEY_MAP_FILE_HINT = "see README, 'Key map files': rename: [[PATTERN, REPLACEMENT], ...], drop: [PATTERN, ...]"


def resolve_key_map(value: str | None) -> str | KeyMapRules | None:
    """--key-map's value: a registered name stays a name; an existing file is read as KeyMapRules."""
    if value is None or value in KEY_MAPS:
        return value
    path = Path(value)
    if path.is_file() or path.suffix in (".yaml", ".yml", ".json") or "/" in value:
        return load_key_map_file(path)
    raise UsageError(
        f"unknown key map {value!r}",
        hint=f"choose one of {', '.join(sorted(KEY_MAPS))}, or pass a YAML file of renames ({KEY_MAP_FILE_HINT})",
    )


@dataclass(frozen=True)
class MappedTensors:
    """The outcome of mapping: output tensors (Hugging Face names, model order) and what was dropped."""

    tensors: tuple[TensorMeta, ...]
    key_map: str
    prefix: str
    dropped: tuple[str, ...]  # tied aliases and non-persistent buffers, by output name
    rope_heads: Mapping[str, int] = field(default_factory=dict)  # output name -> heads to rotary-permute by


def map_names(
    tensors: Sequence[TensorMeta], spec: ModelSpec | None, key_map: str | KeyMapRules | None = None
) -> MappedTensors:
    """Rename the checkpoint's tensors; with a spec, choose the map and prefix that match it exactly.

    Raises KeyMappingError when no candidate matches, naming unmatched and missing tensors.
    """
    if isinstance(key_map, KeyMapRules):
        maps = [key_map.key_map()]
    elif key_map is not None and key_map not in KEY_MAPS:
        raise KeyMappingError(f"unknown key map {key_map!r}", hint=f"choose one of {', '.join(sorted(KEY_MAPS))}")
    else:
        maps = [KEY_MAPS[key_map]] if key_map else list(KEY_MAPS.values())
    if spec is None:
        chosen = maps[0]
        renamed = _rename(tensors, chosen, "")
        if renamed is None:
            raise KeyMappingError(
                f"key map {chosen.name!r} gives two checkpoint tensors the same name",
                hint="make the renames of --key-map FILE distinct",
            )
        return MappedTensors(tuple(renamed), chosen.name, "", ())
    best: tuple[int, list[TensorMeta], KeyMap, str] | None = None
    for candidate in maps:
        for prefix in CONTAINER_PREFIXES:
            renamed = _rename(tensors, candidate, prefix)
            if renamed is None:
                continue
            score = sum(t.name in spec.known for t in renamed)
            if best is None or score > best[0]:
                best = (score, renamed, candidate, prefix)
            if score == len(renamed) and _missing(renamed, spec) == []:
                return _finish(renamed, spec, candidate, prefix)
    if best is None:
        raise KeyMappingError(
            f"key map {maps[0].name!r} gives two checkpoint tensors the same name",
            hint="make the renames of --key-map FILE distinct",
        )
    _, renamed, candidate, _ = best
    raise _mismatch_error(renamed, spec, candidate)


def _rename(tensors: Iterable[TensorMeta], key_map: KeyMap, prefix: str) -> list[TensorMeta] | None:
    """Apply wrapper stripping, prefix removal and the map; None when two tensors collide."""
    out, seen = [], set()
    for t in tensors:
        name = strip_wrappers(t.name)
        if prefix and name.startswith(prefix):
            name = name[len(prefix) :]
        mapped = key_map.rename(name)
        if mapped is None:
            continue
        if mapped in seen:
            return None
        seen.add(mapped)
        out.append(replace(t, name=mapped))
    return out


def _missing(renamed: Sequence[TensorMeta], spec: ModelSpec) -> list[str]:
    present = {t.name for t in renamed}
    present |= {spec.tied[a] for a in present if a in spec.tied}
    return [n for n in spec.names if n not in present]


def _finish(renamed: list[TensorMeta], spec: ModelSpec, key_map: KeyMap, prefix: str) -> MappedTensors:
    """Drop buffers and tied aliases, fill a missing canonical from its alias, check shapes, model order."""
    by_name = {t.name: t for t in renamed}
    for name, t in by_name.items():
        expected = spec.shapes.get(name)
        if expected is not None and tuple(t.shape) != tuple(expected):
            raise SourceError(
                f"tensor {name!r} has shape {list(t.shape)} in the checkpoint but config.json "
                f"({spec.architecture}) expects {list(expected)}",
                where=spec.config_path,
                hint="the config.json found does not describe this checkpoint; check that it belongs to it",
            )
    dropped = []
    for alias, canonical in spec.tied.items():
        if alias in by_name:
            tensor = by_name.pop(alias)
            if canonical not in by_name:
                by_name[canonical] = replace(tensor, name=canonical)
            else:
                dropped.append(alias)
    for name in spec.ignorable & by_name.keys():
        del by_name[name]
        dropped.append(name)
    ordered = tuple(by_name[n] for n in spec.names if n in by_name)
    if prefix or key_map.name != "hf":
        log.info("tensor names: key map %r, container prefix %r removed", key_map.name, prefix)
    heads = {t.name: h for t in ordered if (h := key_map.rope_heads(t.name, spec.raw_config)) is not None}
    return MappedTensors(ordered, key_map.name, prefix, tuple(sorted(dropped)), heads)


def _mismatch_error(renamed: list[TensorMeta], spec: ModelSpec, key_map: KeyMap) -> KeyMappingError:
    unknown = [t.name for t in renamed if t.name not in spec.known]
    missing = _missing(renamed, spec)
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} checkpoint tensor(s) unknown to {spec.architecture}, e.g. {_sample(unknown)}")
    if missing:
        parts.append(f"{len(missing)} expected tensor(s) missing, e.g. {_sample(missing)}")
    return KeyMappingError(
        "checkpoint tensor names do not match config.json's model (" + "; ".join(parts) + ")",
        where=spec.config_path,
        hint=f"pass --key-map NAME (known: {', '.join(sorted(KEY_MAPS))}) or --key-map FILE, a YAML of ordered regex "
        "renames and a drop list (README, 'Key map files'); or check that config.json belongs to this checkpoint",
    )


def _sample(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_NAMES_IN_ERROR])
    return shown + (", ..." if len(names) > MAX_NAMES_IN_ERROR else "")


def tie_candidates(tensors: Sequence[TensorMeta]) -> list[tuple[TensorMeta, TensorMeta]]:
    """(output embedding, input embedding) pairs that may hold the same data: same shape and dtype."""
    by_name = {t.name: t for t in tensors}
    pairs = []
    for head, embed in TIE_CANDIDATES:
        a, b = by_name.get(head), by_name.get(embed)
        if a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype:
            pairs.append((a, b))
    return pairs
