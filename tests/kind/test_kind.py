"""The user's path on a real kind cluster (`make kind-up`, `make kind-demo`): Thaw's images, the
Helm chart's operator under its ServiceAccount, stage pods training in DDP across two worker
nodes over the pod network, SeaweedFS and Prometheus in the cluster.

One quickstart run carries the fault checks, so the suite pays for one training run: a stage
pod deleted mid-epoch in stage 1, the operator pod deleted mid-stage in stage 2; while it runs,
the containers' user and root filesystem are checked and Prometheus is asked for every rank.
The cluster is created by `hack/kind.sh up` and deleted at the end (THAW_KIND_KEEP=1 keeps it
for a warm re-run, which `up` then reuses).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from testbed import demo as demo_mod
from testbed import kind_demo
from thaw_contract.spec import CheckpointSpec
from trainer import checkpoint as ckpt
from trainer.storage import open_store

pytestmark = [pytest.mark.kind]
ROOT = demo_mod.ROOT
# A fresh name per run: a kept cluster's store still holds earlier runs' checkpoints, which a
# job of the same name would rightly refuse to resume ("written by a different spec").
NAME = f"quickstart-kind-{os.getpid()}"
STAGES = ("head", "top3", "all")
MIN_TEST_ACCURACY = 0.80  # as on the process node (tests/e2e/test_cluster_demo.py)
OPERATOR_SA = "system:serviceaccount:thaw-system:thaw"


@pytest.fixture(scope="module")
def kind():
    if os.geteuid() != 0:
        pytest.fail("the kind tests start a Docker engine and a cluster: run as root")
    # An engine that was running before (the user's, or a private one they started) stays; one
    # that `up` starts for the tests is stopped with the cluster, so the machine is left as found.
    # hack/test.sh (make test) may have started the engine for these tests and says so.
    said = os.environ.get("THAW_KIND_ENGINE_BEFORE")
    running = subprocess.run(["hack/docker.sh", "env"], cwd=ROOT, capture_output=True).returncode == 0
    engine_before = said == "1" if said in ("0", "1") else running
    up = subprocess.run(["hack/kind.sh", "up"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if up.returncode != 0:  # a half-made cluster would keep its nodes' disk until the next `down`
        _down(engine_before)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-5000:]
    try:
        yield kind_demo.Kind(kind_demo.bins() / "kubectl")
    finally:
        if not os.environ.get("THAW_KIND_KEEP"):
            _down(engine_before)


def _down(engine_before: bool) -> None:
    """Delete the cluster, and stop the private Docker engine if the tests started it (its image
    store stays under ~/.cache/thaw/docker for the next run)."""
    subprocess.run(["hack/kind.sh", "down"], cwd=ROOT, capture_output=True, timeout=600)
    if not engine_before:
        subprocess.run(["hack/docker.sh", "down"], cwd=ROOT, capture_output=True, timeout=120)


def _pods(kind, selector: str, namespace: str = "default") -> list[dict]:
    out = kind.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    return json.loads(out)["items"]


def _exec_python(kind, pod: str, code: str, namespace: str = "default") -> subprocess.CompletedProcess:
    return kind.kubectl("exec", "-n", namespace, pod, "--", "python", "-c", code, check=False)


# What a container may do to itself: print its uid, then try to write to /.
# Run inside a stage pod and the operator pod: its user, whether the root filesystem is writable,
# and which of the layers' packages the image holds.
PACKAGES = ("thaw_contract", "trainer", "thaw_operator", "torch", "kubernetes")
PROBE = (
    "import os, importlib.util as u; print(os.getuid())\ntry:\n    open('/probe', 'w')\nexcept OSError as e:\n"
    f"    print(e.strerror)\nprint(','.join(m for m in {PACKAGES!r} if u.find_spec(m)))"
)


def _prometheus(kind, expr: str) -> list[dict]:
    path = "/api/v1/namespaces/monitoring/services/prometheus:web/proxy/api/v1/query?" + urllib.parse.urlencode(
        {"query": expr}
    )
    out = json.loads(kind.kubectl("get", "--raw", path).stdout)
    assert out["status"] == "success", out
    return out["data"]["result"]


@dataclass
class Run:
    status: dict = field(default_factory=dict)
    deleted_stage_pod: str = ""
    deleted_operator_pod: str = ""
    probes: dict = field(default_factory=dict)  # "role:pod" -> (uid, write error, packages held)
    nodes_by_stage: dict = field(default_factory=dict)  # stage -> node names of its first attempt
    jobs: list = field(default_factory=list)


def _epoch_logged(kind, pods: list[str]) -> bool:
    return any('"event": "epoch"' in kind.kubectl("logs", p, check=False).stdout for p in pods)


def _watch(kind, r: Run, stop: threading.Event) -> None:
    """Every 0.5 s (the stages last seconds here): record where each stage's first attempt
    runs, probe the containers in stage 0, delete a stage-1 pod once an epoch has ended, and
    the operator pod once stage 2 has trained an epoch."""
    while not stop.is_set():
        pods = _pods(kind, f"thaw.dev/finetunejob={NAME},thaw.dev/attempt=1")
        by_stage: dict[int, list[dict]] = {}
        for p in pods:
            if p["status"].get("phase") == "Running":
                by_stage.setdefault(int(p["metadata"]["labels"]["thaw.dev/stage"]), []).append(p)
        for k, live in by_stage.items():
            r.nodes_by_stage.setdefault(k, set()).update(p["spec"].get("nodeName") for p in live)
        names = {k: [p["metadata"]["name"] for p in live] for k, live in by_stage.items()}
        if len(names.get(0, [])) == 2 and not r.probes:
            r.probes[f"stage:{names[0][0]}"] = tuple(_exec_python(kind, names[0][0], PROBE).stdout.split("\n")[:3])
            op = _pods(kind, "app.kubernetes.io/name=thaw", "thaw-system")[0]["metadata"]["name"]
            r.probes[f"operator:{op}"] = tuple(_exec_python(kind, op, PROBE, "thaw-system").stdout.split("\n")[:3])
        if len(names.get(1, [])) == 2 and not r.deleted_stage_pod and _epoch_logged(kind, names[1]):
            kind.kubectl("delete", "pod", names[1][-1], "--wait=false")
            r.deleted_stage_pod = names[1][-1]
        if len(names.get(2, [])) == 2 and not r.deleted_operator_pod and _epoch_logged(kind, names[2]):
            op = _pods(kind, "app.kubernetes.io/name=thaw", "thaw-system")[0]["metadata"]["name"]
            kind.kubectl("delete", "pod", "-n", "thaw-system", op, "--wait=false")
            r.deleted_operator_pod = op
        stop.wait(0.5)


@pytest.fixture(scope="module")
def run(kind) -> Run:
    """The quickstart on kind, with a stage pod and the operator pod deleted on the way. Three
    times the quickstart's training images per class, so stages last long enough to be hit
    mid-epoch (and the accuracy bar is met with margin)."""
    doc = kind_demo.job_manifest(yaml.safe_load(demo_mod.JOB.read_text()), name=NAME)
    doc["spec"]["data"]["trainPerClass"] = 300
    kind.kubectl("delete", "ftj", NAME, "--ignore-not-found", "--wait=true")
    kind.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    r = Run()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(kind, r, stop), daemon=True)
    watcher.start()
    try:
        r.status = demo_mod.follow(kind, NAME, timeout=2400, quiet=True)
    finally:
        stop.set()
        watcher.join(30)
    jobs = json.loads(kind.kubectl("get", "jobs", "-l", f"thaw.dev/finetunejob={NAME}", "-o", "json").stdout)
    r.jobs = sorted(j["metadata"]["name"] for j in jobs["items"])
    return r


def test_the_quickstart_succeeds_on_kind_with_its_accuracy(kind, run, monkeypatch):
    assert run.status["phase"] == "Succeeded", run.status
    pf = kind.port_forward("svc/seaweedfs", 8333)
    try:
        for key, value in kind.s3_env().items():
            monkeypatch.setenv(key, value)
        spec = CheckpointSpec(uri="s3://thaw/checkpoints", endpoint=f"http://127.0.0.1:{pf.local_port}")
        store = open_store(spec, NAME, write=False)
        for k, stage in enumerate(STAGES):
            prefix, _ = ckpt.read_final(store, k, stage)  # committed and verifying (sizes, sha256)
            assert run.status["stages"][k]["checkpoint"].endswith(prefix)
        final = ckpt.read_pointer(store, 2, "all")["metrics"]
    finally:
        pf.terminate()
    assert final["test_accuracy"] > MIN_TEST_ACCURACY, final["test_accuracy"]


def test_each_stage_trains_on_both_workers(run):
    workers = {f"{kind_demo.CLUSTER}-worker", f"{kind_demo.CLUSTER}-worker2"}
    assert run.nodes_by_stage == {0: workers, 1: workers, 2: workers}, run.nodes_by_stage


def test_a_deleted_stage_pod_costs_one_retry_and_no_checkpoint(run):
    assert run.deleted_stage_pod, "no stage-1 pod was deleted"
    assert [s["attempts"] for s in run.status["stages"]] == [1, 2, 1]


def test_a_deleted_operator_pod_converges_without_duplicate_jobs(run):
    assert run.deleted_operator_pod, "the operator pod was not deleted during stage 2"
    # One Job per attempt: the replacement operator adopted stage 2's Job instead of making another.
    assert run.jobs == [f"{NAME}-0-a1", f"{NAME}-1-a1", f"{NAME}-1-a2", f"{NAME}-2-a1"], run.jobs


def test_stage_and_operator_containers_run_as_10001_on_a_read_only_root(run):
    assert len(run.probes) == 2, run.probes
    for pod, (uid, write_error, _) in run.probes.items():
        assert (uid, write_error) == ("10001", "Read-only file system"), pod


def test_each_image_carries_its_own_side_and_the_contract_only(run):
    """The operator image holds no trainer code and no torch; the trainer image no operator."""
    held = {pod.split(":")[0]: packages for pod, (*_, packages) in run.probes.items()}
    assert held == {"operator": "thaw_contract,thaw_operator,kubernetes", "stage": "thaw_contract,trainer,torch"}, held


def test_prometheus_has_every_ranks_training_loss(kind, run):
    series = _prometheus(kind, f'count by (stage, rank) (last_over_time(thaw_train_loss{{finetunejob="{NAME}"}}[1h]))')
    assert {(s["metric"]["stage"], s["metric"]["rank"]) for s in series} == {(s, r) for s in STAGES for r in "01"}


@pytest.mark.parametrize(
    ("verb", "resource", "namespace", "allowed"),
    [
        ("create", "jobs.batch", "default", True),
        ("patch", "finetunejobs.thaw.dev --subresource=status", "default", True),
        ("delete", "finetunejobs.thaw.dev", "default", False),  # a user's object is the user's
        ("delete", "pods", "default", False),
        ("get", "secrets", "default", False),  # S3 keys reach pods by reference only
        ("create", "pods", "default", False),
        ("delete", "nodes", "", False),
        ("create", "clusterrolebindings", "", False),
        ("update", "leases.coordination.k8s.io", "kube-system", False),
    ],
)
def test_the_operators_service_account_gets_only_what_the_chart_grants(kind, verb, resource, namespace, allowed):
    args = ["auth", "can-i", verb, *resource.split(), f"--as={OPERATOR_SA}"] + (["-n", namespace] if namespace else [])
    out = kind.kubectl(*args, check=False)
    assert out.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, out.stdout, out.stderr)


def test_an_image_that_cannot_be_pulled_is_named_and_fails_the_job_after_its_startup_timeout(kind, run):
    """A real kubelet's ErrImagePull / ImagePullBackOff (no registry answers here, so an image
    that is not loaded into the nodes cannot be pulled): the reason shows in status, and after
    runPolicy.startupTimeoutSeconds the FineTuneJob is Failed with it and its Job gone."""
    name = f"nopull-{os.getpid()}"
    doc = kind_demo.job_manifest(yaml.safe_load(demo_mod.JOB.read_text()), name=name)
    deploy = json.loads(kind.kubectl("get", "deploy", "-n", "thaw-system", "-o", "json").stdout)["items"][0]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    trainer = next(a for a in args if a.startswith("--trainer-image=")).split("=", 1)[1]
    # The chart's trainer repository (what its admission policy allows), a tag no node holds.
    doc["spec"]["image"] = trainer.rsplit(":", 1)[0] + ":does-not-exist"
    doc["spec"]["runPolicy"] = {"startupTimeoutSeconds": 30}
    kind.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    try:
        deadline = time.monotonic() + 240
        while True:
            st = json.loads(kind.kubectl("get", "ftj", name, "-o", "json").stdout).get("status") or {}
            if st.get("phase") == "Failed" or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert st.get("phase") == "Failed", st
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "StageNotStarting", failed
        assert "ErrImagePull" in failed["message"] or "ImagePullBackOff" in failed["message"], failed["message"]
        assert "thaw-trainer:does-not-exist" in failed["message"], failed["message"]
        events = kind.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
        assert "StageNotStarting" in {e["reason"] for e in json.loads(events)["items"]}
        deadline = time.monotonic() + 60
        while json.loads(kind.kubectl("get", "jobs", "-l", f"thaw.dev/finetunejob={name}", "-o", "json").stdout)[
            "items"
        ]:
            assert time.monotonic() < deadline, "the stage Job of a job that could not start was not deleted"
            time.sleep(2)
    finally:
        kind.kubectl("delete", "ftj", name, "--ignore-not-found", "--wait=false")


CACHE_IMAGES_PER_CLASS = 5_000  # 4 classes: 20,000 training images, as a user's bucket holds them
CACHE_COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "gray": (128, 128, 128)}


def _image_folder(root, per_class: int, test_per_class: int) -> int:
    """train/<class>/*.jpg and test/<class>/*.jpg: small noisy squares of a class's color."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    n = 0
    for split, count in (("train", per_class), ("test", test_per_class)):
        for name, rgb in CACHE_COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=80)
                n += 1
    return n


def _upload(folder, bucket: str, prefix: str, endpoint: str, env: dict) -> None:
    """Every file of folder under s3://bucket/prefix, 32 PUTs in flight (what s5cmd would do)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(max_pool_connections=32, retries={"max_attempts": 5}),
    )
    files = [p for p in folder.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda p: s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder)}"), files))


def _stage_logs(kind, name: str) -> dict[int, list[str]]:
    """stage -> the logs of its pods (every attempt)."""
    out: dict[int, list[str]] = {}
    for p in _pods(kind, f"thaw.dev/finetunejob={name}"):
        stage = int(p["metadata"]["labels"]["thaw.dev/stage"])
        out.setdefault(stage, []).append(kind.kubectl("logs", p["metadata"]["name"], check=False).stdout)
    return out


def test_a_job_on_20000_images_fetches_them_once_into_its_data_cache_volume(kind, tmp_path):
    """spec.dataCache on the kind cluster's ReadWriteMany class: a 3-stage job on an s3:// prefix of
    20,000 JPEGs and one on shards of the same images, each stage's two pods on the two workers.
    Stage 0 fetches every object once between its two pods; stages 1 and 2 fetch nothing; one
    truncated test image is skipped and named in status; a third job that allows no bad image
    fails after one attempt with the line; deleting the FineTuneJob deletes its claim and the
    volume's files."""
    n = _image_folder(tmp_path / "images", CACHE_IMAGES_PER_CLASS, 50)
    corrupt = tmp_path / "images" / "test" / "red" / "00000.jpg"  # every stage evaluates every test image
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated, as a failed upload leaves one
    tag = f"cache-{os.getpid()}"
    pf = kind.port_forward("svc/seaweedfs", 8333)
    env = {**os.environ, **kind.s3_env()}
    try:
        endpoint = f"http://127.0.0.1:{pf.local_port}"
        _upload(tmp_path / "images", "thaw", f"datasets/{tag}", endpoint, env)
        packed = subprocess.run(
            [sys.executable, "-m", "trainer", "pack", str(tmp_path / "images"), f"s3://thaw/datasets/{tag}-shards"]
            + ["--shard-mib", "2", "--endpoint", endpoint],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert packed.returncode == 0, packed.stderr[-2000:]
    finally:
        pf.terminate()
    names = {"prefix": f"{tag}-prefix", "shards": f"{tag}-shards", "toomany": f"{tag}-toomany"}
    for kind_of, name in names.items():
        doc = kind_demo.job_manifest(yaml.safe_load(demo_mod.JOB.read_text()), name=name)
        spec = doc["spec"]
        source = f"s3://thaw/datasets/{tag}" + ("" if kind_of == "prefix" else "-shards")
        spec["model"]["numClasses"] = len(CACHE_COLORS)
        spec["data"] = {"source": source, "endpoint": kind_demo.S3_IN_CLUSTER, "imageSize": 32,
                        "trainPerClass": 40, "valPerClass": 20, "batchSize": 40, "maxBadFraction": 0.01}  # fmt: skip
        spec.pop("earlyStopping", None)
        for stage in spec["stages"]:
            stage["epochs"] = 1
        if kind_of == "toomany":  # the same bad image above the threshold: exit 2, one attempt
            spec["data"]["maxBadFraction"] = 0
        spec["dataCache"] = {"size": "1Gi", "storageClassName": "thaw-shared"}
        kind.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    try:
        status = demo_mod.follow(kind, names["toomany"], timeout=1800, quiet=True)
        failed = next(c for c in status.get("conditions", []) if c["type"] == "Failed")
        assert status["phase"] == "Failed" and failed["reason"] == "InvalidConfiguration", status
        said = "stage 0 (head) configuration error: spec.data.maxBadFraction: 1 of "
        assert failed["message"].startswith(said) and "red/00000.jpg" in failed["message"], failed
        assert status["stages"][0]["attempts"] == 1, status["stages"][0]  # not retried
        for name in (names["prefix"], names["shards"]):
            status = demo_mod.follow(kind, name, timeout=1800, quiet=True)
            assert status["phase"] == "Succeeded", status
            # The truncated image: skipped, counted and named in status, stage by stage.
            for row in status["stages"]:
                bad = row["result"]["badImages"]
                assert bad["count"] == 1 and bad["first"][0].endswith("red/00000.jpg"), (name, row["result"])
        claim = json.loads(kind.kubectl("get", "pvc", f"{names['prefix']}-data", "-o", "json").stdout)
        assert claim["status"]["phase"] == "Bound" and claim["spec"]["accessModes"] == ["ReadWriteMany"]

        logs = _stage_logs(kind, names["prefix"])
        said = r"\((\d+) objects downloaded\)"
        fetched = {k: [int(x) for t in v for x in re.findall(said, t)] for k, v in logs.items()}
        # Stage 0: every object once between its two pods (one fetched, the other found them there).
        assert sum(fetched[0]) == n and len(fetched[0]) >= 2, fetched
        assert set(fetched[1]) == {0} and set(fetched[2]) == {0}, fetched  # later stages: nothing

        logs = _stage_logs(kind, names["shards"])
        said = {k: [re.search(r"(\d+) of (\d+) shards", t) for t in v] for k, v in logs.items()}
        for k in (1, 2):
            assert all(m and m[1] == m[2] for m in said[k]), (k, said[k])  # every shard there at the start
    finally:
        for name in names.values():
            kind.kubectl("delete", "ftj", name, "--ignore-not-found", "--wait=true")
    # The claims go with their FineTuneJobs (garbage collector), then the volumes and their folders
    # on the shared mount (reclaimPolicy Delete: the provisioner's teardown helper).
    shared = Path(os.environ.get("THAW_KIND_SHARED") or f"{os.environ.get('TMPDIR', '/tmp')}/thaw-kind-thaw-volumes")
    deadline = time.monotonic() + 180
    while any(kind.kubectl("get", "pvc", f"{n}-data", check=False).returncode == 0 for n in names.values()) or [
        d for d in shared.iterdir() if d.name.endswith(tuple(f"_default_{n}-data" for n in names.values()))
    ]:
        assert time.monotonic() < deadline, "a data cache claim or its volume outlived its FineTuneJob"
        time.sleep(2)
