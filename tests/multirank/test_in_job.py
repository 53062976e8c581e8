"""`distfinalize.finalize()` inside a job that formed its own process group (2 gloo ranks under torchrun): the
finalize runs its collectives on a group of its own over the job's ranks, with its own timeout, and leaves the
job's group working. Marked `dist`: a real torchrun job on CPU/gloo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import check_ok, env, read_output, torchrun

pytestmark = pytest.mark.dist

JOB = """
import datetime, sys
import torch, torch.distributed as dist
import distfinalize

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))  # a job with a short timeout of its own
outcome = distfinalize.finalize(sys.argv[1], sys.argv[2], max_shard_size="60KB")
total = torch.ones(1)
dist.all_reduce(total)  # the job's group goes on working after the finalize
print(f"rank {dist.get_rank()}: after finalize, all_reduce gives {int(total.item())}", flush=True)
dist.barrier()  # no rank tears gloo down while the other is still in a collective
dist.destroy_process_group()
"""


def test_slow_rank_outlasts_the_jobs_timeout(fsdp2_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 pauses 6 s at the start of the write step while rank 0 waits for it in the step's agreement: longer
    than the job group's 2 s timeout, well inside distfinalize's. The output is the checkpoint's tensors, bit for
    bit, and the job's own group still works afterwards."""
    run = fsdp2_runs / "untied-model"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    dest = tmp_path / "out"
    monkeypatch.setattr("support.env", lambda: {**env(), "DISTFINALIZE_FAIL_AT": "1:write:pause"})
    result = torchrun(2, script, run, dest)
    check_ok(result)
    assert "rank 1: after finalize, all_reduce gives 2" in result.stdout
    reference = torch.load(run / "reference.pt")
    tensors, _ = read_output(dest)
    assert tensors.keys() == reference.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference[name]), name
