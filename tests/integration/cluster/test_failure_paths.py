"""Failure paths of the operator against the real API server (stage pods on kwok): one broken
job never stalls the others, children it does not own are never adopted, the job file follows
mutable fields, a vanished stage Job costs an attempt, the FineTuneJob's TTL, the server-side
filtered Job watch, and two replicas of which exactly one acts."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import yaml
from kubernetes import client, watch

from testbed.control_plane import DELAY, EXIT_CODE
from testbed.operator_process import OperatorProcess
from tests.integration.cluster.conftest import wait_for
from tests.integration.cluster.test_operator import KWOK, Api, ftj_doc, reported

pytestmark = pytest.mark.cluster
OK = {EXIT_CODE: "0", DELAY: "300ms"}


def test_one_broken_job_among_ten_good_ones_and_all_ten_succeed(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    # The broken one: a ConfigMap with its job file's name exists and belongs to nobody (a
    # leftover of a deleted job of the same name). It must never become the job file.
    k.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "broken-job"}, "data": {"job.yaml": "not: yours\n"}}
    )
    k.create(ftj_doc("broken", f"file://{tmp_path}/store", stages=1, podAnnotations={**OK, **reported({0: 0.5})}))
    for i in range(10):
        annotations = {**OK, **reported({0: 0.5 + i / 100, 1: 0.6 + i / 100})}
        k.create(ftj_doc(f"good{i}", f"file://{tmp_path}/store", stages=2, podAnnotations=annotations))
    for i in range(10):
        st = k.phase(f"good{i}", "Succeeded", 120)
        assert st["valAccuracy"] == pytest.approx(0.6 + i / 100)
    st = k.status("broken")
    stalled = next(c for c in st.get("conditions", []) if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ReconcileError"
    assert "ConfigMap" in stalled["message"] and "broken-job" in stalled["message"]
    assert "not owned by this FineTuneJob" in stalled["message"]
    wait_for(lambda: any(r == "ReconcileError" and "broken-job" in m for r, m in k.events("broken")), 30, what="event")
    assert not k.jobs("broken")  # nothing started on a job file that is not its own
    cm = k.core.read_namespaced_config_map("broken-job", namespace)
    assert cm.data == {"job.yaml": "not: yours\n"} and not cm.metadata.owner_references
    # Once the stranger is gone, the job goes on and the condition clears.
    k.core.delete_namespaced_config_map("broken-job", namespace)
    st = k.phase("broken", "Succeeded", 60)
    assert all(c["type"] != "Stalled" for c in st["conditions"])


def test_a_pod_that_only_wears_a_stage_jobs_labels_cannot_report_its_result(api, namespace, operator, tmp_path):
    """Anyone who may create pods in the namespace can copy a stage pod's labels and index. Such a
    pod, ending Succeeded with a forged result, is ignored (a Warning event, status.ignoredPods):
    the stage's first attempt, whose own pods report nothing, is retried, and the job's result is
    the one its own pods report."""
    from thaw_operator import resources as res
    from thaw_operator.observe import INDEX_ANNOTATION

    k = Api(api, namespace)
    doc = ftj_doc(
        "forge",
        f"file://{tmp_path}/store",
        stages=1,
        podAnnotations={EXIT_CODE: "0", DELAY: "6s"},
        runPolicy={"retriesPerStage": 1},
    )
    k.create(doc)
    wait_for(lambda: "forge-0-a1" in k.jobs("forge"), 30, what="stage 0")
    forged = {
        "metadata": {
            "name": "forge-0-a1-0-forged",
            "labels": {
                res.LABEL_JOB: "forge",
                res.LABEL_STAGE: "0",
                res.LABEL_ATTEMPT: "1",
                "batch.kubernetes.io/job-name": "forge-0-a1",
                "job-name": "forge-0-a1",
            },
            "annotations": {INDEX_ANNOTATION: "0", **OK, **reported({0: 0.99}, store="s3://evil/store")},
        },
        "spec": {
            "nodeName": "kwok-gpu-0",
            "tolerations": KWOK["tolerations"],
            "containers": [{"name": "trainer", "image": "thaw/trainer:forged"}],
        },
    }
    k.core.create_namespaced_pod(namespace, forged)
    k.patch("forge", {"podAnnotations": {**OK, **reported({0: 0.5})}})  # what attempt 2's own pods report
    st = k.phase("forge", "Succeeded", 120)
    assert st["stages"][0]["checkpoint"] == "s3://kwok/store/head/epoch-0000", st["stages"][0]
    assert st["valAccuracy"] == pytest.approx(0.5) and st["stages"][0]["attempts"] == 2
    assert st["ignoredPods"] == ["forge-0-a1-0-forged"]
    # The API server's ServiceAccount admission mounts a token into a pod unless told not to: the
    # forged pod got one, the stage pods none (automountServiceAccountToken: false).
    pods = k.core.list_namespaced_pod(namespace, label_selector=f"{res.LABEL_JOB}=forge").items
    tokens = {p.metadata.name: any(v.name.startswith("kube-api-access") for v in p.spec.volumes or []) for p in pods}
    assert tokens.pop("forge-0-a1-0-forged") is True and tokens and not any(tokens.values()), tokens
    wait_for(
        lambda: any(r == "ForeignPodIgnored" and "forge-0-a1-0-forged" in m for r, m in k.events("forge")),
        30,
        what="the ForeignPodIgnored event",
    )


def test_the_job_file_follows_mutable_fields_for_the_next_stage(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    doc = ftj_doc(
        "mutable",
        f"file://{tmp_path}/store",
        stages=2,
        podAnnotations={EXIT_CODE: "0", DELAY: "3s", **reported({0: 0.5})},
    )
    k.create(doc)
    wait_for(lambda: "mutable-0-a1" in k.jobs("mutable"), 30, what="stage 0")
    job_file = lambda: yaml.safe_load(k.core.read_namespaced_config_map("mutable-job", namespace).data["job.yaml"])
    assert job_file()["spec"]["data"]["workers"] == "auto"  # the default, as the API server filled it in
    k.patch("mutable", {"data": {"workers": 2}, "podAnnotations": {**OK, **reported({0: 0.5, 1: 0.6})}})
    k.phase("mutable", "Succeeded", 60)
    assert job_file()["spec"]["data"]["workers"] == 2  # what stage 1's pods read


def test_a_stage_job_deleted_before_it_finished_costs_an_attempt(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    doc = ftj_doc(
        "vanish",
        f"file://{tmp_path}/store",
        stages=1,
        podAnnotations={EXIT_CODE: "0", DELAY: "60s"},
        runPolicy={"retriesPerStage": 1},
    )
    k.create(doc)
    wait_for(lambda: "vanish-0-a1" in k.jobs("vanish"), 30, what="stage 0")
    k.batch.delete_namespaced_job("vanish-0-a1", namespace, propagation_policy="Background")
    wait_for(lambda: "vanish-0-a2" in k.jobs("vanish"), 30, what="a second attempt")
    # The Job is created before the status that counts it (children first): wait for both.
    wait_for(lambda: k.status("vanish")["stages"][0]["attempts"] == 2, 10, what="attempt 2 in the status")
    wait_for(
        lambda: any("vanish-0-a1 was deleted" in m for r, m in k.events("vanish") if r == "StageRetrying"),
        30,
        what="the StageRetrying event",
    )
    k.batch.delete_namespaced_job("vanish-0-a2", namespace, propagation_policy="Background")
    st = k.phase("vanish", "Failed", 30)  # the budget counts it: no third attempt
    assert "retries exhausted" in st["message"] and sorted(k.jobs("vanish")) == []


def test_the_finetunejobs_ttl_removes_its_stage_jobs_once_it_finished(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    doc = ftj_doc(
        "ttl",
        f"file://{tmp_path}/store",
        stages=2,
        podAnnotations={**OK, **reported({0: 0.5, 1: 0.6})},
        runPolicy={"ttlSecondsAfterFinished": 3},
    )
    k.create(doc)
    wait_for(lambda: "ttl-0-a1" in k.jobs("ttl"), 30, what="stage 0")
    assert k.jobs("ttl")["ttl-0-a1"].spec.ttl_seconds_after_finished is None  # not the stage Job's own
    k.phase("ttl", "Succeeded", 60)
    wait_for(lambda: not k.jobs("ttl"), 30, what="stage Jobs removed after the TTL")
    time.sleep(2)
    st = k.status("ttl")
    assert st["phase"] == "Succeeded" and [s["attempts"] for s in st["stages"]] == [1, 1]


def test_the_stage_job_watch_cache_is_filtered_by_the_api_server(api, namespace, cluster):
    """Jobs without the thaw label never reach the operator (kopf filters labels client-side),
    and the cache holds the labelled one, slimmed, under its FineTuneJob."""
    from thaw_operator import observe
    from thaw_operator import resources as res
    from thaw_operator.informer import Informer

    batch = client.BatchV1Api(api)
    seen: list[str] = []
    cache = Informer(
        "Job",
        batch.list_namespaced_job,
        (namespace,),
        observe.slim_job,
        res.LABEL_JOB,
        on_change=lambda job: seen.append(job["metadata"]["name"]),
    )
    stop = threading.Event()
    threading.Thread(target=cache.run, args=(stop,), daemon=True).start()
    spec = {
        "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}},
        "suspend": True,
    }
    try:
        wait_for(cache.synced.is_set, 30, what="the first list")
        for i in range(5):
            batch.create_namespaced_job(namespace, {"metadata": {"name": f"other-{i}"}, "spec": spec})
        batch.create_namespaced_job(
            namespace, {"metadata": {"name": "ours", "labels": {res.LABEL_JOB: "x"}}, "spec": spec}
        )
        wait_for(lambda: "ours" in seen, 30, what="the labelled Job's event")
        time.sleep(1)
        assert set(seen) == {"ours"}, seen
        (held,) = cache.by_label(namespace, "x")
        assert held["spec"] == {"suspend": True} and "template" not in str(held) and len(cache) == 1
        batch.delete_namespaced_job("ours", namespace, propagation_policy="Background")
        wait_for(lambda: len(cache) == 0, 30, what="the deletion to leave the cache")
    finally:
        stop.set()


def test_two_replicas_one_acts_and_the_other_takes_over_without_duplicates(cluster, crd, api, namespace, tmp_path):
    k = Api(api, namespace)
    creates: Counter = Counter()
    stop = threading.Event()

    def record_creates():  # every Job ever created for this namespace, from the API server's own stream
        version = None  # each watch resumes where the last ended: no create is missed or counted twice
        while not stop.is_set():
            try:
                for event in watch.Watch().stream(
                    k.batch.list_namespaced_job, namespace, timeout_seconds=5, resource_version=version
                ):
                    version = event["object"].metadata.resource_version
                    if event["type"] == "ADDED":
                        creates[event["object"].metadata.name] += 1
            except Exception:  # noqa: BLE001 - a dropped stream: watch again from `version`
                time.sleep(0.5)

    threading.Thread(target=record_creates, daemon=True).start()
    election = [f"--leader-election-namespace={namespace}", "--lease-seconds=4"]
    a = OperatorProcess(cluster.kubeconfig_path, tmp_path / "a.log", extra=election, standalone=False).start()
    wait_for(lambda: "became leader" in (tmp_path / "a.log").read_text(), 30, what="replica a leads")
    b = OperatorProcess(cluster.kubeconfig_path, tmp_path / "b.log", extra=election, standalone=False).start()
    try:
        annotations = {EXIT_CODE: "0", DELAY: "4s", **reported({0: 0.5, 1: 0.6, 2: 0.7})}
        k.create(ftj_doc("ha", f"file://{tmp_path}/store", stages=3, podAnnotations=annotations))
        wait_for(lambda: "ha-1-a1" in k.jobs("ha"), 60, what="stage 1 started by the leader")
        assert "became leader" not in (tmp_path / "b.log").read_text()  # b stood by
        a.kill()  # SIGKILL: the lease is not released
        t0 = time.monotonic()
        wait_for(lambda: "became leader" in (tmp_path / "b.log").read_text(), 30, what="replica b takes over")
        took = time.monotonic() - t0
        print(f"replica b took over {took:.1f} s after replica a was SIGKILLed (lease 4 s)")
        st = k.phase("ha", "Succeeded", 90)
        assert [s["attempts"] for s in st["stages"]] == [1, 1, 1]
    finally:
        stop.set()
        a.stop()
        b.stop()
    assert took < 30
    assert {n: c for n, c in creates.items() if n.startswith("ha-")} == {"ha-0-a1": 1, "ha-1-a1": 1, "ha-2-a1": 1}
