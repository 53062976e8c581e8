"""The commit is decided before the rename and reported truthfully after it (real 2-rank torchrun runs).

Every rank agrees that all writes and rank 0's finish step succeeded; only then does rank 0 rename the staging dir
to DEST. A failure injected on either side of that point (DISTFINALIZE_FAIL_AT, distfinalize/dist.py) must leave
output that matches what is on disk: no DEST and an error, or a complete DEST (verify passes) and no error and no
"nothing was written".
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import error_lines, finished_text, our_traceback
from trust_runs import ARGS, finished_records, one_error_line, run, staging_of, verify

pytestmark = pytest.mark.dist

SRC = "untied-model"

# Before the decision: no DEST. (fault, what the one error line says, staging dir kept for --resume)
BEFORE = {
    "1:finish": ("rank 1 failed during finish: injected failure", False),  # an error: nothing kept
    "1:finish:kill": ("rank 1 failed during finish: it died", True),  # a dead rank: finished files kept
    "0:commit:kill": ("rank 0 failed during commit: it died", True),  # rank 0 dies before its rename
}
# After the decision: DEST is complete, whatever the output of the dying rank. (fault, the note rank 0/1 logs)
AFTER = {
    "1:commit": "rank 1 failed after the commit was decided (injected failure",
    "1:commit:kill": "rank 1 died after the commit was decided",
    "0:committed:kill": "rank 0 died after the commit was decided",
    "0:committed:term": "SIGTERM arrived at rank 0 during the commit",
    "1:commit:int": "SIGINT arrived at rank 1 during the commit",
}


@pytest.mark.parametrize("fault", sorted(BEFORE))
def test_failure_before_the_decision_writes_no_dest(fsdp2_runs: Path, tmp_path: Path, fault: str) -> None:
    dest = tmp_path / "out"
    code, out = run(fsdp2_runs / SRC, dest, *ARGS, fail_at=fault, log=tmp_path / "log")
    expected, kept = BEFORE[fault]
    assert code != 0 and not dest.exists(), out
    line = one_error_line(out)
    assert expected in line and "DEST is complete" not in out, line
    assert not our_traceback(out), out
    assert staging_of(dest).exists() == kept, out
    if kept:
        assert f"--resume will reuse the {finished_text(staging_of(dest))} kept in" in line, line
        assert finished_records(dest) > 0


@pytest.mark.parametrize("fault", sorted(AFTER))
def test_failure_after_the_rename_reports_dest_complete(fsdp2_runs: Path, tmp_path: Path, fault: str) -> None:
    dest = tmp_path / "out"
    code, out = run(fsdp2_runs / SRC, dest, *ARGS, fail_at=fault, log=tmp_path / "log")
    assert dest.is_dir() and not staging_of(dest).exists(), out
    assert error_lines(out) == [], out  # no rank says the run failed, and none says nothing was written
    assert "nothing was written" not in out and not our_traceback(out), out
    assert AFTER[fault] in out and f"DEST is complete: {dest}" in out, out
    assert "finalized" in out, out
    if ":kill" not in fault:  # a killed worker makes torchrun itself exit non-zero; the others exit 0
        assert code == 0, out
    checked = verify(dest, "--source", str(fsdp2_runs / SRC))
    assert checked.returncode == 0, checked.stdout + checked.stderr
