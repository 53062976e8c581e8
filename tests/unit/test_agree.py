"""The status byte each rank contributes to a step's one all_reduce, and what the ranks read back from the sum."""

from __future__ import annotations

from distfinalize.dist.agree import Status, encode, peer_failure
from distfinalize.errors import SourceError, Terminated


def test_status_names_the_lowest_real_error_and_counts_every_failure() -> None:
    codes = (encode(None), encode(Terminated("SIGTERM")), encode(SourceError("bad")), encode(SourceError("worse")))
    status = Status(codes)
    assert status.failed == [1, 2, 3] and status.errors == [2, 3]
    assert status.signal(1) == "SIGTERM" and status.signal(0) is None
    assert status.speaker == 2  # a real error speaks for the step before a signal does
    failure = peer_failure("write", status, "bad")
    assert str(failure) == "rank 2 failed during write (and 2 more rank(s)): bad"
    assert failure.keeps_staging  # a signal stopped a rank: its finished files are kept for --resume


def test_only_signals_and_the_rename() -> None:
    status = Status((encode(None, renamed=True), encode(None, "SIGINT"), encode(KeyboardInterrupt())))
    assert status.renamed and status.failed == [2] and status.errors == []
    assert status.signal(1) == "SIGINT" and status.signal(2) == "SIGINT"  # a bare KeyboardInterrupt is a SIGINT
    assert status.speaker == 2
    assert Status((0, 0)).speaker is None and not Status((0, 0)).renamed
