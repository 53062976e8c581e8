"""The overlapped pipeline: order kept per lane, bytes in flight bounded, the first error raised, no hang."""

from __future__ import annotations

import threading

import pytest
import torch

from distfinalize.plan import FilePlan, TensorPlan
from distfinalize.write.overlap import ByteBudget, Stages, in_flight, lane_order, to_pinned


def files(count: int, per_file: int, rows: int = 64) -> list[FilePlan]:
    return [
        FilePlan(
            f"f{i}",
            0,
            tuple(
                TensorPlan(f"f{i}.t{j}", f"f{i}.t{j}", (rows, 4), torch.float32, torch.bfloat16)
                for j in range(per_file)
            ),
        )
        for i in range(count)
    ]


def feed_of(steps):
    def feed(failed):
        for s in steps:
            if failed() is not None:
                return
            yield s.tensor, (torch.full(s.tensor.shape, float(len(s.tensor.name))),)

    return feed


def test_lanes_get_their_files_in_order_within_budget() -> None:
    steps = lane_order(files(5, 4), 3, lambda f: list(f.tensors))
    limit = 3 * in_flight(steps[0].tensor)
    stages = Stages(steps, limit, torch.device("cpu"))
    got: dict[int, list[str]] = {}
    peak = [0]
    lock = threading.Lock()

    def write(lane, items):
        for item in items:
            with lock:
                peak[0] = max(peak[0], stages.budget.used)
                got.setdefault(lane, []).append(item.step.tensor.name)
            assert item.outputs[item.step.tensor.name].dtype == torch.bfloat16

    stages.run(feed_of(steps), lambda inputs, t, start: {t.name: inputs[0].to(t.dtype)}, write)
    assert {lane: names for lane, names in got.items()} == {
        lane: [s.tensor.name for s in steps if s.lane == lane] for lane in got
    }
    assert sum(len(v) for v in got.values()) == 20
    assert 0 < peak[0] <= limit
    assert stages.budget.used == 0


@pytest.mark.parametrize("stage", ["feed", "transform", "write"])
def test_first_error_is_raised_and_nothing_hangs(stage: str) -> None:
    steps = lane_order(files(4, 6), 2, lambda f: list(f.tensors))
    stages = Stages(steps, in_flight(steps[0].tensor), torch.device("cpu"))

    def feed(failed):
        for i, s in enumerate(steps):
            if stage == "feed" and i == 5:
                raise OSError("disk gone while reading")
            if failed() is not None:
                return
            yield s.tensor, (torch.zeros(s.tensor.shape),)

    def transform(inputs, t, start):
        if stage == "transform" and t is steps[7].tensor:
            raise ValueError("bad tensor")
        return {t.name: inputs[0]}

    def write(lane, items):
        for n, _ in enumerate(items):
            if stage == "write" and lane == 1 and n == 2:
                raise OSError("No space left on device")

    expected = {"feed": OSError, "transform": ValueError, "write": OSError}[stage]
    with pytest.raises(expected):
        stages.run(feed, transform, write)


def test_oversized_tensor_passes_alone() -> None:
    budget = ByteBudget(10)
    assert budget.acquire(100)  # nothing in flight: a big tensor goes alone
    done = threading.Event()
    threading.Thread(target=lambda: (budget.acquire(1), done.set()), daemon=True).start()
    assert not done.wait(0.2)
    budget.release(100)
    assert done.wait(5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: pinned device-to-host copies")
def test_pinned_copy_on_cuda() -> None:
    device = torch.device("cuda", 0)
    outputs = {"a": torch.randn(256, 256, device=device).to(torch.bfloat16)}
    host, event = to_pinned(outputs)
    event.synchronize()
    assert host["a"].is_pinned() and host["a"].device.type == "cpu"
    assert torch.equal(host["a"], outputs["a"].cpu())
    steps = lane_order(files(3, 3), 2, lambda f: list(f.tensors))
    got = {}

    def write(lane, items):
        for item in items:
            got[item.step.tensor.name] = item.outputs[item.step.tensor.name]

    Stages(steps, 1 << 20, device).run(
        lambda failed: ((s.tensor, (torch.full(s.tensor.shape, 1.5),)) for s in steps),
        lambda inputs, t, start: {t.name: inputs[0].to(device).to(t.dtype)},
        write,
    )
    assert all(v.is_pinned() and torch.equal(v, torch.full(v.shape, 1.5, dtype=v.dtype)) for v in got.values())
