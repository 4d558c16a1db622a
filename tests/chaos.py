"""Chaos trials: faults at random moments against real training through the operator.

    python -m tests.chaos [--trials pod-kill=20,operator-kill=20,...] [--seed N] [--out docs/reliability.md]

The bed: the local control plane with one process node (stage pods run `python -m trainer
launch` -> torchrun -> DDP training over gloo, in their own network namespaces and memory
cgroups), a real SeaweedFS for checkpoints, and the operator as its own process (so it can be
SIGKILLed). The job: digits at 32 px, 3 stages x 2 pods, 3 epochs a stage, checkpoints every
epoch. One undisturbed run gives the reference weights and wall time; every trial draws its
fault's moment from random.Random(seed) and the seed is printed, so a failed trial replays with
`--seed`. A trial passes only if the job ends as its fault's contract says (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testbed.control_plane import ControlPlane
from testbed.net import free_port
from testbed.node_agent import GATEWAY
from testbed.seaweedfs import ADMIN, SeaweedFS
from tests.builders import job_doc

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("head", "top3", "all")
BUCKET = "thaw"
EPOCHS = 3  # a stage


def chaos_job(name: str, endpoint: str, **spec) -> dict:
    """A small, deterministic job that still takes long enough to be hit: 3 stages x 3 epochs, 2 pods."""
    fields = {
        "data": {
            "source": "digits",
            "imageSize": 32,
            "trainPerClass": 20,
            "valPerClass": 5,
            "testLimit": 50,
            "batchSize": 20,
        },
        "stages": [
            {"name": "head", "trainable": {"top": 1}, "epochs": EPOCHS, "lr": 0.05},
            {"name": "top3", "trainable": {"top": 3}, "epochs": EPOCHS, "lr": 0.01},
            {"name": "all", "trainable": "all", "epochs": EPOCHS, "lr": 0.005},
        ],
        "nodeSelector": {"type": "process"},
        "nodes": 2,
        "speed": {"threads": 1},
        "checkpoint": {"uri": f"s3://{BUCKET}/chaos", "endpoint": endpoint, "credentialsSecret": "s3"},
        "runPolicy": {"retriesPerStage": 2},
        # Every stage's own weights are compared, never a rolled-back pointer to the stage before.
        "gate": {"onRegression": "keep"},
        **spec,
    }
    doc = job_doc(**fields)
    doc["metadata"] = {"name": name}
    return doc


@dataclass
class Outcome:
    fault: str
    trial: int
    seed: int
    ok: bool
    detail: str
    wall: float


class Bed:
    """The cluster, the store and the operator, each of which a trial may break."""

    def __init__(self, state: Path, cp: ControlPlane | None = None, namespace: str = "default"):
        from testbed.operator_process import OperatorProcess

        self.state, self.ns = state, namespace
        self.own_cp = cp is None  # the test suite lends its session cluster: one process node at a time
        self.cp = cp or ControlPlane(state / "cluster", kwok_nodes=2, process_nodes=1)
        self.seaweed = SeaweedFS(state / "seaweedfs", buckets=(BUCKET,), ip=str(GATEWAY), s3_port=free_port())
        self._operator_cls = OperatorProcess
        self.operator = None
        self.created: dict[str, set[str]] = defaultdict(set)  # Job/Service name -> uids ever seen
        self._stop = threading.Event()

    def start(self) -> Bed:
        from kubernetes import client, config

        shutil.rmtree(self.state, ignore_errors=True)  # an old store would hand back old checkpoints
        self.state.mkdir(parents=True)
        if self.own_cp:
            self.cp.start()
        self.cp.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests" / "crd"))
        self.cp.kubectl("wait", "--for", "condition=established", "crd/finetunejobs.thaw.dev", "--timeout=60s")
        self.seaweed.start()
        self.api = config.new_client_from_config(str(self.cp.kubeconfig_path))
        self.core, self.batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        key, secret = (base64.b64encode(x.encode()).decode() for x in ADMIN)
        self.core.create_namespaced_secret(
            self.ns, {"metadata": {"name": "s3"}, "data": {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}}
        )
        for lister in (self.batch.list_namespaced_job, self.core.list_namespaced_service):
            threading.Thread(target=self._record, args=(lister,), daemon=True).start()
        self.start_operator()
        return self

    def _record(self, lister) -> None:
        """Every Job and Service ever created, by uid: a name seen with two uids was created twice.
        Each new watch resumes from the last version seen, so no create falls between two."""
        from kubernetes import watch

        version = None
        while not self._stop.is_set():
            try:
                for ev in watch.Watch().stream(lister, self.ns, timeout_seconds=10, resource_version=version):
                    if ev["type"] == "ERROR":  # 410 Gone as an event: list again
                        version = None
                        break
                    version = ev["object"].metadata.resource_version
                    self.created[ev["object"].metadata.name].add(ev["object"].metadata.uid)
            except Exception as err:  # noqa: BLE001 - the API server may be restarting: watch again
                if getattr(err, "status", None) == 410:
                    version = None  # too old: list again (the uids of what exists are kept)
                time.sleep(0.5)

    def start_operator(self) -> None:
        self.operator = self._operator_cls(
            self.cp.kubeconfig_path, self.state / "operator.log", extra=["--namespace", self.ns]
        ).start()

    def stop(self) -> None:
        self._stop.set()
        if self.operator:
            self.operator.stop()
        self.seaweed.stop()
        if self.own_cp:
            self.cp.stop()

    # -- observing ------------------------------------------------------------------------

    def submit(self, doc: dict) -> float:
        self.custom.create_namespaced_custom_object("thaw.dev", "v1alpha1", self.ns, "finetunejobs", doc)
        return time.monotonic()

    def status(self, name: str) -> dict:
        try:
            obj = self.custom.get_namespaced_custom_object("thaw.dev", "v1alpha1", self.ns, "finetunejobs", name)
        except Exception:  # noqa: BLE001 - the API server may be restarting
            return {}
        return obj.get("status") or {}

    def wait(self, name: str, timeout: float = 900, poll: Callable[[dict], None] | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(name)
            if poll:
                poll(st)
            if st.get("phase") in ("Succeeded", "Failed"):
                return st
            time.sleep(0.5)
        return self.status(name) | {"phase": "TimedOut"}

    def running_pods(self, name: str, stage: int) -> list:
        try:
            pods = self.core.list_namespaced_pod(
                self.ns, label_selector=f"thaw.dev/finetunejob={name},thaw.dev/stage={stage}"
            ).items
        except Exception:  # noqa: BLE001
            return []
        return [
            p
            for p in pods
            if p.status.phase == "Running"
            and p.metadata.deletion_timestamp is None
            and all((c.container_id or "").startswith("process://") for c in p.status.container_statuses or [])
        ]

    def store(self, name: str):
        from thaw_contract.spec import CheckpointSpec
        from trainer.storage import open_store

        for k, v in self.seaweed.env().items():
            os.environ[k] = v
        spec = CheckpointSpec(uri=f"s3://{BUCKET}/chaos", endpoint=self.seaweed.endpoint)
        return open_store(spec, name, write=True)

    def final_weights(self, name: str) -> dict:
        import io

        import torch

        from trainer import checkpoint as ckpt

        store = self.store(name)
        prefix, manifest = ckpt.read_final(store, len(STAGES) - 1, STAGES[-1])
        model = next(f for f in manifest["files"] if f.startswith("model"))
        return torch.load(io.BytesIO(store.get(f"{prefix}/{model}")), weights_only=True)

    def pod_log(self, name: str) -> str:
        return "\n".join(p.read_text() for p in self.cp.state.rglob(f"{self.ns}_{name}-*/trainer.log"))


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _children() -> dict[int, list[int]]:
    """Every process's children, from one pass over /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children[ppid].append(int(d.name))
    return children


def _descendants(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    children = _children() if children is None else children
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _container_root(pod) -> int:
    return int(pod.status.container_statuses[0].container_id.removeprefix("process://"))


def kill_container(pod) -> None:
    """SIGKILL every process of the pod's container, as a runtime does (torchrun starts its
    workers in sessions of their own, so the process group alone is not the container)."""
    for pid in _descendants(_container_root(pod)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_stage_pod(pod, rng: random.Random) -> str:
    """SIGKILL a whole pod (the container dies: 137), or only one training worker under its
    torchrun (the case that once failed a whole job)."""
    children = _children()
    tree = _descendants(_container_root(pod), children)
    workers = [p for p in tree if "trainer" in _cmdline(p) and not children.get(p)]  # leaves: the workers
    if workers and rng.random() < 0.5:
        victim = rng.choice(workers)
        os.kill(victim, signal.SIGKILL)
        return f"worker pid {victim} of {pod.metadata.name}"
    kill_container(pod)
    return f"pod {pod.metadata.name}"


# -- trials ----------------------------------------------------------------------------------


@dataclass
class Reference:
    weights: dict
    wall: float
    stage_seconds: list[float] = field(default_factory=list)


def reference(bed: Bed) -> Reference:
    t0 = bed.submit(chaos_job("ref", bed.seaweed.endpoint))
    starts: dict[int, float] = {}

    def note(st):
        for k, s in enumerate(st.get("stages") or []):
            if s.get("phase") == "Running":
                starts.setdefault(k, time.monotonic())

    st = bed.wait("ref", poll=note)
    wall = time.monotonic() - t0
    if st.get("phase") != "Succeeded":
        raise RuntimeError(f"the undisturbed reference run did not succeed: {st}")
    ends = [starts.get(k + 1, t0 + wall) for k in range(len(STAGES))]
    return Reference(bed.final_weights("ref"), wall, [ends[k] - starts.get(k, t0) for k in range(len(STAGES))])


def _checks(bed: Bed, name: str, st: dict, ref: Reference, attempts: list[int] | None) -> list[str]:
    bad = []
    if st.get("phase") != "Succeeded":
        bad.append(f"phase {st.get('phase')}: {[c.get('message') for c in st.get('conditions', [])][-1:]}")
        return bad
    got = [s.get("attempts") for s in st.get("stages", [])]
    if attempts is not None and got != attempts:
        bad.append(f"attempts {got}, expected {attempts}")
    if not same_weights(bed.final_weights(name), ref.weights):
        bad.append("final weights differ from the undisturbed run")
    twice = sorted(n for n, uids in bed.created.items() if n.startswith(f"{name}-") and len(uids) > 1)
    if twice:
        bad.append(f"created twice: {twice}")
    return bad


def trial_pod_kill(bed: Bed, ref: Reference, name: str, rng: random.Random) -> tuple[bool, str]:
    stage = rng.randrange(len(STAGES))
    # Within the pods' running window: a stage's seconds (status Running to the next stage's)
    # include creating and starting its pods, so 0.8 of them could fall after the pods ended
    # (seen once, as a stage ran faster than in the reference: the fault was never injected).
    delay = rng.uniform(0.0, 0.6 * ref.stage_seconds[stage])
    hit: list[str] = []
    seen: dict[str, float] = {}

    def poll(st):
        if hit:
            return
        pods = bed.running_pods(name, stage)
        if len(pods) < 2:
            return
        seen.setdefault("t", time.monotonic())
        if time.monotonic() - seen["t"] >= delay:
            hit.append(kill_stage_pod(rng.choice(pods), rng))

    t0 = bed.submit(chaos_job(name, bed.seaweed.endpoint))
    st = bed.wait(name, poll=poll)
    wall = time.monotonic() - t0
    expected = [2 if k == stage else 1 for k in range(len(STAGES))]
    if not hit:
        when = "ended before the drawn moment" if seen else "were never seen running"
        return False, f"the stage {stage} pods {when} (+{delay:.1f}s; fault not injected)"
    # A kill in the last instant (rank 0 already committed and reported) ends the attempt
    # successfully; anything else must cost exactly one attempt.
    bad = _checks(bed, name, st, ref, None)
    got = [s.get("attempts") for s in st.get("stages", [])]
    if got not in (expected, [1, 1, 1]):
        bad.append(f"attempts {got}, expected {expected}")
    # A retry costs about one stage; a pod deaf to SIGTERM (torchrun's exit barrier: 300 s) would not.
    if wall > 2 * ref.wall + 30:
        bad.append(f"wall {wall:.0f}s > 2 x reference {ref.wall:.0f}s + 30s")
    return not bad, f"stage {stage} +{delay:.1f}s: killed {hit[0]}; attempts {got}, wall {wall:.0f}s" + (
        "; " + "; ".join(bad) if bad else ""
    )


def trial_operator_kill(bed: Bed, ref: Reference, name: str, rng: random.Random) -> tuple[bool, str]:
    at, down = rng.uniform(0.0, 0.9 * ref.wall), rng.uniform(0.0, 10.0)
    t0 = bed.submit(chaos_job(name, bed.seaweed.endpoint))
    time.sleep(at)
    bed.operator.kill()
    time.sleep(down)
    bed.start_operator()
    st = bed.wait(name)
    wall = time.monotonic() - t0
    bad = _checks(bed, name, st, ref, [1, 1, 1])
    if wall > ref.wall + 10 + down:
        bad.append(f"wall {wall:.0f}s > reference {ref.wall:.0f}s + 10s + {down:.1f}s")
    return not bad, f"killed at {at:.1f}s, down {down:.1f}s, wall {wall:.0f}s (ref {ref.wall:.0f}s)" + (
        "; " + "; ".join(bad) if bad else ""
    )


def _during_stage(bed: Bed, name: str, rng: random.Random, ref: Reference, at_start: bool, fault: Callable):
    stage = rng.randrange(len(STAGES))
    delay = 0.0 if at_start else rng.uniform(0.0, 0.6 * ref.stage_seconds[stage])
    done: list[str] = []
    seen: dict[str, float] = {}

    def poll(st):
        if done:
            return
        stages = st.get("stages") or []
        if len(stages) <= stage:
            return
        if at_start:
            ready = bool(
                bed.core.list_namespaced_pod(
                    bed.ns, label_selector=f"thaw.dev/finetunejob={name},thaw.dev/stage={stage}"
                ).items
            )
        else:
            ready = len(bed.running_pods(name, stage)) == 2
        if ready:
            seen.setdefault("t", time.monotonic())
            if time.monotonic() - seen["t"] >= delay:
                done.append(fault())

    bed.submit(chaos_job(name, bed.seaweed.endpoint))
    st = bed.wait(name, timeout=1200, poll=poll)
    return stage, delay, done, st


def trial_apiserver_restart(bed: Bed, ref: Reference, name: str, rng: random.Random) -> tuple[bool, str]:
    def fault():
        bed.cp.restart("kube-apiserver", down_seconds=rng.uniform(0, 5))
        return "restarted"

    stage, delay, done, st = _during_stage(bed, name, rng, ref, False, fault)
    bad = _checks(bed, name, st, ref, None) if done else ["fault not injected"]
    return not bad, f"stage {stage} +{delay:.1f}s; attempts {[s.get('attempts') for s in st.get('stages', [])]}" + (
        "; " + "; ".join(bad) if bad else ""
    )


def _store_down(at_start: bool):
    def trial(bed: Bed, ref: Reference, name: str, rng: random.Random) -> tuple[bool, str]:
        def fault():
            bed.seaweed.stop()
            threading.Timer(60, bed.seaweed.start).start()
            return "down 60 s"

        stage, delay, done, st = _during_stage(bed, name, rng, ref, at_start, fault)
        bad = _checks(bed, name, st, ref, None) if done else ["fault not injected"]
        return not bad, f"stage {stage} +{delay:.1f}s; attempts {[s.get('attempts') for s in st.get('stages', [])]}" + (
            "; " + "; ".join(bad) if bad else ""
        )

    return trial


def committed_epochs(store, stage: int) -> list[int]:
    from trainer import checkpoint as ckpt

    keys = store.list(ckpt.stage_prefix(stage, STAGES[stage]))
    return sorted(
        int(k.split("epoch-")[1].split("/")[0]) for k in keys if k.endswith(f"/{ckpt.MANIFEST}") and "epoch-" in k
    )


def trial_corrupt_checkpoint(bed: Bed, ref: Reference, name: str, rng: random.Random) -> tuple[bool, str]:
    """Stage s has committed >= 1 epoch; the operator is stopped, a pod killed, the newest
    checkpoint damaged (truncated or bytes flipped), the operator started: the retry must skip
    it with a warning naming it and resume from the one before (or the stage's start).

    Only the stages that unfreeze layers are hit: the head stage trains on cached features, and
    its three epochs commit faster than the status is polled, so a draw of it could find no
    moment (a CI run drew it and missed); its checkpoints take the same path as the others'."""
    from trainer import checkpoint as ckpt

    stage = 1 + rng.randrange(len(STAGES) - 1)
    how = rng.choice(["truncate", "flip"])
    store = bed.store(name)
    hit: list[str] = []

    def poll(st):
        pods = bed.running_pods(name, stage)
        if hit or len(pods) < 2:
            return
        committed = committed_epochs(store, stage)  # manifests only: polling must not slow the training
        if not committed or committed[-1] >= EPOCHS - 1:
            return  # nothing committed yet, or the stage has no epoch left to resume into
        bed.operator.kill()  # so that no next attempt starts before the damage is done
        for p in pods:
            kill_container(p)
        prefix = ckpt.epoch_prefix(stage, STAGES[stage], committed_epochs(store, stage)[-1])  # one more may have landed
        victim = f"{prefix}/model.pt"
        data = store.get(victim)
        store.put(victim, data[: len(data) // 2] if how == "truncate" else bytes([data[0] ^ 0xFF]) + data[1:])
        hit.append(f"{how} {victim}")
        bed.start_operator()

    bed.submit(chaos_job(name, bed.seaweed.endpoint))
    st = bed.wait(name, poll=poll)
    if not hit:
        return False, f"stage {stage}: no checkpoint was seen to damage (the job ended {st.get('phase')})"
    bad = _checks(bed, name, st, ref, None)
    damaged = hit[0].split(" ", 1)[1].rsplit("/", 1)[0]
    if f"skipping checkpoint {damaged}" not in bed.pod_log(name):
        bad.append(f"no warning naming {damaged}")
    return not bad, f"stage {stage}: {hit[0]}" + ("; " + "; ".join(bad) if bad else "")


def trial_oom_every_attempt(bed: Bed, ref: Reference, name: str, rng: random.Random) -> tuple[bool, str]:
    retries = rng.randrange(3)
    doc = chaos_job(name, bed.seaweed.endpoint, resources={"memory": "150Mi"}, runPolicy={"retriesPerStage": retries})
    bed.submit(doc)
    st = bed.wait(name)
    bad = []
    jobs = sorted(
        j.metadata.name
        for j in bed.batch.list_namespaced_job(bed.ns, label_selector=f"thaw.dev/finetunejob={name}").items
    )
    if st.get("phase") != "Failed":
        bad.append(f"phase {st.get('phase')}")
    if jobs != [f"{name}-0-a{i + 1}" for i in range(retries + 1)]:
        bad.append(f"jobs {jobs}, expected {retries + 1} attempts of stage 0")
    failed = next((c for c in st.get("conditions", []) if c["type"] == "Failed"), {})
    if "OOMKilled" not in failed.get("message", ""):
        bad.append(f"reason does not name OOMKilled: {failed.get('message')!r}")
    time.sleep(5)  # nothing restarts after the end
    if len(bed.batch.list_namespaced_job(bed.ns, label_selector=f"thaw.dev/finetunejob={name}").items) != len(jobs):
        bad.append("a Job was created after the FineTuneJob failed")
    return not bad, f"retriesPerStage {retries}: {len(jobs)} attempts" + ("; " + "; ".join(bad) if bad else "")


def trial_broken_among_ten(bed: Bed, ref: Reference, name: str, rng: random.Random) -> tuple[bool, str]:
    """Ten good jobs (stage pods on kwok nodes, random durations) and one broken in a way drawn
    at random: its job file's or its stage Service's name taken by a stranger, or its stage
    pods failing on every attempt. The ten must succeed; the broken one must say why."""
    from testbed.control_plane import DELAY, EXIT_CODE
    from tests.integration.cluster.test_operator import ftj_doc, reported

    store = f"file://{bed.state}/kwok-store"
    broken = f"{name}-x"
    how = rng.choice(["configmap", "service", "failing"])
    if how == "configmap":
        bed.core.create_namespaced_config_map(bed.ns, {"metadata": {"name": f"{broken}-job"}, "data": {"a": "b"}})
    elif how == "service":
        svc = {"metadata": {"name": f"{broken}-0"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}
        bed.core.create_namespaced_service(bed.ns, svc)
    code = "1" if how == "failing" else "0"
    bed.submit(ftj_doc(broken, store, stages=1, podAnnotations={EXIT_CODE: code, DELAY: "1s", **reported({0: 0.5})}))
    good = [f"{name}-{i}" for i in range(10)]
    for g in good:
        ann = {EXIT_CODE: "0", DELAY: f"{rng.randrange(100, 3000)}ms", **reported({0: 0.5, 1: 0.6})}
        bed.submit(ftj_doc(g, store, stages=2, podAnnotations=ann))
    phases = {g: bed.wait(g, timeout=180).get("phase") for g in good}
    bad = [f"{g} {p}" for g, p in phases.items() if p != "Succeeded"]
    st = bed.status(broken)
    conds = {c["type"]: c for c in st.get("conditions", [])}
    if how == "failing":
        st = bed.wait(broken, timeout=120)
        failed = next((c for c in st.get("conditions", []) if c["type"] == "Failed"), {})
        if st.get("phase") != "Failed" or failed.get("reason") != "RetriesExhausted":
            bad.append(f"broken one: {st.get('phase')} {failed.get('reason')}")
    elif conds.get("Stalled", {}).get("reason") != "ReconcileError" or "not owned" not in conds["Stalled"]["message"]:
        bad.append(f"broken one not Stalled with the reason: {conds}")
    for g in [*good, broken]:
        bed.custom.delete_namespaced_custom_object("thaw.dev", "v1alpha1", bed.ns, "finetunejobs", g)
    if how == "configmap":
        bed.core.delete_namespaced_config_map(f"{broken}-job", bed.ns)
    elif how == "service":
        bed.core.delete_namespaced_service(f"{broken}-0", bed.ns)
    return not bad, f"broken by {how}: {sum(p == 'Succeeded' for p in phases.values())}/10 good succeeded" + (
        "; " + "; ".join(bad) if bad else ""
    )


FAULTS: dict[str, tuple[Callable, int, str, str]] = {
    "pod-kill": (
        trial_pod_kill,
        20,
        "a random stage pod (or one of its workers) SIGKILLed at a random moment",
        "Succeeded; the stage's attempts recorded; final weights bit-identical to the undisturbed run; "
        "wall time < 2 x the reference + 30 s",
    ),
    "operator-kill": (
        trial_operator_kill,
        20,
        "the operator SIGKILLed at a random moment, restarted after 0-10 s",
        "Succeeded; no Job or Service created twice; wall time < reference + 10 s + the restart delay",
    ),
    "apiserver-restart": (
        trial_apiserver_restart,
        5,
        "kube-apiserver restarted mid-stage (SIGTERM; it drains up to 30 s, then 0-5 s down)",
        "Succeeded; final weights bit-identical",
    ),
    "store-down-mid-stage": (
        _store_down(False),
        5,
        "SeaweedFS down for 60 s mid-stage",
        "Succeeded; nothing committed lost (final weights bit-identical)",
    ),
    "store-down-at-start": (
        _store_down(True),
        5,
        "SeaweedFS down for 60 s as a stage's pods start",
        "Succeeded; final weights bit-identical",
    ),
    "corrupt-checkpoint": (
        trial_corrupt_checkpoint,
        5,
        "the newest checkpoint truncated or corrupted before a resume",
        "skipped with a warning naming it; the previous valid one used; weights bit-identical",
    ),
    "oom-every-attempt": (
        trial_oom_every_attempt,
        3,
        "a container exiting 137 (OOM) on every attempt",
        "Failed after exactly retriesPerStage+1 attempts, reason names OOMKilled, nothing more",
    ),
    "broken-among-ten": (
        trial_broken_among_ten,
        3,
        "one broken FineTuneJob among 10 good ones (kwok stage pods; broken at random three ways)",
        "the 10 Succeed; the broken one Stalled (a stranger holds its child's name) or Failed, saying why",
    ),
}


def run_trials(
    bed: Bed, plan: dict[str, int], seed: int, log=print, replay: int | None = None
) -> tuple[Reference, list[Outcome]]:
    """Each trial's seed comes from the master seed in order, or is `replay` (one trial)."""
    ref = reference(bed)
    log(f"reference: {ref.wall:.0f} s, stages {[round(s) for s in ref.stage_seconds]} s")
    master = random.Random(seed)
    outcomes = []
    for fault, count in plan.items():
        fn = FAULTS[fault][0]
        for i in range(count):
            trial_seed = master.randrange(2**31) if replay is None else replay
            name = f"{fault.split('-')[0][:4]}-{fault.split('-')[-1][:4]}-{i}".replace("_", "")
            t0 = time.monotonic()
            try:
                ok, detail = fn(bed, ref, name, random.Random(trial_seed))
            except Exception as err:  # noqa: BLE001 - a trial that crashes is a failed trial
                ok, detail = False, f"{type(err).__name__}: {err}"
            out = Outcome(fault, i, trial_seed, ok, detail, time.monotonic() - t0)
            log(f"{'PASS' if ok else 'FAIL'} {fault} #{i} seed={trial_seed} {out.wall:.0f}s: {detail}")
            outcomes.append(out)
            if not bed.operator.alive():  # a trial that failed mid-restart must not fail the ones after it
                log("the operator is down after that trial: starting it")
                bed.start_operator()
            try:
                bed.custom.delete_namespaced_custom_object("thaw.dev", "v1alpha1", bed.ns, "finetunejobs", name)
            except Exception:  # noqa: BLE001 - a trial of several jobs removes its own
                pass
    return ref, outcomes


def report(outcomes: list[Outcome], ref: Reference, seed: int, argv: str) -> str:
    lines = [
        "### Chaos trials (random fault timing, real training)",
        "",
        f"Command: `make chaos` (`python -m tests.chaos {argv}`), master seed {seed}; the undisturbed "
        f"reference job took {ref.wall:.0f} s. Replay one trial with `--replay FAULT:SEED`.",
        "",
        "| fault | passed / run | must show | trial seeds | wall per trial |",
        "|---|---|---|---|---|",
    ]
    for fault, (_, _, what, must) in FAULTS.items():
        rows = [o for o in outcomes if o.fault == fault]
        if not rows:
            continue
        seeds = ", ".join(str(o.seed) + ("" if o.ok else " (FAILED)") for o in rows)
        mean = sum(o.wall for o in rows) / len(rows)
        lines.append(f"| {what} | {sum(o.ok for o in rows)}/{len(rows)} | {must} | {seeds} | {mean:.0f} s |")
    failed = [o for o in outcomes if not o.ok]
    lines += [
        "",
        "Failures: none." if not failed else "Failures:",
        *(f"- {o.fault} seed {o.seed}: {o.detail}" for o in failed),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos")
    ap.add_argument("--trials", default=",".join(f"{k}={v[1]}" for k, v in FAULTS.items()))
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--state", type=Path, default=ROOT / "runs" / "chaos")
    ap.add_argument("--replay", metavar="FAULT:SEED", help="one trial with the trial seed a report printed")
    ap.add_argument("--out", type=Path, help="docs/reliability.md: its chaos section is replaced")
    args = ap.parse_args()
    plan = {k: int(v) for k, v in (kv.split("=") for kv in args.trials.split(","))}
    replay = None
    if args.replay:
        fault, trial_seed = args.replay.split(":")
        plan, replay = {fault: 1}, int(trial_seed)
    unknown = set(plan) - set(FAULTS)
    if unknown:
        sys.exit(f"unknown fault(s) {sorted(unknown)}; known: {sorted(FAULTS)}")
    print(f"chaos: master seed {args.seed}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `kill` still stops the bed
    bed = Bed(args.state).start()
    try:
        ref, outcomes = run_trials(bed, plan, args.seed, log=lambda s: print(s, flush=True), replay=replay)
    finally:
        bed.stop()
    text = report(outcomes, ref, args.seed, " ".join(sys.argv[1:]))
    print(text)
    if args.out:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from report import write_section

        write_section(args.out, "chaos", text)
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


if __name__ == "__main__":
    main()
