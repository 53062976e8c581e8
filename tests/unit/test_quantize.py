"""Quantization recipes: planned outputs, error bounds, scales, config blocks, and a real transformers load on CPU.

Logit bounds, agreed from float64 references (tiny random Llama, weights N(0, 0.1), float32 on CPU):
- TIGHT, every recipe: the loaded model vs a float64 model holding dequantize()'s weights (and, for fp8, per-token
  FP8 activations): max |diff| / max |logits| <= 1e-4 (measured ~1e-6). The loader reads our tensors as we mean them.
- LOOSE, relative RMS of the logits vs the unquantized float64 model, i.e. round-to-nearest error through a random
  2-layer net (measured fp8 0.18 incl. FP8 activations, fp8-block 0.13, int8 0.033, int4 0.47, torchao-int8 0.033,
  torchao-fp8 0.13, torchao-int4 0.47): fp8 0.3, fp8-block 0.2, int8 0.06, int4 0.75, torchao-int8 0.06,
  torchao-fp8 0.2, torchao-int4 0.75.
The torchao-* recipes are written in torchao's format, header metadata included (see test_quantize_torchao.py).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao", reason="needs the quant extra: pip install 'distfinalize[quant]'")
pytest.importorskip("compressed_tensors", reason="needs the quant extra: pip install 'distfinalize[quant]'")

from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import save_file

from distfinalize.transform.quant.base import BLOCK, FP8_MAX
from distfinalize.transform.quant.compressed import PackedInt
from distfinalize.transform.quant.recipes import RECIPES, get_recipe
from distfinalize.transform.quant.selection import ignored_modules, quantizable

SHAPES = {
    "fp8": [(256, 384), (128, 128), (48, 80), (200, 136)],
    "fp8-block": [(256, 384), (128, 128), (200, 136), (130, 257), (1, 5)],
    "int8": [(256, 384), (48, 80), (200, 136), (3, 7)],
    "int4": [(256, 384), (128, 128), (8, 256)],
    "torchao-int8": [(256, 384), (48, 80), (3, 7)],
    "torchao-fp8": [(256, 384), (48, 80)],
    "torchao-int4": [(256, 384), (8, 256)],
}
# TIGHT: max |loaded - float64 dequantized model| / max |logits|; LOOSE: relative RMS vs the unquantized model
TIGHT = 1e-4
LOOSE = {
    "fp8": 0.3,
    "fp8-block": 0.2,
    "int8": 0.06,
    "int4": 0.75,
    "torchao-int8": 0.06,
    "torchao-fp8": 0.2,
    "torchao-int4": 0.75,
}


def weight(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.linspace(0.01, 3.0, shape[0]).unsqueeze(1)
    w[0, :] = 0  # an all-zero row must still get a finite scale
    return w.to(dtype)


@pytest.mark.parametrize("name,shape", [(n, s) for n, shapes in SHAPES.items() for s in shapes])
def test_outputs_match_quantize(name: str, shape: tuple[int, int]) -> None:
    recipe = RECIPES[name]
    planned = recipe.outputs("model.layers.0.mlp.up_proj.weight", shape, torch.bfloat16)
    got = recipe.quantize("model.layers.0.mlp.up_proj.weight", weight(shape), torch.bfloat16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == planned
    assert all(
        k.startswith(("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj._weight_")) for k in planned
    )
    assert recipe.output_bytes(shape, torch.bfloat16) == sum(v.numel() * v.element_size() for v in got.values())
    assert all(v.is_contiguous() and torch.isfinite(v.float()).all() for v in got.values())


@pytest.mark.parametrize("name,shape", [(n, s) for n, shapes in SHAPES.items() for s in shapes])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_within_bound(name: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    recipe = RECIPES[name]
    w = weight(shape, seed=1, dtype=dtype)
    out = recipe.quantize("x.weight", w, torch.bfloat16)  # torchao-*: cast to the model dtype first
    err = (recipe.dequantize(out) - w.float()).abs()
    assert (err <= recipe.error_bound(w, out)).all()
    assert err[0].max() == 0  # the zero row stays zero


def test_fp8_scales_match_amax_reference() -> None:
    w = weight((200, 136), seed=2)
    out = RECIPES["fp8"].quantize("x.weight", w)
    ref = w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    torch.testing.assert_close(out["x.weight_scale"], ref.clamp(min=1e-12 / FP8_MAX), rtol=0, atol=0)
    assert out["x.weight"].float().abs().max() == FP8_MAX  # each row's amax maps to 448


def test_fp8_block_scales_match_amax_reference() -> None:
    w = weight((200, 300), seed=3)
    out = RECIPES["fp8-block"].quantize("x.weight", w)
    scale = out["x.weight_scale_inv"]
    assert scale.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            tile = w.float()[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            assert scale[i, j] == max(tile.abs().max().item(), 1e-12) / FP8_MAX


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_int_scales_and_values_match_reference(name: str) -> None:
    recipe = RECIPES[name]
    assert isinstance(recipe, PackedInt)
    w = weight((64, 256), seed=4)
    out = recipe.quantize("x.weight", w)
    group = recipe.group_size or 256
    qmin, qmax = -(1 << (recipe.num_bits - 1)), (1 << (recipe.num_bits - 1)) - 1
    amax = w.float().reshape(64, -1, group).abs().amax(-1)
    ref_scale = (amax / ((qmax - qmin) / 2)).clamp(min=1e-12)
    torch.testing.assert_close(out["x.weight_scale"], ref_scale, rtol=0, atol=0)
    # unpack with compressed-tensors and compare to torchao's integer values
    unpacked = unpack_from_int32(out["x.weight_packed"], recipe.num_bits, torch.Size([64, 256]))
    q, _ = recipe.int_values(w)
    assert torch.equal(unpacked, q)
    expected = (w.float().reshape(64, -1, group) / ref_scale.unsqueeze(-1)).round().clamp(qmin, qmax)
    assert (unpacked.reshape(64, -1, group).float() - expected).abs().max() <= 1  # ties may round either way
    assert out["x.weight_shape"].tolist() == [64, 256]


@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_compressed_tensors_compressor_reads_our_tensors(name: str) -> None:
    """compressed-tensors' own decompressor turns our tensors into the weight our dequantize() gives."""
    recipe = RECIPES[name]
    block = QuantizationConfig.model_validate(recipe.config_block([]))
    scheme = block.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(block.format)
    w = weight((64, 256), seed=5)
    out = recipe.quantize("x.weight", w)
    local = {k.removeprefix("x."): v for k, v in out.items()}
    dense = compressor.decompress(local, scheme)["weight"]
    torch.testing.assert_close(dense.float(), recipe.dequantize(out), rtol=0, atol=0)
    # and its compressor, given our scale, picks the same values: x / s (compressed-tensors) and x * (1 / s)
    # (torchao) can land on either side of a rounding tie, one step apart, in a few elements
    again = compressor.compress({"weight": w.float(), "weight_scale": local["weight_scale"]}, scheme)
    theirs = compressor.decompress(again, scheme)["weight"].float()
    diff = (theirs - dense.float()).abs()
    assert (diff <= recipe.error_bound(w, out) * 2).all()
    assert (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("name", list(RECIPES))
def test_config_block_loads(name: str, tmp_path: Path) -> None:
    import transformers

    block = RECIPES[name].config_block(["lm_head", "model.layers.0.mlp.down_proj"])
    json.dumps(block)
    config = tiny_config().to_dict() | {"quantization_config": block}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.quantization_config["quant_method"] == block["quant_method"]
    if block["quant_method"] == "compressed-tensors":
        parsed = QuantizationConfig.model_validate(block)
        assert parsed.ignore == ["lm_head", "model.layers.0.mlp.down_proj"]
        assert parsed.quantization_status == "compressed"
        assert parsed.format == RECIPES[name].format


@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_compressed_tensors_block_is_the_librarys_own_dump(name: str) -> None:
    """The block is built without importing compressed_tensors; it is exactly what the library fills in and
    writes for the recipe's scheme (every field, defaults included)."""
    recipe = RECIPES[name]
    strategy = "channel" if getattr(recipe, "group_size", None) is None else "group"
    weights = {"num_bits": 8 if name == "fp8" else recipe.num_bits, "type": "float" if name == "fp8" else "int"}
    weights |= {"strategy": strategy, "symmetric": True, "dynamic": False}
    if strategy == "group":
        weights["group_size"] = recipe.group_size
    acts = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
    group = {"targets": ["Linear"], "weights": weights, "format": recipe.format}
    group["input_activations"] = acts if name == "fp8" else None
    ignored = ["lm_head", "model.layers.0.mlp.down_proj"]
    library = QuantizationConfig.model_validate(
        {
            "quant_method": "compressed-tensors",
            "format": recipe.format,
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": ignored,
        }
    ).model_dump(mode="json")
    ours = recipe.config_block(ignored)
    assert json.dumps(ours, sort_keys=True) == json.dumps(library, sort_keys=True)


def test_fp8_config_block_is_the_documented_schema() -> None:
    group = RECIPES["fp8"].config_block([])["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")} == {
        "num_bits": 8,
        "type": "float",
        "strategy": "channel",
        "symmetric": True,
        "dynamic": False,
    }
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "strategy", "dynamic")} == {
        "num_bits": 8,
        "type": "float",
        "strategy": "token",
        "dynamic": True,
    }
    assert RECIPES["int4"].config_block([])["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert RECIPES["fp8-block"].config_block(["lm_head"]) == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"],
        "ignored_layers": ["lm_head"],
    }


def test_what_stays_unquantized() -> None:
    int4, fp8b = RECIPES["int4"], RECIPES["fp8-block"]
    q = lambda name, shape, recipe=int4, **kw: quantizable(name, shape, "lm_head.weight", recipe=recipe, **kw)  # noqa: E731
    assert q("model.layers.0.mlp.up_proj.weight", (512, 256))
    assert q("model.layers.0.mlp.gate_proj.weight", (512, 256))
    assert not q("lm_head.weight", (320, 256))
    assert not q("model.embed_tokens.weight", (320, 256))
    assert not q("model.layers.0.mlp.up_proj.bias", (512,))
    assert not q("model.norm.weight", (256,))
    assert not q("model.layers.0.input_layernorm.weight", (256,))
    assert not q("model.layers.0.mlp.gate.weight", (8, 256))  # MoE router
    assert not q("model.layers.0.mlp.shared_expert_gate.weight", (1, 256))
    assert not q("model.layers.0.mlp.experts.gate_up_proj", (8, 512, 256))  # fused 3-D experts
    assert not q("model.layers.0.mlp.up_proj.weight", (512, 200))  # 200 % 128
    assert not q("model.layers.0.mlp.up_proj.weight", (200, 256), recipe=fp8b)
    assert q("model.layers.0.mlp.up_proj.weight", (200, 256), recipe=RECIPES["int8"])
    assert not q("model.layers.0.mlp.up_proj.weight", (512, 256), ignore=[r"layers\.0\.mlp"])
    assert not q("model.layers.0.mlp.up_proj.weight", (512, 256), tied=["model.layers.0.mlp.up_proj.weight"])
    assert not quantizable("model.tok.weight", (320, 256), None, recipe=int4, spec_input_embedding="model.tok.weight")
    tensors = [
        ("model.embed_tokens.weight", (320, 256)),
        ("model.layers.0.mlp.up_proj.weight", (512, 256)),
        ("model.layers.0.mlp.down_proj.weight", (256, 200)),
        ("model.norm.weight", (256,)),
        ("lm_head.weight", (320, 256)),
    ]
    assert ignored_modules(tensors, "lm_head.weight", recipe=int4) == [
        "model.embed_tokens",
        "model.layers.0.mlp.down_proj",
        "lm_head",
    ]


def test_unknown_recipe_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="fp8, fp8-block, int8, int4"):
        get_recipe("nf4")


# ---- a real transformers load on CPU ----


def tiny_config():
    import transformers

    return transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        dtype="float32",
    )


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # weights well above init scale, so quantization error shows in the logits
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.1)
    return model


def logits(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    ids = torch.arange(24).remainder(320).reshape(2, 12) * 13 % 320
    with torch.no_grad():
        return model.to(dtype)(input_ids=ids).logits.double()


def fp8_per_token(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Dynamic per-token FP8 activation quantization (the fp8 recipe's input_activations), as a reference."""
    x = args[0]
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return ((x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale, *args[1:])


@pytest.mark.parametrize("name", list(RECIPES))
def test_transformers_loads_on_cpu(name: str, tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    import transformers

    recipe = RECIPES[name]
    state = tiny_llama.state_dict()
    shapes = [(n, tuple(t.shape)) for n, t in state.items()]
    out: dict[str, torch.Tensor] = {}
    reference = copy.deepcopy(tiny_llama)
    quantized = []
    for n, t in state.items():
        if quantizable(
            n, tuple(t.shape), "lm_head.weight", recipe=recipe, spec_input_embedding="model.embed_tokens.weight"
        ):
            tensors = recipe.quantize(n, t, t.dtype)
            out |= tensors
            reference.get_parameter(n).data.copy_(recipe.dequantize(tensors))
            if name == "fp8":  # W8A8: activations are quantized per token at run time, as vLLM does
                reference.get_submodule(n.removesuffix(".weight")).register_forward_pre_hook(fp8_per_token)
            quantized.append(n)
        else:
            out[n] = t.contiguous()
    assert len(quantized) == 14  # 7 Linear per layer
    ignored = ignored_modules(shapes, "lm_head.weight", recipe=recipe, spec_input_embedding="model.embed_tokens.weight")
    assert ignored == ["model.embed_tokens", "lm_head"]
    described = [(n, tuple(t.shape), t.dtype, n in quantized) for n, t in state.items()]
    save_file(out, tmp_path / "model.safetensors", metadata={"format": "pt", **recipe.file_metadata(described)})
    config = tiny_config().to_dict() | {"quantization_config": recipe.config_block(ignored)}
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    got = logits(loaded)
    exact = logits(reference, torch.float64)  # what our tensors mean, in float64
    source = logits(copy.deepcopy(tiny_llama), torch.float64)
    top = source.abs().max().item()
    tight = (got - exact).abs().max().item() / top
    loose = ((got - source).norm() / source.norm()).item()  # relative RMS: the quantization error itself
    assert tight <= TIGHT, f"{name}: loader disagrees with dequantize(): {tight:.2e}"
    assert loose <= LOOSE[name], f"{name}: quantization error {loose:.3f} over the agreed {LOOSE[name]}"
    assert loose > 0 and math.isfinite(loose)
    # ignored modules are bit-identical to the source
    for module in ignored:
        assert torch.equal(loaded.get_parameter(f"{module}.weight"), state[f"{module}.weight"]), module
    assert torch.equal(loaded.model.norm.weight, state["model.norm.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the GPU path is compared to the CPU one"
)
@pytest.mark.parametrize("name", list(RECIPES))
def test_cuda_matches_cpu(name: str) -> None:
    """Quantizing on the rank's GPU gives the CPU result: identical scales, values at most one rounding apart."""
    recipe = RECIPES[name]
    w = weight((512, 384), seed=6)
    on_cpu = recipe.quantize("x.weight", w, torch.bfloat16)
    on_gpu = recipe.quantize("x.weight", w.cuda(), torch.bfloat16)
    assert all(t.is_cuda for t in on_gpu.values())
    assert {k: (v.shape, v.dtype) for k, v in on_gpu.items()} == {k: (v.shape, v.dtype) for k, v in on_cpu.items()}
    for key, t in on_cpu.items():
        if "scale" in key:
            torch.testing.assert_close(on_gpu[key].cpu(), t, rtol=1e-6, atol=0)
    diff = (recipe.dequantize({k: v.cpu() for k, v in on_gpu.items()}) - recipe.dequantize(on_cpu)).abs()
    assert (diff <= 2 * recipe.error_bound(w, on_cpu)).all()
    assert (diff > 0).float().mean() < 0.01
