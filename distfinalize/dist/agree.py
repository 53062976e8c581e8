"""How the ranks agree on a step's outcome with one small collective: a status byte per rank, summed.

Each rank writes one byte in its own slot of a uint8 vector (world size bytes, so 4 KiB at 4096 ranks) and the
ranks sum it with one all_reduce: every rank then knows which ranks failed, which were stopped by a signal, and
(at the commit) whether rank 0 renamed. Nothing else moves unless something failed: then the lowest rank with
a real error (or, when only signals stopped ranks, the lowest stopped rank) broadcasts its message, so that the
reporting rank can say "rank N failed during STEP: why". Values move only as the step asks: broadcast from
rank 0 (trimmed to what the others need), gathered to rank 0, or (small values) gathered on every rank.
Runs on: all ranks (pure helpers).
"""

from __future__ import annotations

from dataclasses import dataclass

from distfinalize.errors import RankFailure

SIGNAL_NAMES = ("", "SIGINT", "SIGTERM")  # code 0: none
OK, ERROR, STOPPED = 0, 1, 2  # a rank's outcome: done, raised an error, stopped by a signal (KeyboardInterrupt)
RENAMED = 1 << 4  # rank 0's slot at the commit: the staging dir became DEST


def signal_code(name: str | None) -> int:
    return SIGNAL_NAMES.index(name) if name in SIGNAL_NAMES[1:] else (1 if name else 0)


def encode(error: BaseException | None, signal: str | None = None, renamed: bool = False) -> int:
    """This rank's status byte: its outcome (bits 0-1), the signal it got (bits 2-3), rank 0's rename (bit 4)."""
    outcome = OK
    if error is not None:
        outcome = STOPPED if isinstance(error, KeyboardInterrupt) else ERROR
        if outcome == STOPPED:
            signal = signal or getattr(error, "signal", None) or "SIGINT"
    return outcome | (signal_code(signal) << 2) | (RENAMED if renamed else 0)


def error_text(error: BaseException | None) -> str:
    return (str(error) or type(error).__name__) if error is not None else ""


@dataclass(frozen=True)
class Status:
    """Every rank's status byte after the all_reduce, read back."""

    codes: tuple[int, ...]

    @property
    def failed(self) -> list[int]:
        """Ranks that raised or were stopped, lowest first."""
        return [r for r, c in enumerate(self.codes) if c & 3]

    @property
    def errors(self) -> list[int]:
        return [r for r, c in enumerate(self.codes) if c & 3 == ERROR]

    def signal(self, rank: int) -> str | None:
        return SIGNAL_NAMES[(self.codes[rank] >> 2) & 3] or None

    @property
    def renamed(self) -> bool:
        return bool(self.codes[0] & RENAMED)

    @property
    def speaker(self) -> int | None:
        """The rank whose message names the failure: the lowest with a real error, else the lowest stopped."""
        return (self.errors or self.failed or [None])[0]


def peer_failure(step: str, status: Status, text: str) -> RankFailure:
    """The error every other rank raises when ranks reported a failure (or a signal) at `step`."""
    speaker = status.speaker
    count = len(status.failed)
    others = f" (and {count - 1} more rank(s))" if count > 1 else ""
    failure = RankFailure(f"rank {speaker} failed during {step}{others}", where=text)
    failure.keeps_staging = any(status.codes[r] & 3 == STOPPED for r in status.failed)
    return failure
