"""A real Kubernetes control plane on this machine: etcd, kube-apiserver (RBAC, service
account tokens), kube-controller-manager, kube-scheduler, plus kwok for simulated GPU
nodes. Binaries come from hack/build-k8s.sh. Everything lives under one state directory
and is started as child processes; `stop()` leaves nothing running.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE = Path(os.environ.get("THAW_CLUSTER_DIR", "/tmp/thaw-cluster"))
SERVICE_CIDR = "10.96.0.0/16"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_dir() -> Path:
    """Build (or find cached) binaries; the script prints the bin directory last.
    THAW_K8S_BIN_DIR points at a ready directory instead (skips the script)."""
    if os.environ.get("THAW_K8S_BIN_DIR"):
        return Path(os.environ["THAW_K8S_BIN_DIR"])
    out = subprocess.run([str(ROOT / "hack" / "build-k8s.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(pki: Path) -> None:
    """A CA, the apiserver's serving cert, and the service-account signing key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "apiserver.crt").exists():
        return
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "30",
        "-subj",
        "/CN=thaw-test-ca",
        cwd=pki,
    )
    (pki / "san.cnf").write_text(
        "[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName="
        + ",".join(
            [
                "IP:127.0.0.1",
                "IP:10.96.0.1",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ]
        )
        + "\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        "-subj",
        "/CN=kube-apiserver",
        cwd=pki,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "apiserver.crt",
        "-days",
        "30",
        "-extfile",
        "san.cnf",
        "-extensions",
        "ext",
        cwd=pki,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig(server: str, ca: Path, token: str, user: str = "admin") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "thaw", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "thaw", "context": {"cluster": "thaw", "user": user}}],
        "current-context": "thaw",
    }


@dataclass
class ControlPlane:
    state: Path = DEFAULT_STATE
    kwok_nodes: int = 2
    process_nodes: int = 1
    gpus_per_node: int = 8
    bins: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    argv: dict[str, list[str]] = field(default_factory=dict)

    @property
    def kubeconfig_path(self) -> Path:
        return self.state / "admin.kubeconfig"

    @property
    def info_path(self) -> Path:
        return self.state / "cluster.json"

    def _bin(self, name: str) -> str:
        assert self.bins is not None
        return str(self.bins / name)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.state / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        # Own process group: stop() can signal the whole tree, and Ctrl-C on pytest does not
        # kill the cluster half-way through a test's clean-up.
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.argv[name] = args
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
        )
        (self.state / "pids").mkdir(exist_ok=True)
        (self.state / "pids" / name).write_text(str(self.procs[name].pid))

    def restart(self, name: str, down_seconds: float = 0.0) -> None:
        """Stop one component (SIGTERM to its group, as systemd or a kubelet would) and start it
        again with the same arguments: a control-plane upgrade or crash, for the chaos trials."""
        p = self.procs[name]
        _terminate(p.pid)
        try:
            p.wait(timeout=30)  # a kubelet's default grace period; an apiserver drains watches ~60 s
        except subprocess.TimeoutExpired:
            _kill_group(p.pid, signal.SIGKILL)
            p.wait()
        time.sleep(down_seconds)
        self._spawn(name, self.argv[name])

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.state / "logs" / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{tail}")

    def _wait_http(self, url: str, what: str, timeout: float = 60, ctx=None, headers=None) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                req = urllib.request.Request(url, headers=headers or {})
                # Loopback never goes through a proxy, whatever http(s)_proxy says.
                opener = urllib.request.build_opener(
                    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
                )
                with opener.open(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception as err:  # noqa: BLE001 - polling until ready
                last = err
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout}s: {last}")

    def start(self) -> ControlPlane:
        stop_leftovers(self.state)
        if self.state.exists():
            shutil.rmtree(self.state)
        (self.state / "logs").mkdir(parents=True)
        self.bins = self.bins or bin_dir()
        pki = self.state / "pki"
        make_pki(pki)
        token = secrets.token_hex(16)
        (pki / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()

        self._spawn(
            "etcd",
            [
                self._bin("etcd"),
                "--data-dir",
                str(self.state / "etcd"),
                "--name",
                "thaw",
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"thaw=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes",
                str(2 * 1024**3),
            ],
        )
        self._wait_http(f"http://127.0.0.1:{etcd_port}/health", "etcd")

        self._spawn(
            "kube-apiserver",
            [
                self._bin("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--cert-dir={pki}",
                "--profiling=false",
                "--enable-priority-and-fairness=false",
            ],
        )
        server = f"https://127.0.0.1:{api_port}"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._wait_http(
            f"{server}/readyz", "kube-apiserver", timeout=90, ctx=ctx, headers={"Authorization": f"Bearer {token}"}
        )
        import yaml

        self.kubeconfig_path.write_text(yaml.safe_dump(kubeconfig(server, pki / "ca.crt", token)))
        kc = str(self.kubeconfig_path)
        self._spawn(
            "kube-controller-manager",
            [
                self._bin("kube-controller-manager"),
                f"--kubeconfig={kc}",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--controllers=*,-nodeipam",
                "--secure-port=0",
                "--concurrent-gc-syncs=5",
                "--node-monitor-grace-period=60s",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                self._bin("kube-scheduler"),
                f"--kubeconfig={kc}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
        )
        kwok_port = free_port()
        self._spawn(
            "kwok",
            [
                self._bin("kwok"),
                f"--kubeconfig={kc}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--config={write_kwok_config(self.state)}",
                f"--server-address=127.0.0.1:{kwok_port}",
                "--node-lease-duration-seconds=40",
            ],
        )
        self.info_path.write_text(
            json.dumps(
                {
                    "server": server,
                    "kubeconfig": kc,
                    "pids": {n: p.pid for n, p in self.procs.items()},
                }
            )
        )
        self._wait_for_default_service_account()
        self.add_kwok_nodes(self.kwok_nodes)
        for i in range(self.process_nodes):
            self._spawn(
                f"process-{i}",
                [
                    sys.executable,
                    "-m",
                    "testbed.node_agent",
                    f"--kubeconfig={kc}",
                    f"--name=process-{i}",
                    f"--state={self.state / 'nodes' / f'process-{i}'}",
                ],
            )
        if self.process_nodes:
            self._wait_nodes("type=process", self.process_nodes)
        return self

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self._bin("kubectl"), f"--kubeconfig={self.kubeconfig_path}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
        )

    def _wait_for_default_service_account(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError("the default ServiceAccount never appeared (controller-manager not working?)")

    def add_kwok_nodes(self, count: int, timeout: float = 60) -> None:
        docs = []
        for i in range(count):
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": f"kwok-gpu-{i}",
                        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {
                            "type": "kwok",
                            "kubernetes.io/hostname": f"kwok-gpu-{i}",
                            "nvidia.com/gpu.present": "true",
                        },
                    },
                    "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
                    "status": {
                        "allocatable": {
                            "cpu": "32",
                            "memory": "256Gi",
                            "pods": "110",
                            "nvidia.com/gpu": str(self.gpus_per_node),
                        },
                        "capacity": {
                            "cpu": "32",
                            "memory": "256Gi",
                            "pods": "110",
                            "nvidia.com/gpu": str(self.gpus_per_node),
                        },
                    },
                }
            )
        if not docs:
            return
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        self._wait_nodes("type=kwok", count, timeout)

    def _wait_nodes(self, selector: str, count: int, timeout: float = 60) -> None:
        """`kubectl wait` fails at once when nothing matches yet, so poll for the nodes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            out = self.kubectl(
                "get",
                "node",
                "-l",
                selector,
                "-o",
                'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
                check=False,
            ).stdout.split()
            if len(out) >= count and all(s == "True" for s in out):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{count} Ready node(s) with {selector} did not appear in {timeout}s")

    def stop(self) -> None:
        # Node agents first, while the API server can still take their last words.
        order = sorted(self.procs, key=lambda n: not n.startswith("process-"))
        for name in order:
            _terminate(self.procs[name].pid)
            if name.startswith("process-"):
                try:
                    self.procs[name].wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _kill_group(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs.clear()
        shutil.rmtree(self.state / "pids", ignore_errors=True)


KWOK_VERSION = os.environ.get("KWOK_VERSION", "v0.8.0")
EXIT_CODE = "thaw.dev/kwok-exit-code"
DELAY = "thaw.dev/kwok-delay"
# The container's termination message of a pod whose thaw.dev/stage label is <k>, and an
# optional terminated reason (e.g. OOMKilled): what a trainer or a kubelet would report.
MESSAGE = "thaw.dev/kwok-message-"  # + stage index
REASON = "thaw.dev/kwok-reason"

# Pods annotated with EXIT_CODE end that way after DELAY (a Go duration, e.g. "3s").
EXIT_STAGE = {
    "apiVersion": "kwok.x-k8s.io/v1alpha1",
    "kind": "Stage",
    "metadata": {"name": "thaw-pod-exit"},
    "spec": {
        "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
        "selector": {
            "matchExpressions": [
                {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                {"key": f'.metadata.annotations["{EXIT_CODE}"]', "operator": "Exists"},
            ]
        },
        "delay": {"durationMilliseconds": 0, "durationFrom": {"expressionFrom": f'.metadata.annotations["{DELAY}"]'}},
        "next": {
            "statusTemplate": (
                "{{ $now := Now }}\n"
                "{{ $root := . }}\n"
                f'{{{{ $code := index .metadata.annotations "{EXIT_CODE}" }}}}\n'
                '{{ $stage := "" }}{{ with .metadata.labels }}{{ $stage = index . "thaw.dev/stage" }}{{ end }}\n'
                f'{{{{ $msg := index .metadata.annotations (printf "{MESSAGE}%v" $stage) }}}}\n'
                f'{{{{ $reason := index .metadata.annotations "{REASON}" }}}}\n'
                "containerStatuses:\n"
                "{{ range $index, $item := .spec.containers }}\n"
                "- image: {{ $item.image | Quote }}\n"
                "  name: {{ $item.name | Quote }}\n"
                "  ready: false\n"
                "  restartCount: 0\n"
                "  started: false\n"
                "  state:\n"
                "    terminated:\n"
                "      exitCode: {{ $code }}\n"
                "      finishedAt: {{ $now | Quote }}\n"
                "      reason: {{ if $reason }}{{ $reason }}"
                '{{ else if eq $code "0" }}Completed{{ else }}Error{{ end }}\n'
                "{{ if $msg }}      message: {{ $msg | Quote }}\n{{ end }}"
                "      startedAt: {{ $now | Quote }}\n"
                "{{ end }}\n"
                'phase: {{ if eq $code "0" }}Succeeded{{ else }}Failed{{ end }}\n'
            )
        },
    },
}


def write_kwok_config(state: Path) -> Path:
    """kwok's default node and pod stages, read from its module, plus our exit-code stage.

    Supplying any Stage drops kwok's defaults, so they are read back from the module cache
    (not copied into this repository) and the default pod-complete is kept away from pods
    that carry our annotation.
    """
    import yaml

    modcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(
        ["go", "mod", "download", f"sigs.k8s.io/kwok@{KWOK_VERSION}"], check=True, capture_output=True, cwd=state
    )
    base = Path(modcache) / f"sigs.k8s.io/kwok@{KWOK_VERSION}" / "kustomize" / "stage"
    files = [
        base / "node/fast/node-initialize.yaml",
        base / "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
        base / "pod/fast/pod-ready.yaml",
        base / "pod/fast/pod-complete.yaml",
        base / "pod/fast/pod-delete.yaml",
    ]
    docs = [yaml.safe_load(f.read_text()) for f in files]
    for d in docs:
        if d["metadata"]["name"] == "pod-complete":
            d["spec"]["selector"]["matchExpressions"].append(
                {"key": f'.metadata.annotations["{EXIT_CODE}"]', "operator": "DoesNotExist"}
            )
    docs.append(EXIT_STAGE)
    path = state / "kwok.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _terminate(pid: int) -> None:
    _kill_group(pid, signal.SIGTERM)


def stop_leftovers(state: Path) -> None:
    """Stop processes a previous run (a crashed test session, `make cluster-up`) left behind."""
    pids = state / "pids"
    if not pids.is_dir():
        return
    for f in pids.iterdir():
        try:
            pid = int(f.read_text())
        except ValueError:
            continue
        _terminate(pid)
    time.sleep(1)
    for f in pids.iterdir():
        try:
            _kill_group(int(f.read_text()), signal.SIGKILL)
        except ValueError:
            pass
    shutil.rmtree(pids, ignore_errors=True)
