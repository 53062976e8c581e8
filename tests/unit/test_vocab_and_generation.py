"""Vocabulary resize, --add-tokens parsing and generation-config rules (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distfinalize.artifacts.generation import eos_ids, read_preset
from distfinalize.artifacts.tokenizer import TokenizerOutcome, TokenRequest, token_requests
from distfinalize.config import GenerationOptions
from distfinalize.errors import UsageError
from distfinalize.sources import TensorMeta
from distfinalize.transform.vocab import RowInit, RowResize, plan_resizes, resize_rows


def test_resize_rows_inits() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    out = resize_rows(base, RowResize(7, (RowInit(4, "zero"), RowInit(5, "copy", 2))))
    assert torch.equal(out[:4], base)
    assert torch.equal(out[4], torch.zeros(3)) and torch.equal(out[5], base[2])
    assert torch.equal(out[6], base.mean(dim=0))
    bf = base.to(torch.bfloat16)
    assert torch.equal(resize_rows(bf, RowResize(5))[4], bf.float().mean(dim=0).to(torch.bfloat16))
    with pytest.raises(ValueError, match="cannot shrink"):
        resize_rows(base, RowResize(2))


def test_row_init_validation() -> None:
    with pytest.raises(ValueError, match="needs a source row"):
        RowInit(3, "copy")
    with pytest.raises(ValueError, match="not one of"):
        RowInit(3, "random")


def test_plan_resizes_rounds_and_never_shrinks() -> None:
    tensors = [TensorMeta("a", "embed", (100, 8), torch.float32), TensorMeta("b", "head", (100, 8), torch.float32)]
    resizes = plan_resizes(tensors, ["embed", "head"], 101, [RowInit(100, "zero")], 64)
    assert {k: v.rows for k, v in resizes.items()} == {"embed": 128, "head": 128}
    assert plan_resizes(tensors, ["embed", "head"], 90, [], None) == {}  # padded vocab: rows are kept
    assert plan_resizes(tensors, ["embed"], 100, [], 64)["embed"].rows == 128


def test_token_requests() -> None:
    requests = token_requests(
        {
            "pad_token": "<pad>",
            "eos_token": {"token": "<e>", "init": "copy:</s>", "if_missing": True},
            "special_tokens": ["<a>"],
            "regular_tokens": [{"token": "w", "init": "zero"}],
        }
    )
    assert requests == (
        TokenRequest("<e>", "eos_token", "copy:</s>", True, True),
        TokenRequest("<pad>", "pad_token", "zero", True, False),
        TokenRequest("<a>", None, "mean", True, False),
        TokenRequest("w", None, "zero", False, False),
    )
    with pytest.raises(UsageError, match="unknown key"):
        token_requests({"mask_token": "x"})
    with pytest.raises(UsageError, match="is not zero, mean or copy"):
        token_requests({"special_tokens": [{"token": "x", "init": "random"}]})


def test_preset_rules(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"max_tokens": 10, "temperature": 0}))
    assert read_preset(path) == {"max_new_tokens": 10, "do_sample": False}
    path.write_text(json.dumps({"top_k": 5}))
    assert read_preset(path)["do_sample"] is True
    path.write_text(json.dumps({"do_sample": False, "top_k": 5}))
    assert read_preset(path)["do_sample"] is False


def test_eos_merging() -> None:
    tokenizer = TokenizerOutcome(None, 10, vocab={"<|im_end|>": 7, "<|eot_id|>": 8, "<x>": 9})
    assert eos_ids(tokenizer, 2, GenerationOptions()) == [2, 7, 8]
    assert eos_ids(tokenizer, 2, GenerationOptions(auto_stop_tokens=False)) == 2
    assert eos_ids(tokenizer, [2, 7], GenerationOptions(stop_tokens=("<x>",), auto_stop_tokens=False)) == [2, 7, 9]
    with pytest.raises(UsageError, match="not in the tokenizer's vocabulary"):
        eos_ids(tokenizer, 2, GenerationOptions(stop_tokens=("<nope>",)))
