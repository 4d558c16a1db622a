"""Stage Jobs queued by a real Kueue controller (built from sigs.k8s.io/kueue): quota for one
stage at a time, two FineTuneJobs taking turns, and a FineTuneJob suspended and resumed
through its Workload without the operator and Kueue fighting over the Job's suspend field."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client, watch

from testbed.control_plane import DELAY, EXIT_CODE
from testbed.kueue import start_kueue, stop_kueue
from tests.integration.cluster.conftest import wait_for
from tests.integration.cluster.test_operator import Api, ftj_doc, reported

pytestmark = pytest.mark.cluster
KQ = ("kueue.x-k8s.io", "v1beta2")


@pytest.fixture(scope="module")
def kueue(cluster):
    start_kueue(cluster)
    yield
    proc = cluster.procs.pop("kueue")
    proc.terminate()
    proc.wait(timeout=30)
    stop_kueue()


@pytest.fixture
def queue(kueue, api, namespace):
    """A LocalQueue 'lq' in the test namespace whose ClusterQueue has 2 GPUs: one 2-pod stage at a time."""
    custom = client.CustomObjectsApi(api)
    flavor = {"apiVersion": "/".join(KQ), "kind": "ResourceFlavor", "metadata": {"name": "gpu"}}
    try:
        custom.create_cluster_custom_object(*KQ, "resourceflavors", flavor)
    except client.exceptions.ApiException as err:
        if err.status != 409:
            raise
    cq = {
        "apiVersion": "/".join(KQ),
        "kind": "ClusterQueue",
        "metadata": {"name": f"cq-{namespace}"},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "resourceGroups": [
                {
                    "coveredResources": ["nvidia.com/gpu"],
                    "flavors": [{"name": "gpu", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 2}]}],
                }
            ],
        },
    }
    custom.create_cluster_custom_object(*KQ, "clusterqueues", cq)
    lq = {
        "apiVersion": "/".join(KQ),
        "kind": "LocalQueue",
        "metadata": {"name": "lq", "namespace": namespace},
        "spec": {"clusterQueue": f"cq-{namespace}"},
    }
    custom.create_namespaced_custom_object(*KQ, namespace, "localqueues", lq)
    yield "lq"
    custom.delete_cluster_custom_object(*KQ, "clusterqueues", f"cq-{namespace}")


def queued_doc(name: str, tmp_path, queue: str, delay: str, stages: int = 2) -> dict:
    results = {k: 0.5 + k / 10 for k in range(stages)}
    doc = ftj_doc(
        name,
        f"file://{tmp_path}/store",
        stages=stages,
        gpusPerNode=1,
        podAnnotations={EXIT_CODE: "0", DELAY: delay, **reported(results)},
    )
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": queue}
    return doc


def test_two_finetunejobs_take_turns_on_quota_for_one_stage(queue, api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    running_at_once: list[int] = []
    stop = threading.Event()

    def record():  # how many stage Jobs ran (unsuspended, unfinished) at once, at every change
        w = watch.Watch()
        state: dict[str, bool] = {}
        for event in w.stream(k.batch.list_namespaced_job, namespace, timeout_seconds=300):
            j = event["object"]
            done = any(c.type in ("Complete", "Failed") and c.status == "True" for c in j.status.conditions or [])
            state[j.metadata.name] = not j.spec.suspend and not done and event["type"] != "DELETED"
            running_at_once.append(sum(state.values()))
            if stop.is_set():
                w.stop()

    threading.Thread(target=record, daemon=True).start()
    try:
        for name in ("qa", "qb"):
            k.create(queued_doc(name, tmp_path, queue, "3s"))
        phases = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(phases.get(n) == "Succeeded" for n in ("qa", "qb")):
            for n in ("qa", "qb"):
                phases[n] = k.status(n).get("phase")
                if phases[n] == "Queued":
                    phases[f"{n}-was-queued"] = True
            time.sleep(0.3)
    finally:
        stop.set()
    assert phases["qa"] == phases["qb"] == "Succeeded", phases
    assert phases.get("qa-was-queued") or phases.get("qb-was-queued"), "neither waited for quota"
    assert max(running_at_once) == 1, running_at_once  # quota for one stage: they took turns
    for n in ("qa", "qb"):
        assert [s["attempts"] for s in k.status(n)["stages"]] == [1, 1]
        assert sorted(k.jobs(n)) == [f"{n}-0-a1", f"{n}-1-a1"]


def test_a_queued_finetunejob_suspends_and_resumes_through_its_workload(queue, api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    custom = client.CustomObjectsApi(api)
    held = queued_doc("held", tmp_path, queue, "3s", stages=1)
    held["spec"]["suspend"] = True
    k.create(held)  # suspended from the start: nothing is created, nothing runs
    k.phase("held", "Suspended", 30)

    k.create(queued_doc("pausing", tmp_path, queue, "30s", stages=1))
    pods = lambda: [
        p
        for p in k.core.list_namespaced_pod(namespace, label_selector="thaw.dev/finetunejob=pausing").items
        if p.status.phase == "Running"
    ]
    wait_for(lambda: len(pods()) == 2, 60, what="stage 0 admitted by Kueue and running")
    k.patch("pausing", {"suspend": True})
    k.phase("pausing", "Suspended", 30)
    workload = lambda: next(
        w
        for w in custom.list_namespaced_custom_object(*KQ, namespace, "workloads")["items"]
        if w["metadata"]["ownerReferences"][0]["name"] == "pausing-0-a1"
    )
    wait_for(lambda: workload()["spec"]["active"] is False, 30, what="its Workload deactivated")
    wait_for(lambda: not pods(), 60, what="Kueue stopped the pods")
    # Nothing fights: for 10 s the Job stays suspended and the FineTuneJob stays Suspended.
    for _ in range(20):
        assert k.batch.read_namespaced_job("pausing-0-a1", namespace).spec.suspend is True
        assert k.status("pausing")["phase"] == "Suspended"
        time.sleep(0.5)
    assert "held-0-a1" not in k.jobs("held")
    k.patch("pausing", {"suspend": False})
    wait_for(lambda: workload()["spec"]["active"] is True, 30, what="its Workload active again")
    st = k.phase("pausing", "Succeeded", 120)  # re-admitted; new pods run the stage to its end
    assert st["stages"][0]["attempts"] == 1  # resumed, not retried
