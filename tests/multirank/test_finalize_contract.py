"""The finalize contract: tokenizer and added tokens, config, generation config, card, model code, kept
checkpoint and Hub. Real transformers/tokenizers objects, real checkpoints; marked `dist`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import common
import pytest
import torch
import torch.distributed.checkpoint as dcp
from huggingface_hub import ModelCard
from support import check_ok, finalize, read_json, read_output, tree_digest
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

pytestmark = pytest.mark.dist

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
ADD_TOKENS = """\
special_tokens:
  - "<|im_start|>"
  - {token: "<|im_end|>", init: "copy:</s>"}
  - {token: "<tool>", init: zero}
regular_tokens: ["finalizer"]
"""


@pytest.fixture
def run_without_pad(fsdp2_runs: Path, tmp_path: Path) -> Path:
    """The untied FSDP2 run, with a tokenizer that has no PAD token (like Llama 3's)."""
    run = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-optim", run, symlinks=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (run / name).unlink()
    common.build_tokenizer(pad=False).save_pretrained(run)
    return run


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=common.reference_input()).logits


def test_tokens_added_rows_and_everything_loads(run_without_pad: Path, tmp_path: Path) -> None:
    run = run_without_pad
    (tmp_path / "tokens.yaml").write_text(ADD_TOKENS)
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    dest = tmp_path / "out"
    args = [
        "--max-shard-size",
        "60KB",
        "--add-tokens",
        str(tmp_path / "tokens.yaml"),
        "--chat-template",
        str(tmp_path / "chat.jinja"),
        "--pad-vocab-to-multiple-of",
        "8",
        "--base-model-id",
        "org/base",
        "--dataset",
        "org/data1",
        "--dataset",
        "org/data2",
        "--training-method",
        "sft",
        "--log-url",
        "https://wandb.example/run/1",
    ]
    before = tree_digest(run)
    check_ok(finalize(run, dest, *args, nproc=2))
    assert tree_digest(run) == before

    tokenizer = AutoTokenizer.from_pretrained(dest)
    vocab = tokenizer.get_vocab()
    new = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<tool>", "finalizer"]
    assert [vocab[t] for t in new] == list(range(256, 261))
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.chat_template == TEMPLATE

    config = AutoConfig.from_pretrained(dest)
    assert config.vocab_size == 264  # 261 tokens, rounded up to a multiple of 8
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (256, 0, 1)
    generation = GenerationConfig.from_pretrained(dest)
    assert generation.eos_token_id == [1, 258] and generation.pad_token_id == 256

    reference = torch.load(run / "reference.pt")
    tensors, _ = read_output(dest)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ref, out = reference[name], tensors[name]
        assert out.shape == (264, 64)
        assert torch.equal(out[:256], ref)
        mean = ref.float().mean(dim=0).to(ref.dtype)
        assert torch.equal(out[256], torch.zeros(64))  # PAD: zero by default
        assert torch.equal(out[257], mean)  # <|im_start|>: mean
        assert torch.equal(out[258], ref[1])  # <|im_end|>: copy of </s>
        assert torch.equal(out[259], torch.zeros(64))  # <tool>: zero
        assert torch.equal(out[260], mean) and torch.equal(out[263], mean)  # regular token, padding rows
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert torch.equal(logits(model)[..., :256], torch.load(run / "reference_logits.pt"))

    card = ModelCard.load(dest / "README.md")
    assert card.data.base_model == "org/base" and card.data.datasets == ["org/data1", "org/data2"]
    assert {"distfinalize", "sft"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert "https://wandb.example/run/1" in card.text and "checkpoint-3" in card.text


def test_generation_preset_and_none(fsdp2_runs: Path, tmp_path: Path) -> None:
    run = fsdp2_runs / "tied-model"
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"max_tokens": 64, "temperature": 0.7, "top_p": 0.9}))
    check_ok(finalize(run, tmp_path / "a", "--generation-config", str(preset), "--stop-tokens", "<unk>"))
    generation = read_json(tmp_path / "a" / "generation_config.json")
    assert generation["max_new_tokens"] == 64 and generation["do_sample"] is True
    assert generation["eos_token_id"] == [1, 2] and generation["pad_token_id"] == 3
    check_ok(finalize(run, tmp_path / "b", "--generation-config", "none"))
    assert not (tmp_path / "b" / "generation_config.json").exists()
    bad = finalize(run, tmp_path / "c", "--stop-tokens", "<nope>")
    assert bad.returncode == 2 and "stop token '<nope>' is not in the tokenizer's vocabulary" in bad.stderr
    assert not (tmp_path / "c").exists()


def test_keep_checkpoint_with_optimizer(fsdp2_runs: Path, tmp_path: Path) -> None:
    run = fsdp2_runs / "untied-optim"
    dest = tmp_path / "out"
    check_ok(finalize(run, dest, "--max-shard-size", "100KB", "--keep-checkpoint", "--keep-optimizer", nproc=2))
    kept = dest / "checkpoints" / "checkpoint-3"
    weights = sorted(p.name for p in kept.glob("*.safetensors"))
    assert weights and all((dest / w).is_symlink() and (dest / w).resolve() == (kept / w).resolve() for w in weights)
    assert not Path(str((dest / weights[0]).readlink())).is_absolute()
    manifest = read_json(kept / "manifest.json")
    assert manifest["weights"] == [*weights, "model.safetensors.index.json"] and manifest["optimizer"] == "optimizer"
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert torch.equal(logits(model), torch.load(run / "reference_logits.pt"))

    source_dir = run / "checkpoints" / "checkpoint-3"
    kept_md = FileSystemReader(str(kept / "optimizer")).read_metadata()
    assert kept_md.state_dict_metadata and all(k.startswith("optim.") for k in kept_md.state_dict_metadata)
    source_md = FileSystemReader(str(source_dir)).read_metadata()
    assert {k for k in source_md.state_dict_metadata if k.startswith("optim.")} == set(kept_md.state_dict_metadata)
    tensor_keys = [k for k, m in kept_md.state_dict_metadata.items() if hasattr(m, "size")]

    def load(path: Path) -> dict[str, torch.Tensor]:
        state = {
            k: torch.empty(kept_md.state_dict_metadata[k].size, dtype=kept_md.state_dict_metadata[k].properties.dtype)
            for k in tensor_keys
        }
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
        return state

    ours, theirs = load(kept / "optimizer"), load(source_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in tensor_keys)
    kept_bytes = sum(p.stat().st_size for p in (kept / "optimizer").glob("*.distcp"))
    assert kept_bytes == sum(info.length for info in kept_md.storage_data.values())
    assert kept_bytes < sum(p.stat().st_size for p in source_dir.glob("*.distcp"))  # no model bytes copied


def test_base_model_supplies_config_and_tokenizer(fsdp2_runs: Path, tmp_path: Path) -> None:
    """SRC holds only DCP files; config.json and the tokenizer come from --base-model."""
    run = fsdp2_runs / "untied-model"
    src = tmp_path / "bare"
    shutil.copytree(run / "checkpoints" / "checkpoint-3", src / "checkpoint-3")
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run / name, base / name)
    dest = tmp_path / "out"
    check_ok(finalize(src, dest, "--base-model", str(base)))
    assert AutoTokenizer.from_pretrained(dest).pad_token == "<pad>"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(dest)), torch.load(run / "reference_logits.pt"))


def test_model_code_is_copied(fsdp2_runs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-model", run)
    (run / "modeling_tiny.py").write_text("from transformers import LlamaForCausalLM as TinyForCausalLM\n")
    (run / "train.py").write_text("print('the training script, not model code')\n")
    config = read_json(run / "config.json")
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (run / "config.json").write_text(json.dumps(config))
    dest = tmp_path / "out"
    check_ok(finalize(run, dest))
    assert (dest / "modeling_tiny.py").read_text() == (run / "modeling_tiny.py").read_text()
    assert not (dest / "train.py").exists()
    assert read_json(dest / "config.json")["auto_map"] == config["auto_map"]


def test_dry_run_reports_the_contract(run_without_pad: Path, tmp_path: Path) -> None:
    result = check_ok(finalize(run_without_pad, tmp_path / "out", "--dry-run", "--training-method", "dpo"))
    assert not (tmp_path / "out").exists()
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["tokenizer"]["added"] == [["<|pad|>", 256]]
    assert report["config.json"]["vocab_size"] == 257 and report["config.json"]["pad_token_id"] == 256
    assert "dpo" in report["model_card"]["tags"]


def test_push_to_hub_fakes_only_the_network(fsdp2_runs: Path, tmp_path: Path, monkeypatch) -> None:
    """The Hub is unreachable here: HfApi's network methods are replaced by recorders (the only fake);
    everything else, finalize included, runs for real, in this process (world size 1)."""
    from huggingface_hub import HfApi

    from distfinalize.cli import main

    calls: list[tuple[str, dict]] = []

    def record(name: str, result: object):
        def method(self, *args, **kwargs):
            calls.append((name, {**kwargs, "args": args}))
            return result

        return method

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(HfApi, "create_repo", record("create_repo", type("RepoUrl", (), {"repo_id": "org/tiny"})()))
    monkeypatch.setattr(HfApi, "create_branch", record("create_branch", None))

    class Commit:
        commit_url = "https://hub.example/org/tiny/commit/abc"
        oid = "abc"

    monkeypatch.setattr(HfApi, "upload_folder", record("upload_folder", Commit()))
    dest = tmp_path / "out"
    code = main(
        [
            str(fsdp2_runs / "tied-model"),
            str(dest),
            "--push-to-hub",
            "org/tiny",
            "--private",
            "--revision",
            "v1",
            "--commit-message",
            "first",
        ]
    )
    assert code == 0
    assert [name for name, _ in calls] == ["create_repo", "create_branch", "upload_folder"]
    repo, branch, upload = (kwargs for _, kwargs in calls)
    assert repo["args"] == ("org/tiny",) and repo["private"] is True
    assert branch["args"] == ("org/tiny",) and branch["branch"] == "v1"
    assert upload["repo_id"] == "org/tiny" and upload["revision"] == "v1" and upload["commit_message"] == "first"
    assert Path(upload["folder_path"]) == dest
    uploaded = sorted(p.replace("\\", "") for p in upload["allow_patterns"])
    assert uploaded == sorted(p.name for p in dest.iterdir())
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(uploaded)
