"""LoRA checkpoints made by peft under FSDP2 (2 gloo ranks): a PEFT adapter dir by default, --merge-lora a full model.

The adapter's tensors are copied bit for bit and the base weights are the same, so PeftModel.from_pretrained must
give exactly the trained model's logits (torch.equal). A merge computes W + (B @ A) * scale in float32 like
peft's merge_and_unload does for float32 weights; on CPU the two agree bit for bit, but the tests allow the
rounding of a different matmul kernel (a GPU): each weight within 4 float32 ulps of its largest element.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import common
import fsdp2_lora
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from support import TIMEOUT_S, check_ok, env, error_lines, finalize, our_traceback, read_json, read_output, tree_digest
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist

ADAPTER_FILES = [
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "distfinalize-manifest.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
EPS = torch.finfo(torch.float32).eps


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m distfinalize ARGS` (a subcommand), checked."""
    cmd = [sys.executable, "-m", "distfinalize", *map(str, args)]
    return check_ok(subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=common.reference_input()).logits


def base_model(run: Path) -> torch.nn.Module:
    """The frozen base the adapter was trained on: the saved base dir, else the same seeded model."""
    if (run / "base-model").is_dir():
        return AutoModelForCausalLM.from_pretrained(run / "base-model")
    return common.build_model(tie=False)


def adapter_flags(run: Path) -> list[str]:
    """What a run without adapter_config.json / config.json must be told."""
    if run.name == "lora-adapter-only":
        return ["--base-model", str(run / "base-model"), "--lora-alpha", "16", "--lora-rslora"]
    return []


@pytest.mark.parametrize(("variant", "nproc"), [("lora-full", 1), ("lora-adapter-only", 2)])
def test_adapter_dir(lora_runs: Path, tmp_path: Path, variant: str, nproc: int) -> None:
    """Default output: exactly peft's adapter files and names; loads with PeftModel and gives the same logits."""
    run, dest = lora_runs / variant, tmp_path / "adapter"
    result = check_ok(finalize(run, dest, *adapter_flags(run), nproc=nproc))
    assert "PEFT adapter dir" in result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ADAPTER_FILES

    trained = fsdp2_lora.build_peft_model(variant)
    trained.load_state_dict(torch.load(run / "reference.pt"))
    expected = get_peft_model_state_dict(trained)
    tensors, _ = read_output(dest)
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)

    config = read_json(dest / "adapter_config.json")
    want = fsdp2_lora.lora_config(variant)
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == (
        "LORA",
        want.r,
        want.lora_alpha,
        want.use_rslora,
    )
    assert set(config["target_modules"]) == set(want.target_modules)
    assert config["modules_to_save"] == (sorted(want.modules_to_save) if want.modules_to_save else None)
    assert config["inference_mode"] is True and config["task_type"] == "CAUSAL_LM"
    base_id = "tiny-llama" if variant == "lora-full" else None  # a local --base-model is not recorded (private)
    assert config["base_model_name_or_path"] == base_id
    assert read_json(dest / "distfinalize-manifest.json")["files"].keys() == {"adapter_model.safetensors"}
    assert "library_name: peft" in (dest / "README.md").read_text()

    loaded = PeftModel.from_pretrained(base_model(run), dest)
    assert torch.equal(logits(loaded), torch.load(run / "reference_logits.pt"))
    report = json.loads(cli("verify", dest, "--source", run, "--json").stdout)
    assert "bit-exact" in json.dumps(report) and "merged LoRA" not in json.dumps(report)


@pytest.mark.parametrize(("variant", "nproc"), [("lora-full", 2), ("lora-adapter-only", 1)])
def test_merge_lora(lora_runs: Path, tmp_path: Path, variant: str, nproc: int) -> None:
    """--merge-lora: a plain model that loads with transformers and equals merge_and_unload() within float32
    rounding; base weights from the checkpoint (lora-full) or --base-model (lora-adapter-only)."""
    run, dest = lora_runs / variant, tmp_path / "merged"
    check_ok(finalize(run, dest, "--merge-lora", "--max-shard-size", "100KB", *adapter_flags(run), nproc=nproc))
    assert (dest / "model.safetensors.index.json").is_file() and not (dest / "adapter_config.json").exists()
    merged = torch.load(run / "merged.pt")
    model = AutoModelForCausalLM.from_pretrained(dest)
    state = model.state_dict()
    assert set(state) == set(merged)
    for name, want in merged.items():
        assert state[name].dtype == torch.float32
        bound = 4 * EPS * want.abs().max().item()
        assert (state[name] - want).abs().max().item() <= bound, name
    lora_weights = [k for k in merged if "q_proj" in k]
    assert not torch.equal(state[lora_weights[0]], base_model(run).state_dict()[lora_weights[0]])  # merged in
    torch.testing.assert_close(logits(model), torch.load(run / "merged_logits.pt"), rtol=1e-5, atol=1e-5)
    layers = sum(".lora_A." in k or ".lora_embedding_A." in k for k in torch.load(run / "reference.pt"))
    assert f"{layers} of them merged LoRA weights" in cli("verify", dest, "--source", run).stdout  # redone as recorded


def test_merge_lora_bfloat16(lora_runs: Path, tmp_path: Path) -> None:
    """The merge is done in float32 and rounded once: every tensor is merge_and_unload()'s float32 value cast."""
    run, dest = lora_runs / "lora-full", tmp_path / "merged"
    check_ok(finalize(run, dest, "--merge-lora", "--dtype", "bfloat16", nproc=2))
    tensors, _ = read_output(dest)
    merged = torch.load(run / "merged.pt")
    assert set(tensors) == set(merged)
    assert all(torch.equal(tensors[k], merged[k].to(torch.bfloat16)) for k in merged)


def test_adapter_only_without_base_model(lora_runs: Path, tmp_path: Path) -> None:
    """An adapter-only checkpoint with config.json beside it and no --base-model: the adapter is written without
    the adapted embedding's base weight (peft would store it; a warning says so) and still loads to the same
    logits. Then the bad inputs: no lora_alpha anywhere, and --merge-lora without base weights: one clear line
    each, exit 1, nothing at DEST, SRC untouched."""
    src = tmp_path / "src"
    shutil.copytree(lora_runs / "lora-adapter-only", src, ignore=shutil.ignore_patterns("base-model"))
    common.tiny_config(tie=False).save_pretrained(src)
    before = tree_digest(src)
    dest = tmp_path / "adapter"
    result = check_ok(finalize(src, dest, "--lora-alpha", "16", "--lora-rslora", nproc=2))
    assert "embed_tokens.base_layer.weight" in result.stderr and "Pass --base-model DIR" in result.stderr
    tensors, _ = read_output(dest)
    assert not [n for n in tensors if "base_layer" in n] and len(tensors) == 18
    loaded = PeftModel.from_pretrained(base_model(lora_runs / "lora-adapter-only"), dest)
    assert torch.equal(logits(loaded), torch.load(src / "reference_logits.pt"))
    cases = [
        ([], "lora_alpha is unknown"),
        (["--merge-lora", "--lora-alpha", "16"], "--merge-lora needs the base weights"),
    ]
    for args, message in cases:
        dest = tmp_path / "out"
        result = finalize(src, dest, *args, nproc=2)
        assert result.returncode == 1, result.stderr
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not our_traceback(result.stderr)
        assert not dest.exists() and not list(tmp_path.glob("out*"))
    assert tree_digest(src) == before


def test_inspect_says_lora(lora_runs: Path) -> None:
    """inspect names the adapter (r, alpha, targets) and plans the single adapter file."""
    report = json.loads(cli("inspect", lora_runs / "lora-full", "--json").stdout)
    assert report["lora"]["r"] == 4 and report["lora"]["lora_alpha"] == 8
    assert report["lora"]["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert [f["file"] for f in report["plan"]["files"]] == ["adapter_model.safetensors"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--key-map", "hf"], "--key-map does not apply to LoRA checkpoints"),
        (["--merge-lora", "--strategy", "exchange"], "--strategy exchange cannot merge LoRA adapters yet"),
    ],
    ids=["key-map", "exchange-merge"],
)
def test_refused_combinations(lora_runs: Path, tmp_path: Path, args: list[str], message: str) -> None:
    run = lora_runs / "lora-full"
    before = tree_digest(run)
    result = finalize(run, tmp_path / "out", *args)  # one process: torchrun would turn exit 2 into 1
    assert result.returncode == 2 and not our_traceback(result.stderr)
    [line] = error_lines(result.stderr)
    assert message in line
    assert not (tmp_path / "out").exists() and tree_digest(run) == before
