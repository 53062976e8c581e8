"""The exception hierarchy. Every error a user can cause is a DistfinalizeError.

Each one says what is wrong, where, and what to do; the CLI prints it as one line.
"""

from __future__ import annotations


class DistfinalizeError(Exception):
    """A failure the user can act on. Subclasses set the process exit code."""

    exit_code = 1
    report_rank = 0  # the rank that prints it: rank 0, or the lowest surviving rank when rank 0 is gone
    keeps_staging = False  # a failure --resume can get past (a rank died or hung, a signal): keep finished files

    def __init__(self, what: str, *, where: object = None, hint: str | None = None) -> None:
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.what
        if self.where is not None:
            text += f": {self.where}"
        if self.hint:
            text += f". {self.hint}"
        return text


class UsageError(DistfinalizeError):
    """Bad command-line options."""

    exit_code = 2


class SourceError(DistfinalizeError):
    """SRC is missing, unreadable, not a checkpoint, or corrupt."""


class KeyMappingError(SourceError):
    """The checkpoint's tensor names do not match the model that config.json describes."""


class DestinationError(DistfinalizeError):
    """DEST exists, cannot be written, or the commit failed."""


class MissingDependencyError(DistfinalizeError):
    """An optional dependency is not installed; the hint gives the install command."""


class DeviceError(DistfinalizeError):
    """The rank's device (or the model dtype) cannot run what was asked, e.g. a recipe that needs a newer GPU."""


class RankFailure(DistfinalizeError):
    """Raised on every rank whose peer failed, naming the failed rank and step."""


class Interrupted(DistfinalizeError):
    """SIGINT or SIGTERM stopped the job; the message says what that left at DEST."""

    exit_code = 130


class LaunchError(DistfinalizeError):
    """The launch environment is inconsistent, or the process group cannot be formed."""


class InjectedFailure(DistfinalizeError):
    """The failure the DISTFINALIZE_FAIL_AT testing hook raises (an ordinary error: one line, exit code 1)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGINT (scancel, a time limit, Ctrl-C, torchrun stopping the survivors of a failed rank), raised
    like Ctrl-C so that the staging dir is cleaned up on the way out. `signal` names the signal."""

    def __init__(self, signame: str = "SIGTERM") -> None:
        super().__init__(f"terminated by {signame}")
        self.signal = signame
