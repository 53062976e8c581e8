"""Hugging Face model dirs as SRC (the transformers Trainer's checkpoint-N, save_pretrained shards, .bin files)
and DCP saved as safetensors by torch's HuggingFaceStorageWriter, finalized by 1 and 2 ranks: every byte checked,
the output loaded with transformers. Marked `dist`: real Trainer and torchrun runs on CPU/gloo.
"""

from __future__ import annotations

from pathlib import Path

import common
import pytest
import torch
from support import check_ok, finalize, read_json, read_output, run_cli, tree_digest
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

pytestmark = pytest.mark.dist

SHARD = "60KB"  # the tiny model is ~400 KB in float32: several output files, more than one per rank
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def logits_of(dest: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=common.reference_input()).logits


def check_exact(run: Path, dest: Path, tied: bool) -> dict[str, torch.Tensor]:
    """Bit-identical tensors (lm_head written only when untied), the index and config right, the logits of the
    trained model from transformers."""
    reference = torch.load(run / "reference.pt")
    tensors, where = read_output(dest)
    assert set(tensors) == set(reference) - ({"lm_head.weight"} if tied else set())
    for name, tensor in tensors.items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name
    files = sorted(p.name for p in dest.glob("*.safetensors"))
    assert len(files) > 2 and read_json(dest / "model.safetensors.index.json")["weight_map"] == where
    config = read_json(dest / "config.json")
    assert config["tie_word_embeddings"] is tied and config["architectures"] == ["LlamaForCausalLM"]
    assert not any((dest / name).exists() for name in TRAINER_FILES)
    assert torch.equal(logits_of(dest), torch.load(run / "reference_logits.pt"))
    return tensors


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize(
    ("variant", "tied", "found"),
    [
        ("trainer-tied", True, "checkpoint-4"),  # the Trainer's output_dir: the latest checkpoint-N
        ("trainer-untied", False, "checkpoint-4"),
        ("sharded-safetensors", False, "sharded-safetensors"),  # save_pretrained(max_shard_size=...)
        ("bin", True, "checkpoint-4"),  # pytorch_model.bin beside the Trainer's optimizer.pt & co.
        ("sharded-bin", False, "sharded-bin"),  # pytorch_model-0000i-of-0000N.bin + index
    ],
)
def test_model_dirs(hf_trainer_runs: Path, tmp_path: Path, variant: str, tied: bool, found: str, nproc: int) -> None:
    run = hf_trainer_runs / variant
    before = tree_digest(run)
    dest = tmp_path / "out"
    result = check_ok(finalize(run, dest, "--max-shard-size", SHARD, nproc=nproc))
    assert found in result.stderr
    check_exact(run, dest, tied)
    assert tree_digest(run) == before
    assert "tensors bit-exact" in check_ok(run_cli("verify", dest, "--source", run)).stdout
    assert AutoTokenizer.from_pretrained(dest).pad_token == "<pad>"


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("variant", ["sharded", "consolidated"])
def test_dcp_hf_storage(hf_storage_runs: Path, tmp_path: Path, variant: str, nproc: int) -> None:
    """dcp.save with HuggingFaceStorageWriter from 2 FSDP2 ranks: each rank's shard files (saved_offsets in their
    headers) or the consolidated files; found one level below SRC's checkpoint/ folder."""
    run = hf_storage_runs / variant
    dest = tmp_path / "out"
    result = check_ok(finalize(run, dest, "--max-shard-size", SHARD, nproc=nproc))
    assert "checkpoint/step-3" in result.stderr
    if variant == "sharded":
        assert "saved by 2 rank(s)" in result.stderr
    check_exact(run, dest, tied=False)
    assert "21 tensors bit-exact" in check_ok(run_cli("verify", dest, "--source", run)).stdout


def test_transforms_on_a_model_dir(hf_trainer_runs: Path, tmp_path: Path) -> None:
    """A model dir resharded, cast to bfloat16, with tokens added, a chat template and a generation preset."""
    run = hf_trainer_runs / "sharded-bin"
    (tmp_path / "tokens.yaml").write_text('special_tokens: ["<|im_start|>", "<|im_end|>"]\n')
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    (tmp_path / "preset.json").write_text('{"max_tokens": 32, "temperature": 0.5}')
    dest = tmp_path / "out"
    args = ["--dtype", "bfloat16", "--max-shard-size", "30KB", "--add-tokens", str(tmp_path / "tokens.yaml")]
    args += ["--chat-template", str(tmp_path / "chat.jinja"), "--generation-config", str(tmp_path / "preset.json")]
    check_ok(finalize(run, dest, *args, "--base-model-id", "org/tiny", nproc=2))
    reference = torch.load(run / "reference.pt")
    tensors, _ = read_output(dest)
    assert len(list(dest.glob("*.safetensors"))) > 8
    for name, tensor in tensors.items():
        want = reference[name].to(torch.bfloat16)
        assert torch.equal(tensor if tensor.shape == want.shape else tensor[: want.shape[0]], want), name
    assert tensors["model.embed_tokens.weight"].shape == (258, 64)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert tokenizer.chat_template == TEMPLATE and tokenizer.convert_tokens_to_ids("<|im_end|>") == 257
    generation = GenerationConfig.from_pretrained(dest)
    assert generation.max_new_tokens == 32 and generation.temperature == 0.5
    assert "org/tiny" in (dest / "README.md").read_text()
    expected = logits_of_reference(run, torch.bfloat16)
    assert torch.equal(logits_of(dest, torch.bfloat16)[..., :256], expected)


def logits_of_reference(run: Path, dtype: torch.dtype) -> torch.Tensor:
    model = AutoModelForCausalLM.from_config(common.tiny_config(False), dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in torch.load(run / "reference.pt").items()})
    with torch.no_grad():
        return model.eval()(input_ids=common.reference_input()).logits


def test_parallel_quantizer_for_an_existing_model(hf_trainer_runs: Path, tmp_path: Path) -> None:
    """`torchrun -m distfinalize HF_DIR DEST --quantize fp8`: the Linear weights quantized within the recipe's
    bound, everything else bit for bit."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is the `quant` extra")
    from distfinalize.transform.quant.recipes import get_recipe

    run = hf_trainer_runs / "sharded-safetensors"
    dest = tmp_path / "out"
    check_ok(finalize(run, dest, "--quantize", "fp8", "--max-shard-size", SHARD, nproc=2))
    reference = torch.load(run / "reference.pt")
    tensors, _ = read_output(dest)
    quant = get_recipe("fp8")
    name = "model.layers.1.mlp.down_proj.weight"
    outputs = quant.outputs(name, tuple(reference[name].shape), reference[name].dtype)
    got = {k: tensors[k] for k in outputs}
    error = (quant.dequantize(got) - reference[name].float()).abs()
    assert bool((error <= quant.error_bound(reference[name].float(), got)).all())
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(tensors[name], reference[name]), name
    assert "quantization_config" in read_json(dest / "config.json")
    AutoModelForCausalLM.from_pretrained(dest)
