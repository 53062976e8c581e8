"""A weight holding NaN or Inf is never quantized into garbage: --quantize fails with one line naming the weight and
how many values, unless --quantize-skip-nonfinite, which writes that whole weight unquantized (bit for bit), lists
it as ignored in config.json, and transformers loads the result. The checkpoint is a real FSDP2 one whose weight
was set to NaN/Inf in the sharded model and saved again with DCP (nan_checkpoint.py), finalized by 2 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import common
import pytest
import torch
from support import TIMEOUT_S, check_ok, env, error_lines, finalize, our_traceback, read_json, read_output, torchrun

from distfinalize.errors import SourceError
from distfinalize.transform.quant.recipes import RECIPES

pytestmark = pytest.mark.dist

WEIGHT = "model.layers.0.mlp.down_proj.weight"  # [64, 160]: fp8 quantizes it
MODULE = WEIGHT.removesuffix(".weight")
BAD = 160 + 5 + 1  # nan_checkpoint.py: row 1, five values of row 3, one +Inf


@pytest.fixture(scope="module")
def nan_run(fsdp2_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nan") / "run"
    check_ok(torchrun(2, Path(__file__).with_name("nan_checkpoint.py"), fsdp2_runs / "untied-model", out, WEIGHT))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_nonfinite_weight_fails_quantize(nan_run: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = finalize(nan_run, dest, "--quantize", "fp8", nproc=2)
    assert result.returncode != 0, result.stdout + result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"{BAD} of {64 * 160} values of {WEIGHT} are NaN or Inf" in lines[0], lines[0]
    assert "--quantize-skip-nonfinite" in lines[0]
    assert not our_traceback(result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == []  # no DEST, no staging dir


def test_skip_nonfinite_writes_that_weight_unquantized(nan_run: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = check_ok(
        finalize(nan_run, dest, "--quantize", "fp8", "--quantize-skip-nonfinite", "--max-shard-size", "60KB", nproc=2)
    )
    assert WEIGHT in result.stderr  # the warning names it
    source = torch.load(nan_run / f"{WEIGHT}.pt")
    tensors, _ = read_output(dest)
    got = tensors[WEIGHT]
    assert got.dtype == source.dtype == torch.float32 and f"{MODULE}.weight_scale" not in tensors
    assert torch.equal(bits(got), bits(source))  # NaN payloads and +Inf included
    assert int((~torch.isfinite(got)).sum()) == BAD
    other = "model.layers.1.mlp.down_proj"  # quantized as usual
    assert tensors[f"{other}.weight"].dtype == torch.float8_e4m3fn and f"{other}.weight_scale" in tensors
    block = read_json(dest / "config.json")["quantization_config"]
    assert MODULE in block["ignore"] and "lm_head" in block["ignore"]
    assert read_json(dest / "distfinalize-manifest.json")["quantization"]["nonfinite"] == [WEIGHT]
    assert f"`{MODULE}`" in (dest / "README.md").read_text()  # the card lists it as left unquantized

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    loaded = model.get_submodule(MODULE).weight
    assert loaded.dtype == torch.float32 and torch.equal(bits(loaded.detach()), bits(source))
    assert model.get_submodule(other).weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert model(input_ids=common.reference_input()).logits.shape[-1] == common.VOCAB

    cmd = [sys.executable, "-m", "distfinalize", "verify", str(dest), "--source", str(nan_run), "--json"]
    verified = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False)
    assert json.loads(check_ok(verified).stdout)["passed"], verified.stdout


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_refuses_nonfinite(recipe: str) -> None:
    """Every recipe checks the weight it is about to quantize (after its cast to the model dtype)."""
    weight = torch.randn(256, 256)
    weight[7, :3] = float("nan")
    weight[9, 9] = float("-inf")
    with pytest.raises(SourceError, match=rf"--quantize {recipe}: 4 of 65536 values of x\.weight are NaN or Inf"):
        RECIPES[recipe].quantize("x.weight", weight, torch.bfloat16)
    if RECIPES[recipe].casts_first:  # finite in float32, +Inf once cast to float16
        weight = torch.randn(256, 256)
        weight[0, 0] = 1e6
        with pytest.raises(SourceError, match="1 of 65536 values"):
            RECIPES[recipe].quantize("x.weight", weight, torch.float16)


def test_skip_nonfinite_with_exchange(nan_run: Path, tmp_path: Path) -> None:
    """--strategy exchange (node-local files): each rank scans the chunks of the files it reads."""
    dest = tmp_path / "out"
    check_ok(
        finalize(
            nan_run,
            dest,
            "--quantize",
            "fp8",
            "--quantize-skip-nonfinite",
            "--strategy",
            "exchange",
            "--max-shard-size",
            "60KB",
            nproc=2,
        )
    )
    tensors, _ = read_output(dest)
    assert torch.equal(bits(tensors[WEIGHT]), bits(torch.load(nan_run / f"{WEIGHT}.pt")))
    assert read_json(dest / "distfinalize-manifest.json")["quantization"]["nonfinite"] == [WEIGHT]
