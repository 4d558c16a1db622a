"""The Kubernetes objects of a FineTuneJob, as plain dicts (pure: no API calls).

Per FineTuneJob: a ConfigMap holding the job file every stage pod runs, and with spec.dataCache
a PersistentVolumeClaim for the data cache. Per stage: a headless
Service (stable DNS for torchrun's rendezvous) and, per attempt, an Indexed Job with one pod
per node. Names are deterministic, so creating them again is a no-op (409), never a duplicate.
"""

from __future__ import annotations

import re

import yaml

from thaw_contract.spec import API_VERSION, EXIT_CONFIG_ERROR, KIND, FineTuneJobSpec, StageSpec
from thaw_contract.stage_result import INPUT_DIGEST_ENV

LABEL_JOB = "thaw.dev/finetunejob"
LABEL_STAGE = "thaw.dev/stage"
LABEL_ATTEMPT = "thaw.dev/attempt"
ANNOTATION_SUSPENDED = "thaw.dev/suspended-by-operator"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# Kueue's Workloads: a queued stage is stopped and resumed through spec.active, never through
# the Job's suspend field, which belongs to Kueue once the Job is queued.
KUEUE_GROUP, KUEUE_VERSION, KUEUE_WORKLOADS = "kueue.x-k8s.io", "v1beta2", "workloads"
ANNOTATION_DEACTIVATED = "thaw.dev/deactivated-by-operator"
MASTER_PORT = 29500
CONFIG_PATH = "/etc/thaw/job.yaml"
DATA_CACHE = "/var/cache/thaw"
GRACE_MARGIN_SECONDS = 30
# Local rank r serves metrics on spec.metrics.port + r, declared as container port "metrics"
# (r = 0) or "metrics-<r>"; the chart's PodMonitor keeps every port whose name matches.
METRICS_PORT = re.compile(r"metrics(-[0-9]+)?")  # after the last upload's deadline, for the process to exit


def _data_cache_volume(ftj: str, spec: FineTuneJobSpec) -> dict:
    if spec.data_cache is None:
        return {"name": "data-cache", "emptyDir": {}}
    return {"name": "data-cache", "persistentVolumeClaim": {"claimName": cache_claim_name(ftj)}}


def job_name(ftj: str, stage: int, attempt: int) -> str:
    return f"{ftj}-{stage}-a{attempt}"


def service_name(ftj: str, stage: int) -> str:
    return f"{ftj}-{stage}"


def config_map_name(ftj: str) -> str:
    return f"{ftj}-job"


def owner_reference(ftj: dict) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ftj["metadata"]["name"],
        "uid": ftj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(ftj: dict, name: str, labels: dict | None = None) -> dict:
    return {
        "name": name,
        "namespace": ftj["metadata"]["namespace"],
        "labels": {LABEL_JOB: ftj["metadata"]["name"], "app.kubernetes.io/managed-by": "thaw", **(labels or {})},
        "ownerReferences": [owner_reference(ftj)],
    }


def config_map(ftj: dict) -> dict:
    """The job file the trainer reads: the FineTuneJob itself, with the pod's data cache path."""
    spec = dict(ftj["spec"])
    spec["data"] = {**spec["data"], "cacheDir": DATA_CACHE}
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": ftj["metadata"]["name"]}, "spec": spec}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ftj, config_map_name(ftj["metadata"]["name"])),
        "data": {"job.yaml": yaml.safe_dump(doc, sort_keys=False)},
    }


def cache_claim_name(ftj: str) -> str:
    return f"{ftj}-data"


def cache_claims(ftj: dict, spec: FineTuneJobSpec) -> list[dict]:
    """spec.dataCache: the job's data cache volume (none: each pod has an emptyDir). Owned by the
    FineTuneJob, so it is deleted with the job; every stage pod mounts it, so a source fetched by
    stage 0 is there for the stages after it."""
    cache = spec.data_cache
    if cache is None:
        return []
    claim = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name:
        claim["storageClassName"] = cache.storage_class_name
    meta = _meta(ftj, cache_claim_name(ftj["metadata"]["name"]))
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": claim}]


def headless_service(ftj: dict, stage: int) -> dict:
    name = ftj["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ftj, service_name(name, stage), {LABEL_STAGE: str(stage)}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before anything is "ready"
            "selector": {LABEL_JOB: name, LABEL_STAGE: str(stage)},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT}],
        },
    }


def stage_topology(spec: FineTuneJobSpec, stage: StageSpec) -> tuple[int, int]:
    """(pods, GPUs per pod) for a stage: its own override or the job's."""
    nodes = stage.nodes if stage.nodes is not None else spec.nodes
    gpus = stage.gpus_per_node if stage.gpus_per_node is not None else spec.gpus_per_node
    return nodes, gpus


def _resources(spec: FineTuneJobSpec, gpus: int) -> dict:
    amounts = {}
    if spec.resources.cpu:
        amounts["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        amounts["memory"] = spec.resources.memory
    limits = dict(amounts)
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": amounts, "limits": limits} if limits else {}


def _env(
    ftj: dict, spec: FineTuneJobSpec, stage: int, jobname: str, nodes: int, gpus: int, input_digest: str | None
) -> list[dict]:
    ns, name = ftj["metadata"]["namespace"], ftj["metadata"]["name"]
    master = f"{jobname}-0.{service_name(name, stage)}.{ns}.svc.cluster.local"
    env = [
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(nodes)},
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": "NPROC_PER_NODE", "value": str(max(gpus, 1))},
        {"name": "THAW_JOB", "value": name},
        {"name": "THAW_STAGE", "value": str(stage)},
        {"name": "THAW_CHECKPOINT_URI", "value": spec.checkpoint.uri},
        {"name": "THAW_TERMINATION_LOG", "value": "/dev/termination-log"},
        {"name": "HOME", "value": "/tmp"},  # read-only root filesystem: caches go to the /tmp emptyDir
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if input_digest:  # what stage-1's rank 0 reported: the pods load that checkpoint or nothing
        env.append({"name": INPUT_DIGEST_ENV, "value": input_digest})
    if spec.checkpoint.credentials_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = {"name": spec.checkpoint.credentials_secret, "key": key}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def spread_affinity(name: str, stage: int, attempt: int) -> dict:
    """By default a stage's pods prefer distinct nodes (spec.nodes means nodes): each gets a
    node's GPUs and the gang survives one node's loss less often. Preferred, not required, so a
    one-node cluster still runs it; a FineTuneJob's own spec.affinity replaces it."""
    selector = {LABEL_JOB: name, LABEL_STAGE: str(stage), LABEL_ATTEMPT: str(attempt)}
    term = {"labelSelector": {"matchLabels": selector}, "topologyKey": "kubernetes.io/hostname"}
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]
        }
    }


def stage_job(
    ftj: dict,
    spec: FineTuneJobSpec,
    stage: int,
    stage_spec: StageSpec,
    attempt: int,
    image: str,
    suspend: bool = False,
    input_digest: str | None = None,
) -> dict:
    """Stage `stage`'s Indexed Job. `input_digest`: the manifest digest the stage before reported
    for its final checkpoint (recorded in status), which these pods check before loading it."""
    name = ftj["metadata"]["name"]
    jobname = job_name(name, stage, attempt)
    nodes, gpus = stage_topology(spec, stage_spec)
    labels = {LABEL_STAGE: str(stage), LABEL_ATTEMPT: str(attempt)}
    queue = ftj["metadata"].get("labels", {}).get(KUEUE_QUEUE)
    job_labels = {**labels, **({KUEUE_QUEUE: queue} if queue else {})}
    container = {
        "name": "trainer",
        "image": image,
        # Preflight checks, then torchrun with the env below (trainer/launch.py): a configuration
        # error exits 2 before any rendezvous, with its line in the termination message.
        "command": ["python", "-m", "trainer", "launch"],
        "args": [CONFIG_PATH, "--stage", str(stage)],
        "env": _env(ftj, spec, stage, jobname, nodes, gpus, input_digest),
        "ports": [
            {"name": "metrics" if r == 0 else f"metrics-{r}", "containerPort": spec.metrics.port + r}
            for r in range(max(gpus, 1))
        ],
        "resources": _resources(spec, gpus),
        "volumeMounts": [
            {"name": "job", "mountPath": "/etc/thaw", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "data-cache", "mountPath": DATA_CACHE},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec = {
        "restartPolicy": "Never",
        "subdomain": service_name(name, stage),
        # SIGTERM (suspend, preemption) lets the trainer commit queued checkpoints first: as long
        # as one upload may be retried, plus a margin, so the kubelet never cuts the flush short.
        "terminationGracePeriodSeconds": int(spec.checkpoint.upload_timeout_seconds) + GRACE_MARGIN_SECONDS,
        # The trainer never talks to the API server: a token in the pod would only be something a
        # tenant's code could use (cloud workload identity, e.g. EKS IRSA, mounts its own token).
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "job", "configMap": {"name": config_map_name(name)}},
            {"name": "tmp", "emptyDir": {}},
            _data_cache_volume(name, spec),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
        ],
    }
    optional = {
        "serviceAccountName": spec.service_account_name,
        "priorityClassName": spec.priority_class_name,
        "nodeSelector": spec.node_selector or None,
        "affinity": spec.affinity or spread_affinity(name, stage, attempt),
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations] or None,
        "imagePullSecrets": [{"name": s} for s in spec.image_pull_secrets] or None,
    }
    pod_spec.update({k: v for k, v in optional.items() if v is not None})
    rp = spec.run_policy
    if queue:  # Kueue starts it when admitted (its webhook would suspend it too, where installed)
        suspend = True
    job_spec = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,  # a DDP gang fails together; the operator retries with a fresh Job that resumes
        "suspend": suspend,
        # Only disruptions (preemption, eviction, node drain) are free. Anything else, an OOM kill
        # (137) included, fails this attempt and counts against runPolicy.retriesPerStage.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_CONFIG_ERROR]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {"labels": {LABEL_JOB: name, **labels}, "annotations": dict(spec.pod_annotations)},
            "spec": pod_spec,
        },
    }
    if rp.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = rp.active_deadline_seconds
    # No ttlSecondsAfterFinished here: a stage Job removed before the operator saw it finish
    # would cost an attempt. The FineTuneJob's TTL is applied by the operator once it finished.
    meta = _meta(ftj, jobname, job_labels)
    if suspend and not queue:
        meta["annotations"] = {ANNOTATION_SUSPENDED: "true"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
