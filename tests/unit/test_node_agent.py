"""The process node's bookkeeping (testbed/node_agent.py): what it does without a cluster."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from testbed.node_agent import NodeAgent, PodRun, expand


def _agent() -> NodeAgent:
    agent = NodeAgent.__new__(NodeAgent)  # no API server: only the address book
    agent.runs, agent.used_ips, agent.lock, agent.last_ip = {}, set(), threading.RLock(), -1
    return agent


def test_a_second_event_for_a_pod_being_started_takes_no_address():
    agent = _agent()
    first = agent._alloc_ip()
    agent.runs["u1"] = PodRun("u1", "ns", "p", "thaw-u1", first, Path("/nonexistent"))
    pod = SimpleNamespace(metadata=SimpleNamespace(uid="u1", namespace="ns", name="p"))
    for _ in range(300):  # more than the /24 holds: each leaked address would be gone for good
        agent._start_pod(pod)
    assert agent.used_ips == {first}
    assert agent._alloc_ip() != first


def test_command_variables_expand_as_kubernetes_does():
    env = {"MODE": "fast"}
    assert expand("$(MODE)-arg $$(MODE) $(NOPE)", env) == "fast-arg $(MODE) $(NOPE)"
