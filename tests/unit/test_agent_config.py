"""`distfinalize run`'s elastic agent settings: one node alone meets through a static rendezvous on a free local port
(no random wait before the first round), checked every LOCAL_MONITOR_S; several nodes, or an endpoint, through
c10d as torchrun does; a port taken between the probe and the store's bind is replaced by a fresh one."""

from __future__ import annotations

import socket
import subprocess
import sys

from launching import bare_env

from distfinalize.dist.agent import LOCAL_MONITOR_S, AgentOptions, launch_config


def test_one_node_takes_a_static_rendezvous_on_a_free_port() -> None:
    config = launch_config(AgentOptions(nproc_per_node=2, rdzv_conf=(("timeout", "900"),)))
    host, port = config.rdzv_endpoint.rsplit(":", 1)
    assert (config.rdzv_backend, host, config.rdzv_configs) == ("static", "localhost", {"timeout": "900", "rank": 0})
    with socket.socket() as probe:
        probe.bind(("", int(port)))  # nothing listens there
    assert config.monitor_interval == LOCAL_MONITOR_S < 0.1
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node, config.max_restarts) == (1, 1, 2, 0)


def test_nodes_meet_at_the_endpoint_through_c10d() -> None:
    options = AgentOptions(nproc_per_node=8, nnodes=2, rdzv_endpoint="node01:29500", rdzv_id="job")
    config = launch_config(options)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "node01:29500", "job")
    assert "rank" not in config.rdzv_configs and config.monitor_interval == 0.1
    one_node = launch_config(AgentOptions(nproc_per_node=2, rdzv_endpoint="localhost:29500"))
    assert (one_node.rdzv_backend, one_node.rdzv_endpoint) == ("c10d", "localhost:29500")


RETRY = """
import socket
from distfinalize.dist import agent
from distfinalize.dist.agent import AgentOptions, launch
busy = socket.socket()
busy.bind(("", 0))
busy.listen()
ports = [busy.getsockname()[1]]
real = agent.free_port
def free_port():
    ports.append(real())
    return ports[-2] if len(ports) == 2 else ports[-1]
agent.free_port = free_port
code, line = launch(AgentOptions(nproc_per_node=2), ["--help"])
print("RESULT", code, line, len(ports) - 1)
"""


def test_a_taken_port_is_replaced_and_the_ranks_run() -> None:
    """The first port is taken by a listening socket: the store cannot bind it, the next attempt gets a fresh one,
    and both ranks run (`python -m distfinalize --help` on each, exit 0)."""
    done = subprocess.run(
        [sys.executable, "-c", RETRY], capture_output=True, text=True, env=bare_env(), timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "RESULT 0 None 2" in done.stdout
    assert done.stdout.count("usage: distfinalize") == 2  # each rank's --help
