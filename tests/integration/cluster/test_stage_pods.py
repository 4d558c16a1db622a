"""Failure paths through the path users run: the operator creates stage Jobs whose pods run
`python -m trainer launch` (preflight, then torchrun) on the process node, with real training,
a real kernel OOM kill under the pod's memory limit, and a real SeaweedFS that goes away."""

from __future__ import annotations

import base64
import re
import threading
import time
import uuid

import pytest
from kubernetes import client
from thaw_operator.status import seconds as status_seconds

from testbed.net import free_port
from testbed.node_agent import GATEWAY
from testbed.seaweedfs import ADMIN, SeaweedFS
from tests.builders import job_doc
from tests.integration.cluster.conftest import ROOT, wait_for
from tests.integration.cluster.test_operator import Api

pytestmark = [pytest.mark.cluster, pytest.mark.integration]
SMALL_DATA = {"source": "digits", "imageSize": 32, "trainPerClass": 10, "valPerClass": 5, "testLimit": 50}


def stage_pod_doc(name: str, store: str, **spec) -> dict:
    """A small real job for the process node: digits at 32 px, the bundled EfficientNet-Lite0."""
    fields = {
        "data": {**SMALL_DATA, "batchSize": 20},
        "nodeSelector": {"type": "process"},
        "nodes": 1,
        "speed": {"threads": 1},
        "metrics": {"enabled": False},
        "checkpoint": {"uri": store},
        **spec,
    }
    doc = job_doc(**fields)
    doc["metadata"] = {"name": name}
    return doc


@pytest.fixture
def store_dir():
    """A file:// store the pods see too (the process node keeps this repository visible)."""
    path = ROOT / "runs" / f"test-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _pod_logs(cluster, namespace: str, job: str) -> str:
    return "\n".join(p.read_text() for p in cluster.state.rglob(f"{namespace}_{job}-*/trainer.log"))


def test_configuration_errors_fail_at_once_with_the_trainers_line(cluster, api, namespace, operator, store_dir):
    k = Api(api, namespace)
    store = f"file://{store_dir}"
    bad = {
        # Found by the operator from the layer table: no pod starts.
        "top": (stage_pod_doc("top", store), "spec.stages.1.trainable", {"top": 999}),
        "glob": (stage_pod_doc("glob", store), "spec.stages.1.trainable", {"modules": ["nothing.*"]}),
        # Found by the pod's preflight, before torchrun.
        "nodata": (stage_pod_doc("nodata", store), "spec.data.source", "file:///nonexistent/set"),
        # Found by a worker under torchrun (autocast needs the device): torchrun exits 1, the launcher 2.
        "fp16": (stage_pod_doc("fp16", store, speed={"amp": "fp16", "threads": 1}), None, None),
    }
    from tests.builders import with_path

    for doc, path, value in bad.values():
        k.create(with_path(doc, path, value) if path else doc)
    expected = {
        "top": ("InvalidSpec", "spec.stages[1].trainable.top: top 999 exceeds the 10 layer groups"),
        "glob": ("InvalidSpec", "spec.stages[1].trainable.modules[0]: 'nothing.*' matches no module or group"),
        "nodata": (
            "InvalidConfiguration",
            "stage 0 (head) configuration error: spec.data.source: /nonexistent/set/train is not a directory",
        ),
        "fp16": ("InvalidConfiguration", "stage 0 (head) configuration error: spec.speed.amp: fp16 needs a CUDA"),
    }
    for name, (reason, message) in expected.items():
        st = k.phase(name, "Failed", 180)
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == reason, (name, failed)
        assert failed["message"].startswith(message), (name, failed["message"])
        assert "\n" not in failed["message"]
        # The event follows the status patch: wait for it rather than race it.
        wait_for(
            lambda: any(r == "Failed" and m == failed["message"] for r, m in k.events(name)),  # noqa: B023
            30,
            what=f"{name}'s Failed event",
        )
    assert not k.jobs("top") and not k.jobs("glob")  # nothing started
    for name in ("nodata", "fp16"):
        assert sorted(k.jobs(name)) == [f"{name}-0-a1"]  # one attempt, not retried
        logs = _pod_logs(cluster, namespace, f"{name}-0-a1")
        assert "error: spec." in logs and "Traceback" not in logs, logs[-3000:]


def _admin_secret(api, namespace: str) -> None:
    """Secret `s3`: the test SeaweedFS's admin keys, as a job's checkpoint.credentialsSecret."""
    keys = {"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1]}
    data = {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}
    client.CoreV1Api(api).create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "data": data})


def _photo_folder(root, empty_class: bool = False, no_test_class: bool = False) -> str:
    """Two classes of 16 px PNGs (train 12 each, test 4 each); the first dark image corrupt.
    empty_class: train/light holds nothing; no_test_class: test/ has no light folder."""
    import torch
    from torchvision.io import encode_png

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 4)):
        for label, base in (("dark", 40), ("light", 200)):
            if no_test_class and split == "test" and label == "light":
                continue
            (root / split / label).mkdir(parents=True)
            for i in range(0 if empty_class and label == "light" and split == "train" else n):
                img = (torch.full((3, 16, 16), base) + torch.randint(0, 30, (3, 16, 16), generator=g)).to(torch.uint8)
                (root / split / label / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    (root / "train/dark/0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return f"file://{root}"


@pytest.fixture
def operator_slow_resync(cluster, crd, tmp_path):
    """An operator whose periodic resync (600 s) cannot stand in for a pod's watch event."""
    from testbed.operator_process import OperatorProcess

    op = OperatorProcess(cluster.kubeconfig_path, tmp_path / "operator.log", extra=["--resync-seconds=600"]).start()
    yield op
    op.stop()


def test_a_stage_whose_pods_cannot_start_says_why_and_fails_after_its_startup_timeout(
    cluster, api, namespace, operator_slow_resync, store_dir
):
    """The reported case: a credentialsSecret that does not exist left the FineTuneJob Running
    with no reason. Now the pod's CreateContainerConfigError is in status and a Warning event
    within seconds, and after runPolicy.startupTimeoutSeconds the job is Failed with it and its
    Job deleted (the pods stop holding the node). The operator resyncs only every 600 s here: a
    pod stuck waiting changes no Job, so only its own watch event can wake the reconcile."""
    k = Api(api, namespace)
    checkpoint = {"uri": "s3://thaw/ckpt", "endpoint": "http://127.0.0.1:9", "credentialsSecret": "absent"}
    k.create(
        stage_pod_doc("nosecret", "s3://thaw/ckpt", checkpoint=checkpoint, runPolicy={"startupTimeoutSeconds": 20})
    )
    said = wait_for(
        lambda: "cannot start" in (m := k.status("nosecret").get("message", "")) and m, 60, what="the reason in status"
    )
    assert (
        "CreateContainerConfigError" in said
        and "absent" in said
        and said.startswith("stage 0 (head) cannot start: pod nosecret-0-a1-")
    )
    assert k.status("nosecret")["phase"] == "Running"
    st = k.phase("nosecret", "Failed", 90)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StageNotStarting" and "CreateContainerConfigError" in failed["message"]
    assert st["message"].startswith(
        "stage 0 (head) could not start in 20 s (spec.runPolicy.startupTimeoutSeconds): pod "
    )
    events = k.events("nosecret")
    assert [r for r, _ in events].count("StageNotStarting") == 1, events
    wait_for(lambda: not k.jobs("nosecret"), 60, what="its Job deleted")
    assert st["stages"][0]["attempts"] == 1  # nothing to retry: a retry would meet the same missing Secret


def test_a_job_past_its_deadline_is_failed_and_its_running_stage_stopped(
    cluster, api, namespace, operator_slow_resync, store_dir
):
    """spec.runPolicy.deadlineSeconds through the operator and real stage pods: stages that would
    train for minutes are stopped when the job's deadline passes, in whichever stage that is (the
    head stage trains on cached features and may end first on a fast machine), and a stage that
    committed before it keeps its result. The operator resyncs only every 600 s here and a
    training pod changes nothing the operator watches: its own wake-up at the deadline has to
    find it."""
    k = Api(api, namespace)
    doc = stage_pod_doc("late", f"file://{store_dir}", runPolicy={"deadlineSeconds": 25})
    doc["spec"]["stages"][0]["epochs"] = 200  # ~15 s of cached-feature epochs
    doc["spec"]["stages"][1]["epochs"] = 500  # minutes
    k.create(doc)
    st = k.phase("late", "Failed", 120)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DeadlineExceeded", failed
    at, rows = st["currentStage"], st["stages"]
    said = f"the job ran past its deadline of 25 s (spec.runPolicy.deadlineSeconds) in stage {at} ({rows[at]['name']})"
    assert st["message"] == said and rows[at]["phase"] == "Failed", st
    assert all(r["phase"] == "Succeeded" and r["result"] for r in rows[:at]), rows  # committed, kept
    assert all(r["phase"] == "Pending" for r in rows[at + 1 :]), rows  # never started
    started, ended = status_seconds(rows[0]["startTime"]), status_seconds(st["completionTime"])
    assert ended - started < 25 + 15, st  # woken by its own deadline, not by the 600 s resync
    wait_for(lambda: f"late-{at}-a1" not in k.jobs("late"), 60, what="the running stage's Job deleted")


def test_a_stage_whose_pods_a_quota_refuses_says_why_and_fails_after_its_startup_timeout(
    cluster, api, namespace, operator_slow_resync, store_dir
):
    """A ResourceQuota that admits no more pods: the API server refuses every pod of the stage
    Job, so there is no pod to read, only the Job controller's FailedCreate events. Their line is
    in status within seconds (the operator resyncs only every 600 s here: its own requeue of a
    Job without pods has to find it), and after startupTimeoutSeconds the job is Failed with it."""
    client.CoreV1Api(api).create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    )
    k = Api(api, namespace)
    k.create(stage_pod_doc("quota", f"file://{store_dir}", runPolicy={"startupTimeoutSeconds": 30}))
    said = wait_for(
        lambda: "cannot start" in (m := k.status("quota").get("message", "")) and m, 60, what="the reason in status"
    )
    assert said.startswith(
        "stage 0 (head) cannot start: Job quota-0-a1: FailedCreate: Error creating: pods are forbidden"
    ), said
    assert "exceeded quota: no-pods" in said, said
    st = k.phase("quota", "Failed", 90)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StageNotStarting" and "exceeded quota: no-pods" in failed["message"]
    assert [r for r, _ in k.events("quota")].count("StageNotStarting") == 1
    wait_for(lambda: not k.jobs("quota"), 60, what="its Job deleted")


def test_bad_data_through_stage_pods_is_skipped_and_named_or_fails_once_with_its_line(
    cluster, api, namespace, operator, store_dir
):
    """Issue 27's bad data on the path users run: one image that does not decode is skipped, named
    in the log and in status; above spec.data.maxBadFraction, an empty class folder, a valPerClass
    or trainPerClass larger than a class, a class missing from the test split, or numClasses that
    does not match the classes: Failed after one attempt, with the trainer's one line."""
    k = Api(api, namespace)
    store = f"file://{store_dir}"
    good, empty = _photo_folder(store_dir / "photos"), _photo_folder(store_dir / "empty", empty_class=True)
    notest = _photo_folder(store_dir / "notest", no_test_class=True)
    model = {"architecture": "efficientnet_lite0", "weights": "BUNDLED", "numClasses": 2}
    data = {"imageSize": 32, "valPerClass": 2, "batchSize": 4, "maxBadFraction": 0.1}
    docs = {
        "skip": {"source": good},
        "toomany": {"source": good, "maxBadFraction": 0},
        "noclass": {"source": empty},
        "valsize": {"source": good, "valPerClass": 12},
        "trainsize": {"source": good, "trainPerClass": 20},
        "notestclass": {"source": notest},
        "classes": {"source": good},  # numClasses 3 below
    }
    for name, extra in docs.items():
        doc = stage_pod_doc(
            name, store, model={**model, "numClasses": 3 if name == "classes" else 2}, data={**data, **extra}
        )
        doc["spec"]["stages"] = doc["spec"]["stages"][:1]
        k.create(doc)
    st = k.phase("skip", "Succeeded", 300)
    bad = st["stages"][0]["result"]["badImages"]
    assert bad == {"count": 1, "first": ["train/dark/0.png"]}, st["stages"][0]["result"]
    logs = _pod_logs(cluster, namespace, "skip-0-a1")
    said = "warning: data: 1 of 32 images do not decode; skipped: train/dark/0.png (OSError: Truncated File Read)"
    assert said in logs, logs[-3000:]
    expected = {
        "toomany": "stage 0 (head) configuration error: spec.data.maxBadFraction: 1 of 32 images do not decode",
        "noclass": "stage 0 (head) configuration error: spec.data.source: ",
        "valsize": "stage 0 (head) configuration error: spec.data.valPerClass: 12 leaves no training images of class",
        "trainsize": "stage 0 (head) configuration error: spec.data.trainPerClass: 20 is more than class",
        "notestclass": "stage 0 (head) configuration error: spec.data.source: the class folders of ",
        "classes": "stage 0 (head) configuration error: spec.model.numClasses: 3 does not match the 2 classes of",
    }
    for name, message in expected.items():
        st = k.phase(name, "Failed", 300)
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidConfiguration" and failed["message"].startswith(message), (name, failed)
        assert "\n" not in failed["message"]
        assert sorted(k.jobs(name)) == [f"{name}-0-a1"]  # one attempt, not retried
        assert "Traceback" not in _pod_logs(cluster, namespace, f"{name}-0-a1")
    assert "empty/train/light holds no images" in next(
        c["message"] for c in k.status("noclass")["conditions"] if c["type"] == "Failed"
    )


def test_a_shard_set_in_the_store_through_stage_pods_names_its_bad_image_or_fails_once(
    cluster, api, namespace, operator, store_dir, tmp_path
):
    """Issue 27's shards on the path users run: `trainer pack` puts the photo folder into a real
    SeaweedFS as shards; a two-stage job's pods fetch them into their cache (each stage pod its
    own: the cache is the pod's emptyDir), the corrupt image is skipped and named as
    <shard>/<class>/<file> in status; with maxBadFraction 0 the job fails after one attempt."""
    from trainer.pack import pack

    seaweed = SeaweedFS(tmp_path / "seaweedfs", buckets=("thaw",), ip=str(GATEWAY), s3_port=free_port()).start()
    try:
        src = _photo_folder(store_dir / "photos").removeprefix("file://")
        with pytest.MonkeyPatch.context() as env:
            for key, value in seaweed.env().items():
                env.setenv(key, value)
            pack(src, "s3://thaw/packed", shard_bytes=4096, log=lambda _: None)
        k = Api(api, namespace)
        _admin_secret(api, namespace)
        data = {"source": "s3://thaw/packed", "endpoint": seaweed.endpoint, "imageSize": 32, "valPerClass": 2}
        checkpoint = {"uri": f"file://{store_dir}", "credentialsSecret": "s3"}
        model = {"architecture": "efficientnet_lite0", "weights": "BUNDLED", "numClasses": 2}
        for name, extra in (("shards", {"maxBadFraction": 0.1}), ("shardsbad", {"maxBadFraction": 0})):
            doc = stage_pod_doc(name, "", model=model, data={**data, **extra, "batchSize": 4}, checkpoint=checkpoint)
            if name == "shardsbad":
                doc["spec"]["stages"] = doc["spec"]["stages"][:1]
            k.create(doc)
        st = k.phase("shards", "Succeeded", 420)
        (first,) = st["stages"][0]["result"]["badImages"]["first"]
        assert first.startswith("train-") and first.endswith(".tar/dark/0.png"), first
        for stage in (0, 1):
            logs = _pod_logs(cluster, namespace, f"shards-{stage}-a1")
            said = [line for line in logs.splitlines() if "in the node cache" in line]
            assert said and "data: s3://thaw/packed: 0 of " in said[0], logs[-3000:]
            here, total = re.search(r": (\d+) of (\d+) shards", said[-1]).groups()
            assert here == total, said  # every shard fetched into this pod's cache by the end
        st = k.phase("shardsbad", "Failed", 300)
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidConfiguration", failed
        assert failed["message"].startswith(
            "stage 0 (head) configuration error: spec.data.maxBadFraction: 1 of 32 images do not decode"
        ), failed
        assert sorted(k.jobs("shardsbad")) == ["shardsbad-0-a1"]  # one attempt, not retried
    finally:
        seaweed.stop()


def test_a_final_checkpoint_swapped_in_the_store_between_stages_is_refused_by_the_next(
    cluster, api, namespace, operator, store_dir
):
    """Whoever can write to the store replaces stage 0's final checkpoint, after its pods reported
    it, with another that verifies on its own: stage 1's pods refuse it with one line naming the
    digest the operator recorded (exit 2, one attempt), and load nothing."""
    import torch

    from thaw_contract.spec import CheckpointSpec
    from trainer import checkpoint as ckpt
    from trainer.storage import open_store

    k = Api(api, namespace)
    k.create(stage_pod_doc("swap", f"file://{store_dir}"))
    st = wait_for(
        lambda: (s := k.status("swap")).get("stages") and s["stages"][0]["phase"] == "Succeeded" and s,
        300,
        interval=0.1,
        what="stage 0 succeeded",
    )
    recorded = st["stages"][0]["manifestSha256"]
    store = open_store(CheckpointSpec(uri=f"file://{store_dir}"), "swap")
    prefix, manifest = ckpt.read_final(store, 0, "head", recorded)
    state = ckpt.load_object(store, prefix, "model.pt")
    state = {n: torch.zeros_like(t) if n.startswith("classifier") else t for n, t in state.items()}
    other = ckpt.epoch_prefix(0, "head", 7)
    fields = {k: v for k, v in manifest.items() if k != "files"}
    swapped = ckpt.commit(store, other, ckpt.encode({"model.pt": state}), fields)
    ckpt.mark_final(store, 0, "head", other, swapped, {})  # verifies on its own: only the digest differs
    st = k.phase("swap", "Failed", 300)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidConfiguration", failed
    assert failed["message"].startswith("stage 1 (top3) configuration error: stage 0 (head)'s final checkpoint "), (
        failed
    )
    assert f"not {recorded} as its pods reported when it committed" in failed["message"]
    assert sorted(k.jobs("swap")) == ["swap-0-a1", "swap-1-a1"]  # one attempt: a retry would read the same


def test_a_stage_pod_killed_by_the_kernels_oom_killer_is_counted_and_named(
    cluster, api, namespace, operator, store_dir
):
    """A memory limit below what torch needs: the kernel kills the pod (137). Not ignored: it
    costs an attempt, and the FineTuneJob names OOMKilled and the limit."""
    k = Api(api, namespace)
    doc = stage_pod_doc("oom", f"file://{store_dir}", resources={"memory": "150Mi"}, runPolicy={"retriesPerStage": 1})
    k.create(doc)
    st = k.phase("oom", "Failed", 180)
    assert sorted(k.jobs("oom")) == ["oom-0-a1", "oom-0-a2"], st
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RetriesExhausted"
    assert "container trainer was OOMKilled (exit 137, memory limit 150Mi)" in failed["message"], failed["message"]
    pods = k.core.list_namespaced_pod(namespace, label_selector="thaw.dev/finetunejob=oom").items
    terminated = [c.state.terminated for p in pods for c in p.status.container_statuses or [] if c.state.terminated]
    assert terminated and all(t.reason == "OOMKilled" and t.exit_code == 137 for t in terminated)


def test_store_down_when_stage_one_starts_and_back_30s_later_succeeds(cluster, api, namespace, operator, tmp_path):
    seaweed = SeaweedFS(tmp_path / "seaweedfs", buckets=("thaw",), ip=str(GATEWAY), s3_port=free_port()).start()
    k = Api(api, namespace)
    _admin_secret(api, namespace)
    doc = stage_pod_doc(
        "outage",
        "s3://thaw/ckpt",
        checkpoint={"uri": "s3://thaw/ckpt", "endpoint": seaweed.endpoint, "credentialsSecret": "s3"},
    )
    try:
        k.create(doc)
        wait_for(lambda: "outage-1-a1" in k.jobs("outage"), 300, interval=0.2, what="stage 1 created")
        seaweed.stop()  # before stage 1's pod has even imported torch
        time.sleep(30)
        threading.Thread(target=seaweed.start, daemon=True).start()
        st = k.phase("outage", "Succeeded", 600)
    finally:
        seaweed.stop()
    assert [s["attempts"] for s in st["stages"]] == [1, 1]  # waited out, not failed and not even retried
    logs = _pod_logs(cluster, namespace, "outage-1-a1")
    assert "retrying in" in logs, logs[-3000:]  # it did meet the outage
    assert st["stages"][1]["checkpoint"].startswith("s3://thaw/ckpt/outage/stage-01-top3/")


def test_a_diverging_stage_is_rolled_back_through_the_operator_and_the_next_starts_before_it(
    cluster, api, namespace, operator, store_dir
):
    """The gate on the path users run: stage pods under torchrun, the operator reading rank 0's
    result. Stage 1 trains at a rate that diverges; its pods succeed with the stage rolled back,
    the FineTuneJob says so (status and a StageRolledBack event), and stage 2 loads stage 0's weights."""
    k = Api(api, namespace)
    doc = stage_pod_doc("gate", f"file://{store_dir}")
    doc["spec"]["stages"][1].update(trainable="all", lr=1e6)  # SGD at a million: the loss explodes
    doc["spec"]["stages"].append({"name": "again", "trainable": {"top": 1}, "epochs": 1, "lr": 0.01})
    k.create(doc)
    st = k.phase("gate", "Succeeded", 420)
    head, top3, again = st["stages"]
    assert st["model"] == again["result"]["model"] and st["model"]["uri"] == f"file://{store_dir}/gate/model"
    assert (store_dir / "gate" / "model" / "model.safetensors").is_file()  # published by the last stage's rank 0
    gate = top3["result"]["gate"]
    assert gate["decision"] == "rolled_back" and gate["previous"] == head["result"]["gate"]["value"], gate
    assert top3["result"]["diverged"].startswith("loss "), top3["result"]
    assert top3["checkpoint"] == head["checkpoint"]  # what it passed on: stage 0's committed weights
    assert top3["result"]["testAccuracy"] == head["result"]["testAccuracy"]  # re-evaluated on those weights
    wait_for(
        lambda: any(r == "StageRolledBack" and "stage 1 (top3) rolled back" in m for r, m in k.events("gate")),
        30,
        what="the StageRolledBack event",
    )
    assert again["result"]["gate"]["previous"] == head["result"]["gate"]["value"]  # compared with stage 0's
    logs = _pod_logs(cluster, namespace, "gate-2-a1")
    assert f"again: starting from file://{store_dir}/gate/stage-00-head/" in logs, logs[-3000:]


def test_a_gate_that_says_stop_ends_the_job_and_the_next_stage_never_starts(
    cluster, api, namespace, operator, store_dir
):
    """onRegression: stop on the path users run: stage 1's pods commit it rolled back, the
    operator reads that from rank 0's result, ends the job Succeeded and creates no Job for stage 2."""
    k = Api(api, namespace)
    doc = stage_pod_doc("halt", f"file://{store_dir}")
    doc["spec"]["stages"][1]["gate"] = {"minGain": 0.5, "onRegression": "stop"}  # no stage gains 50 points
    doc["spec"]["stages"].append({"name": "again", "trainable": {"top": 1}, "epochs": 1, "lr": 0.01})
    k.create(doc)
    st = k.phase("halt", "Succeeded", 420)
    assert [s["phase"] for s in st["stages"]] == ["Succeeded", "Succeeded", "Skipped"]
    head, top3, _ = st["stages"]
    assert top3["result"]["gate"]["decision"] == "stopped" and top3["checkpoint"] == head["checkpoint"]
    done = next(c for c in st["conditions"] if c["type"] == "Succeeded")
    assert done["reason"] == "StoppedByGate" and done["message"].endswith("skipped: stage 2 (again)"), done
    time.sleep(3)  # a few more reconciles: still no Job for stage 2
    assert sorted(k.jobs("halt")) == ["halt-0-a1", "halt-1-a1"]
    assert not (store_dir / "halt" / "stage-02-again").exists()


def test_a_gradual_job_runs_its_expanded_stages_through_pods(cluster, api, namespace, operator, store_dir):
    """`gradual:` through the path users run: the operator names and sizes the stage Jobs from the
    expansion, and each pod's trainer expands the same spec to the same stage (the same pure
    function on both sides): names, epochs and the weights each stage starts from agree."""
    k = Api(api, namespace)
    doc = stage_pod_doc("grad", f"file://{store_dir}")
    del doc["spec"]["stages"]
    doc["spec"]["gradual"] = {"stages": 3, "epochs": 4, "lr": 0.05}  # a third to the earlier stages: 1, 1, 2
    k.create(doc)
    st = k.phase("grad", "Succeeded", 420)
    assert [s["name"] for s in st["stages"]] == ["top1", "top3", "all"]
    assert [s["result"]["epochs"] for s in st["stages"]] == [1, 1, 2]
    assert sorted(k.jobs("grad")) == ["grad-0-a1", "grad-1-a1", "grad-2-a1"]
    for i in (1, 2):
        prev, stage = st["stages"][i - 1], st["stages"][i]
        logs = _pod_logs(cluster, namespace, f"grad-{i}-a1")
        assert f"{stage['name']}: starting from {prev['checkpoint']}" in logs, logs[-3000:]
