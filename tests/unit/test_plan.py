"""The plan is pure, deterministic, split like transformers and balanced by bytes."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from hypothesis import given
from hypothesis import strategies as st

from distfinalize.plan import assign_ranks, build_plan, file_names, output_dtype
from distfinalize.sources import TensorMeta


def metas(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> list[TensorMeta]:
    return [TensorMeta(f"key{i}", f"w{i}", s, dtype) for i, s in enumerate(shapes)]


def test_single_file_and_sharded_names() -> None:
    assert file_names(1) == ["model.safetensors"]
    assert file_names(3) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]


def test_split_matches_save_pretrained_grouping() -> None:
    tensors = metas([(100, 10), (50,), (300, 10), (10, 10), (200, 10)])
    plan = build_plan(tensors, dtype=torch.bfloat16, max_shard_size=4000, world_size=2)
    real = {t.name: torch.zeros(t.shape, dtype=torch.bfloat16) for t in tensors}
    expected = split_torch_state_dict_into_shards(real, max_shard_size=4000)
    assert plan.weight_map == expected.tensor_to_filename
    assert plan.total_size == sum(t.numel() * 2 for t in real.values())


def test_casts_only_floating_tensors() -> None:
    assert output_dtype(torch.float32, torch.bfloat16) == torch.bfloat16
    assert output_dtype(torch.int64, torch.bfloat16) == torch.int64
    assert output_dtype(torch.bool, torch.float16) == torch.bool
    assert output_dtype(torch.float16, None) == torch.float16


def test_oversized_tensor_gets_its_own_file() -> None:
    plan = build_plan(metas([(10,), (1000,), (10,)]), dtype=None, max_shard_size=100, world_size=1)
    files = {f.filename: [t.name for t in f.tensors] for f in plan.files}
    assert files[plan.weight_map["w1"]] == ["w1"]


def test_ranks_balanced_and_every_rank_used() -> None:
    plan = build_plan(metas([(64, 64)] * 12), dtype=None, max_shard_size=64 * 64 * 4, world_size=4)
    assert [plan.bytes_for(r) for r in range(4)] == [3 * 64 * 64 * 4] * 4


@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=40), st.integers(min_value=1, max_value=9))
def test_assignment_is_lpt_balanced(sizes: list[int], world: int) -> None:
    ranks = assign_ranks(sizes, world)
    assert ranks == assign_ranks(sizes, world)  # deterministic
    loads = [sum(s for s, r in zip(sizes, ranks, strict=True) if r == k) for k in range(world)]
    # greedy largest-first: no rank exceeds the mean load by more than the biggest file
    assert max(loads) <= sum(sizes) / world + max(sizes, default=0)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_same_plan_on_every_call(world: int) -> None:
    tensors = metas([(i + 1, 7) for i in range(30)])
    a = build_plan(tensors, dtype=torch.float16, max_shard_size=300, world_size=world)
    b = build_plan(list(tensors), dtype=torch.float16, max_shard_size=300, world_size=world)
    assert a == b
    assert sorted(t.name for t in a.tensors) == sorted(t.name for t in tensors)
