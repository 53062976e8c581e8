"""What the command promises: --dry-run writes nothing, DEST is never overwritten, SRC is never touched,
user mistakes give one line and no traceback. Marked `dist`: real runs, some under torchrun."""

from __future__ import annotations

from pathlib import Path

import common
import pytest
import torch
import torch.distributed.checkpoint as dcp
from support import check_ok, error_lines, finalize, our_traceback, read_json, read_output, tree_digest
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("nproc", [1, 2])
def test_dry_run_writes_nothing(fsdp2_runs: Path, tmp_path: Path, nproc: int) -> None:
    run = fsdp2_runs / "untied-optim"
    before = tree_digest(run)
    dest = tmp_path / "sub" / "out"
    result = check_ok(finalize(run, dest, "--dry-run", "--max-shard-size", "100KB", nproc=nproc))
    assert list(tmp_path.iterdir()) == []
    assert tree_digest(run) == before
    table = result.stdout
    assert "model-00001-of-00006.safetensors" in table and "model.layers.1.mlp.down_proj.weight" in table
    assert f"rank {nproc - 1}:" in table
    assert table.count("model-00001-of-00006.safetensors") >= 2  # the file row and its tensors


@pytest.mark.parametrize("nproc", [1, 2])
def test_existing_dest_is_refused(fsdp2_runs: Path, tmp_path: Path, nproc: int) -> None:
    run = fsdp2_runs / "tied-model"
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    src_before, dest_before = tree_digest(run), tree_digest(dest)
    result = finalize(run, dest, nproc=nproc)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "destination already exists" in lines[0] and str(dest) in lines[0]
    assert not our_traceback(result.stderr)
    assert tree_digest(dest) == dest_before and tree_digest(run) == src_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dest_inside_source_is_refused(fsdp2_runs: Path) -> None:
    run = fsdp2_runs / "untied-model"
    before = tree_digest(run)
    result = finalize(run, run / "final")
    assert result.returncode == 1 and "destination lies inside the source" in result.stderr
    assert tree_digest(run) == before


def test_identical_lm_head_is_written_once(tmp_path: Path) -> None:
    """config.json says untied, but lm_head holds exactly embed_tokens' data: tied output, same logits."""
    model = common.build_model(tie=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    src = tmp_path / "run"
    dcp.save(state, checkpoint_id=str(src / "checkpoint-1"), no_dist=True)
    common.tiny_config(tie=False).save_pretrained(src)
    dest = tmp_path / "out"
    result = check_ok(finalize(src, dest))
    assert "identical to model.embed_tokens.weight" in result.stderr
    tensors, _ = read_output(dest)
    assert "lm_head.weight" not in tensors and set(tensors) == set(state) - {"lm_head.weight"}
    assert read_json(dest / "config.json")["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    model.eval()
    with torch.no_grad():
        ids = common.reference_input()
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
