"""DistContext: all process-group work in one place.

Which launcher started this process is decided by `detect_launch`, a pure function of the environment over a
small registry (first match wins):

- torchrun, or `accelerate launch` (which runs torchrun's launcher): RANK, WORLD_SIZE, LOCAL_RANK;
- a plain `srun python -m distfinalize` (one SLURM task per rank): SLURM_PROCID, SLURM_STEP_NUM_TASKS (or
  SLURM_NTASKS), SLURM_LOCALID; the master is the first host of the step's node list (or MASTER_ADDR), the
  port MASTER_PORT or one derived from the job id;
- anything else: a single process, world size 1, no process group at all.

Backends: gloo only when ranks work on the CPU; with CUDA, one group with NCCL for CUDA tensors and gloo for
the CPU objects the pipeline exchanges (metadata, results). Each rank takes cuda:LOCAL_RANK. Inside a job whose
group is already formed, the collectives run on a group of their own over its ranks (group.join_group).

Each step ends in one small collective (dist/agree.py): a status byte per rank, then only the values the step
shares. It raises on every rank when any rank failed; a rank that dies or hangs is named from the check-ins
every rank leaves in the store before each step's collective (dist/liveness.py).

Signals: SIGTERM and SIGINT (scancel, a time limit, Ctrl-C, torchrun stopping the survivors of a failed rank)
become `Terminated`, a KeyboardInterrupt, so the pipeline cleans up on the way out; inside a collective, and while
the commit is being made (`hold_signals`), the signal is only recorded. `interruption` turns it into one error for
the job: printed by the lowest surviving rank, naming any rank whose process is gone ("rank N died").

Testing hook: DISTFINALIZE_FAIL_AT="RANK:STEP[:MODE]" makes rank RANK fail (raise, exit, kill, hang, term, int or
pause: dist/faults.py) at the start of step STEP, or at a point the pipeline names (`committed`: just after the
rename to DEST); `startup` is before the device is picked and the process group formed. A warning says it is set.
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

from distfinalize.dist.agree import Status, encode, error_text, peer_failure
from distfinalize.dist.faults import inject_fault
from distfinalize.dist.group import _init_group, _pick_device, _relabel_logging, _short, join_group, scatter_object
from distfinalize.dist.launch import FAULT_ENV, detect_launch, parse_fault
from distfinalize.dist.liveness import check_in, dead_ranks, lost_peer, mark, publish_process
from distfinalize.errors import DistfinalizeError, Interrupted, RankFailure, Terminated

log = logging.getLogger(__name__)
T = TypeVar("T")
CPU = torch.device("cpu")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_GRACE_S = 2.0  # a signal repeated sooner than this is the same stop; later, it kills the process


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
    group: Any = field(default=None, repr=False)  # the group the collectives use; None: the default group
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
        if launch.world_size > 1 and not ctx.owns_group:
            ctx.group = join_group(torch_device, timeout_s)
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
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """`obj` from rank `src` on every rank. No-op at world size 1. Runs on: all ranks."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_to_all_bytes(
        self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int], *, step: str
    ) -> torch.Tensor:
        """Swap flat uint8 buffers: `send_splits[r]` bytes go to rank r, `recv_splits[r]` bytes come from it.

        NCCL carries CUDA buffers, gloo CPU ones (both implement all_to_all_single with split sizes). A peer that
        died or hung makes this a RankFailure naming it. Runs on: all ranks together.
        """
        if self.world_size == 1:
            return send
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=send.device)
        try:
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        except RuntimeError as exc:
            self._broken = self._failing = True
            if self.signal is not None:  # the job is being stopped: the peers left the exchange for that
                raise Terminated(self.signal) from None
            raise lost_peer(self, step, exc) from None
        return recv

    def run_step(
        self,
        step: str,
        fn: Callable[[], T],
        *,
        ranks: str = "all",
        collect: str = "own",
        share: Callable[[T], Any] | None = None,
        scatter: bool = False,
    ) -> Any:
        """Run `fn` (on every rank, or only rank 0 with ranks="rank0") and agree on the outcome (dist/agree.py).

        What comes back: with ranks="rank0", rank 0's value on every rank (the others get `share(value)` when
        given: only what they need; with scatter=True, item r of it on rank r); otherwise by `collect`: "own" (each
        rank its own value; nothing is sent), "rank0" (rank 0 gets every rank's value in rank order, the others
        None), "all" (every rank gets them all: small values only). When any rank raised, every rank raises: the
        failing rank its own error, the others a RankFailure naming the failed rank and step. When a rank died or
        hung (the collective failed or timed out), the others raise a RankFailure naming the ranks that never
        checked in. Runs on: all ranks.
        """
        self._steps += 1
        self.step = step
        value: Any = None
        own_error: BaseException | None = None
        try:
            self.fault_point(step)
            if ranks == "all" or self.is_rank0:
                value = fn()
        except SystemExit:
            raise
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            own_error = exc
        with self._collective(step, own_error):
            status = self._agree(encode(own_error))
            text = self._failure_text(status, own_error)
        self._failing = bool(status.failed)
        if own_error is not None:
            raise own_error
        stop = self.signal or next((s for r in status.failed if (s := status.signal(r))), None)
        if stop is not None and not self._holding and not status.errors:
            raise Terminated(stop)  # the job is being stopped, here or by a peer (a peer's real error would win)
        if status.failed:
            raise peer_failure(step, status, text)
        with self._collective(step, None):
            if ranks == "rank0":
                if scatter:
                    return scatter_object(value, self.world_size, self.is_rank0, self.group)
                sent = self.broadcast_object(share(value) if share is not None and self.is_rank0 else value)
                return value if self.is_rank0 else sent
            if collect == "rank0":
                return self.gather_object(value)
            if collect == "all":
                return self.all_gather_object(value)
        return value

    def gather_object(self, obj: T) -> list[T] | None:
        """Every rank's object in rank order on rank 0, None on the others. Runs on: all ranks."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_rank0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def run_commit(self, rename: Callable[[], None], landed: Callable[[], bool]) -> CommitOutcome:
        """The point of no return, taken once every rank agreed that everything was written (the step before).

        Rank 0 runs `rename`, with SIGTERM/SIGINT held; then every rank learns whether it happened. When it did
        not, this raises as run_step does (nothing was committed). When it did, nothing turns the run into a
        failure: a rank that fails, dies or is signalled after the decision only adds a note (rank 0 collects
        them), signals stay held for the rest of the run, and a rank that cannot hear from rank 0 asks the file
        system (`landed`). Runs on: all ranks.
        """
        self._steps += 1
        self.step = "commit"
        own_error: BaseException | None = None
        renamed = False
        lost: RuntimeError | None = None
        status: Status | None = None
        text, texts = "", None
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
        try:
            self._in_collective = True
            status = self._agree(encode(own_error, self.signal, renamed))
            if not status.renamed:
                text = self._failure_text(status, own_error)
            elif status.failed or any(status.signal(r) for r in range(self.world_size)):
                texts = dict(enumerate(self.gather_object(error_text(own_error)) or []))
        except RuntimeError as exc:
            self._broken, lost = True, exc
        finally:
            self._in_collective = False
        # rank 0 knows; a rank that lost contact with it asks the file system
        heard = status.renamed if status is not None else None
        committed = heard if heard is not None else renamed or (not self.is_rank0 and landed())
        if not committed:
            self._holding = False
            self._failing = True
            if own_error is not None:
                raise own_error
            if status is None:
                if self.signal is not None:
                    raise Terminated(self.signal)
                raise lost_peer(self, "commit", lost)
            raise peer_failure("commit", status, text)
        notes, reporter = [], 0
        if status is not None:
            if self.is_rank0 and (status.failed or any(status.signal(r) for r in range(self.world_size))):
                said = texts or {}
                notes += [f"rank {r} failed after the commit was decided ({said.get(r, '?')})" for r in status.failed]
                notes += [
                    f"{status.signal(r)} arrived at rank {r} during the commit"
                    for r in range(self.world_size)
                    if status.signal(r)
                ]
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
            error = RankFailure(
                f"rank {dead[0]} failed during {self.step}{others}",
                where="it died: its process is gone (killed by a signal, or out of memory?)",
                hint=f"see that rank's own output and the launcher's report; {outcome}",
            )
        else:
            error = Interrupted(f"interrupted by {self.signal} during {self.step}", where=outcome)
        error.report_rank = min(set(range(self.world_size)) - set(dead))
        error.keeps_staging = True
        return error

    def close(self) -> None:
        """Tear down the process group this context created (a job's own group is left as it was). Never raises,
        and waits for no peer once the group broke or a signal came. Runs on: all ranks."""
        mark(self, "done")
        self._holding = False  # a signal now stops the wait for the others (caught below)
        try:
            self.fault_point("close")
            if (self.owns_group or self.group is not None) and dist.is_initialized():
                if not self._broken and self.signal is None:
                    self._in_collective = True
                    try:  # tearing down gloo while a peer is still in a collective aborts the peer
                        dist.barrier(group=self.group)
                    except RuntimeError as exc:
                        log.debug("barrier before teardown failed: %s", exc)
                    finally:
                        self._in_collective = False
                self._holding = True
                dist.destroy_process_group(self.group)  # ours: the default group we formed, or our own subgroup
                self.owns_group, self.group = False, None
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

    def _agree(self, code: int) -> Status:
        """Check in, then every rank's status byte (one all_reduce; a signal meanwhile is only recorded)."""
        check_in(self)
        if self.world_size == 1:
            return Status((code,))
        codes = torch.zeros(self.world_size, dtype=torch.uint8)
        codes[self.rank] = code
        dist.all_reduce(codes, op=dist.ReduceOp.SUM, group=self.group)
        return Status(tuple(codes.tolist()))

    def _failure_text(self, status: Status, own_error: BaseException | None) -> str:
        """The message of the rank that speaks for a failed step, broadcast from it (only when one failed)."""
        speaker = status.speaker
        if speaker is None:
            return ""
        return self.broadcast_object(error_text(own_error) if self.rank == speaker else "", src=speaker)

    @contextmanager
    def _collective(self, step: str, own_error: BaseException | None) -> Iterator[None]:
        """A collective of `step`: a signal meanwhile is only recorded; a broken group becomes this rank's own
        error, the signal that is stopping the job, or a RankFailure naming the lost peer."""
        self._in_collective = True
        try:
            yield
        except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection, or the timeout passed
            self._broken = self._failing = True
            if own_error is not None:
                raise own_error from None
            if self.signal is not None:  # the job is being stopped: the peers left the collective for that
                raise Terminated(self.signal) from None
            raise lost_peer(self, step, exc) from None
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
