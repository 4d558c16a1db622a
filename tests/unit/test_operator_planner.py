"""The operator's planner as tables: observed state in, objects/status/events out."""

from __future__ import annotations

from pathlib import Path

import pytest
from thaw_operator import resources as res
from thaw_operator.planner import JobView, plan

from tests.builders import job_doc
from thaw_contract.spec import parse_job

NOW = "2026-11-28T00:00:00Z"
IMAGE = "thaw-trainer:test"


def ftj(status: dict | None = None, generation: int = 1, labels: dict | None = None, **spec) -> dict:
    doc = job_doc(**spec)
    doc["metadata"] = {"name": "ft", "namespace": "ns", "uid": "u-1", "generation": generation, "labels": labels or {}}
    if status is not None:
        doc["status"] = status
    return doc


def run(body: dict, jobs=(), now=NOW):
    spec = parse_job(body).spec
    return plan(body, spec, None, list(jobs), now, IMAGE)


def job(stage, attempt, **kw) -> JobView:
    return JobView(name=res.job_name("ft", stage, attempt), stage=stage, attempt=attempt, **kw)


def result(stage) -> dict:
    """Rank 0's termination message for a committed stage."""
    return {
        "stage": stage,
        "name": ["head", "all"][stage],
        "checkpoint": f"file:///s/ft/stage-0{stage}/epoch-0000",
        "manifestSha256": "ab" * 32,
        "metrics": {"valAccuracy": 0.5 + stage / 10, "testAccuracy": 0.4, "epochs": 1},
    }


def kinds(p):
    return [(o["kind"], o["metadata"]["name"]) for o in p.create]


def reasons(p):
    return [r for _, r, _ in p.events]


def cond(p, ctype):
    return next(c for c in p.status["conditions"] if c["type"] == ctype)


def test_new_job_creates_stage_zero_service_and_job():
    p = run(ftj())
    assert kinds(p) == [("Service", "ft-0"), ("Job", "ft-0-a1")]
    assert p.status["phase"] == "Running" and p.status["stageProgress"] == "0/2"
    assert [s["phase"] for s in p.status["stages"]] == ["Running", "Pending"]
    assert cond(p, "Created")["status"] == "True" and cond(p, "Running")["status"] == "True"
    assert "StageStarted" in reasons(p)


def test_running_job_changes_nothing():
    first = run(ftj())
    p = run(ftj(first.status), [job(0, 1)])
    assert p.create == [] and p.patch_jobs == [] and p.status["phase"] == "Running"
    assert p.status["conditions"] == first.status["conditions"]  # transition times kept
    assert reasons(p) == []


@pytest.mark.parametrize(
    "reported,phase,created",
    [
        # Job done but rank 0 left no result (pods removed): a new attempt finds the committed
        # stage and reports it; never start stage 1 on an unreported checkpoint.
        (None, "Running", [("Job", "ft-0-a2")]),
        ({**result(0), "stage": 1}, "Running", [("Job", "ft-0-a2")]),  # another stage's report
        (result(0), "Running", [("Service", "ft-1"), ("Job", "ft-1-a1")]),
    ],
)
def test_next_stage_waits_for_rank_zeros_reported_checkpoint(reported, phase, created):
    status = run(ftj()).status
    p = run(ftj(status), [job(0, 1, complete=True, result=reported)])
    assert p.status["phase"] == phase and kinds(p) == created


def test_all_stages_reported_is_success_with_metrics():
    status = run(ftj()).status
    p = run(ftj(status), [job(0, 1, complete=True, result=result(0))])
    p = run(ftj(p.status), [job(0, 1, complete=True, result=result(0)), job(1, 1, complete=True, result=result(1))])
    assert p.status["phase"] == "Succeeded" and p.status["stageProgress"] == "2/2"
    assert p.status["valAccuracy"] == 0.6
    assert p.status["stages"][0]["result"] == {"valAccuracy": 0.5, "testAccuracy": 0.4, "epochs": 1}
    assert p.status["stages"][1]["checkpoint"].endswith("stage-01/epoch-0000")
    assert cond(p, "Succeeded")["status"] == "True" and cond(p, "Running")["status"] == "False"
    assert "Succeeded" in reasons(p)
    again = run(ftj(p.status), [])  # TTL removed the Jobs: the finished job stays finished
    assert again.create == [] and again.status == p.status
    assert p.status["completionTime"] == NOW


@pytest.mark.parametrize(
    "attempts,retries,outcome,created",
    [
        (1, 2, "Running", ["ft-0-a2"]),
        (2, 2, "Running", ["ft-0-a3"]),
        (3, 2, "Failed", []),
        (1, 0, "Failed", []),
    ],
)
def test_failed_stage_is_retried_until_the_budget_is_spent(attempts, retries, outcome, created):
    body = ftj(runPolicy={"retriesPerStage": retries})
    status = run(body).status
    jobs = [job(0, a, failed=True, failed_reason="BackoffLimitExceeded") for a in range(1, attempts + 1)]
    p = run(ftj(status, runPolicy={"retriesPerStage": retries}), jobs)
    assert p.status["phase"] == outcome
    assert [n for k, n in kinds(p) if k == "Job"] == created
    if outcome == "Failed":
        assert cond(p, "Failed")["reason"] == "RetriesExhausted" and "retries exhausted" in p.status["message"]
        assert "Failed" in reasons(p)
    else:
        assert "StageRetrying" in reasons(p) and p.status["stages"][0]["attempts"] == attempts + 1


def test_configuration_error_fails_fast_without_retry_with_the_trainers_message():
    status = run(ftj()).status
    line = "spec.data.source: /data/x/train is not a directory (ImageFolder layout: train/<class>/*.jpg)"
    bad = job(0, 1, failed=True, failed_reason="PodFailurePolicy", failed_message="exit code 2", failure=line)
    p = run(ftj(status), [bad])
    assert p.status["phase"] == "Failed" and cond(p, "Failed")["reason"] == "InvalidConfiguration"
    assert cond(p, "Failed")["message"] == f"stage 0 (head) configuration error: {line}"
    assert p.create == []


def test_an_oom_killed_attempt_counts_against_the_budget_and_says_so():
    """Exit 137 is not free: it ends the attempt; the reason names OOMKilled and the limit."""
    why = "pod ft-0-a1-0-x: container trainer was OOMKilled (exit 137, memory limit 2Gi); raise ..."
    body = ftj(runPolicy={"retriesPerStage": 1})
    status = run(body).status
    p = run(ftj(status, runPolicy={"retriesPerStage": 1}), [job(0, 1, failed=True, failure=why)])
    assert kinds(p) == [("Job", "ft-0-a2")] and "OOMKilled" in p.events[0][2] and "2Gi" in p.events[0][2]
    jobs = [job(0, 1, failed=True, failure=why), job(0, 2, failed=True, failure=why)]
    p = run(ftj(p.status, runPolicy={"retriesPerStage": 1}), jobs)
    assert p.status["phase"] == "Failed" and cond(p, "Failed")["reason"] == "RetriesExhausted"
    assert "failed 2 times (pod ft-0-a1-0-x: container trainer was OOMKilled" in p.status["message"]


def test_next_attempt_waits_until_the_failed_attempts_pods_have_stopped():
    """Its rank 0 may still be committing a checkpoint; the next attempt must see that commit."""
    status = run(ftj()).status
    p = run(ftj(status), [job(0, 1, failed=True, pods_left=1)])
    assert p.create == [] and p.requeue_after == 2.0 and p.status["phase"] == "Running"
    assert "waiting for 1 pod(s) to stop" in p.status["message"]
    p = run(ftj(p.status), [job(0, 1, failed=True, pods_left=0)])
    assert kinds(p) == [("Job", "ft-0-a2")]


def test_a_stage_job_deleted_before_it_finished_counts_as_an_attempt():
    body = ftj(runPolicy={"retriesPerStage": 1})
    p = run(body)
    p = run(ftj(p.status, runPolicy={"retriesPerStage": 1}), [])  # ft-0-a1 vanished
    assert kinds(p) == [("Job", "ft-0-a2")] and "was deleted" in p.events[0][2]
    p = run(ftj(p.status, runPolicy={"retriesPerStage": 1}), [])  # and ft-0-a2 too
    assert p.create == [] and p.status["phase"] == "Failed" and "retries exhausted" in p.status["message"]


def test_the_finetunejobs_ttl_deletes_its_stage_jobs_after_it_finished():
    body = ftj(runPolicy={"ttlSecondsAfterFinished": 60})
    p = run(body, [job(0, 1, complete=True, result=result(0)), job(1, 1, complete=True, result=result(1))])
    p = run(ftj(p.status, runPolicy={"ttlSecondsAfterFinished": 60}), [job(0, 1, complete=True, result=result(0))])
    p = run(ftj(p.status, runPolicy={"ttlSecondsAfterFinished": 60}), [job(1, 1, complete=True, result=result(1))])
    assert p.status["phase"] == "Succeeded"
    jobs = [job(0, 1, complete=True), job(1, 1, complete=True)]
    early = run(ftj(p.status, runPolicy={"ttlSecondsAfterFinished": 60}), jobs, now="2026-11-28T00:00:30Z")
    assert early.delete_jobs == [] and early.requeue_after == 30
    late = run(ftj(p.status, runPolicy={"ttlSecondsAfterFinished": 60}), jobs, now="2026-11-28T00:01:00Z")
    assert late.delete_jobs == ["ft-0-a1", "ft-1-a1"] and late.status == p.status


def test_terminal_state_is_sticky():
    status = run(ftj()).status
    failed = run(ftj(status, runPolicy={"retriesPerStage": 0}), [job(0, 1, failed=True)])
    p = run(ftj(failed.status, runPolicy={"retriesPerStage": 0}), [])
    assert p.create == [] and p.status == failed.status


@pytest.mark.parametrize(
    "observed,suspend,patch,phase",
    [
        (dict(), True, {"suspend": True}, "Suspended"),  # suspend: stop the pods (SIGTERM)
        (dict(suspended=True, suspended_by_operator=True), True, None, "Suspended"),
        (dict(suspended=True, suspended_by_operator=True), False, {"suspend": False}, "Running"),  # resume
        (dict(suspended=True), False, None, "Queued"),  # suspended by Kueue: queued, not failed
    ],
)
def test_suspend_resume_and_queue(observed, suspend, patch, phase):
    status = run(ftj()).status
    p = run(ftj(status, suspend=suspend), [job(0, 1, **observed)])
    assert p.status["phase"] == phase
    assert [x[1]["spec"] for x in p.patch_jobs] == ([patch] if patch else [])
    assert cond(p, "Suspended")["status"] == ("True" if phase == "Suspended" else "False")


def test_suspended_before_start_creates_nothing():
    p = run(ftj(suspend=True))
    assert p.create == [] and p.status["phase"] == "Suspended"


def test_spec_the_trainer_rejects_fails_with_the_message():
    body = ftj()
    p = plan(body, None, "spec.stages[0].trainable.top: must be greater than 0", [], NOW, IMAGE)
    assert p.status["phase"] == "Failed" and cond(p, "Failed")["reason"] == "InvalidSpec"
    assert "spec.stages[0].trainable.top" in cond(p, "Failed")["message"]


def test_stage_job_shape():
    body = ftj(
        nodes=2,
        labels={res.KUEUE_QUEUE: "team-a"},
        checkpoint={"uri": "s3://bucket/x", "credentialsSecret": "s3-creds"},
    )
    spec = parse_job(body).spec
    j = res.stage_job(body, spec, 1, spec.stages[1], 3, IMAGE)
    s = j["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"], s["backoffLimit"]) == ("Indexed", 2, 2, 0)
    assert j["metadata"]["labels"][res.KUEUE_QUEUE] == "team-a"
    assert j["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    pod = s["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == "ft-1"
    assert pod["automountServiceAccountToken"] is False  # the trainer never calls the API server
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    c = pod["containers"][0]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    env = {e["name"]: e for e in c["env"]}
    assert env["MASTER_ADDR"]["value"] == "ft-1-a3-0.ft-1.ns.svc.cluster.local"
    assert env["NNODES"]["value"] == "2" and env["NPROC_PER_NODE"]["value"] == "1"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert c["command"] == ["python", "-m", "trainer", "launch"] and c["args"][-2:] == ["--stage", "1"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/dev/shm", res.DATA_CACHE, "/etc/thaw"} <= mounts
    rules = s["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
    # Only disruptions are free: no exit code (OOM's 137 included) is ignored.
    assert rules[1:] == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
    assert "ttlSecondsAfterFinished" not in s
    # The kubelet's grace covers one upload's whole retry window, so the SIGTERM flush is not cut.
    assert pod["terminationGracePeriodSeconds"] == spec.checkpoint.upload_timeout_seconds + 30


def test_a_data_cache_volume_is_one_claim_per_job_owned_by_it_and_mounted_by_every_stage_pod():
    def volume(body: dict, stage: int) -> dict:
        spec = parse_job(body).spec
        pod = res.stage_job(body, spec, stage, spec.stages[stage], 1, IMAGE)["spec"]["template"]["spec"]
        return next(v for v in pod["volumes"] if v["name"] == "data-cache")

    assert volume(ftj(), 0) == {"name": "data-cache", "emptyDir": {}}  # no dataCache: each pod its own
    body = ftj(dataCache={"size": "50Gi", "storageClassName": "shared-nfs"})
    p = run(body)
    assert kinds(p) == [("PersistentVolumeClaim", "ft-data"), ("Service", "ft-0"), ("Job", "ft-0-a1")]
    claim = p.create[0]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "50Gi"}},
        "storageClassName": "shared-nfs",
    }
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "u-1"  # deleted with the FineTuneJob
    for stage in (0, 1):
        assert volume(body, stage) == {"name": "data-cache", "persistentVolumeClaim": {"claimName": "ft-data"}}
    # A retry asks for the claim again (a no-op while it exists), before its Job.
    status = run(body).status
    p = run(ftj(status, dataCache={"size": "50Gi"}), [job(0, 1, failed=True, failed_reason="BackoffLimitExceeded")])
    assert kinds(p) == [("PersistentVolumeClaim", "ft-data"), ("Job", "ft-0-a2")]
    assert "storageClassName" not in p.create[0]["spec"]  # the cluster's default class


def test_a_stages_pods_prefer_distinct_nodes_unless_the_job_sets_its_own_affinity():
    body = ftj(nodes=2)
    spec = parse_job(body).spec
    template = res.stage_job(body, spec, 1, spec.stages[1], 2, IMAGE)["spec"]["template"]
    (pref,) = template["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = pref["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    # Exactly this attempt's gang (not the previous attempt's pods, still terminating), and the
    # gang's pods carry those labels.
    selector = {res.LABEL_JOB: "ft", res.LABEL_STAGE: "1", res.LABEL_ATTEMPT: "2"}
    assert term["labelSelector"]["matchLabels"] == selector
    assert template["metadata"]["labels"].items() >= selector.items()
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}}}
    own["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0] = {
        "matchExpressions": [{"key": "gpu", "operator": "Exists"}]
    }
    body = ftj(nodes=2, affinity=own)
    spec = parse_job(body).spec
    assert res.stage_job(body, spec, 1, spec.stages[1], 2, IMAGE)["spec"]["template"]["spec"]["affinity"] == own


def test_every_local_rank_declares_its_metrics_port():
    """Rank r serves port + r: the PodMonitor scrapes each, not only local rank 0's."""
    body = ftj(nodes=2, gpusPerNode=4, metrics={"port": 9400})
    spec = parse_job(body).spec
    c = res.stage_job(body, spec, 0, spec.stages[0], 1, IMAGE)["spec"]["template"]["spec"]["containers"][0]
    assert c["ports"] == [
        {"name": "metrics", "containerPort": 9400},
        {"name": "metrics-1", "containerPort": 9401},
        {"name": "metrics-2", "containerPort": 9402},
        {"name": "metrics-3", "containerPort": 9403},
    ]
    assert all(res.METRICS_PORT.fullmatch(p["name"]) for p in c["ports"])
    chart = Path(__file__).resolve().parents[2] / "charts" / "thaw" / "templates" / "monitors.yaml"
    assert f'regex: "{res.METRICS_PORT.pattern}"' in chart.read_text()  # the PodMonitor keeps the same names


def test_stage_overrides_nodes_and_gpus():
    body = ftj(nodes=4, gpusPerNode=8)
    body["spec"]["stages"][0].update(nodes=1, gpusPerNode=2)
    spec = parse_job(body).spec
    head = res.stage_job(body, spec, 0, spec.stages[0], 1, IMAGE)
    full = res.stage_job(body, spec, 1, spec.stages[1], 1, IMAGE)
    assert head["spec"]["completions"] == 1 and full["spec"]["completions"] == 4
    assert head["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert full["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_running_stage_shows_epoch_progress_rank_zero_serves():
    status = run(ftj()).status
    body = ftj(status)
    p = plan(
        body,
        parse_job(body).spec,
        None,
        [job(0, 1)],
        NOW,
        IMAGE,
        {0: {"epoch": 1, "valAccuracy": 0.61, "etaSeconds": 12.0}},
    )
    st = p.status["stages"][0]
    assert st["progress"] == {"epoch": 1, "valAccuracy": 0.61, "etaSeconds": 12.0} and st["epochs"] == 1
    assert p.status["valAccuracy"] == 0.61


def test_the_jobs_image_overrides_the_operators_default():
    p = run(ftj())
    assert p.create[1]["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    p = run(ftj(image="registry.example/thaw-trainer:cu13"))
    assert p.create[1]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/thaw-trainer:cu13"


QUEUE = {res.KUEUE_QUEUE: "team-a"}


def test_a_queued_stage_job_is_created_suspended_for_kueue_to_admit():
    p = run(ftj(labels=QUEUE))
    j = p.create[1]
    assert j["spec"]["suspend"] is True and j["metadata"]["labels"][res.KUEUE_QUEUE] == "team-a"
    assert res.ANNOTATION_SUSPENDED not in j["metadata"].get("annotations", {})  # Kueue's to unsuspend


@pytest.mark.parametrize(
    "observed,suspend,workload_patch,phase",
    [
        # Admitted by Kueue (unsuspended) and running: never suspended again.
        (dict(workload="w"), False, None, "Running"),
        (dict(suspended=True, workload="w"), False, None, "Queued"),  # waiting for quota
        # FineTuneJob suspended: its Workload is deactivated (Kueue stops the pods); the Job is not touched.
        (dict(workload="w"), True, False, "Suspended"),
        (
            dict(suspended=True, workload="w", workload_active=False, workload_deactivated_by_operator=True),
            True,
            None,
            "Suspended",
        ),
        # Resumed: the Workload it deactivated is active again; Kueue re-admits it.
        (
            dict(suspended=True, workload="w", workload_active=False, workload_deactivated_by_operator=True),
            False,
            True,
            "Queued",
        ),
        # Deactivated by someone else (an admin): left alone.
        (dict(suspended=True, workload="w", workload_active=False), False, None, "Queued"),
    ],
)
def test_kueue_owns_a_queued_jobs_suspend_field(observed, suspend, workload_patch, phase):
    status = run(ftj(labels=QUEUE)).status
    p = run(ftj(status, labels=QUEUE, suspend=suspend), [job(0, 1, queued=True, **observed)])
    assert p.status["phase"] == phase
    assert p.patch_jobs == []  # never the Job's suspend field
    assert [w[1]["spec"]["active"] for w in p.patch_workloads] == ([] if workload_patch is None else [workload_patch])


def test_every_generated_name_is_a_valid_label_at_the_limits():
    """The longest name the CRD admits (40), the most stages (16) and retries (20): Services are
    DNS-1035 labels, Jobs and pod hostnames (<job>-<index>) at most 63 characters."""
    import re

    from thaw_operator.crd import MAX_NAME, MAX_STAGES

    label = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    name = "a" * (MAX_NAME - 1) + "z"
    for stage in (0, MAX_STAGES - 1):
        service = res.service_name(name, stage)
        job_name = res.job_name(name, stage, 21)
        assert label.fullmatch(service) and len(service) <= 63
        assert label.fullmatch(job_name) and len(f"{job_name}-{63}") <= 63
        assert len(res.config_map_name(name)) <= 253


def test_a_foreign_pod_is_named_once_in_a_warning_and_in_status():
    first = plan(ftj(), parse_job(ftj()).spec, None, [], NOW, IMAGE, None, ["forged-1"])
    events = [e for e in first.events if e[1] == "ForeignPodIgnored"]
    assert events == [
        (
            "Warning",
            "ForeignPodIgnored",
            "pod forged-1 carries a stage Job's labels but that Job does not control it; its result is ignored",
        )
    ]
    assert first.status["ignoredPods"] == ["forged-1"]
    again = plan(ftj(first.status), parse_job(ftj()).spec, None, [], NOW, IMAGE, None, ["forged-1", "forged-2"])
    assert [e[2].split()[1] for e in again.events if e[1] == "ForeignPodIgnored"] == ["forged-2"]  # only the new one
    assert again.status["ignoredPods"] == ["forged-1", "forged-2"]
    quiet = plan(ftj(again.status), parse_job(ftj()).spec, None, [], NOW, IMAGE)
    assert quiet.status["ignoredPods"] == ["forged-1", "forged-2"]  # kept once gone
    assert not [e for e in quiet.events if e[1] == "ForeignPodIgnored"]


def test_the_next_stage_gets_the_digest_the_stage_before_reported():
    from thaw_contract.stage_result import INPUT_DIGEST_ENV

    p = run(ftj(run(ftj()).status), [job(0, 1, complete=True, result=result(0))])
    assert p.status["stages"][0]["manifestSha256"] == "ab" * 32
    (stage1,) = [o for o in p.create if o["kind"] == "Job"]
    env = {e["name"]: e.get("value") for e in stage1["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[INPUT_DIGEST_ENV] == "ab" * 32
    first = [o for o in run(ftj()).create if o["kind"] == "Job"][0]
    assert INPUT_DIGEST_ENV not in {e["name"] for e in first["spec"]["template"]["spec"]["containers"][0]["env"]}
    # Carried across reconciles, and into a retry of stage 1.
    again = run(ftj(p.status), [job(0, 1, complete=True, result=result(0)), job(1, 1, failed=True)])
    assert again.status["stages"][0]["manifestSha256"] == "ab" * 32
    retry = [o for o in again.create if o["kind"] == "Job"]
    assert (
        retry
        and {e["name"]: e.get("value") for e in retry[0]["spec"]["template"]["spec"]["containers"][0]["env"]}[
            INPUT_DIGEST_ENV
        ]
        == "ab" * 32
    )


def test_the_model_the_last_stage_published_is_in_status():
    status = run(ftj()).status
    last = result(1)
    last["metrics"]["model"] = {"uri": "file:///s/ft/model", "sha256": "cd" * 32}
    p = run(ftj(status), [job(0, 1, complete=True, result=result(0))])
    assert "model" not in p.status  # nothing published while stages remain
    p = run(ftj(p.status), [job(0, 1, complete=True, result=result(0)), job(1, 1, complete=True, result=last)])
    assert p.status["phase"] == "Succeeded" and p.status["model"] == last["metrics"]["model"]
    assert p.status["stages"][1]["result"]["model"] == last["metrics"]["model"]
