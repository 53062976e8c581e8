"""DistContext: all process-group work in one place.

Which launcher started this process is decided by `detect_launch`, a pure function of the environment over a
small registry (first match wins):

- torchrun, or `accelerate launch` (which runs torchrun's launcher): RANK, WORLD_SIZE, LOCAL_RANK;
- a plain `srun python -m distfinalize` (one SLURM task per rank): SLURM_PROCID, SLURM_STEP_NUM_TASKS (or
  SLURM_NTASKS), SLURM_LOCALID; the master is the first host of the step's node list (or MASTER_ADDR), the
  port MASTER_PORT or one derived from the job id;
- anything else: a single process, world size 1, no process group at all.

Backends: gloo only when ranks work on the CPU; with CUDA, one group with NCCL for CUDA tensors and gloo for
the CPU objects the pipeline exchanges (metadata, results). Each rank takes cuda:LOCAL_RANK.

Metadata collectives raise on every rank when any rank failed; a rank that dies or hangs is named by the
others from the check-ins every rank leaves in the store before each step's collective.

Signals: SIGTERM and SIGINT (scancel, a time limit, Ctrl-C, torchrun stopping the survivors of a failed rank)
become `Terminated`, a KeyboardInterrupt, so the pipeline cleans up on the way out; inside a collective, and while
the commit is being made (`hold_signals`), the signal is only recorded. `interruption` turns it into one error for
the job: printed by the lowest surviving rank, naming any rank whose process is gone ("rank N died").

Testing hook: DISTFINALIZE_FAIL_AT="RANK:STEP[:MODE]" makes rank RANK fail at the start of step STEP
(startup, prepare, tie check, stage, write, finish, commit, ...), or at a point the pipeline names (`committed`:
just after the rename to DEST). `startup` is before the device is picked and the process group formed. MODE is
`raise` (default: an error, exit code 1, like a real one), `exit` (the process exits with status 3), `kill`
(SIGKILL, a rank that dies), `hang` (sleeps forever), `term` or `int` (the rank sends itself SIGTERM or SIGINT
and carries on, as if the launcher had). It exists for the failure tests; a warning is logged whenever it is set.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distfinalize.dist.faults import inject_fault
from distfinalize.dist.group import (
    _init_group,
    _pick_device,
    _relabel_logging,
    _short,
)
from distfinalize.dist.launch import FAULT_ENV, detect_launch, parse_fault
from distfinalize.dist.liveness import check_in, dead_ranks, lost_peer, mark, publish_process
from distfinalize.errors import DistfinalizeError, Interrupted, RankFailure, Terminated

log = logging.getLogger(__name__)
T = TypeVar("T")
CPU = torch.device("cpu")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_GRACE_S = 2.0  # a signal repeated sooner than this is the same stop; later, it kills the process

# --------------------------------------------------------------------------------------------------------------
# Launch environment: pure functions of the environment


# --------------------------------------------------------------------------------------------------------------
# DistContext


@dataclass(frozen=True)
class RankOutcome:
    """What one rank reports at the end of a step: a value, or an error message."""

    rank: int
    value: Any = None
    error: str | None = None
    signal: str | None = None  # the error is this signal (SIGTERM, SIGINT), not a failure


@dataclass(frozen=True)
class CommitOutcome:
    """What a rank knows after `run_commit`: the rename happened, and what went wrong around it without changing
    that (a rank that died or failed after the decision, a signal); `reporter` is the rank that says so."""

    notes: tuple[str, ...] = ()
    reporter: int = 0


@dataclass
class DistContext:
    """Rank, world size and device of this process, and the collectives the pipeline uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    owns_group: bool = False
    launcher: str = "single"
    fault: tuple[int, str, str] | None = None
    step: str = "startup"  # the step this rank is in, or ran last
    signal: str | None = None  # SIGTERM/SIGINT, once one arrived (recorded even when it was not raised)
    _steps: int = field(default=0, repr=False)
    _broken: bool = field(default=False, repr=False)
    _failing: bool = field(default=False, repr=False)
    _in_collective: bool = field(default=False, repr=False)
    _holding: bool = field(default=False, repr=False)
    _signal_at: float = field(default=0.0, repr=False)
    _old_handlers: dict[int, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
        """Join the job torchrun, accelerate or srun started, or stand alone; a process group that is already
        there (a training job's) is used as it is, and left to its owner. Runs on: all ranks."""
        launch = detect_launch()
        if dist.is_initialized():  # its rank and size, whatever the environment says
            launch = replace(launch, rank=dist.get_rank(), world_size=dist.get_world_size())
        fault = parse_fault(os.environ.get(FAULT_ENV))
        if launch.launcher == "slurm":
            os.environ.update(launch.exported())
            _relabel_logging(launch)
        if fault is not None:
            log.warning("testing hook %s is set: rank %d will fail at %r (%s)", FAULT_ENV, *fault)
            inject_fault(fault, launch.rank, "startup")
        torch_device = _pick_device(device, launch.local_rank)
        ctx = cls(launch.rank, launch.world_size, launch.local_rank, torch_device, launcher=launch.launcher)
        ctx.fault = fault
        if launch.world_size > 1 and not dist.is_initialized():
            _init_group(launch, torch_device, timeout_s)
            ctx.owns_group = True
        elif torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        publish_process(ctx)
        ctx._catch_signals()
        log.debug("launched by %s: rank %d of %d, device %s", launch.launcher, ctx.rank, ctx.world_size, torch_device)
        return ctx

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's object, in rank order. No-op at world size 1. Runs on: all ranks."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """`obj` from rank `src` on every rank. No-op at world size 1. Runs on: all ranks."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_to_all_bytes(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int], *,
                         step: str) -> torch.Tensor:
        """Swap flat uint8 buffers: `send_splits[r]` bytes go to rank r, `recv_splits[r]` bytes come from it.

        NCCL carries CUDA buffers, gloo CPU ones (both implement all_to_all_single with split sizes). A peer that
        died or hung makes this a RankFailure naming it. Runs on: all ranks together.
        """
        if self.world_size == 1:
            return send
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=send.device)
        try:
            dist.all_to_all_single(recv, send, recv_splits, send_splits)
        except RuntimeError as exc:
            self._broken = self._failing = True
            if self.signal is not None:  # the job is being stopped: the peers left the exchange for that
                raise Terminated(self.signal) from None
            raise lost_peer(self, step, exc) from None
        return recv

    def run_step(self, step: str, fn: Callable[[], T], *, ranks: str = "all") -> list[T]:
        """Run `fn` (on every rank, or only rank 0 with ranks="rank0") and agree on the outcome.

        Returns every rank's result in rank order (this rank's own as `fn` returned it, the others' as they
        arrived). When any rank raised, every rank raises: the failing
        rank its own error, the others a RankFailure naming the failed rank and step. When a rank died or
        hung (the collective failed or timed out), the others raise a RankFailure naming the ranks that never
        checked in. Runs on: all ranks.
        """
        self._steps += 1
        self.step = step
        outcome = RankOutcome(self.rank)
        own_error: BaseException | None = None
        try:
            self.fault_point(step)
            if ranks == "all" or self.is_rank0:
                outcome = RankOutcome(self.rank, value=fn())
        except SystemExit:
            raise
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            own_error, outcome = exc, _failed(self.rank, exc)
        try:
            outcomes = self._gather(outcome)
        except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection, or the timeout passed
            self._broken = self._failing = True
            if own_error is not None:
                raise own_error from None
            if self.signal is not None:  # the job is being stopped: the peers left the collective for that
                raise Terminated(self.signal) from None
            raise lost_peer(self, step, exc) from None
        failed = [o for o in outcomes if o.error is not None]
        self._failing = bool(failed)
        if own_error is not None:
            raise own_error
        stop = self.signal or next((o.signal for o in failed if o.signal), None)
        if stop is not None and not self._holding and all(o.signal for o in failed):
            raise Terminated(stop)  # the job is being stopped, here or by a peer (a peer's real error would win)
        if failed:
            raise _peer_failure(step, failed)
        values = [o.value for o in outcomes]
        values[self.rank] = outcome.value
        return values

    def run_commit(self, rename: Callable[[], None], landed: Callable[[], bool]) -> CommitOutcome:
        """The point of no return, taken once every rank agreed that everything was written (the step before).

        Rank 0 runs `rename`, with SIGTERM/SIGINT held; then every rank learns whether it happened. When it did
        not, this raises as run_step does (nothing was committed). When it did, nothing turns the run into a
        failure: a rank that fails, dies or is signalled after the decision only adds a note, signals stay held
        for the rest of the run, and a rank that cannot hear from rank 0 asks the file system (`landed`).
        Runs on: all ranks.
        """
        self._steps += 1
        self.step = "commit"
        own_error: BaseException | None = None
        renamed = False
        lost: RuntimeError | None = None
        outcomes: list[RankOutcome] | None = None
        self._holding = True
        try:
            self.fault_point("commit")
            if self.is_rank0:
                rename()
                renamed = True
                self.fault_point("committed")
        except SystemExit:
            raise
        except BaseException as exc:
            own_error = exc
        outcome = _failed(self.rank, own_error) if own_error is not None else RankOutcome(self.rank)
        try:
            outcomes = self._gather(replace(outcome, value=(renamed, self.signal)))
        except RuntimeError as exc:
            self._broken, lost = True, exc
        # rank 0 knows; a rank that lost contact with it asks the file system
        heard = outcomes[0].value[0] is True if outcomes is not None else None
        committed = heard if heard is not None else renamed or (not self.is_rank0 and landed())
        if not committed:
            self._holding = False
            self._failing = True
            if own_error is not None:
                raise own_error
            if outcomes is None:
                if self.signal is not None:
                    raise Terminated(self.signal)
                raise lost_peer(self, "commit", lost)
            raise _peer_failure("commit", [o for o in outcomes if o.error is not None] or outcomes[:1])
        notes, reporter = [], 0
        if outcomes is not None:
            notes += [f"rank {o.rank} failed after the commit was decided ({o.error})" for o in outcomes if o.error]
            notes += [f"{o.value[1]} arrived at rank {o.rank} during the commit" for o in outcomes if o.value[1]]
        else:
            dead = dead_ranks(self)
            reporter = min(set(range(self.world_size)) - set(dead))
            gone = f"rank {', '.join(map(str, dead))} died" if dead else "a rank died or stopped responding"
            notes.append(f"{gone} after the commit was decided ({_short(lost)})")
            if own_error is not None:
                notes.append(f"rank {self.rank} failed after the commit was decided ({own_error})")
            if self.signal is not None:
                notes.append(f"{self.signal} arrived at rank {self.rank} during the commit")
        return CommitOutcome(tuple(notes), reporter)

    @contextmanager
    def signals_raise(self) -> Iterator[None]:
        """Let SIGTERM/SIGINT interrupt the block even after the commit (a long upload). Runs on: any rank."""
        held, self._holding = self._holding, False
        try:
            if self.signal is not None:
                raise Terminated(self.signal)
            yield
        finally:
            self._holding = held

    def interruption(self, exc: BaseException, outcome: str) -> DistfinalizeError:
        """The one error a signal becomes: "interrupted by SIGTERM during write: <outcome>", or "rank N failed
        during write: it died" when a peer's process is gone without saying goodbye (SIGKILL, the OOM killer). Its
        `report_rank` is the lowest rank still alive, so the job prints one line. Runs on: every rank signalled.
        """
        self.signal = self.signal or getattr(exc, "signal", None) or "SIGINT"
        self._failing = True
        mark(self, "interrupted")
        dead = dead_ranks(self)
        error: DistfinalizeError
        if dead:
            others = f" (and rank(s) {', '.join(map(str, dead[1:]))})" if len(dead) > 1 else ""
            error = RankFailure(f"rank {dead[0]} failed during {self.step}{others}",
                                where="it died: its process is gone (killed by a signal, or out of memory?)",
                                hint=f"see that rank's own output and the launcher's report; {outcome}")
        else:
            error = Interrupted(f"interrupted by {self.signal} during {self.step}", where=outcome)
        error.report_rank = min(set(range(self.world_size)) - set(dead))
        error.keeps_staging = True
        return error


    def close(self) -> None:
        """Tear down the process group this context created. Never raises, and waits for no peer once the
        group broke or a signal came. Runs on: all ranks."""
        mark(self, "done")
        self._holding = False  # a signal now stops the wait for the others (caught below)
        try:
            self.fault_point("close")
            if self.owns_group and dist.is_initialized():
                if not self._broken and self.signal is None:
                    self._in_collective = True
                    try:
                        dist.barrier()  # tearing down gloo while a peer is still in a collective aborts the peer
                    except RuntimeError as exc:
                        log.debug("barrier before teardown failed: %s", exc)
                    finally:
                        self._in_collective = False
                self._holding = True
                dist.destroy_process_group()
                self.owns_group = False
        except KeyboardInterrupt:
            log.debug("interrupted while closing the process group")
        finally:
            self._holding = True
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            self._old_handlers.clear()

    # -- failure handling --------------------------------------------------------------------------------------

    def fault_point(self, step: str) -> None:
        """The DISTFINALIZE_FAIL_AT testing hook, at the start of `step` or at a point the pipeline names."""
        if self.fault is not None:
            inject_fault(self.fault, self.rank, step)

    def _gather(self, outcome: RankOutcome) -> list[RankOutcome]:
        """Check in, then every rank's outcome (a signal meanwhile is only recorded)."""
        self._in_collective = True
        try:
            check_in(self)
            return self.all_gather_object(outcome)
        finally:
            self._in_collective = False


    def _catch_signals(self) -> None:
        """Turn SIGTERM and SIGINT into Terminated (a KeyboardInterrupt) so the pipeline cleans up its staging
        dir; while in a collective or holding signals (the commit), only record them."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            if signal.getsignal(signum) is default:  # else someone (a launcher, a test harness) handles it
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.signal is not None:
            if now - self._signal_at < REPEAT_GRACE_S:
                return  # the same stop, sent twice (a launcher forwarding what the terminal also sent)
            signal.signal(signum, signal.SIG_DFL)  # asked again: stop now, as a second Ctrl-C does
            os.kill(os.getpid(), signum)
            return
        self.signal, self._signal_at = signal.Signals(signum).name, now
        if self._failing or self._in_collective or self._holding:
            # on the way out with an error already, inside a collective that is about to tell why the job is
            # being stopped, or past the point of no return: let that outcome (and the cleanup) win
            return
        raise Terminated(self.signal)


def _failed(rank: int, exc: BaseException) -> RankOutcome:
    signame = (getattr(exc, "signal", None) or "SIGINT") if isinstance(exc, KeyboardInterrupt) else None
    return RankOutcome(rank, error=str(exc) or type(exc).__name__, signal=signame)


def _peer_failure(step: str, failed: list[RankOutcome]) -> RankFailure:
    """The error every other rank raises when ranks reported a failure (or a signal) at `step`."""
    first = failed[0]
    others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    failure = RankFailure(f"rank {first.rank} failed during {step}{others}", where=first.error)
    failure.keeps_staging = any(o.signal for o in failed)
    return failure
