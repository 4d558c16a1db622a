"""What the operator reads from stage Jobs and pods (thaw_operator.observe), and its watch cache's
bookkeeping (thaw_operator.informer, without the API server: the list+watch loop itself runs in
tests/integration/cluster/test_failure_paths.py and every operator test)."""

from __future__ import annotations

import json
import threading
import time

from kubernetes.client.exceptions import ApiException
from thaw_operator import observe
from thaw_operator import resources as res
from thaw_operator.informer import Informer


def job(name="j-0-a1", stage=0, attempt=1, version="10", conds=(), uid="ftj-uid", **status):
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "resourceVersion": version,
            "labels": {res.LABEL_JOB: "j", res.LABEL_STAGE: str(stage), res.LABEL_ATTEMPT: str(attempt)},
            "ownerReferences": [{"uid": uid, "kind": "FineTuneJob", "name": "j", "controller": True}],
        },
        "spec": {"suspend": False, "template": {"spec": {"containers": [{"name": "trainer", "env": [{"name": "X"}]}]}}},
        "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conds]}
        | status,
    }


def pod(name, index="0", phase="Running", terminated=None, job_name="j-0-a1", memory="1Gi", version="5"):
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": version,
            "labels": {res.LABEL_JOB: "j", "batch.kubernetes.io/job-name": job_name},
            "annotations": {observe.INDEX_ANNOTATION: index},
        },
        "spec": {"containers": [{"name": "trainer", "resources": {"limits": {"memory": memory}}, "env": []}]},
        "status": {
            "phase": phase,
            "podIP": "10.0.0.7",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated} if terminated else {}}],
        },
    }


RESULT = {"stage": 0, "checkpoint": "s3://b/j/stage-0/epoch-2", "metrics": {"valAccuracy": 0.9}}


def test_a_slim_copy_gives_the_same_view_as_the_whole_object():
    j = job(conds=[("Complete", "", "")], startTime="2026-11-30T00:00:00Z", completionTime="2026-11-30T00:05:00Z")
    pods = [
        pod("p0", "0", "Succeeded", {"exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT)}),
        pod("p1", "1", "Succeeded", {"exitCode": 0, "reason": "Completed", "message": ""}),
    ]
    whole = observe.job_view(j, pods)
    slim = observe.job_view(observe.slim_job(j), [observe.slim_pod(p) for p in pods])
    assert whole == slim
    assert whole.complete and whole.result == RESULT and whole.pods_left == 0
    assert whole.start_time == "2026-11-30T00:00:00Z" and whole.completion_time == "2026-11-30T00:05:00Z"
    assert "template" not in json.dumps(observe.slim_job(j)) and "env" not in json.dumps(observe.slim_pod(pods[0]))
    pods[0]["metadata"]["annotations"]["user/annotation"] = "x" * 1000  # podAnnotations: not kept
    assert "user/annotation" not in json.dumps(observe.slim_pod(pods[0]))


def test_failures_prefer_the_trainers_own_message_and_name_the_memory_limit():
    j = job(conds=[("Failed", "BackoffLimitExceeded", "too many")])
    oom = pod("p1", "1", "Failed", {"exitCode": 137, "reason": "OOMKilled"}, memory="150Mi")
    own = pod("p0", "0", "Failed", {"exitCode": 1, "reason": "Error", "message": json.dumps({"error": "bad data"})})
    view = observe.job_view(observe.slim_job(j), [observe.slim_pod(oom), observe.slim_pod(own)])
    assert view.failed and view.failed_reason == "BackoffLimitExceeded" and view.failure == "bad data"
    alone = observe.job_view(j, [observe.slim_pod(oom)])
    assert "OOMKilled" in alone.failure and "memory limit 150Mi" in alone.failure
    gone = observe.pod_failure({"metadata": {"name": "p"}, "status": {"reason": "Evicted", "message": "disk"}})
    assert gone == ("pod p: Evicted: disk", False)


def test_a_job_without_stage_labels_is_not_a_stage():
    j = job()
    del j["metadata"]["labels"][res.LABEL_STAGE]
    assert observe.job_view(j, []) is None


def test_pods_are_listed_live_only_while_an_outcome_is_unrecorded():
    done = observe.job_view(job(conds=[("Complete", "", "")]), [])
    running = observe.job_view(job("j-1-a1", stage=1), [])
    assert observe.needs_fresh_pods([done, running], {"stages": []})
    assert not observe.needs_fresh_pods([done, running], {"stages": [{"index": 0, "phase": "Succeeded"}]})
    assert not observe.needs_fresh_pods([running], {})
    # an older failed attempt does not count once a newer one runs
    old = observe.job_view(job("j-1-a1", stage=1, conds=[("Failed", "", "")]), [])
    new = observe.job_view(job("j-1-a2", stage=1, attempt=2), [])
    assert not observe.needs_fresh_pods([old, new], {})


def cache() -> Informer:
    return Informer("Job", None, (), observe.slim_job, res.LABEL_JOB)


def test_the_cache_indexes_by_finetunejob_and_forgets_deleted_objects():
    c = cache()
    c.upsert(job("j-0-a1"))
    c.upsert(job("j-1-a1", stage=1))
    other = job("k-0-a1")
    other["metadata"]["labels"][res.LABEL_JOB] = "k"
    c.upsert(other)
    assert [o["metadata"]["name"] for o in c.by_label("ns", "j")] == ["j-0-a1", "j-1-a1"]
    assert [o["metadata"]["name"] for o in c.by_label("ns", "k")] == ["k-0-a1"]
    assert c.by_label("other-ns", "j") == []
    c.remove("ns", "j-0-a1")
    assert [o["metadata"]["name"] for o in c.by_label("ns", "j")] == ["j-1-a1"] and len(c) == 2


def test_an_older_event_does_not_replace_our_newer_write():
    c = cache()
    c.upsert(job(version="20", conds=[("Complete", "", "")]))
    c.upsert(job(version="15"))  # a lagging watch event from before
    assert c.by_label("ns", "j")[0]["status"]["conditions"][0]["type"] == "Complete"
    c.upsert(job(version="21"))
    assert c.by_label("ns", "j")[0]["metadata"]["resourceVersion"] == "21"


def test_a_relist_replaces_the_contents_but_keeps_what_we_wrote_after_it():
    c = cache()
    c.upsert(job("j-0-a1", version="10"))
    c.upsert(job("j-1-a1", stage=1, version="30"))  # created by us after the list below was taken
    c.upsert(job("j-2-a1", stage=2, version="12"))  # deleted before the list: gone
    c._replace([job("j-0-a1", version="25")], version=25)
    names = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in c.by_label("ns", "j")}
    assert names == {"j-0-a1": "25", "j-1-a1": "30"}
    assert not c.synced.is_set()  # only the run loop's first list marks it usable


def test_a_cache_whose_watch_fails_is_not_taken_as_current():
    """Listed once, then every watch refused (say RBAC grants list but not watch): callers must
    go back to live lists rather than read a cache that no longer moves."""

    class Reply:
        data = json.dumps({"metadata": {"resourceVersion": "7"}, "items": [job()]}).encode()

    stop, calls = threading.Event(), []

    def list_fn(*_, watch=False, **__):
        calls.append(watch)
        if watch:
            raise ApiException(status=403, reason="Forbidden")
        return Reply()

    c = Informer("Job", list_fn, (), observe.slim_job, res.LABEL_JOB)
    t = threading.Thread(target=c.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while True not in calls and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(5)
    assert calls[:2] == [False, True] and not c.synced.is_set()
    assert [o["metadata"]["name"] for o in c.by_label("ns", "j")] == ["j-0-a1"]  # kept, just not current


def test_only_a_change_to_what_is_kept_counts_as_one():
    """The predicate that keeps unchanged events from waking the operator: an event that moves
    only resourceVersion, or fields the slim copy drops (pods ready, pod tracking), is not a
    change; our own write's echo is not either; a new condition is."""
    c = cache()
    assert c.upsert(job(version="10"))  # new
    assert not c.upsert(job(version="10"))  # the echo of our own create
    assert not c.upsert(job(version="11", ready=2, uncountedTerminatedPods={"succeeded": ["u"]}))
    assert not c.upsert(job(version="9", conds=[("Complete", "", "")]))  # older than held: ignored
    assert c.upsert(job(version="12", startTime="t0"))
    assert c.upsert(job(version="13", startTime="t0", conds=[("Complete", "", "")]))
    assert c.remove("ns", "j-0-a1") and not c.remove("ns", "j-0-a1")


def test_a_relist_reports_what_the_lost_watch_would_have():
    c = cache()
    c.upsert(job("j-0-a1", version="10"))
    c.upsert(job("j-1-a1", stage=1, version="11"))
    c.upsert(job("j-2-a1", stage=2, version="12"))
    listed = [
        job("j-0-a1", version="20"),  # unchanged but for its version
        job("j-1-a1", stage=1, version="21", conds=[("Complete", "", "")]),  # completed meanwhile
        job("j-3-a1", stage=3, version="22"),  # created meanwhile; j-2-a1 deleted meanwhile
    ]
    changed = c._replace(listed, version=22)
    assert sorted(o["metadata"]["name"] for o in changed) == ["j-1-a1", "j-2-a1", "j-3-a1"]


def _controlled(p: dict, job_uid: str) -> dict:
    p["metadata"]["ownerReferences"] = [{"uid": job_uid, "kind": "Job", "name": "j-0-a1", "controller": True}]
    return p


def test_only_pods_the_stage_job_controls_count_a_label_alone_is_ignored():
    j = job(conds=[("Complete", "", "")])
    done = {"exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT)}
    forged_result = json.dumps(RESULT | {"checkpoint": "s3://evil/x", "metrics": {"valAccuracy": 1.0}})
    real = _controlled(pod("p0", "0", "Succeeded", done), "uid-j-0-a1")
    forged = pod("forged", "0", "Succeeded", {"exitCode": 0, "reason": "Completed", "message": forged_result})
    owner_only = pod("also-forged", "0", "Succeeded", {"exitCode": 0, "message": forged_result})
    owner_only["metadata"]["ownerReferences"] = [{"uid": "uid-j-0-a1", "kind": "Job"}]  # not the controller
    other_job = pod("unrelated", job_name="elsewhere-0-a1")
    for pods in ([real, forged, owner_only, other_job], [forged, owner_only, real, other_job]):  # any order
        mine, foreign = observe.split_pods([j], pods)
        assert mine == {"j-0-a1": [real]} and foreign == ["also-forged", "forged"]
        assert observe.job_view(j, mine["j-0-a1"]).result["checkpoint"] == RESULT["checkpoint"]
    # The slim copy the watch cache keeps carries the controller flag.
    slim = observe.slim_pod(real)
    assert observe.controlled_by(slim, "uid-j-0-a1") and not observe.controlled_by(observe.slim_pod(forged), "x")
