"""What a TRL SFTTrainer + peft LoRA run under Accelerate FSDP2 (SHARDED_STATE_DICT) leaves on disk, finalized as
a user would: the adapter-only DCP checkpoint, named as get_peft_model_state_dict names it (no adapter segment),
with no config.json, adapter_config.json or tokenizer anywhere in the run's output dir.

The adapter is copied bit for bit, so PeftModel.from_pretrained must give the trained model's logits exactly; a
merge is W + (B @ A) * scale in float32, within 4 float32 ulps of peft's merge_and_unload. A FinalizeCallback
finalized the same checkpoint inside the training job: its output must be byte for byte a CLI finalize's.

--base-model as a Hub id: the Hub is unreachable here, so the tests populate a Hugging Face cache (the layout
huggingface_hub's downloads leave, checked with its scan_cache_dir) and set HF_HUB_OFFLINE=1. Only the network is
faked; the resolution (snapshot_download, the cache, rank 0 first) is huggingface_hub's and distfinalize's own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import common
import pytest
import torch
from hubcache import populate
from peft import PeftModel
from support import check_ok, error_lines, finalize, no_traceback, read_json, read_output, run_cli, tree_digest
from transformers import AutoModelForCausalLM
from trl.trainer.utils import generate_model_card

pytestmark = pytest.mark.dist

EPS = torch.finfo(torch.float32).eps
HUB_ID = "tiny-org/tiny-llama"


def offline_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """HF_HUB_CACHE and HF_HUB_OFFLINE=1 for the torchrun ranks (environment) and for a 1-rank run in this process
    (huggingface_hub reads both into its constants when imported)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=common.reference_input()).logits


def base(out: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(out / "base-model")


def check_adapter(out: Path, dest: Path) -> None:
    """peft's adapter names and the trained tensors bit for bit; PeftModel gives the trained logits exactly."""
    reference = torch.load(out / "reference.pt")
    tensors, _ = read_output(dest)
    assert len(tensors) == 12 and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in tensors)
    for name, tensor in tensors.items():
        in_model = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.equal(tensor, reference[in_model]), name
    config = read_json(dest / "adapter_config.json")
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        4,
        8,
        ["down_proj", "q_proj", "v_proj"],
    )
    assert torch.equal(logits(PeftModel.from_pretrained(base(out), dest)), torch.load(out / "reference_logits.pt"))


def check_merged(out: Path, dest: Path) -> None:
    merged = torch.load(out / "merged.pt")
    state = AutoModelForCausalLM.from_pretrained(dest).state_dict()
    assert set(state) == set(merged)
    for name, want in merged.items():
        assert (state[name] - want).abs().max().item() <= 4 * EPS * want.abs().max().item(), name


@pytest.mark.parametrize("nproc", [1, 2])
def test_trl_adapter_dir(trl_run: Path, tmp_path: Path, nproc: int) -> None:
    """SRC is the run's output dir as TRL left it; --base-model gives the config and tokenizer."""
    dest = tmp_path / "adapter"
    args = ("--base-model", str(trl_run / "base-model"), "--lora-alpha", "8")
    check_ok(finalize(trl_run / "run", dest, *args, nproc=nproc))
    check_adapter(trl_run, dest)
    assert (dest / "tokenizer.json").is_file()
    assert read_json(dest / "adapter_config.json")["base_model_name_or_path"] is None  # no local path is recorded


def test_trl_merge_lora(trl_run: Path, tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    args = ("--merge-lora", "--base-model", str(trl_run / "base-model"), "--lora-alpha", "8")
    check_ok(finalize(trl_run / "run", dest, *args, "--max-shard-size", "100KB", nproc=2))
    check_merged(trl_run, dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    torch.testing.assert_close(logits(model), torch.load(trl_run / "merged_logits.pt"), rtol=1e-5, atol=1e-5)


def test_callback_output_is_a_cli_finalize(trl_run: Path, tmp_path: Path) -> None:
    """FinalizeCallback ran in the training job (2 ranks, its own gloo group, which the job went on using): the
    same bytes as `torchrun -m distfinalize OUTPUT_DIR DEST` with what the callback took from the trained model
    (--base-model, --lora-alpha)."""
    callback = trl_run / "callback" / "model"
    check_adapter(trl_run, callback)
    dest = tmp_path / "model"
    args = ("--base-model", str(trl_run / "base-model"), "--lora-alpha", "8")
    check_ok(finalize(trl_run / "run", dest, *args, nproc=2))
    assert tree_digest(callback) == tree_digest(dest)


@pytest.mark.parametrize("nproc", [1, 2])
def test_base_model_hub_id(trl_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nproc: int) -> None:
    """--base-model ORG/NAME from the Hugging Face cache, offline: the adapter dir (adapter_config.json and the card
    name the Hub id) and the merge (its base weights from the cache)."""
    from huggingface_hub import scan_cache_dir

    cache = tmp_path / "hub"
    populate(cache, HUB_ID, trl_run / "base-model")
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == [HUB_ID]
    offline_cache(monkeypatch, cache)
    before = tree_digest(cache)

    dest = tmp_path / "adapter"
    check_ok(finalize(trl_run / "run", dest, "--base-model", HUB_ID, "--lora-alpha", "8", nproc=nproc))
    check_adapter(trl_run, dest)
    assert read_json(dest / "adapter_config.json")["base_model_name_or_path"] == HUB_ID
    assert f"base_model: {HUB_ID}" in (dest / "README.md").read_text()
    assert "/hub/" not in json.dumps(read_json(dest / "distfinalize-manifest.json"))  # no cache path is recorded

    merged = tmp_path / "merged"
    args = ("--merge-lora", "--base-model", HUB_ID, "--lora-alpha", "8")
    check_ok(finalize(trl_run / "run", merged, *args, nproc=nproc))
    check_merged(trl_run, merged)
    assert f"base_model: {HUB_ID}" in (merged / "README.md").read_text()
    assert read_json(merged / "distfinalize-manifest.json")["lora"]["base_model_id"] == HUB_ID
    if nproc == 2:  # verify redoes the merge with the base weights the manifest's Hub id names, from the cache
        result = check_ok(run_cli("verify", merged, "--source", trl_run / "run"))
        assert "6 of them merged LoRA weights" in result.stdout  # q, v, down of 2 layers
    assert tree_digest(cache) == before


def test_no_config_anywhere(trl_run: Path, fsdp2_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing unloadable is written silently: no config.json -> one line naming --base-model (and --tensors-only),
    exit 1, nothing at DEST, SRC untouched. A Hub id the offline cache lacks: one line saying so and what to do."""
    before = tree_digest(trl_run / "run")
    dest = tmp_path / "out" / "model"
    result = finalize(trl_run / "run", dest, "--lora-alpha", "8")
    assert result.returncode == 1 and no_traceback(result)
    [line] = error_lines(result.stderr)
    assert "needs its base model's config.json" in line and "--base-model DIR|HUB_ID" in line
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []

    carded = tmp_path / "carded"  # the run as TRL leaves it when the base was loaded by Hub id: its card names it
    shutil.copytree(trl_run / "run", carded)
    card = generate_model_card(HUB_ID, "carded", "me/carded", None, ["sft"], None, None, "SFT")
    card.save(carded / "README.md")
    result = finalize(carded, dest, "--lora-alpha", "8")
    [line] = error_lines(result.stderr)
    assert result.returncode == 1 and f"names base_model {HUB_ID}: pass --base-model {HUB_ID}" in line
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []

    src = tmp_path / "plain"
    shutil.copytree(fsdp2_runs / "untied-model" / "checkpoints" / "checkpoint-3", src / "checkpoint-3")
    result = finalize(src, dest)
    assert result.returncode == 1 and no_traceback(result)
    [line] = error_lines(result.stderr)
    assert "no config.json found" in line and "--base-model" in line and "--tensors-only" in line
    assert not dest.exists()
    check_ok(finalize(src, dest, "--tensors-only"))
    assert not (dest / "config.json").exists() and read_output(dest)[0]

    offline_cache(monkeypatch, tmp_path / "empty-cache")
    result = finalize(trl_run / "run", tmp_path / "hub-out", "--base-model", "nobody/missing", "--lora-alpha", "8")
    assert result.returncode == 1 and no_traceback(result)
    [line] = error_lines(result.stderr)
    assert "not in the Hugging Face cache" in line and "hf download nobody/missing" in line
    assert not (tmp_path / "hub-out").exists()
    assert tree_digest(trl_run / "run") == before
