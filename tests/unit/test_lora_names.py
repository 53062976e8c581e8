"""LoRA names and the merge math, checked against peft's own merge on small layers."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from distfinalize.config import LoraOptions
from distfinalize.transform.lora import (
    LoraMerge,
    adapter_names,
    is_lora_checkpoint,
    is_lora_weight,
    merge_lora,
    merged_name,
    peft_name,
)

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_detects_lora_names() -> None:
    assert is_lora_checkpoint([f"{Q}.lora_A.default.weight", "x.weight"])
    assert is_lora_checkpoint(["base_model.model.model.embed_tokens.lora_embedding_A.default"])
    assert is_lora_checkpoint([f"_orig_mod.{Q}.lora_B.default.weight"])
    assert not is_lora_checkpoint(["model.layers.0.self_attn.q_proj.weight", "model.lora_Alpha.weight"])
    assert adapter_names([f"{Q}.lora_A.sft.weight", "base_model.model.lm_head.modules_to_save.sft.weight"]) == {"sft"}
    assert is_lora_weight(f"{Q}.lora_B.default.weight") and not is_lora_weight(f"{Q}.base_layer.weight")


def test_peft_and_merged_names() -> None:
    assert peft_name(f"model.{Q}.base_layer.weight", "") == f"{Q}.base_layer.weight"  # a {"model": ...} container
    assert (
        peft_name(f"{Q.replace('.self_attn', '._checkpoint_wrapped_module.self_attn')}.lora_A.default.weight", "")
        == f"{Q}.lora_A.default.weight"
    )
    injected = "module.model.layers.0.self_attn.q_proj.lora_A.default.weight"  # no PeftModel wrapper, DDP prefix
    assert peft_name(injected, "module.") == f"{Q}.lora_A.default.weight"
    assert merged_name(f"{Q}.base_layer.weight", "default") == "model.layers.0.self_attn.q_proj.weight"
    assert merged_name("base_model.model.lm_head.modules_to_save.default.weight", "default") == "lm_head.weight"
    assert merged_name("base_model.model.lm_head.original_module.weight", "default") is None
    assert merged_name("base_model.model.model.norm.weight", "default") == "model.norm.weight"


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 5)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_peft(rslora: bool) -> None:
    """W + (B @ A) * scale (transposed for embeddings) is what merge_and_unload computes, bit for bit on CPU."""
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=3, lora_alpha=7, use_rslora=rslora, target_modules=["emb", "proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    inner = model.base_model.model
    cases = {
        "proj": (
            inner.proj.base_layer.weight,
            inner.proj.lora_A["default"].weight,
            inner.proj.lora_B["default"].weight,
            inner.proj.scaling["default"],
            False,
        ),
        "emb": (
            inner.emb.base_layer.weight,
            inner.emb.lora_embedding_A["default"],
            inner.emb.lora_embedding_B["default"],
            inner.emb.scaling["default"],
            True,
        ),
    }
    ours = {
        k: merge_lora(w.detach(), a.detach(), b.detach(), LoraMerge("a", "b", s, t))
        for k, (w, a, b, s, t) in cases.items()
    }
    assert cases["proj"][3] == pytest.approx(7 / 3**0.5 if rslora else 7 / 3)
    merged = model.merge_and_unload()
    assert torch.equal(ours["proj"], merged.proj.weight) and torch.equal(ours["emb"], merged.emb.weight)


def test_lora_options() -> None:
    assert LoraOptions(alpha=16.0, target_modules=("q_proj",)).overrides == {
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
    }
    assert LoraOptions(alpha=0.5, use_rslora=True).overrides == {"lora_alpha": 0.5, "use_rslora": True}
    with pytest.raises(ValueError, match="--lora-r"):
        LoraOptions(r=0)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the GPU merge is compared to the CPU one"
)
def test_cuda_merge_matches_cpu() -> None:
    """Merging on the rank's GPU (bf16 base weight, float32 adapter) stays on the GPU, in float32, and agrees with the
    CPU merge up to the matmul's float32 rounding (TF32 off, as torch's default for matmul)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 192, generator=gen).to(torch.bfloat16)
    a, b = torch.randn(16, 192, generator=gen), torch.randn(256, 16, generator=gen)
    merge = LoraMerge("a", "b", 0.5)
    on_cpu = merge_lora(w, a, b, merge)
    on_gpu = merge_lora(w.cuda(), a, b, merge)
    assert on_gpu.is_cuda and on_gpu.dtype == torch.float32
    bound = 8 * torch.finfo(torch.float32).eps * on_cpu.abs().max().item()
    assert (on_gpu.cpu() - on_cpu).abs().max().item() <= bound


def test_peft_saved_format_names() -> None:
    """get_peft_model_state_dict's names (no adapter segment) are LoRA names of the adapter `default`."""
    from distfinalize.transform.lora import is_saved_format

    saved = [
        f"model.{Q}.lora_A.weight",
        f"model.{Q}.lora_B.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
    ]
    assert is_lora_checkpoint(saved) and is_saved_format(saved) and adapter_names(saved) == {"default"}
    assert is_lora_checkpoint(["base_model.model.model.embed_tokens.lora_embedding_B"])
    assert not is_saved_format(
        [f"{Q}.lora_A.default.weight", "base_model.model.model.embed_tokens.lora_embedding_A.sft"]
    )
