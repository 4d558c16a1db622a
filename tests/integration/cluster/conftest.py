from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from testbed.control_plane import ControlPlane
from testbed.operator_process import OperatorProcess

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One real cluster for the whole session; stopped (processes, namespaces) even when tests fail."""
    if os.geteuid() != 0:
        pytest.fail("the cluster tests need root (network namespaces for the process node)")
    state = tmp_path_factory.mktemp("cluster")
    cp = ControlPlane(state, kwok_nodes=2, process_nodes=1)
    try:
        cp.start()
        yield cp
    finally:
        pids = [p.pid for p in cp.procs.values()]
        cp.stop()
        from testbed.node_agent import NS_PREFIX, teardown_network

        leftover_ns = [
            ln
            for ln in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if ln.startswith(NS_PREFIX)
        ]
        teardown_network()
        alive = [pid for pid in pids if _alive(pid)]
        assert not alive, f"cluster processes still running after stop: {alive}"
        assert not leftover_ns, f"network namespaces left behind: {leftover_ns}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing cluster test shows the tails of the process node's and the scheduler's logs
    beside its traceback: CI keeps nothing else, and a flake seen once must say what happened."""
    outcome = yield
    rep = outcome.get_result()
    cp = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
    if rep.failed and isinstance(cp, ControlPlane):
        for name in ("process-0", "kube-scheduler"):
            path = cp.state / "logs" / f"{name}.log"
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-40:]
                rep.sections.append((f"{name} log (last 40 lines)", "\n".join(tail)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def api(cluster):
    from kubernetes import config

    return config.new_client_from_config(str(cluster.kubeconfig_path))


@pytest.fixture
def namespace(api):
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the ServiceAccount controller must create "default" first
        try:
            core.read_namespaced_service_account("default", name)
            break
        except client.exceptions.ApiException:
            time.sleep(0.2)
    yield name
    core.delete_namespace(name)


def wait_for(fn, timeout: float = 60, interval: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def crd(cluster):
    """The FineTuneJob CRD from manifests/, established."""
    cluster.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests" / "crd"))
    cluster.kubectl("wait", "--for", "condition=established", "crd/finetunejobs.thaw.dev", "--timeout=60s")
    return "finetunejobs.thaw.dev"


@pytest.fixture
def operator(cluster, crd, tmp_path):
    op = OperatorProcess(cluster.kubeconfig_path, tmp_path / "operator.log").start()
    yield op
    op.stop()
