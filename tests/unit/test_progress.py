"""The write step's meter and progress: busy seconds and bytes per stage, the job's plain progress lines."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from distfinalize.write import progress
from distfinalize.write.progress import Meter, Progress


def ctx(rank: int = 0, world_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(rank=rank, world_size=world_size, is_rank0=rank == 0)


def test_meter_adds_busy_seconds_and_bytes() -> None:
    meter = Meter()
    with meter.busy("read"):
        time.sleep(0.02)
    meter.read(1000)
    meter.update(600)
    meter.update(400)
    assert meter.busy_s["read"] >= 0.02 and meter.busy_s["transform"] == 0.0
    assert meter.read_bytes == 1000 and meter.done == 1000


def test_plain_progress_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    bar = Progress(ctx(), 4 * 2**20, 4 * 2**20, "job")
    bar.plain, bar.interval = True, 0.05
    with caplog.at_level(logging.INFO, logger="distfinalize"), bar:
        bar.update(2**20)
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("writing:")]
    assert lines and lines[-1].startswith("writing: 25% (1.00 MiB of 4.00 MiB)") and "/s" in lines[-1]


@pytest.mark.parametrize(("mode", "rank", "draws"), [("job", 0, True), ("job", 1, False), ("rank", 1, True)])
def test_who_draws(mode: str, rank: int, draws: bool) -> None:
    bar = Progress(ctx(rank), 10, 10, mode)
    bar.plain = True
    with bar:
        assert bar.draws is draws
    assert Progress(ctx(), 10, 10, "off").__enter__().thread is None
