"""torchao-* recipes: the same tensors and metadata as torchao's own quantize_ + flatten, torchao's unflatten reads
them back, transformers loads a multi-file checkpoint only because every file carries the whole model's metadata;
the device requirement check; the card's summary of what stays unquantized.

The logit bounds of a transformers load (TIGHT, LOOSE) are in test_quantize.py, with those of the other recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao", reason="needs the quant extra: pip install 'distfinalize[quant]'")

from safetensors import safe_open
from safetensors.torch import save_file
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict, unflatten_tensor_state_dict
from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao
from torchao.quantization import quantize_

from distfinalize.artifacts.card import group_modules, quantization_lines
from distfinalize.errors import DeviceError
from distfinalize.transform.quant.base import Recipe, Requirement
from distfinalize.transform.quant.recipes import RECIPES
from distfinalize.transform.quant.selection import check_requirement, quantizable

TORCHAO = [name for name in RECIPES if name.startswith("torchao-")]


def weight(shape: tuple[int, int], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * torch.linspace(0.01, 3.0, shape[0]).unsqueeze(1)).to(dtype)


def torchao_itself(recipe: Recipe, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What torchao writes for a Linear holding `w`: quantize_ with the recipe's config, then flatten."""
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    quantize_(linear, recipe.config())
    return flatten_tensor_state_dict({"x.weight": linear.weight})


def test_three_torchao_recipes() -> None:
    assert TORCHAO == ["torchao-int8", "torchao-fp8", "torchao-int4"]


@pytest.mark.parametrize("name", TORCHAO)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_tensors_and_metadata_as_torchao(name: str, dtype: torch.dtype) -> None:
    recipe = RECIPES[name]
    w = weight((256, 384), seed=7, dtype=dtype)
    ours = recipe.quantize("x.weight", w, dtype)
    theirs, metadata = torchao_itself(recipe, w)
    assert ours.keys() == theirs.keys()
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key
    described = [("x.weight", (256, 384), dtype, True), ("n.weight", (384,), dtype, False)]
    header = recipe.file_metadata(described)
    assert header["x.weight"] == metadata["x.weight"]  # planned from a meta tensor, identical to the real one
    assert json.loads(header["tensor_names"]) == ["x.weight", "n.weight"]
    assert json.loads(header["n.weight"]) == {"_type": "Tensor"}
    assert is_metadata_torchao(header)


@pytest.mark.parametrize("name", TORCHAO)
def test_unflatten_round_trip(name: str) -> None:
    """torchao's unflatten rebuilds the subclass from our tensors and header; its dequantize() is ours."""
    recipe = RECIPES[name]
    w = weight((128, 256), seed=8, dtype=torch.float32)
    ours = recipe.quantize("m.proj.weight", w, torch.float32)
    header = recipe.file_metadata([("m.proj.weight", (128, 256), torch.float32, True)])
    restored, left = unflatten_tensor_state_dict(dict(ours), header)
    assert not left
    subclass = restored["m.proj.weight"]
    assert type(subclass).__name__ == json.loads(header["m.proj.weight"])["_type"]
    assert subclass.shape == (128, 256) and subclass.dtype == torch.float32
    torch.testing.assert_close(subclass.dequantize(), recipe.dequantize(ours), rtol=0, atol=0)
    x = torch.randn(3, 256)
    expected = x @ recipe.dequantize(ours).T  # torchao's linear may scale after the matmul: float32 rounding
    torch.testing.assert_close(torch.nn.functional.linear(x, subclass), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["torchao-int8", "torchao-int4"])
def test_int_values_and_scales(name: str) -> None:
    """Unpack the integers: symmetric (zero_point 0), in the int range, scale = amax / half the range."""
    recipe = RECIPES[name]
    bits, group = recipe.num_bits, recipe.group_size or 384
    w = weight((64, 384), seed=9, dtype=torch.float32)
    local = {k.removeprefix("x."): v for k, v in recipe.quantize("x.weight", w, torch.float32).items()}
    q, scale = local["_weight_qdata"], local["_weight_scale"]
    assert (local["_weight_zero_point"] == 0).all()
    assert q.min() >= -(1 << (bits - 1)) and q.max() <= (1 << (bits - 1)) - 1
    amax = w.reshape(64, -1, group).abs().amax(-1)
    torch.testing.assert_close(scale, amax / (((1 << bits) - 1) / 2), rtol=1e-6, atol=0)
    expected = (w.reshape(64, -1, group) / scale.unsqueeze(-1)).round().clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    assert (q.reshape(64, -1, group).float() - expected).abs().max() <= 1  # ties may round either way


def test_fp8_zero_row_stays_zero() -> None:
    """torchao 0.18's Float8WeightOnlyConfig turns an all-zero row into NaN; the recipe floors the amax."""
    recipe = RECIPES["torchao-fp8"]
    w = weight((64, 128), seed=10)
    w[3] = 0
    assert torchao_itself(recipe, w)[0]["x._weight_qdata"][3].float().isnan().all()  # why the floor is there
    out = recipe.quantize("x.weight", w, torch.bfloat16)
    assert torch.isfinite(out["x._weight_qdata"].float()).all()
    assert recipe.dequantize(out)[3].abs().max() == 0


# ---- a multi-file checkpoint, loaded by transformers ----


def tiny(tmp_path: Path) -> tuple[torch.nn.Module, dict]:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(config).eval(), config.to_dict()


def write_shards(tmp_path: Path, name: str, per_file_metadata: bool) -> tuple[torch.nn.Module, dict]:
    """Our tensors in 3 files with an index, each file carrying the whole model's metadata (or only its own)."""
    recipe = RECIPES[name]
    model, config = tiny(tmp_path)
    state = model.state_dict()
    embedding = "model.embed_tokens.weight"
    quantized = {
        n
        for n, t in state.items()
        if quantizable(n, tuple(t.shape), "lm_head.weight", recipe=recipe, spec_input_embedding=embedding)
    }
    assert len(quantized) == 14
    described = [(n, tuple(t.shape), t.dtype, n in quantized) for n, t in state.items()]
    names = list(state)
    groups = [names[:4], names[4:12], names[12:]]
    weight_map = {}
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-00003.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for n in group:
            tensors |= recipe.quantize(n, state[n], state[n].dtype) if n in quantized else {n: state[n]}
        mine = [d for d in described if d[0] in group]
        metadata = recipe.file_metadata(mine if per_file_metadata else described)
        save_file(tensors, tmp_path / filename, metadata={"format": "pt", **metadata})
        weight_map |= dict.fromkeys(tensors, filename)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ignored = ["lm_head"]
    (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": recipe.config_block(ignored)}))
    return model, state


@pytest.mark.parametrize("name", TORCHAO)
def test_transformers_loads_multi_file(name: str, tmp_path: Path) -> None:
    import transformers

    model, state = write_shards(tmp_path, name, per_file_metadata=False)
    for path in tmp_path.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            assert len(json.loads(f.metadata()["tensor_names"])) == len(state)  # the whole model, in every file
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    proj = loaded.model.layers[1].mlp.down_proj.weight
    assert (
        type(proj).__name__
        == json.loads(RECIPES[name].file_metadata([("w", (128, 256), torch.float32, True)])["w"])["_type"]
    )
    ids = torch.arange(16).reshape(2, 8) * 7 % 160
    with torch.no_grad():
        got, source = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    assert ((got - source).norm() / source.norm()).item() < 0.75  # the LOOSE bounds live in test_quantize.py
    for plain in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(loaded.get_parameter(plain), state[plain]), plain


def test_per_file_metadata_does_not_load(tmp_path: Path) -> None:
    """Why every file carries the whole model's metadata: transformers merges headers with dict.update, so the
    last file's tensor_names wins, and weights described only in earlier files fail to load."""
    import transformers

    write_shards(tmp_path, "torchao-int8", per_file_metadata=True)
    with pytest.raises(RuntimeError, match="conversion of the weights"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


# ---- up-front device check ----

NEEDS_HOPPER = Requirement(cpu=False, min_cuda_capability=(8, 9), dtypes=(torch.bfloat16,), needed_by="FP8 GEMMs")


@pytest.mark.parametrize(
    ("device", "capability", "dtype", "problem"),
    [
        ("cuda", (9, 0), torch.bfloat16, None),
        ("cuda", (8, 9), torch.bfloat16, None),
        ("cuda", (8, 0), torch.bfloat16, "compute capability 8.9 or newer; this rank's GPU has 8.0"),
        ("cuda", (7, 5), torch.bfloat16, "this rank's GPU has 7.5"),
        ("cpu", None, torch.bfloat16, "needs a CUDA GPU of compute capability 8.9 or newer, and this rank runs on"),
        ("cuda", (9, 0), torch.float32, "needs bfloat16 weights, and the output dtype is float32"),
    ],
)
def test_requirement_problem(device: str, capability: tuple[int, int] | None, dtype: torch.dtype, problem) -> None:
    got = NEEDS_HOPPER.problem(device, capability, dtype)
    assert got is None if problem is None else problem in got


def test_no_requirement_runs_anywhere() -> None:
    assert all(Requirement().problem(d, c, torch.float16) is None for d, c in [("cpu", None), ("cuda", (5, 0))])
    assert all(r.requires.problem("cpu", None, torch.bfloat16) is None for r in RECIPES.values())


def test_check_requirement_is_one_clear_error() -> None:
    recipe = RECIPES["fp8"]
    strict = type(recipe)("fp8-strict", "test", recipe.format, recipe.torchao_config, requires=NEEDS_HOPPER)
    check_requirement(recipe, torch.device("cpu"), torch.bfloat16, where="device cpu")  # no requirement: passes
    with pytest.raises(DeviceError) as info:
        check_requirement(strict, torch.device("cpu"), torch.bfloat16, where="device cpu")
    text = str(info.value)
    assert text.startswith("--quantize fp8-strict needs a CUDA GPU of compute capability 8.9")
    assert "device cpu" in text and "FP8 GEMMs" in text and "torchao-int8" in text and "\n" not in text


# ---- the card ----


def test_card_groups_unquantized_modules() -> None:
    names = [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.11.mlp.down_proj",
        "model.layers.3.self_attn.o_proj",
        "lm_head",
    ]
    assert group_modules(names) == [
        ("model.layers.*.mlp.down_proj", 3),
        ("model.layers.3.self_attn.o_proj", 1),
        ("lm_head", 1),
    ]
    lines = quantization_lines("torchao-int4", tuple(names))
    assert lines[0].startswith("- Quantization: torchao-int4, W4A16: torchao IntxWeightOnlyConfig")
    assert lines[1] == (
        "- Left unquantized: embeddings, norms, biases, and the Linear layers `model.layers.*.mlp.down_proj` "
        "(3 modules), `model.layers.3.self_attn.o_proj`, `lm_head`"
    )
    assert quantization_lines(None, ()) == ["- Quantization: none"]
