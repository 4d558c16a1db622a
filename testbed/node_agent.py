"""A process node: registers a real Node and runs every pod bound to it as local processes.

Test infrastructure standing in for a kubelet where no container runtime exists. Each pod
gets its own network namespace with an address on a bridge (so pods reach each other the
way they do on a cluster), a hosts file naming every `<hostname>.<subdomain>` pod on the
node, its own UTS namespace (hostname) and mount namespace (volumes bind-mounted at their
mountPath). The container "image" is assumed to be this repository's environment: the
command runs with the repository's virtualenv first on PATH.

Honoured: command/args (with Kubernetes' $(VAR) expansion), env (literal, fieldRef incl. annotations and status.podIP,
secretKeyRef, configMapKeyRef, resourceFieldRef is not), envFrom, workingDir, emptyDir /
configMap / secret / projected (service-account token) volumes, the termination message
file (terminationMessagePath, reported in the terminated state), restartPolicy Never,
deletion with SIGTERM then SIGKILL after the grace period, the memory limit (a cgroup v1
memory group; an OOM kill is reported as exit 137, reason OOMKilled). Not honoured: images,
init containers, probes, CPU and other limits, securityContext, restarts.

    python -m testbed.node_agent --kubeconfig K --name process-0 --state DIR
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = "thaw0"
SUBNET = ipaddress.ip_network(os.environ.get("THAW_POD_SUBNET", "10.244.0.0/24"))
# Where a pod's mount namespace keeps paths that one of its volumes would hide (see start_pod).
KEEP_DIR = Path("/run/thaw-keep")
# cgroup v1 memory controller: a container's memory limit is enforced by the kernel, and an
# OOM kill is reported as reason OOMKilled (exit 137), as a kubelet does.
MEMCG = Path("/sys/fs/cgroup/memory")
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (512Mi, 2G, 1e9, 1073741824) in bytes."""
    m = re.fullmatch(r"([0-9.e+]+)([kMGT]i?)?", str(quantity))
    if not m:
        raise ValueError(f"unsupported memory quantity {quantity!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


# The bridge's own address: pods reach services on the host (SeaweedFS, say) there.
GATEWAY = next(SUBNET.hosts())
NS_PREFIX = "thaw-"
log = logging.getLogger("node-agent")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args: defined variables are replaced,
    undefined ones stay as written, and $$ escapes a dollar."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


# A Docker engine on the same machine (hack/docker.sh) sets the FORWARD policy to DROP and
# loads br_netfilter, which then filters pod-to-pod traffic on this bridge too: accept it.
FORWARD_RULES = (("-i", BRIDGE), ("-o", BRIDGE))


def _iptables(*args: str) -> bool:
    return shutil.which("iptables") is not None and sh("iptables", "-w", *args, check=False).returncode == 0


def setup_bridge() -> None:
    if sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
    if str(GATEWAY) not in sh("ip", "-o", "addr", "show", "dev", BRIDGE).stdout:
        sh("ip", "addr", "add", f"{GATEWAY}/{SUBNET.prefixlen}", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    accept_bridge_traffic()


def accept_bridge_traffic() -> None:
    """Idempotent; also run for every new pod, since an engine may start after the bridge."""
    for flag, dev in FORWARD_RULES:
        if not _iptables("-C", "FORWARD", flag, dev, "-j", "ACCEPT"):
            _iptables("-I", "FORWARD", "1", flag, dev, "-j", "ACCEPT")


def teardown_network() -> None:
    """Remove every namespace and veth this agent (or a crashed one) created, and the bridge."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(NS_PREFIX):
            sh("ip", "netns", "delete", name, check=False)
            sh("rm", "-rf", f"/etc/netns/{name}", check=False)
    sh("ip", "link", "delete", BRIDGE, check=False)
    for flag, dev in FORWARD_RULES:
        while _iptables("-D", "FORWARD", flag, dev, "-j", "ACCEPT"):
            pass
    for cg in MEMCG.glob(f"{NS_PREFIX}*") if MEMCG.is_dir() else []:
        try:
            cg.rmdir()
        except OSError:
            pass
    # Keep-out mount points are mounted only inside pods' namespaces: here they are empty
    # directories. rmdir (never rm -r) removes nothing else even if that were not so.
    if KEEP_DIR.is_dir():
        for d in sorted(KEEP_DIR.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [KEEP_DIR]:
            try:
                d.rmdir()
            except OSError:
                pass


def _oom_killed(cg: Path | None) -> bool:
    if cg is None:
        return False
    try:
        stats = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
    except OSError:
        return False
    return int(stats.get("oom_kill", 0)) > 0


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    netns: str
    ip: str
    dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    started: dict[str, str] = field(default_factory=dict)
    deleting: bool = False
    finished: bool = False
    net_ready: bool = False
    names: list[str] = field(default_factory=list)
    cgroups: dict[str, Path] = field(default_factory=dict)  # container -> its memory cgroup
    released: bool = False  # network namespace, address and cgroups given back


class NodeAgent:
    def __init__(self, kubeconfig: str, name: str, state: Path):
        config.load_kube_config(kubeconfig)
        self.v1 = client.CoreV1Api()
        self.name = name
        self.state = state
        self.runs: dict[str, PodRun] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.used_ips: set[str] = set()
        self.last_ip = -1  # index of the last address given

    # -- node ---------------------------------------------------------------------------

    def register(self) -> None:
        cpu = str(os.cpu_count() or 2)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {"type": "process", "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux"},
            },
            "status": {
                "capacity": {"cpu": cpu, "memory": "16Gi", "pods": "20"},
                "allocatable": {"cpu": cpu, "memory": "16Gi", "pods": "20"},
                "conditions": self._conditions(),
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.name},
                ],
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "kubeletVersion": "v0.0.0-process",
                    "containerRuntimeVersion": "process://",
                    "kernelVersion": "",
                    "osImage": "thaw process node",
                    "bootID": "",
                    "machineID": "",
                    "systemUUID": "",
                    "kubeProxyVersion": "",
                },
            },
        }
        try:
            self.v1.create_node(node)
        except ApiException as err:
            if err.status != 409:
                raise
        self.heartbeat()

    def _conditions(self) -> list[dict]:
        t = now()
        return [
            {
                "type": "Ready",
                "status": "True",
                "reason": "ProcessNodeReady",
                "message": "running pods as processes",
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }
        ]

    def heartbeat(self) -> None:
        self.v1.patch_node_status(self.name, {"status": {"conditions": self._conditions()}})

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(10):
            try:
                self.heartbeat()
            except Exception as err:  # noqa: BLE001 - keep beating through API hiccups
                log.warning("heartbeat failed: %s", err)

    # -- pods ---------------------------------------------------------------------------

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.name}"
        while not self.stopping.is_set():
            try:
                w = watch.Watch()
                for ev in w.stream(self.v1.list_pod_for_all_namespaces, field_selector=selector, timeout_seconds=30):
                    if self.stopping.is_set():
                        break
                    self.handle(ev["type"], ev["object"])
            except Exception as err:  # noqa: BLE001 - re-list and go on, like a kubelet
                log.warning("watch interrupted: %s", err)
                time.sleep(1)

    def handle(self, kind: str, pod) -> None:
        uid = pod.metadata.uid
        with self.lock:
            run = self.runs.get(uid)
        if kind == "DELETED":
            if run:
                threading.Thread(target=self.kill, args=(run, 0), daemon=True).start()
            return
        if pod.metadata.deletion_timestamp is not None:
            if run and not run.deleting:
                run.deleting = True
                grace = pod.metadata.deletion_grace_period_seconds or 0
                threading.Thread(target=self.delete_pod, args=(run, pod, grace), daemon=True).start()
            elif run is None:
                self._force_delete(pod)
            return
        if run is None and pod.status.phase in (None, "Pending"):
            threading.Thread(target=self.start_pod, args=(pod,), daemon=True).start()

    def _alloc_ip(self) -> str:
        """The next free address after the last one given, as CNI's host-local IPAM does: an
        address just freed is not handed out again at once (a dying pod's namespace can keep it
        on the bridge for a moment, and its peers' ARP caches keep it longer)."""
        hosts = [str(h) for h in list(SUBNET.hosts())[1:]]
        with self.lock:
            for k in range(len(hosts)):
                ip = hosts[(self.last_ip + 1 + k) % len(hosts)]
                if ip not in self.used_ips:
                    self.used_ips.add(ip)
                    self.last_ip = hosts.index(ip)
                    return ip
        raise RuntimeError("pod subnet exhausted")

    def _status(
        self,
        pod,
        phase: str,
        containers: list[dict],
        reason: str | None = None,
        message: str | None = None,
        run: PodRun | None = None,
    ) -> None:
        ready = phase == "Running"
        t = now()
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": t},
                {"type": "Ready", "status": str(ready), "lastTransitionTime": t},
            ],
            "containerStatuses": containers,
        }
        if run is not None:
            status["podIP"] = run.ip
            status["podIPs"] = [{"ip": run.ip}]
            status["startTime"] = status.get("startTime") or t
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        # Retried until the API server takes it, as a kubelet's status manager does: a status
        # lost while the API server restarts would leave a finished pod Running for good.
        delay = 0.5
        while True:
            try:
                self.v1.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
                return
            except ApiException as err:
                if err.status < 500 and err.status != 429:
                    if err.status != 404:  # 404: the pod is gone, nothing to report
                        log.warning("status of %s/%s: %s", pod.metadata.namespace, pod.metadata.name, err.reason)
                    return
                reason = err.reason
            except Exception as err:  # noqa: BLE001 - connection refused or reset: the server is away
                reason = type(err).__name__
            if self.stopping.is_set():
                return
            log.warning(
                "status of %s/%s not sent (%s); again in %.1fs",
                pod.metadata.namespace,
                pod.metadata.name,
                reason,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    @staticmethod
    def _container(c, state: dict, running: bool = False, **extra) -> dict:
        """One containerStatuses entry, as a kubelet reports it."""
        return {
            "name": c.name,
            "image": c.image or "",
            "imageID": "",
            "ready": running,
            "restartCount": 0,
            "started": running,
            "state": state,
            **extra,
        }

    def _waiting(self, pod, reason: str, message: str) -> None:
        containers = [
            self._container(c, {"waiting": {"reason": reason, "message": message}}) for c in pod.spec.containers
        ]
        self._status(pod, "Pending", containers, reason, message)

    # env and volumes -------------------------------------------------------------------

    def _field(self, pod, path: str, ip: str) -> str:
        if path.startswith("metadata.annotations["):
            key = path[len("metadata.annotations[") : -1].strip("'\"")
            return (pod.metadata.annotations or {}).get(key, "")
        if path.startswith("metadata.labels["):
            key = path[len("metadata.labels[") : -1].strip("'\"")
            return (pod.metadata.labels or {}).get(key, "")
        return {
            "metadata.name": pod.metadata.name,
            "metadata.namespace": pod.metadata.namespace,
            "metadata.uid": pod.metadata.uid,
            "spec.nodeName": self.name,
            "spec.serviceAccountName": pod.spec.service_account_name or "",
            "status.podIP": ip,
            "status.hostIP": "127.0.0.1",
        }[path]

    def _key(self, kind: str, ns: str, name: str, key: str, optional: bool) -> str | None:
        try:
            if kind == "secret":
                data = self.v1.read_namespaced_secret(name, ns).data or {}
                value = data.get(key)
                value = base64.b64decode(value).decode() if value is not None else None
            else:
                value = (self.v1.read_namespaced_config_map(name, ns).data or {}).get(key)
        except ApiException as err:
            if err.status != 404:
                raise
            value = None
        if value is None and not optional:
            raise LookupError(f"{kind} {ns}/{name} has no key {key!r}")
        return value

    def _env(self, pod, container, ip: str) -> dict[str, str]:
        ns = pod.metadata.namespace
        venv = ROOT / ".venv" / "bin"
        env = {
            "PATH": f"{venv}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "HOSTNAME": pod.spec.hostname or pod.metadata.name,
            "LANG": "C.UTF-8",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        }
        for src in container.env_from or []:
            ref = src.config_map_ref or src.secret_ref
            kind = "secret" if src.secret_ref else "configmap"
            try:
                if kind == "secret":
                    items = {
                        k: base64.b64decode(v).decode()
                        for k, v in (self.v1.read_namespaced_secret(ref.name, ns).data or {}).items()
                    }
                else:
                    items = self.v1.read_namespaced_config_map(ref.name, ns).data or {}
            except ApiException as err:
                if err.status == 404 and ref.optional:
                    continue
                raise LookupError(f"{kind} {ns}/{ref.name} not found") from err
            env.update({(src.prefix or "") + k: v for k, v in items.items()})
        for e in container.env or []:
            if e.value_from is None:
                env[e.name] = e.value or ""
                continue
            vf = e.value_from
            if vf.field_ref is not None:
                env[e.name] = self._field(pod, vf.field_ref.field_path, ip)
            elif vf.secret_key_ref is not None:
                v = self._key(
                    "secret", ns, vf.secret_key_ref.name, vf.secret_key_ref.key, bool(vf.secret_key_ref.optional)
                )
                if v is not None:
                    env[e.name] = v
            elif vf.config_map_key_ref is not None:
                r = vf.config_map_key_ref
                v = self._key("configmap", ns, r.name, r.key, bool(r.optional))
                if v is not None:
                    env[e.name] = v
        return env

    def _volumes(self, pod, run: PodRun) -> dict[str, Path]:
        out = {}
        ns = pod.metadata.namespace
        for vol in pod.spec.volumes or []:
            d = run.dir / "volumes" / vol.name
            d.mkdir(parents=True, exist_ok=True)
            if vol.config_map is not None:
                self._write_items(
                    d, self.v1.read_namespaced_config_map(vol.config_map.name, ns).data or {}, vol.config_map.items
                )
            elif vol.secret is not None:
                data = self.v1.read_namespaced_secret(vol.secret.secret_name, ns).data or {}
                self._write_items(d, {k: base64.b64decode(v).decode() for k, v in data.items()}, vol.secret.items)
            elif vol.projected is not None:
                for src in vol.projected.sources:
                    if src.service_account_token is not None:
                        tok = self.v1.create_namespaced_service_account_token(
                            pod.spec.service_account_name or "default",
                            ns,
                            {
                                "spec": {
                                    "audiences": [src.service_account_token.audience]
                                    if src.service_account_token.audience
                                    else None,
                                    "expirationSeconds": src.service_account_token.expiration_seconds or 3600,
                                    "boundObjectRef": {
                                        "kind": "Pod",
                                        "apiVersion": "v1",
                                        "name": pod.metadata.name,
                                        "uid": pod.metadata.uid,
                                    },
                                }
                            },
                        )
                        (d / src.service_account_token.path).write_text(tok.status.token)
                    elif src.config_map is not None:
                        self._write_items(
                            d,
                            self.v1.read_namespaced_config_map(src.config_map.name, ns).data or {},
                            src.config_map.items,
                        )
                    elif src.downward_api is not None:
                        for item in src.downward_api.items or []:
                            if item.field_ref is not None:
                                (d / item.path).write_text(self._field(pod, item.field_ref.field_path, run.ip))
            elif vol.empty_dir is None:
                raise LookupError(f"volume {vol.name}: only emptyDir, configMap, secret and projected are supported")
            out[vol.name] = d
        return out

    @staticmethod
    def _write_items(d: Path, data: dict[str, str], items) -> None:
        mapping = {i.key: i.path for i in items} if items else {k: k for k in data}
        for key, path in mapping.items():
            if key in data:
                (d / path).parent.mkdir(parents=True, exist_ok=True)
                (d / path).write_text(data[key])

    # lifecycle -------------------------------------------------------------------------

    def _network(self, run: PodRun, hostname: str) -> None:
        ns = run.netns
        accept_bridge_traffic()
        sh("ip", "netns", "add", ns)
        veth = "vt" + run.uid.replace("-", "")[:10]
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{run.ip}/{SUBNET.prefixlen}", "dev", "eth0")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)

    def _names(self, pod) -> list[str]:
        h = pod.spec.hostname or pod.metadata.name
        sub = pod.spec.subdomain
        if not sub:
            return [h]
        ns = pod.metadata.namespace
        return [f"{h}.{sub}.{ns}.svc.cluster.local", f"{h}.{sub}.{ns}.svc", f"{h}.{sub}.{ns}", f"{h}.{sub}", h]

    def write_hosts(self) -> None:
        """Every pod's hosts file names every pod on the node (rewritten in place: the file
        is bind-mounted over /etc/hosts, so its inode must stay the same)."""
        with self.lock:
            runs = [r for r in self.runs.values() if r.net_ready and not r.finished]
            lines = ["127.0.0.1 localhost", "::1 localhost"]
            for r in runs:
                lines.append(f"{r.ip} {' '.join(r.names)}")
            text = "\n".join(lines) + "\n"
            for r in runs:
                path = Path(f"/etc/netns/{r.netns}/hosts")
                with open(path, "a+") as f:
                    f.seek(0)
                    f.truncate()
                    f.write(text)

    def start_pod(self, pod) -> None:
        try:
            self._start_pod(pod)
        except Exception as err:  # noqa: BLE001 - a pod that cannot start fails, the agent goes on
            log.exception("starting %s/%s", pod.metadata.namespace, pod.metadata.name)
            run = self.runs.get(pod.metadata.uid)
            if run is not None:
                self._finish(pod, run, {c.name: (128, "StartError") for c in pod.spec.containers}, str(err))

    def _start_pod(self, pod) -> None:
        uid = pod.metadata.uid
        with self.lock:
            # A second event for a pod being started (a watch re-list, a status echo) finds it
            # here before it takes an address: one taken and dropped would never be given back.
            if uid in self.runs:
                return
            ip = self._alloc_ip()
            run = PodRun(
                uid,
                pod.metadata.namespace,
                pod.metadata.name,
                NS_PREFIX + uid[:8],
                ip,
                self.state / "pods" / f"{pod.metadata.namespace}_{pod.metadata.name}_{uid[:8]}",
            )
            run.names = self._names(pod)
            self.runs[uid] = run
        run.dir.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                volumes = self._volumes(pod, run)
                envs = {c.name: self._env(pod, c, ip) for c in pod.spec.containers}
                break
            except LookupError as err:
                self._waiting(pod, "CreateContainerConfigError", str(err))
                if run.deleting or self.stopping.wait(2):
                    return
        self._network(run, pod.spec.hostname or pod.metadata.name)
        run.net_ready = True
        self.write_hosts()
        hostname = (pod.spec.hostname or pod.metadata.name)[:63]
        for c in pod.spec.containers:
            if not c.command and not c.args:
                self._finish(pod, run, {c.name: (128, "NoCommand")})
                return
            # A per-container file at terminationMessagePath, read back when the container ends.
            term = run.dir / f"{c.name}.termination-log"
            term.write_text("")
            term_path = c.termination_message_path or "/dev/termination-log"
            mounts = [
                f"touch {shlex.quote(term_path)} && mount --bind {shlex.quote(str(term))} {shlex.quote(term_path)}"
            ]
            # A mount over an ancestor of this repository or of the agent's state dir (an
            # emptyDir at /tmp while both live under /tmp, say) would hide the pod's program
            # and the other volumes' sources. Those two are first bound to a keep-out place
            # and bound back inside the new mount; such mounts go last.
            keep = [Path(ROOT), self.state]
            hides = lambda m, keep=keep: any(k.is_relative_to(m.mount_path) for k in keep)
            held = KEEP_DIR / run.uid[:8]
            if any(hides(m) for m in c.volume_mounts or []):
                for i, k in enumerate(keep):
                    mounts.append(f"mkdir -p {held}/{i} && mount --bind {shlex.quote(str(k))} {held}/{i}")
            for m in sorted(c.volume_mounts or [], key=hides):
                src = volumes[m.name] / (m.sub_path or "")
                target = shlex.quote(m.mount_path)
                mounts.append(f"mkdir -p {target} && mount --bind {shlex.quote(str(src))} {target}")
                if m.read_only:
                    mounts.append(f"mount -o remount,bind,ro {target}")
                if hides(m):
                    for i, k in enumerate(keep):
                        if k.is_relative_to(m.mount_path):
                            mounts.append(
                                f"mkdir -p {shlex.quote(str(k))} && mount --bind {held}/{i} {shlex.quote(str(k))}"
                            )
            limits = (c.resources.limits if c.resources else None) or {}
            enter = []
            if limits.get("memory") and MEMCG.is_dir():
                cg = MEMCG / f"{NS_PREFIX}{run.uid[:8]}-{c.name}"
                cg.mkdir(exist_ok=True)
                (cg / "memory.limit_in_bytes").write_text(str(memory_bytes(limits["memory"])))
                run.cgroups[c.name] = cg
                # Joined before `ip netns exec`, which mounts a sysfs without the cgroup tree;
                # every process the container starts inherits the group.
                enter = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]
            script = "; ".join(
                [
                    "set -e",
                    "mount --make-rprivate /",
                    f"hostname {shlex.quote(hostname)}",
                    *mounts,
                    f"cd {shlex.quote(c.working_dir or str(ROOT))}",
                    'exec "$@"',
                ]
            )
            argv = [
                *enter,
                "ip",
                "netns",
                "exec",
                run.netns,
                "unshare",
                "--uts",
                "--mount",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                script,
                "sh",
                *(expand(a, envs[c.name]) for a in (c.command or [])),
                *(expand(a, envs[c.name]) for a in (c.args or [])),
            ]
            logf = open(run.dir / f"{c.name}.log", "ab")
            run.procs[c.name] = subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, env=envs[c.name], start_new_session=True
            )
            run.started[c.name] = now()
        self._status(pod, "Running", [self._running(c, run) for c in pod.spec.containers], run=run)
        codes = {}
        for name, p in run.procs.items():
            rc = p.wait()
            code = 128 - rc if rc < 0 else rc
            if code and _oom_killed(run.cgroups.get(name)):
                # The kernel SIGKILLed the container's process (what a runtime reports as 137);
                # the unshare wrapper around it may exit otherwise.
                codes[name] = (137, "OOMKilled")
            else:
                codes[name] = (code, None)
        self._finish(pod, run, codes)

    def _running(self, c, run: PodRun) -> dict:
        return self._container(
            c,
            {"running": {"startedAt": run.started[c.name]}},
            running=True,
            containerID=f"process://{run.procs[c.name].pid}",
        )

    def _finish(self, pod, run: PodRun, codes: dict[str, tuple[int, str | None]], message: str | None = None) -> None:
        if run.deleting:
            return  # the deletion path reports the pod's end itself (delete_pod)
        self._report_terminated(pod, run, codes, message)
        run.finished = True
        self._release(run)

    def _report_terminated(
        self, pod, run: PodRun, codes: dict[str, tuple[int, str | None]], message: str | None = None
    ) -> None:
        t = now()
        containers = []
        for c in pod.spec.containers:
            code, reason = codes.get(c.name, (0, None))
            reason = reason or ("Completed" if code == 0 else "Error")
            started = run.started.get(c.name, t)
            terminated = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": t}
            term = run.dir / f"{c.name}.termination-log"
            if term.is_file() and term.stat().st_size:
                terminated["message"] = term.read_text()[:4096]
            containers.append(self._container(c, {"terminated": terminated}))
        phase = "Succeeded" if all(code == 0 for code, _ in codes.values()) else "Failed"
        self._status(pod, phase, containers, message=message, run=run)
        log.info("%s/%s %s %s", run.namespace, run.name, phase, {k: v[0] for k, v in codes.items()})

    def kill(self, run: PodRun, grace: float) -> None:
        for p in run.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in run.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self._release(run)

    def _release(self, run: PodRun) -> None:
        # Every process left in the pod's network namespace dies with it, as with a container's
        # PID namespace: torchrun starts workers in sessions of their own, which a signal to the
        # process group misses; one left behind would keep the pod's address alive on the bridge.
        for pid in sh("ip", "netns", "pids", run.netns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for cg in run.cgroups.values():
            try:
                cg.rmdir()
            except OSError:  # still has a process (being killed): the next sweep removes it
                log.warning("memory cgroup %s not removed yet", cg)
        sh("ip", "netns", "delete", run.netns, check=False)
        sh("rm", "-rf", f"/etc/netns/{run.netns}", check=False)
        with self.lock:
            # Once per pod: a second release (the pod finished, then its DELETED event) must not
            # free an address a newer pod was given meanwhile (two pods with one IP on the bridge).
            if not run.released:
                run.released = True
                self.used_ips.discard(run.ip)

    def delete_pod(self, run: PodRun, pod, grace: int) -> None:
        self.kill(run, grace)
        with self.lock:
            self.runs.pop(run.uid, None)
        if not run.finished:
            # As a kubelet does: the terminal phase (143 after SIGTERM, 137 after SIGKILL) goes to
            # the API server before the pod is removed; the Job controller's pod-tracking finalizer
            # waits for it, so without it a deleted pod stays Terminating for good.
            codes = {n: (128 - p.returncode if p.returncode < 0 else p.returncode, None) for n, p in run.procs.items()}
            self._report_terminated(pod, run, codes)
        self._force_delete(pod)

    def _force_delete(self, pod) -> None:
        try:
            self.v1.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions={"uid": pod.metadata.uid}),
            )
        except ApiException as err:
            if err.status not in (404, 409):
                log.warning("deleting %s/%s: %s", pod.metadata.namespace, pod.metadata.name, err.reason)

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:
            runs = list(self.runs.values())
        for r in runs:
            r.deleting = True
            self.kill(r, 2)
        teardown_network()
        try:
            self.v1.delete_node(self.name)
        except Exception:  # noqa: BLE001 - the API server may already be gone
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--name", default="process-0")
    ap.add_argument("--state", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    teardown_network()
    setup_bridge()
    agent = NodeAgent(args.kubeconfig, args.name, args.state)
    agent.register()

    def stop(*_):
        agent.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=agent.heartbeat_loop, daemon=True).start()
    agent.watch_pods()


if __name__ == "__main__":
    main()
