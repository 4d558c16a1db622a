"""The operator's own Prometheus metrics (default registry, served by __main__)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from thaw_operator.status import PENDING, PHASES

disable_created_metrics()

RECONCILES = Counter("thaw_operator_reconciles", "FineTuneJob reconciliations")
RECONCILE_ERRORS = Counter("thaw_operator_reconcile_errors", "Reconciliations that raised")
RECONCILE_SECONDS = Histogram(
    "thaw_operator_reconcile_duration_seconds",
    "Time to observe, plan and apply one FineTuneJob",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_CREATED = Counter("thaw_operator_stage_jobs_created", "Stage Jobs created (first attempts and retries)")
STAGE_TRANSITIONS = Counter("thaw_operator_stage_transitions", "Stage phase changes, by new phase", ["phase"])
STAGE_SECONDS = Histogram(
    "thaw_operator_stage_duration_seconds",
    "Wall time of succeeded stages, first start to completion",
    buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400),
)
API_REQUESTS = Counter("thaw_operator_api_requests", "Requests the reconciler sent to the API server", ["verb"])
STAGE_ATTEMPTS = Gauge(
    "thaw_operator_stage_attempts", "Attempts (Jobs) of each stage so far", ["namespace", "finetunejob", "stage"]
)
QUEUE_DEPTH = Gauge("thaw_operator_queue_depth", "FineTuneJobs waiting in the work queue for a reconcile")
QUEUE_WAIT_SECONDS = Histogram(
    "thaw_operator_queue_wait_seconds",
    "Time a FineTuneJob waited in the work queue before a worker took it, by the priority it was taken at",
    ["priority"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FINETUNEJOBS = Gauge("thaw_operator_finetunejobs", "FineTuneJobs by phase", ["phase"])


def set_phases(items: list[dict]) -> None:
    tally = Tally((o.get("status") or {}).get("phase") or PENDING for o in items)
    for phase in PHASES:
        FINETUNEJOBS.labels(phase).set(tally.get(phase, 0))


def set_attempts(namespace: str, name: str, stages: list[dict]) -> None:
    for s in stages:
        STAGE_ATTEMPTS.labels(namespace, name, s["name"]).set(s.get("attempts", 0))


def forget(namespace: str, name: str, stage_names: list[str]) -> None:
    """A deleted FineTuneJob's series go with it (bounded cardinality)."""
    for stage in stage_names:
        try:
            STAGE_ATTEMPTS.remove(namespace, name, stage)
        except KeyError:
            pass
