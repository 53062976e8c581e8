"""Timeline hook for benchmarks/phases.py: with TIMELINE_DIR set, every Python process started with this folder on
PYTHONPATH (torchrun's agent and each rank) appends "time who event [cpu s]" lines to TIMELINE_DIR/<pid>.log: its
start, `import torch`, DistContext.from_env / run_step / close, destroy_process_group and os._exit on the ranks; the
rendezvous, worker start, monitor states and exit barrier in the agent, and its last atexit handler. The code timed
is unchanged (methods are wrapped as their modules load)."""

import atexit
import importlib.abc
import importlib.util
import os
import sys
import time

_DIR = os.environ.get("TIMELINE_DIR")
if _DIR:
    _WHO = f"rank{os.environ['RANK']}" if "RANK" in os.environ else "agent"
    _LOG = open(os.path.join(_DIR, f"{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115 (open until exit)

    def event(what: str) -> None:
        _LOG.write(f"{time.time():.4f} {_WHO} {what} [cpu {time.process_time():.3f}]\n")

    def wrap(cls, name: str, label: str) -> None:
        original = getattr(cls, name)

        def timed(*args, **kwargs):
            event(f"{label} start")
            try:
                return original(*args, **kwargs)
            finally:
                event(f"{label} end")

        setattr(cls, name, timed)

    def patch(name: str, module) -> None:
        if name == "distfinalize.dist.context":
            ctx = module.DistContext
            run_step = ctx.run_step
            ctx.run_step = lambda self, step, fn, **kw: _step(run_step, self, step, fn, kw)
            from_env = ctx.from_env.__func__
            ctx.from_env = classmethod(lambda cls, *a, **k: _timed("from_env", from_env, cls, *a, **k))
            wrap(ctx, "close", "close")
            wrap(module.dist, "destroy_process_group", "destroy")
        elif name == "torch.distributed.elastic.agent.server.api":
            for method in ("run", "_initialize_workers", "_rendezvous", "_exit_barrier"):
                wrap(module.SimpleElasticAgent, method, method)
        elif name == "torch.distributed.elastic.agent.server.local_elastic_agent":
            monitor, last = module.LocalElasticAgent._monitor_workers, []

            def watched(self, group):
                result = monitor(self, group)
                if not last or last[-1] != result.state:
                    last.append(result.state)
                    event(f"monitor -> {result.state.name}")
                return result

            module.LocalElasticAgent._monitor_workers = watched

    def _step(run_step, self, step, fn, kwargs):
        event(f"step {step} start")
        try:
            return run_step(self, step, fn, **kwargs)
        finally:
            event(f"step {step} end")

    def _timed(label, fn, *args, **kwargs):
        event(f"{label} start")
        try:
            return fn(*args, **kwargs)
        finally:
            event(f"{label} end")

    WATCHED = {
        "torch",
        "distfinalize.dist.context",
        "distfinalize.pipeline",
        "torch.distributed.elastic.agent.server.api",
        "torch.distributed.elastic.agent.server.local_elastic_agent",
    }

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in WATCHED:
                return None
            WATCHED.discard(name)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                event(f"import {name} start")
                execute(module)
                event(f"import {name} end")
                patch(name, module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())
    event("start")
    atexit.register(event, "atexit (last)")
    _exit = os._exit

    def hard_exit(code):
        event(f"os._exit({code})")
        _exit(code)

    os._exit = hard_exit
