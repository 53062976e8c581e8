"""--key-map FILE: ordered regex renames and a drop list for a trainer whose names no registered map knows.

The checkpoint is a real DCP save (no process group) of a tiny Llama under made-up names, with two extra
tensors the file drops. The output must equal the model bit for bit and give the same logits; `verify --source`
must pass with the rules the manifest records; without the file, the error points to the option."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import common
import pytest
import torch
import torch.distributed.checkpoint as dcp
from support import TIMEOUT_S, check_ok, env, error_lines, finalize, our_traceback, read_json, read_output
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist

# Hugging Face name -> the trainer's (applied with re.sub to make the checkpoint)
TO_TRAINER = (
    (r"^model\.embed_tokens\.", "backbone.embed."),
    (r"^model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.", r"backbone.blocks.\1.attn.\2."),
    (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.", r"backbone.blocks.\1.ffn.\2."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"backbone.blocks.\1.ln1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"backbone.blocks.\1.ln2."),
    (r"^model\.norm\.", "backbone.final_ln."),
    (r"^lm_head\.", "head."),
)
KEY_MAP_YAML = r"""
# the trainer's names -> Hugging Face Llama's; the first matching rule wins
rename:
  - ['^backbone\.embed\.', 'model.embed_tokens.']
  - ['^backbone\.blocks\.(\d+)\.attn\.(q|k|v|o)\.', 'model.layers.\1.self_attn.\2_proj.']
  - ['^backbone\.blocks\.(\d+)\.ffn\.(gate|up|down)\.', 'model.layers.\1.mlp.\2_proj.']
  - ['^backbone\.blocks\.(\d+)\.ln1\.', 'model.layers.\1.input_layernorm.']
  - ['^backbone\.blocks\.(\d+)\.ln2\.', 'model.layers.\1.post_attention_layernorm.']
  - ['^backbone\.final_ln\.', 'model.norm.']
  - ['^head\.', 'lm_head.']
drop:
  - 'inv_freq$'
  - '^ema_'
"""


def trainer_name(name: str) -> str:
    for pattern, replacement in TO_TRAINER:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    raise AssertionError(name)


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, Path]:
    """(run dir, the model saved, the key map file)."""
    model = common.build_model(tie=False, seed=5)
    state = {trainer_name(k): v.detach().clone() for k, v in model.state_dict().items()}
    state |= {"backbone.blocks.0.attn.rotary.inv_freq": torch.ones(8), "ema_decay": torch.tensor(0.999)}
    run = tmp_path_factory.mktemp("custom") / "run"
    dcp.save({"model": state}, checkpoint_id=str(run / "checkpoint-7"), no_dist=True)
    common.tiny_config(tie=False).save_pretrained(run)
    key_map = run.parent / "names.yaml"
    key_map.write_text(KEY_MAP_YAML)
    return run, model, key_map


def test_key_map_file_finalizes_bit_exact(custom_run: tuple[Path, torch.nn.Module, Path], tmp_path: Path) -> None:
    run, model, key_map = custom_run
    dest = tmp_path / "out"
    result = check_ok(finalize(run, dest, "--key-map", str(key_map), "--max-shard-size", "100KB", nproc=2))
    assert f"key map 'file {key_map}'" in result.stderr
    tensors, _ = read_output(dest)
    expected = model.state_dict()
    assert tensors.keys() == expected.keys()  # the dropped tensors are gone, every other one renamed
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    loaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        ids = common.reference_input()
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)

    recorded = read_json(dest / "distfinalize-manifest.json")["key_map"]
    assert recorded["drop"] == ["inv_freq$", "^ema_"] and len(recorded["rename"]) == 7
    verify = [sys.executable, "-m", "distfinalize", "verify", str(dest), "--source", str(run)]
    checked = subprocess.run(verify, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # names mapped with the recorded rules
    assert "21 tensors bit-exact" in checked.stdout


def test_unmatched_names_point_to_the_option(custom_run: tuple[Path, torch.nn.Module, Path], tmp_path: Path) -> None:
    run, _, _ = custom_run
    result = finalize(run, tmp_path / "out", nproc=2)
    assert result.returncode == 1 and not our_traceback(result.stderr)
    [line] = error_lines(result.stderr)
    assert "'backbone.embed.weight'" in line and "--key-map FILE" in line
    assert not (tmp_path / "out").exists()


def test_key_map_rules_collision(custom_run: tuple[Path, torch.nn.Module, Path], tmp_path: Path) -> None:
    run, _, _ = custom_run
    bad = tmp_path / "collide.yaml"
    bad.write_text("rename:\n  - ['^backbone\\.blocks\\.\\d+\\.', 'model.layers.0.']\n")
    result = finalize(run, tmp_path / "out", "--key-map", str(bad))
    assert result.returncode == 1 and "gives two checkpoint tensors the same name" in result.stderr
    assert not (tmp_path / "out").exists()
