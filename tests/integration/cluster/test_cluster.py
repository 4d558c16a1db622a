"""The local test bed behaves like a cluster: Jobs on kwok GPU nodes, podFailurePolicy,
garbage collection, RBAC, and a process node whose pods really run torch.distributed."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from testbed.control_plane import DELAY, EXIT_CODE
from tests.integration.cluster.conftest import ROOT, wait_for

pytestmark = pytest.mark.cluster

KWOK = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}


def job(name: str, pod_spec: dict, annotations: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {"restartPolicy": "Never", **pod_spec},
            },
            **spec,
        },
    }


def fake_container(gpus: int = 1) -> dict:
    return {"name": "main", "image": "fake", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}


def test_kwok_nodes_advertise_gpus(api):
    nodes = client.CoreV1Api(api).list_node(label_selector="type=kwok").items
    assert len(nodes) == 2
    assert all(n.status.allocatable["nvidia.com/gpu"] == "8" for n in nodes)


def test_job_on_kwok_gpu_nodes_completes(api, namespace):
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(
        namespace, job("ok", {**KWOK, "containers": [fake_container(4)]}, completions=2, parallelism=2)
    )
    done = wait_for(lambda: (batch.read_namespaced_job("ok", namespace).status.succeeded or 0) == 2, what="2 successes")
    assert done


def test_exit_137_is_retried_and_exit_42_fails_the_job_per_pod_failure_policy(api, namespace):
    batch = client.BatchV1Api(api)
    core = client.CoreV1Api(api)
    policy = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}},
            {"action": "Count", "onExitCodes": {"operator": "In", "values": [137]}},
        ]
    }
    pod = {**KWOK, "containers": [fake_container()]}
    batch.create_namespaced_job(
        namespace, job("oom", pod, {EXIT_CODE: "137", DELAY: "1s"}, backoffLimit=1, podFailurePolicy=policy)
    )
    batch.create_namespaced_job(
        namespace, job("bad", pod, {EXIT_CODE: "42", DELAY: "1s"}, backoffLimit=5, podFailurePolicy=policy)
    )

    def failed(name):
        conds = batch.read_namespaced_job(name, namespace).status.conditions or []
        return next((c for c in conds if c.type == "Failed" and c.status == "True"), None)

    oom = wait_for(lambda: failed("oom"), timeout=90, what="oom job to fail")
    assert oom.reason == "BackoffLimitExceeded"
    assert len(core.list_namespaced_pod(namespace, label_selector="job-name=oom").items) == 2, "137 was retried once"
    bad = wait_for(lambda: failed("bad"), timeout=90, what="bad job to fail")
    assert bad.reason == "PodFailurePolicy"
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=bad").items
    assert len(pods) == 1, "exit 42 fails the job without a retry"
    assert pods[0].status.container_statuses[0].state.terminated.exit_code == 42


def test_deleting_an_owner_garbage_collects_its_children(api, namespace):
    batch = client.BatchV1Api(api)
    core = client.CoreV1Api(api)
    batch.create_namespaced_job(
        namespace, job("gc", {**KWOK, "containers": [fake_container()]}, {EXIT_CODE: "0", DELAY: "600s"})
    )
    wait_for(lambda: core.list_namespaced_pod(namespace, label_selector="job-name=gc").items, what="pod of gc")
    batch.delete_namespaced_job("gc", namespace, propagation_policy="Background")
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector="job-name=gc").items,
        what="garbage collection of the pod",
    )


def test_service_account_without_permission_is_forbidden(api, namespace, cluster):
    from kubernetes import config

    core = client.CoreV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {"metadata": {"name": "pods"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token("reader", namespace, {"spec": {}}).status.token
    cfg = client.Configuration()
    base = config.new_client_from_config(str(cluster.kubeconfig_path)).configuration
    cfg.host, cfg.ssl_ca_cert = base.host, base.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    as_reader = client.CoreV1Api(client.ApiClient(cfg))
    wait_for(lambda: as_reader.list_namespaced_pod(namespace) is not None, what="RBAC to allow pods")
    with pytest.raises(ApiException) as err:
        as_reader.list_namespaced_secret(namespace)
    assert err.value.status == 403
    assert 'cannot list resource \\"secrets\\"' in err.value.body


ALL_REDUCE = """
import os, socket, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} on {socket.gethostname()} sum {t.item():.0f}", flush=True)
assert t.item() == 3.0
dist.destroy_process_group()
"""


def test_indexed_job_on_the_process_node_runs_a_two_process_all_reduce(api, namespace, cluster):
    run_all_reduce(api, namespace, cluster)


def test_process_node_pods_still_talk_while_a_docker_engine_runs(api, namespace, cluster):
    """dockerd sets FORWARD to DROP and loads br_netfilter (a `make demo` once hung in stage 0
    that way); the node agent accepts its bridge's traffic, even when the engine starts later.
    Under `make test` the engine may already run (hack/test.sh sets the kind cluster up in the
    background): then it is left running, and pods must talk beside it all the same."""
    docker = ["bash", str(ROOT / "hack" / "docker.sh")]
    running = subprocess.run([*docker, "env"], capture_output=True).returncode == 0
    up = subprocess.run([*docker, "up"], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    try:
        forward = subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True).stdout
        assert "-P FORWARD DROP" in forward or "DOCKER" in forward  # an engine's rules are in place
        run_all_reduce(api, namespace, cluster)
    finally:
        if not running:
            subprocess.run([*docker, "down"], capture_output=True, text=True)


def run_all_reduce(api, namespace, cluster):
    core = client.CoreV1Api(api)
    batch = client.BatchV1Api(api)
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "ddp"},
            "spec": {"clusterIP": "None", "selector": {"job-name": "allreduce"}, "publishNotReadyAddresses": True},
        },
    )
    env = [
        {"name": "MASTER_ADDR", "value": f"allreduce-0.ddp.{namespace}.svc.cluster.local"},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "WORLD_SIZE", "value": "2"},
        {
            "name": "RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    pod = {
        "subdomain": "ddp",
        "nodeSelector": {"type": "process"},
        "containers": [{"name": "main", "image": "thaw-trainer", "command": ["python", "-c", ALL_REDUCE], "env": env}],
    }
    batch.create_namespaced_job(
        namespace, job("allreduce", pod, completionMode="Indexed", completions=2, parallelism=2, backoffLimit=0)
    )
    wait_for(
        lambda: (batch.read_namespaced_job("allreduce", namespace).status.succeeded or 0) == 2,
        timeout=120,
        what="both ranks to succeed",
    )
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=allreduce").items
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 2 and all(ip.startswith("10.244.") for ip in ips)
    logs = sorted((cluster.state / "nodes" / "process-0" / "pods").glob(f"{namespace}_allreduce-*/main.log"))
    text = "".join(p.read_text() for p in logs)
    assert "rank 0 on allreduce-0 sum 3" in text and "rank 1 on allreduce-1 sum 3" in text


def _process_pod(name: str, script: str, **extra) -> dict:
    container = {"name": "main", "image": "thaw-trainer", "command": ["python", "-c", script], **extra.pop("c", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "nodeSelector": {"type": "process"}, "containers": [container], **extra},
    }


def _wait_running(core, namespace, name, cluster):
    """Waits for the pod to leave Pending; a pod that ended at once fails here saying how."""
    seen = []

    def started():
        seen.append(core.read_namespaced_pod(name, namespace))
        return seen[-1].status.phase not in (None, "Pending")

    try:
        wait_for(started, what=f"{name} to start")
    except AssertionError as err:
        raise AssertionError(f"{err}; its status: {seen[-1].status}") from None
    pod = seen[-1]
    logs = list((cluster.state / "nodes" / "process-0" / "pods").glob(f"{namespace}_{name}_*/main.log"))
    assert pod.status.phase == "Running", (
        f"{name} is {pod.status.phase}: {pod.status.container_statuses}; log: {logs[0].read_text() if logs else None}"
    )


def _terminated(core, namespace, name):
    pod = core.read_namespaced_pod(name, namespace)
    if pod.status.phase in ("Succeeded", "Failed"):
        return pod
    return None


def test_process_pod_gets_env_volumes_and_reports_exit_code(api, namespace, cluster):
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"key": "s3cret"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"mode": "fast", "a.txt": "A"}})
    script = (
        "import os, pathlib, socket\n"
        "e = os.environ\n"
        "print('ENV', e['SECRET'], e['MODE'], e['POD'], e['NS'], e['LIT'])\n"
        "print('FILE', pathlib.Path('/etc/cfg/a.txt').read_text(), pathlib.Path('/etc/creds/key').read_text())\n"
        "pathlib.Path('/scratch/x').write_text('ok'); print('EMPTYDIR', pathlib.Path('/scratch/x').read_text())\n"
        "print('CWD', os.getcwd(), 'HOST', socket.gethostname())\n"
        "import sys; print('ARGS', *sys.argv[1:])\n"
        "pathlib.Path('/dev/termination-log').write_text('last words')\n"
        "raise SystemExit(3)\n"
    )
    env = [
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "LIT", "value": "plain"},
    ]
    mounts = [
        {"name": "cfg", "mountPath": "/etc/cfg"},
        {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    volumes = [
        {"name": "cfg", "configMap": {"name": "cfg"}},
        {"name": "creds", "secret": {"secretName": "creds"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    core.create_namespaced_pod(
        namespace,
        _process_pod(
            "probe",
            script,
            hostname="probe-host",
            volumes=volumes,
            c={"env": env, "volumeMounts": mounts, "workingDir": "/tmp", "args": ["$(MODE)-arg", "$$(LIT)", "$(NOPE)"]},
        ),
    )
    pod = wait_for(lambda: _terminated(core, namespace, "probe"), timeout=60, what="probe pod to end")
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 3 and term.reason == "Error"
    assert term.message == "last words"  # the container's own /dev/termination-log
    log = next((cluster.state / "nodes" / "process-0" / "pods").glob(f"{namespace}_probe_*/main.log")).read_text()
    assert f"ENV s3cret fast probe {namespace} plain" in log
    assert "FILE A s3cret" in log and "EMPTYDIR ok" in log and "CWD /tmp HOST probe-host" in log
    assert "ARGS fast-arg $(LIT) $(NOPE)" in log  # $(VAR) expanded, $$ escaped, unknown kept
    assert not Path("/scratch/x").exists(), "the emptyDir was mounted in the pod's own mount namespace only"


def test_deleting_a_process_pod_sends_sigterm_then_sigkill(api, namespace, cluster, tmp_path):
    core = client.CoreV1Api(api)
    marker = tmp_path / "got-sigterm"
    polite = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path('{marker}').write_text('bye'), sys.exit(0)))\n"
        "print('ready', flush=True)\ntime.sleep(600)\n"
    )
    stubborn = "\n".join(
        [
            "import signal, time",
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
            "print('ready', flush=True)",
            "time.sleep(600)",
        ]
    )
    core.create_namespaced_pod(namespace, _process_pod("polite", polite))
    core.create_namespaced_pod(namespace, _process_pod("stubborn", stubborn))
    for name in ("polite", "stubborn"):
        _wait_running(core, namespace, name, cluster)
        wait_for(
            lambda n=name: (
                "ready"
                in next(
                    (cluster.state / "nodes" / "process-0" / "pods").glob(f"{namespace}_{n}_*/main.log")
                ).read_text()
            ),
            what=f"{name} ready",
        )
    core.delete_namespaced_pod("polite", namespace, grace_period_seconds=30)
    core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=2)

    def gone(name):
        try:
            core.read_namespaced_pod(name, namespace)
            return False
        except ApiException as err:
            return err.status == 404

    start = time.monotonic()
    wait_for(lambda: gone("polite"), timeout=20, what="polite pod to go")
    assert marker.read_text() == "bye", "SIGTERM reached the process"
    wait_for(lambda: gone("stubborn"), timeout=20, what="stubborn pod to be killed")
    assert time.monotonic() - start >= 1.5, "the grace period was honoured before SIGKILL"
