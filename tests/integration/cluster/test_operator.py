"""The operator against the real API server: stages on kwok GPU nodes, whose pods end with the
exit code, reason and termination message (rank 0's result) that annotations give them."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from thaw_operator.crd import GROUP, PLURAL, VERSION

from testbed.control_plane import DELAY, EXIT_CODE, MESSAGE, REASON
from tests.builders import job_doc
from tests.integration.cluster.conftest import wait_for
from thaw_contract.spec import CheckpointSpec, parse_job, training_hash
from trainer import checkpoint as ckpt
from trainer.storage import open_store

pytestmark = pytest.mark.cluster
KWOK = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}


def ftj_doc(name: str, store_uri: str, stages: int = 3, **spec) -> dict:
    doc = job_doc(nodes=2, checkpoint={"uri": store_uri}, **KWOK, **spec)
    doc["spec"]["stages"] = [
        {"name": n, "trainable": t, "epochs": 1, "lr": 0.01}
        for n, t in [("head", {"top": 1}), ("top3", {"top": 3}), ("all", "all")][:stages]
    ]
    doc["metadata"] = {"name": name}
    return doc


STAGE_NAMES = ("head", "top3", "all")


def reported(results: dict[int, float], store: str = "s3://kwok/store") -> dict:
    """Pod annotations that make stage k's kwok pods end with rank 0's termination message for a
    committed stage (what trainer.runner writes after its final checkpoint verified)."""
    return {
        f"{MESSAGE}{k}": json.dumps(
            {
                "stage": k,
                "name": STAGE_NAMES[k],
                "checkpoint": f"{store}/{STAGE_NAMES[k]}/epoch-0000",
                "manifestSha256": "0" * 64,
                "metrics": {"valAccuracy": acc, "testAccuracy": acc, "epochs": 1},
            }
        )
        for k, acc in results.items()
    }


def write_final(doc: dict, stage: int, accuracy: float) -> None:
    """What the trainer commits at the end of a stage: objects, manifest, then the pointer."""
    spec = parse_job(doc).spec
    name = spec.stages[stage].name
    store = open_store(CheckpointSpec(uri=spec.checkpoint.uri), doc["metadata"]["name"])
    prefix = ckpt.epoch_prefix(stage, name, 0)
    meta = {"stage": stage, "epoch": 0, "architecture": spec.model.architecture, "specHash": training_hash(spec)}
    manifest = ckpt.commit(store, prefix, ckpt.encode({"model.pt": {"w": [stage]}}), meta)
    ckpt.mark_final(
        store,
        stage,
        name,
        prefix,
        manifest,
        {"best_val_accuracy": accuracy, "test_accuracy": accuracy, "epochs_run": 1},
    )


class Api:
    def __init__(self, api, ns):
        self.ns = ns
        self.custom, self.batch, self.core = client.CustomObjectsApi(api), client.BatchV1Api(api), client.CoreV1Api(api)

    def create(self, doc):
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, doc)

    def get(self, name):
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def patch(self, name, spec):
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def status(self, name):
        return self.get(name).get("status") or {}

    def jobs(self, name):
        items = self.batch.list_namespaced_job(self.ns, label_selector=f"thaw.dev/finetunejob={name}").items
        return {j.metadata.name: j for j in items}

    def job_done(self, jobname):
        try:
            j = self.batch.read_namespaced_job(jobname, self.ns)
        except ApiException:
            return False
        return any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or [])

    def events(self, name):
        evs = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [(e.reason, e.message) for e in sorted(evs, key=lambda e: e.metadata.creation_timestamp)]

    def phase(self, name, phase, timeout=60):
        return wait_for(
            lambda: self.status(name).get("phase") == phase and self.status(name),
            timeout,
            what=f"{name} phase {phase} (now {self.status(name).get('phase')})",
        )


def test_three_stages_succeed_each_handing_over_rank_zeros_result(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    results = {0: 0.71, 1: 0.82, 2: 0.93}
    doc = ftj_doc(
        "three", f"file://{tmp_path}/store", podAnnotations={EXIT_CODE: "0", DELAY: "500ms", **reported(results)}
    )
    k.create(doc)
    st = k.phase("three", "Succeeded", 90)
    assert st["stageProgress"] == "3/3" and st["valAccuracy"] == 0.93
    assert [s["phase"] for s in st["stages"]] == ["Succeeded"] * 3
    assert [s["result"]["valAccuracy"] for s in st["stages"]] == [0.71, 0.82, 0.93]
    assert [s["checkpoint"] for s in st["stages"]] == [f"s3://kwok/store/{n}/epoch-0000" for n in STAGE_NAMES]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Succeeded"]["status"] == "True" and conds["Failed"]["status"] == "False"
    assert st["observedGeneration"] == 1
    assert sorted(k.jobs("three")) == ["three-0-a1", "three-1-a1", "three-2-a1"]
    reasons = [r for r, _ in k.events("three")]
    assert reasons.count("StageStarted") == 3 and reasons.count("StageSucceeded") == 3 and "Succeeded" in reasons
    # kubectl's view: the printer columns
    job = k.jobs("three")["three-1-a1"]
    assert job.spec.completions == 2 and job.spec.completion_mode == "Indexed"


def test_a_completed_stage_without_rank_zeros_result_is_not_trusted(api, namespace, operator, tmp_path):
    """No reported checkpoint, no next stage: a new attempt (which, with a real trainer, finds
    the committed stage and reports it) instead."""
    k = Api(api, namespace)
    doc = ftj_doc("mute", f"file://{tmp_path}/store", stages=2, podAnnotations={EXIT_CODE: "0", DELAY: "2s"})
    k.create(doc)
    wait_for(lambda: "mute-0-a2" in k.jobs("mute"), 60, what="a second attempt of stage 0")
    assert "mute-1-a1" not in k.jobs("mute")
    k.patch("mute", {"podAnnotations": {EXIT_CODE: "0", DELAY: "500ms", **reported({0: 0.5, 1: 0.6})}})
    st = k.phase("mute", "Succeeded", 90)
    assert st["stages"][0]["attempts"] == 3 and st["stages"][1]["attempts"] == 1
    wait_for(
        lambda: any("result was not found" in m for r, m in k.events("mute") if r == "StageRetrying"),
        30,
        what="the StageRetrying event",
    )


def test_stage_failing_twice_then_succeeding(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    doc = ftj_doc("flaky", f"file://{tmp_path}/store", stages=1, podAnnotations={EXIT_CODE: "1", DELAY: "1s"})
    k.create(doc)
    wait_for(lambda: "flaky-0-a2" in k.jobs("flaky"), 60, what="second attempt")
    # the third attempt will succeed
    k.patch("flaky", {"podAnnotations": {EXIT_CODE: "0", DELAY: "1s", **reported({0: 0.5})}})
    st = k.phase("flaky", "Succeeded", 60)
    assert st["stages"][0]["attempts"] == 3
    assert sorted(k.jobs("flaky")) == ["flaky-0-a1", "flaky-0-a2", "flaky-0-a3"]
    wait_for(lambda: [r for r, _ in k.events("flaky")].count("StageRetrying") == 2, 30, what="two StageRetrying events")


def test_stage_exhausting_retries_fails_the_job(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    doc = ftj_doc(
        "doomed",
        f"file://{tmp_path}/store",
        stages=2,
        podAnnotations={EXIT_CODE: "1", DELAY: "500ms"},
        runPolicy={"retriesPerStage": 1},
    )
    k.create(doc)
    st = k.phase("doomed", "Failed", 90)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "RetriesExhausted"
    assert "stage 0 (head) failed 2 times" in failed["message"]
    assert sorted(k.jobs("doomed")) == ["doomed-0-a1", "doomed-0-a2"]


def test_configuration_error_fails_without_retry_with_the_trainers_line(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    line = "spec.checkpoint.uri: s3://nope/x: cannot open bucket: bucket 'nope' does not exist"
    error = json.dumps({"error": line, "configuration": True})
    k.create(
        ftj_doc(
            "badcfg",
            f"file://{tmp_path}/store",
            stages=1,
            podAnnotations={EXIT_CODE: "2", DELAY: "500ms", f"{MESSAGE}0": error},
        )
    )
    st = k.phase("badcfg", "Failed", 60)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidConfiguration"
    assert failed["message"] == f"stage 0 (head) configuration error: {line}"
    assert sorted(k.jobs("badcfg")) == ["badcfg-0-a1"]
    wait_for(lambda: any(line in m for r, m in k.events("badcfg") if r == "Failed"), 30, what="the Failed event")


def test_an_oom_killed_stage_is_retried_within_the_budget_and_says_why(api, namespace, operator, tmp_path):
    """Exit 137 (OOMKilled) is not free: each costs an attempt, and the reason names the limit."""
    k = Api(api, namespace)
    doc = ftj_doc(
        "oom",
        f"file://{tmp_path}/store",
        stages=1,
        podAnnotations={EXIT_CODE: "137", REASON: "OOMKilled", DELAY: "500ms"},
        resources={"memory": "3Gi"},
        runPolicy={"retriesPerStage": 1},
    )
    k.create(doc)
    st = k.phase("oom", "Failed", 60)
    assert sorted(k.jobs("oom")) == ["oom-0-a1", "oom-0-a2"]
    assert st["stages"][0]["attempts"] == 2
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RetriesExhausted"
    assert "container trainer was OOMKilled (exit 137, memory limit 3Gi)" in failed["message"]


def test_operator_killed_mid_stage_converges_without_duplicates(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    annotations = {EXIT_CODE: "0", DELAY: "4s", **reported({0: 0.6, 1: 0.7})}
    doc = ftj_doc("restart", f"file://{tmp_path}/store", stages=2, podAnnotations=annotations)
    k.create(doc)
    wait_for(lambda: "restart-0-a1" in k.jobs("restart"), 30, what="stage 0 job")
    operator.kill()  # SIGKILL: no cleanup, no goodbye
    wait_for(lambda: k.job_done("restart-0-a1"), 60, what="stage 0 complete while the operator is down")
    assert "restart-1-a1" not in k.jobs("restart")
    operator.start()
    wait_for(lambda: k.job_done("restart-1-a1"), 60, what="stage 1 complete")
    operator.kill()
    operator.start()
    st = k.phase("restart", "Succeeded")
    assert sorted(k.jobs("restart")) == ["restart-0-a1", "restart-1-a1"]
    assert [s["attempts"] for s in st["stages"]] == [1, 1]


def test_suspend_stops_pods_and_resume_continues(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    doc = ftj_doc(
        "pause",
        f"file://{tmp_path}/store",
        stages=1,
        podAnnotations={EXIT_CODE: "0", DELAY: "8s", **reported({0: 0.8})},
    )
    k.create(doc)
    pods = lambda: k.core.list_namespaced_pod(namespace, label_selector="thaw.dev/finetunejob=pause").items
    wait_for(lambda: len([p for p in pods() if p.status.phase == "Running"]) == 2, 30, what="2 running pods")
    k.patch("pause", {"suspend": True})
    st = k.phase("pause", "Suspended")
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["status"] == "True"
    wait_for(lambda: not pods(), 30, what="pods deleted on suspend")
    assert k.jobs("pause")["pause-0-a1"].spec.suspend is True
    k.patch("pause", {"suspend": False})
    k.phase("pause", "Running")
    st = k.phase("pause", "Succeeded", 60)
    assert st["stages"][0]["attempts"] == 1  # resumed, not retried
    wait_for(lambda: "Resumed" in [r for r, _ in k.events("pause")], 30, what="the Resumed event")


def test_deleting_the_finetunejob_cascades_but_keeps_checkpoints(api, namespace, operator, tmp_path):
    k = Api(api, namespace)
    doc = ftj_doc("gone", f"file://{tmp_path}/store", stages=2, podAnnotations={EXIT_CODE: "0", DELAY: "30s"})
    k.create(doc)
    write_final(doc, 0, 0.5)
    wait_for(lambda: "gone-0-a1" in k.jobs("gone"), 30, what="stage job")
    k.custom.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "gone", body={"propagationPolicy": "Foreground"}
    )
    wait_for(lambda: not k.jobs("gone"), 60, what="stage Jobs garbage-collected")
    svcs = k.core.list_namespaced_service(namespace, label_selector="thaw.dev/finetunejob=gone").items
    cms = k.core.list_namespaced_config_map(namespace, label_selector="thaw.dev/finetunejob=gone").items
    wait_for(
        lambda: (
            not k.core.list_namespaced_service(namespace, label_selector="thaw.dev/finetunejob=gone").items
            and not k.core.list_namespaced_config_map(namespace, label_selector="thaw.dev/finetunejob=gone").items
        ),
        60,
        what=f"services {len(svcs)} and config maps {len(cms)} collected",
    )
    assert (tmp_path / "store" / "gone" / "stage-00-head" / "final.json").exists()


def test_a_plan_whose_status_write_conflicts_still_announces_the_job_it_created(api, namespace, crd, monkeypatch):
    """apply() creates children first, then writes status conditionally on the version it planned
    from. When that write gets 409 (the user edited the spec meanwhile), the re-plan finds the
    new Job and does not announce it again: its StageRetrying must be posted before the retry.
    (Seen under load: the first of two retries had no event.) Real API server, no operator."""
    from kubernetes.client.exceptions import ApiException
    from thaw_operator import resources as res
    from thaw_operator import state
    from thaw_operator.apply import apply
    from thaw_operator.planner import Plan

    from thaw_contract.spec import parse_job

    k = Api(api, namespace)
    k.create(ftj_doc("stale", "file:///tmp/none", stages=1, suspend=True))
    planned_from = k.get("stale")
    k.patch("stale", {"suspend": False})  # the user's edit: a newer resourceVersion
    monkeypatch.setattr(state.CONFIG, "api", api)
    monkeypatch.setattr(state.CONFIG, "jobs", {})
    spec = parse_job(planned_from).spec
    job = res.stage_job(planned_from, spec, 0, spec.stages[0], 2, "thaw-trainer:test", suspend=True)
    retry = ("Warning", "StageRetrying", "stage 0 (head) attempt 1 failed (test); starting attempt 2")
    plan = Plan(create=[job], status={"phase": "Running"}, events=[retry, ("Normal", "Running", "running")])
    with pytest.raises(ApiException) as err:
        apply(planned_from, plan)
    assert err.value.status == 409
    assert list(k.jobs("stale")) == ["stale-0-a2"]
    wait_for(lambda: [r for r, _ in k.events("stale")] == ["StageRetrying"], 10, what="the retry announced")
