"""torchtitan Llama 3 checkpoints: names and the rotary layout of q/k map onto Hugging Face Llama.

torchtitan itself does not install here (0.3.0 needs spmd_types, wandb, datasets, tensorboard and a newer
torch), so its layout is made by an in-test reference of its state-dict adapter (`from_hf`: the reverse
of Hugging Face's `permute`). That reference is checked on its own: interleaved-pair RoPE (torchtitan's,
complex multiplication) on the torchtitan-layout weights gives the same attention scores as Hugging Face's
rotate-half RoPE on the original weights. Then the finalized model must equal the original bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import common
import pytest
import torch
import torch.distributed.checkpoint as dcp
from support import check_ok, finalize, read_output
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist

HEADS, KV_HEADS, HEAD_DIM, THETA = 4, 2, 16, 10000.0


def to_torchtitan_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face (half-split) rows -> interleaved rotary pairs, like torchtitan's `_reverse_permute`."""
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols).clone()


def torchtitan_state(hf: dict[str, torch.Tensor], new_names: bool) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict in torchtitan's names (0.3's qkv_linear/lm_head, or the older wq/output)."""
    qkv = "attention.qkv_linear." if new_names else "attention."
    out = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        ("lm_head.weight" if new_names else "output.weight"): hf["lm_head.weight"],
    }
    for i in range(2):
        p, t = f"model.layers.{i}.", f"layers.{i}."
        out[t + qkv + "wq.weight"] = to_torchtitan_rows(hf[p + "self_attn.q_proj.weight"], HEADS)
        out[t + qkv + "wk.weight"] = to_torchtitan_rows(hf[p + "self_attn.k_proj.weight"], KV_HEADS)
        out[t + qkv + "wv.weight"] = hf[p + "self_attn.v_proj.weight"]
        out[t + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[t + "feed_forward.w1.weight"] = hf[p + "mlp.gate_proj.weight"]
        out[t + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
        out[t + "feed_forward.w3.weight"] = hf[p + "mlp.up_proj.weight"]
        out[t + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[t + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return {k: v.clone() for k, v in out.items()}


def rope_angles(positions: int) -> torch.Tensor:
    inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv)  # [T, HEAD_DIM/2]


def scores_torchtitan(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs rotated as complex numbers (torchtitan's apply_rotary_emb); GQA by repetition."""
    angles = torch.polar(torch.ones_like(rope_angles(x.shape[0])), rope_angles(x.shape[0]))

    def rotate(w: torch.Tensor, heads: int) -> torch.Tensor:
        y = (x @ w.T).view(x.shape[0], heads, HEAD_DIM // 2, 2)
        return torch.view_as_real(torch.view_as_complex(y.contiguous()) * angles[:, None, :]).flatten(2)

    q, k = rotate(wq, HEADS), rotate(wk, KV_HEADS).repeat_interleave(HEADS // KV_HEADS, dim=1)
    return torch.einsum("thd,shd->hts", q, k)


def scores_hf(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """Hugging Face Llama's rotate_half RoPE on half-split rows."""
    angles = rope_angles(x.shape[0]).repeat(1, 2)  # [T, HEAD_DIM]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rotate(w: torch.Tensor, heads: int) -> torch.Tensor:
        y = (x @ w.T).view(x.shape[0], heads, HEAD_DIM)
        half = torch.cat((-y[..., HEAD_DIM // 2 :], y[..., : HEAD_DIM // 2]), dim=-1)
        return y * cos + half * sin

    q, k = rotate(wq, HEADS), rotate(wk, KV_HEADS).repeat_interleave(HEADS // KV_HEADS, dim=1)
    return torch.einsum("thd,shd->hts", q, k)


def test_reference_layout_is_torchtitans() -> None:
    """The in-test reference really is torchtitan's layout: same attention scores under each one's RoPE."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=gen, dtype=torch.float64)
    wq = torch.randn(HEADS * HEAD_DIM, 64, generator=gen, dtype=torch.float64)
    wk = torch.randn(KV_HEADS * HEAD_DIM, 64, generator=gen, dtype=torch.float64)
    expected = scores_hf(x, wq, wk)
    got = scores_torchtitan(x, to_torchtitan_rows(wq, HEADS), to_torchtitan_rows(wk, KV_HEADS))
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(scores_torchtitan(x, wq, wk), expected, atol=1e-3)  # the layout matters


@pytest.mark.parametrize("new_names", [True, False], ids=["torchtitan-0.3", "older-names"])
def test_torchtitan_checkpoint_finalizes_to_hf(tmp_path: Path, new_names: bool) -> None:
    model = common.build_model(tie=False, seed=3)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run = tmp_path / "torchtitan-run"
    state = {**torchtitan_state(hf, new_names), "freqs_cis": torch.randn(64, 8)}
    dcp.save(
        {"model": state, "train_state": {"step": 10}}, checkpoint_id=str(run / "checkpoint" / "step-10"), no_dist=True
    )
    common.tiny_config(tie=False).save_pretrained(run)
    dest = tmp_path / "out"
    result = check_ok(finalize(run, dest, "--max-shard-size", "100KB", nproc=2))
    assert "key map 'torchtitan-llama'" in result.stderr and "step-10" in result.stderr
    tensors, _ = read_output(dest)
    assert tensors.keys() == hf.keys()
    assert all(torch.equal(tensors[k], hf[k]) for k in hf)
    loaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        ids = common.reference_input()
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_explicit_key_map_and_mismatch_hint(tmp_path: Path) -> None:
    model = common.build_model(tie=False, seed=3)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run = tmp_path / "run"
    dcp.save(torchtitan_state(hf, True), checkpoint_id=str(run / "step-1"), no_dist=True)
    common.tiny_config(tie=False).save_pretrained(run)
    check_ok(finalize(run, tmp_path / "a", "--key-map", "torchtitan-llama"))
    wrong = finalize(run, tmp_path / "b", "--key-map", "hf")
    assert wrong.returncode == 1 and "--key-map" in wrong.stderr and "'tok_embeddings.weight'" in wrong.stderr
