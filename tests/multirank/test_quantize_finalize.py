"""--quantize while finalizing: each rank quantizes the weights of its own files (torchao math), the files are
plain safetensors in the recipe's format, and transformers loads them. Real FSDP2 checkpoints; marked `dist`."""

from __future__ import annotations

import json
from pathlib import Path

import common
import pytest
import torch
from support import check_ok, finalize, read_json, read_output, run_cli
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist

pytest.importorskip("torchao", reason="torchao is the `quant` extra: pip install 'distfinalize[quant]'")
pytest.importorskip("compressed_tensors", reason="compressed-tensors is the `quant` extra")

from safetensors import safe_open  # noqa: E402

from distfinalize.transform.quant.recipes import get_recipe  # noqa: E402

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@pytest.mark.parametrize(("recipe", "nproc"), [("fp8", 2), ("int8", 3), ("torchao-fp8", 2)])
def test_quantized_output_loads_and_matches(fsdp2_runs: Path, tmp_path: Path, recipe: str, nproc: int) -> None:
    run = fsdp2_runs / "untied-optim"
    dest = tmp_path / "out"
    check_ok(finalize(run, dest, "--quantize", recipe, "--max-shard-size", "60KB", nproc=nproc))
    reference = torch.load(run / "reference.pt")
    tensors, where = read_output(dest, header_extra=recipe.startswith("torchao-"))
    quant = get_recipe(recipe)
    for layer in range(2):
        for linear in LINEARS:
            name = f"model.layers.{layer}.{linear}.weight"
            outputs = quant.outputs(name, tuple(reference[name].shape), reference[name].dtype)
            got = {k: tensors[k] for k in outputs}
            assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == outputs
            assert len({where[k] for k in outputs}) == 1  # a weight and its scales share a file
            error = (quant.dequantize(got) - reference[name].float()).abs()
            assert bool((error <= quant.error_bound(reference[name].float(), got)).all()), name
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert torch.equal(tensors[name], reference[name]), name  # left unquantized, bit for bit
    block = read_json(dest / "config.json")["quantization_config"]
    assert block == quant.config_block(["lm_head"])
    assert read_json(dest / "distfinalize-manifest.json")["quantization"] == {"recipe": recipe, "ignore": []}
    headers = {}
    for path in dest.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            headers[path.name] = f.metadata()
    assert len(headers) > 2 and len({json.dumps(h, sort_keys=True) for h in headers.values()}) == 1  # one header
    if recipe.startswith("torchao-"):  # torchao's metadata for the whole model, in every file
        assert len(json.loads(next(iter(headers.values()))["tensor_names"])) == len(reference)
    card = (dest / "README.md").read_text()
    assert f"- Quantization: {recipe}, {quant.description}" in card
    assert "- Left unquantized: embeddings, norms, biases, and the Linear layers `lm_head`" in card

    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        logits = model(input_ids=common.reference_input()).logits
    expected = torch.load(run / "reference_logits.pt")
    assert logits.shape == expected.shape
    assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.99


def test_row_blocks_give_the_same_files(fsdp2_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--quantize fp8 with --read-batch smaller than the biggest weights (saved by 2 ranks, so in 2 chunks each):
    those go through in blocks of rows (a chunk each), and every output file is byte for byte the one a run that
    reads them whole writes. In process (one rank): the reads are counted."""
    from distfinalize.sources import dcp as dcp_source

    run = fsdp2_runs / "untied-optim"
    check_ok(finalize(run, tmp_path / "whole", "--quantize", "fp8", "--max-shard-size", "60KB"))
    blocks: list[tuple[int, int]] = []
    real = dcp_source.DcpTensorReader.read_rows
    monkeypatch.setattr(
        dcp_source.DcpTensorReader,
        "read_rows",
        lambda self, key, start, stop: blocks.append((start, stop)) or real(self, key, start, stop),
    )
    batch = 8 * 1024
    check_ok(
        finalize(run, tmp_path / "blocks", "--quantize", "fp8", "--max-shard-size", "60KB", "--read-batch", str(batch))
    )
    assert blocks and all(start < stop for start, stop in blocks)
    whole = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert whole == sorted(p.name for p in (tmp_path / "blocks").glob("*.safetensors"))
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "blocks" / name).read_bytes(), name
    check_ok(run_cli("verify", tmp_path / "blocks"))  # each file's sha256, computed while writing, is the file's
