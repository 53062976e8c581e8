"""`distfinalize run`: start the ranks through torch.distributed's elastic agent (what torchrun runs), and turn
its outcome into one exit code and at most one line.

Each rank prints its own error line (commands/runner.py); the agent's logging and its ChildFailedError table are
left out. When no rank could say why (a rank killed by a signal before any peer noticed, an exit code that is not
distfinalize's), the launcher prints the one line itself. Runs on: the launching process of each node.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distfinalize.errors import LaunchError

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing import LogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

OUR_EXIT_CODES = frozenset({1, 2, 70, 130})  # a rank that exits with one of these has printed its own line


@dataclass(frozen=True, kw_only=True)
class AgentOptions:
    """The launcher's options: ranks per node, nodes, the rendezvous, per-rank log files."""

    nproc_per_node: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # HOST:PORT of the c10d rendezvous; None: this node alone (standalone)
    rdzv_id: str | None = None
    rdzv_conf: tuple[tuple[str, str], ...] = ()  # torchrun's --rdzv-conf, e.g. (("join_timeout", "900"),)
    log_dir: Path | None = None  # also write each rank's stdout/stderr under it
    tee: int | None = None  # with log_dir: the streams (1 stdout, 2 stderr, 3 both) that also reach the console
    local_ranks: frozenset[int] | None = None  # only these local ranks' output reaches the console
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be at least 1, got {self.nnodes}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (a host every node reaches)")
        if self.tee is not None and self.log_dir is None:
            raise ValueError("--tee needs --log-dir DIR")


def default_nproc() -> int:
    """One rank per visible GPU, else 1."""
    import torch

    return max(torch.cuda.device_count(), 1)


def launch(options: AgentOptions, argv: list[str]) -> tuple[int, str | None]:
    """Run `python -m distfinalize ARGV` on every rank of this node; the exit code, and the line to print when
    no rank printed one."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    from distfinalize.startup import imports_done

    imports_done()  # collection back on for the rest of the job (the command line turned it off for the imports)
    quiet_agent(options.verbose)
    if options.nproc_per_node > 1 or options.nnodes > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets: one thread per rank, unless told
    attempt = 1
    while True:
        try:
            elastic_launch(launch_config(options), sys.executable)("-u", "-m", "distfinalize", *argv)
        except ChildFailedError as exc:
            return child_failure(exc.failures)
        except SignalException as exc:
            return 128 + int(exc.sigval), None  # the ranks got the signal too, and said so
        except DistNetworkError as exc:
            local = options.rdzv_endpoint is None and options.nnodes == 1
            if local and "EADDRINUSE" in str(exc) and attempt < LOCAL_PORT_ATTEMPTS:  # the port was taken meanwhile
                attempt += 1
                continue
            raise rendezvous_error(options, exc) from exc
        except RendezvousError as exc:
            raise rendezvous_error(options, exc) from exc
        return 0, None


LOCAL_MONITOR_S = 0.02  # one node: how often the agent checks its ranks (torch's default, 0.1 s, is for many nodes)
LOCAL_PORT_ATTEMPTS = 3  # one node: fresh free ports tried for the agent's store


def launch_config(options: AgentOptions) -> LaunchConfig:
    """The elastic agent's settings. Several nodes (or --rdzv-endpoint) meet through a c10d rendezvous, as torchrun
    does. One node alone takes a static rendezvous on a free local port, with its store in this process: the c10d
    rendezvous's first round starts after a random 0-0.3 s wait (to spread many nodes' joins), and the agent's
    checks are LOCAL_MONITOR_S apart, so the ranks start and the run ends sooner."""
    from torch.distributed.launcher.api import LaunchConfig

    run_id = options.rdzv_id or os.environ.get("SLURM_JOB_ID") or str(uuid.uuid4())
    local = options.rdzv_endpoint is None and options.nnodes == 1
    return LaunchConfig(
        min_nodes=options.nnodes,
        max_nodes=options.nnodes,
        nproc_per_node=options.nproc_per_node,
        run_id=run_id,
        rdzv_backend="static" if local else "c10d",
        rdzv_endpoint=f"localhost:{free_port()}" if local else options.rdzv_endpoint or "localhost:0",
        rdzv_configs={**dict(options.rdzv_conf), "rank": 0} if local else dict(options.rdzv_conf),
        max_restarts=0,
        monitor_interval=LOCAL_MONITOR_S if local else 0.1,
        logs_specs=logs_specs(options),
    )


def free_port() -> int:
    """A TCP port no socket of this host listens on now (the agent's store binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def rendezvous_error(options: AgentOptions, exc: BaseException) -> LaunchError:
    where = options.rdzv_endpoint or "localhost"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LaunchError(
        f"the ranks could not meet at the rendezvous ({first})",
        where=where,
        hint="check --rdzv-endpoint HOST:PORT and that every node runs the same command",
    )


def logs_specs(options: AgentOptions) -> LogsSpecs:
    """Where each rank's output goes, as torchrun's --log-dir, --tee and --local-ranks-filter place it: the console
    by default (no per-run log folder is made); with --log-dir, files under it and, for --tee's streams (default
    both), the console too; --local-ranks-filter keeps the other ranks off the console."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std

    if options.log_dir is None and options.local_ranks is None:
        return DefaultLogsSpecs(log_dir=os.devnull)
    files = options.log_dir is not None
    return DefaultLogsSpecs(
        log_dir=str(options.log_dir) if files else None,  # None: a temporary folder, as torchrun makes
        redirects=Std.ALL if files else Std.NONE,
        tee=Std.from_str(str(3 if options.tee is None else options.tee)) if files else Std.NONE,
        local_ranks_filter=set(options.local_ranks) if options.local_ranks is not None else None,
    )


def child_failure(failures: dict) -> tuple[int, str | None]:
    """The exit code of the first rank that failed; a line of our own only when no rank printed one."""
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    ours = sorted(rank for rank, code in codes.items() if code in OUR_EXIT_CODES)
    if ours:
        return codes[ours[0]], None
    rank = min(codes, key=lambda r: (failures[r].timestamp, r))
    code = codes[rank]
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        return 128 - code, f"rank {rank} was killed by {name} (pid {failures[rank].pid} on {failures[rank].hostname})"
    return code or 1, f"rank {rank} exited with code {code} (pid {failures[rank].pid} on {failures[rank].hostname})"


def quiet_agent(verbose: bool) -> None:
    """The elastic agent logs its configuration, its rendezvous, each failed rank and the closing of the others:
    shown with -v only (each of its loggers sets its own level, so each is set here)."""
    import torch.distributed.elastic  # noqa: F401  (its loggers exist once it is imported)

    level = logging.INFO if verbose else logging.CRITICAL
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(level)
