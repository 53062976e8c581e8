"""Name mapping against the architecture config.json describes (instantiated on the meta device)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import common
import pytest
import torch

from distfinalize.errors import KeyMappingError, SourceError, UsageError
from distfinalize.prepare.model import ModelSpec, load_model_spec
from distfinalize.sources import TensorMeta
from distfinalize.transform.keymap import KeyMapRules, map_names, resolve_key_map
from distfinalize.transform.names import strip_wrappers


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def spec(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    out = tmp_path_factory.mktemp("cfg")
    common.tiny_config(tie=request.param).save_pretrained(out)
    return load_model_spec(out / "config.json")


def checkpoint_tensors(spec: ModelSpec, rename=lambda n: n) -> list[TensorMeta]:
    names = [*spec.names, *spec.tied]
    return [TensorMeta(f"key:{n}", rename(n), spec.shapes[n], torch.float32) for n in reversed(names)]


def test_spec_describes_llama(spec: ModelSpec) -> None:
    assert spec.architecture == "LlamaForCausalLM"
    assert "model.layers.1.mlp.down_proj.weight" in spec.names
    tied = "lm_head.weight" not in spec.names
    assert spec.tied == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    assert not any("rotary" in n for n in spec.names)


@pytest.mark.parametrize(
    "rename",
    [
        lambda n: n,
        lambda n: "module." + n,
        lambda n: n.replace("layers.", "layers._orig_mod."),
        lambda n: "_orig_mod." + n.replace("layers.0.", "layers.0._checkpoint_wrapped_module."),
    ],
    ids=["hf", "ddp", "compiled", "wrapped"],
)
def test_names_mapped_in_model_order(spec: ModelSpec, rename) -> None:
    mapped = map_names(checkpoint_tensors(spec, rename), spec)
    assert [t.name for t in mapped.tensors] == list(spec.names)
    assert all(t.key == f"key:{t.name}" for t in mapped.tensors)
    assert mapped.dropped == tuple(sorted(spec.tied))


def test_mismatch_names_unknown_and_missing(spec: ModelSpec) -> None:
    tensors = [t for t in checkpoint_tensors(spec) if "norm" not in t.name]
    tensors.append(TensorMeta("x", "model.layers.0.attention.wq.weight", (64, 64), torch.float32))
    with pytest.raises(KeyMappingError) as info:
        map_names(tensors, spec)
    text = str(info.value)
    assert "1 checkpoint tensor(s) unknown" in text and "'model.layers.0.attention.wq.weight'" in text
    assert "expected tensor(s) missing" in text and "--key-map" in text and str(spec.config_path) in text


def test_shape_mismatch(spec: ModelSpec) -> None:
    tensors = checkpoint_tensors(spec)
    tensors[0] = TensorMeta(tensors[0].key, tensors[0].name, (3, 3), torch.float32)
    with pytest.raises(SourceError, match=r"has shape \[3, 3\] in the checkpoint but config.json"):
        map_names(tensors, spec)


def test_without_config_names_are_kept() -> None:
    tensors = [TensorMeta("k", "_orig_mod.encoder.w", (2,), torch.float32)]
    assert [t.name for t in map_names(tensors, None).tensors] == ["encoder.w"]


def test_strip_wrappers_only_whole_segments() -> None:
    assert strip_wrappers("a._fsdp_wrapped_module.b") == "a.b"
    assert strip_wrappers("my_orig_mod.b") == "my_orig_mod.b"


def test_unknown_key_map(spec: ModelSpec) -> None:
    with pytest.raises(KeyMappingError, match="unknown key map 'nope'"):
        map_names(checkpoint_tensors(spec), spec, key_map="nope")


def test_key_map_rules_first_match_wins_and_drops_first() -> None:
    rules = KeyMapRules.from_mapping(
        {"rename": [[r"^a\.(\d+)\.", r"b.\1."], [r"^a\.", "c."]], "drop": [r"\.tmp$"]}, "rules.yaml"
    )
    assert rules.apply("a.3.w") == "b.3.w"  # the first matching rule only
    assert rules.apply("a.x.w") == "c.x.w"
    assert rules.apply("a.3.tmp") is None  # drops are checked before renames
    assert rules.apply("other.w") == "other.w"  # no rule: kept as it is
    assert KeyMapRules.from_mapping(rules.to_mapping(), "again") == KeyMapRules(rules.rename, rules.drop, "again")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rename": [["(", "x"]]}, "'(' is not a regular expression"),
        ({"rename": [["a", "b", "c"]]}, "'rename' must be a list of [PATTERN, REPLACEMENT] string pairs"),
        ({"drop": "x"}, "'drop' must be a list of PATTERN strings"),
        ({"rename": [], "other": 1}, "a key map file holds a mapping"),
        ([], "a key map file holds a mapping"),
    ],
)
def test_key_map_rules_validation(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        KeyMapRules.from_mapping(data, "rules.yaml")


def test_resolve_key_map(tmp_path: Path) -> None:
    assert resolve_key_map(None) is None and resolve_key_map("torchtitan-llama") == "torchtitan-llama"
    path = tmp_path / "m.yaml"
    path.write_text("drop: ['^x']\n")
    assert resolve_key_map(str(path)) == KeyMapRules((), ("^x",), str(path))
    with pytest.raises(UsageError, match="cannot read the --key-map file"):
        resolve_key_map(str(tmp_path / "missing.yaml"))
    with pytest.raises(UsageError, match=r"unknown key map 'llama9'.*or pass a YAML file"):
        resolve_key_map("llama9")


def test_map_names_with_rules(spec: ModelSpec) -> None:
    tensors = checkpoint_tensors(spec, lambda n: n.replace("model.layers.", "blocks."))
    tensors.append(TensorMeta("k:rot", "blocks.0.rot.inv_freq", (4,), torch.float32))
    rules = KeyMapRules(((r"^blocks\.", "model.layers."),), (), "f.yaml")
    with pytest.raises(
        KeyMappingError, match=re.escape("unknown to LlamaForCausalLM, e.g. 'model.layers.0.rot.inv_freq'")
    ):
        map_names(tensors, spec, rules)
    mapped = map_names(tensors, spec, replace(rules, drop=("inv_freq$",)))
    assert mapped.key_map == "file f.yaml" and [t.name for t in mapped.tensors] == list(spec.names)
