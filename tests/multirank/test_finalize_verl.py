"""Finalize verl / SkyRL FSDP checkpoints (`global_step_N/actor/model_world_size_W_rank_R.pt` + `huggingface/`)
with 1 and 2 ranks: every tensor bit-identical to the trained weights, config and tokenizer from `huggingface/`,
transformers loads the result and gives the trained model's logits. A LoRA actor gives a PEFT adapter dir (or,
with --merge-lora, the merged model).

The checkpoints come from examples/trainers/verl_fsdp.py: real FSDP2 / FSDP1 DTensor state dicts on 2 CPU/gloo
ranks, saved with the calls and file names of verl's FSDPCheckpointManager. verl itself does not install beside
this project's transformers (it pins an older one and pulls Ray), so its FSDPModelMerger is not run here; what
it writes is each tensor's pieces concatenated in rank order and cast to bfloat16, which
`test_step_and_actor_dirs_and_bfloat16` checks against the trained weights. Marked `dist`.
"""

from __future__ import annotations

from pathlib import Path

import common
import pytest
import torch
import verl_fsdp
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from support import check_ok, finalize, read_json, read_output
from transformers import AutoModelForCausalLM, AutoTokenizer

from distfinalize.sources.verl import open_verl

pytestmark = pytest.mark.dist

STEP = 3


def actor(run: Path) -> Path:
    return run / f"global_step_{STEP}" / "actor"


def check_against_reference(dest: Path, ref: Path, dtype: torch.dtype = torch.float32) -> None:
    """Every tensor is the trained one (cast to `dtype`), nothing more; transformers loads DEST with the same
    logits as the trained model."""
    reference = torch.load(ref / "reference.pt")
    tied = read_json(ref / "config.json")["tie_word_embeddings"]
    tensors, _ = read_output(dest)
    assert set(tensors) == set(reference) - ({"lm_head.weight"} if tied else set())
    for name, tensor in tensors.items():
        assert tensor.dtype == dtype and torch.equal(tensor, reference[name].to(dtype)), name
    if dtype == torch.float32:
        model = AutoModelForCausalLM.from_pretrained(dest, dtype=dtype).eval()
        with torch.no_grad():
            logits = model(input_ids=common.reference_input()).logits
        assert torch.equal(logits, torch.load(ref / "reference_logits.pt"))


CASES = [("fsdp2", 1), ("fsdp2", 2), ("fsdp2-tied", 2), ("fsdp1", 1), ("fsdp1", 2), ("hsdp2", 2)]


@pytest.mark.parametrize(("variant", "nproc"), CASES, ids=[f"{v}-{n}ranks" for v, n in CASES])
def test_bit_identical_to_the_trained_weights(verl_runs: Path, tmp_path: Path, variant: str, nproc: int) -> None:
    """SRC is the run dir (latest global_step_N, then its actor/); config.json and the tokenizer come from
    actor/huggingface/ (the reference dir is elsewhere)."""
    run, dest = verl_runs / f"verl-{variant}", tmp_path / "out"
    result = check_ok(finalize(run, dest, nproc=nproc))
    assert f"verl checkpoint {actor(run)}" in result.stderr
    check_against_reference(dest, verl_runs / f"verl-{variant}-ref")
    assert read_json(dest / "config.json")["architectures"] == ["LlamaForCausalLM"]
    assert len(AutoTokenizer.from_pretrained(dest)) == common.VOCAB


@pytest.mark.parametrize("where", ["step", "actor"])
def test_step_and_actor_dirs_and_bfloat16(verl_runs: Path, tmp_path: Path, where: str) -> None:
    """SRC may be global_step_N/ or the actor folder itself; --dtype bfloat16 casts the fp32 weights once (what
    verl's model merger writes)."""
    run = verl_runs / "verl-fsdp2"
    src = actor(run) if where == "actor" else actor(run).parent
    check_ok(finalize(src, tmp_path / "out", "--dtype", "bfloat16", nproc=2))
    check_against_reference(tmp_path / "out", verl_runs / "verl-fsdp2-ref", torch.bfloat16)


def test_rank_reads_only_the_pieces_it_needs(verl_runs: Path) -> None:
    """The plan comes from rank 0's file alone; reading one tensor of a hybrid (ddp x fsdp) save opens only the
    file of the first replica, and each piece's bytes, not the whole file."""
    source = open_verl(actor(verl_runs / "verl-hsdp2"), STEP)
    assert source.info.format == "verl" and source.info.saved_world_size == 2
    reader = source.reader()
    key = "model.layers.0.self_attn.q_proj.weight"
    tensor = reader.read([key])[key]
    assert set(reader.located) == {0}  # rank 1's file holds the same replica and is never opened
    assert torch.equal(tensor, torch.load(verl_runs / "verl-hsdp2-ref" / "reference.pt")[key])
    fsdp = open_verl(actor(verl_runs / "verl-fsdp2"), STEP).reader()
    fsdp.read([key])
    assert set(fsdp.located) == {0, 1}


@pytest.mark.parametrize("nproc", [1, 2])
def test_lora_actor_adapter_dir(verl_runs: Path, tmp_path: Path, nproc: int) -> None:
    """A LoRA actor's rank files hold the PeftModel; the adapter dir holds exactly the trained adapter (the same
    tensors verl's own lora_adapter/adapter_model.safetensors holds), with r / alpha / targets from
    lora_adapter/adapter_config.json, and PeftModel on the untouched base gives the trained model's logits."""
    run, ref, dest = verl_runs / "verl-lora", verl_runs / "verl-lora-ref", tmp_path / "adapter"
    check_ok(finalize(run, dest, nproc=nproc))
    trained = verl_fsdp.build("lora")
    trained.load_state_dict(torch.load(ref / "reference.pt"))
    expected = get_peft_model_state_dict(trained)
    tensors, _ = read_output(dest)
    assert set(tensors) == set(expected) and all(torch.equal(tensors[k], expected[k]) for k in expected)
    verl_adapter = load_file(actor(run) / "lora_adapter" / "adapter_model.safetensors")
    assert set(verl_adapter) == set(tensors) and all(torch.equal(tensors[k], verl_adapter[k]) for k in tensors)
    config = read_json(dest / "adapter_config.json")
    want = verl_fsdp.lora_config()
    assert (config["r"], config["lora_alpha"], set(config["target_modules"])) == (
        want.r,
        want.lora_alpha,
        set(want.target_modules),
    )
    loaded = PeftModel.from_pretrained(common.build_model(tie=False), dest).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=common.reference_input()).logits, torch.load(ref / "reference_logits.pt"))


def test_lora_actor_merged(verl_runs: Path, tmp_path: Path) -> None:
    """--merge-lora: the merged model equals peft's merge_and_unload() within float32 rounding and loads with
    transformers."""
    run, ref, dest = verl_runs / "verl-lora", verl_runs / "verl-lora-ref", tmp_path / "merged"
    check_ok(finalize(run, dest, "--merge-lora", nproc=2))
    merged = torch.load(ref / "merged.pt")
    tensors, _ = read_output(dest)
    assert set(tensors) == set(merged)
    for name, want in merged.items():
        torch.testing.assert_close(tensors[name], want, rtol=1e-6, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=common.reference_input()).logits
    torch.testing.assert_close(logits, torch.load(ref / "merged_logits.pt"), rtol=1e-5, atol=1e-5)
