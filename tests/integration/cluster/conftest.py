from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster.control_plane import ControlPlane
from tests.services.net import free_port, http_get, wait_until

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
        from tests.cluster.node_agent import NS_PREFIX, teardown_network

        leftover_ns = [
            ln
            for ln in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if ln.startswith(NS_PREFIX)
        ]
        teardown_network()
        alive = [pid for pid in pids if _alive(pid)]
        assert not alive, f"cluster processes still running after stop: {alive}"
        assert not leftover_ns, f"network namespaces left behind: {leftover_ns}"


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


class OperatorProcess:
    """`python -m thaw_operator` as a separate process, as it runs in its Deployment."""

    def __init__(self, kubeconfig, log_path, extra=(), standalone=True, root=ROOT):
        """root: the source tree to run (benchmarks run a base commit's worktree beside this one)."""
        self.kubeconfig, self.log_path, self.root = kubeconfig, log_path, Path(root)
        self.extra = (["--standalone"] if standalone else []) + list(extra)
        self.metrics_port = self.health_port = None
        self.proc = None

    def start(self):
        # Fresh ports on every start: a restarted operator's old port may meanwhile be some
        # connection's source port (its bind then fails with EADDRINUSE).
        self.metrics_port, self.health_port = free_port(), free_port()
        cmd = [
            sys.executable,
            "-m",
            "thaw_operator",
            "--log-format",
            "plain",
            f"--metrics-port={self.metrics_port}",
            f"--health-port={self.health_port}",
            "--resync-seconds=5",
            "--trainer-image=thaw-trainer:test",
            *self.extra,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        if self.root != ROOT:  # its packages before the editable install of this tree
            env["PYTHONPATH"] = os.pathsep.join([str(self.root / "operator"), str(self.root)])
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_until(self._healthy, 60, "operator")
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            tail = Path(self.log_path).read_text(errors="replace").strip().splitlines()[-3:]
            raise AssertionError(f"operator exited {self.proc.returncode} while starting: {' | '.join(tail)}")
        return http_get(f"http://127.0.0.1:{self.health_port}/healthz", 1)[0] == 200

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def operator(cluster, crd, tmp_path):
    op = OperatorProcess(cluster.kubeconfig_path, tmp_path / "operator.log").start()
    yield op
    op.stop()
