"""The spec's runtime parts: where checkpoints go, what a stage pod gets (resources,
tolerations), the run policy (retries, TTL) and metrics. Part of thaw_contract.spec, which is
what callers import.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    Field,
    field_validator,
)

from thaw_contract.spec_fields import SpecModel, bucket_of, check_endpoint

QUANTITY = r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?"  # a Kubernetes resource quantity


class CheckpointSpec(SpecModel):
    """Where checkpoints go. Credentials never appear here: they come from the environment
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or any source in boto3's chain)."""

    uri: str = Field("file://./runs", description="file:///dir or s3://bucket/prefix; the job's name is appended")
    endpoint: str | None = Field(None, description="S3 endpoint URL (SeaweedFS, MinIO); default AWS_ENDPOINT_URL")
    region: str | None = Field(None, description="S3 region; default AWS_REGION or us-east-1")
    path_style: bool = Field(True, description="path-style addressing (most self-hosted S3 servers need it)")
    keep_last: int = Field(2, gt=0, description="newest epoch checkpoints kept per stage")
    keep_best: bool = Field(True, description="also keep each stage's best epoch (by the early-stopping metric)")
    asynchronous: bool = Field(True, description="upload in the background; training waits only for a host copy")
    max_pending: int = Field(2, gt=0, description="host copies waiting for upload before training waits")
    upload_timeout_seconds: float = Field(
        600, gt=0, description="how long one checkpoint's upload is retried (backoff) before it counts as failed"
    )
    credentials_secret: str | None = Field(
        None,
        description="cluster: Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, given to stage pods "
        "(secretKeyRef); the operator never reads it",
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if v.startswith("s3://"):
            bucket_of(v)
            return v.rstrip("/")
        if not v.startswith("file://"):
            raise ValueError(f"must start with file:// or s3:// (got {v!r})")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        return check_endpoint(v)


class ResourcesSpec(SpecModel):
    """Per pod. GPUs come from gpusPerNode."""

    cpu: str | None = Field(None, description="requests and limits, e.g. '4' or '3500m'")
    memory: str | None = Field(None, description="requests and limits, e.g. '16Gi'")
    shm_size: str = Field("1Gi", description="memory-backed /dev/shm for DataLoader workers")

    @field_validator("cpu", "memory", "shm_size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(QUANTITY, v):
            raise ValueError(f"must be a Kubernetes quantity such as 2, 500m or 8Gi (got {v!r})")
        return v


class DataCacheSpec(SpecModel):
    """Cluster: the data cache as one PersistentVolumeClaim per job, owned by the FineTuneJob
    (deleted with it) and mounted by every stage pod, so an s3:// source is fetched once for
    the whole job; without it each stage pod fetches into its own emptyDir."""

    size: str = Field(description="requested capacity, e.g. 50Gi; bounds the cache: a source that does not fit fails")
    storage_class_name: str | None = Field(None, description="default: the cluster's default StorageClass")
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] = Field(
        "ReadWriteMany",
        description="ReadWriteMany (NFS, EFS, Filestore, CephFS) lets a stage's pods run on several nodes; "
        "ReadWriteOnce suits a job whose pods share one node",
    )

    @field_validator("size")
    @classmethod
    def _quantity(cls, v: str) -> str:
        if not re.fullmatch(QUANTITY, v) or not re.search(r"[1-9]", v):
            raise ValueError(f"must be a Kubernetes quantity such as 50Gi (got {v!r})")
        return v


class Toleration(SpecModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class RunPolicy(SpecModel):
    retries_per_stage: int = Field(2, ge=0, le=20, description="fresh Jobs per stage after the first fails")
    active_deadline_seconds: int | None = Field(None, gt=0, description="per stage Job")
    deadline_seconds: int | None = Field(
        None,
        gt=0,
        description="the whole FineTuneJob fails after this long from its first stage's start (suspended time "
        "included); the running stage's pods are stopped (they checkpoint first) and later stages never start",
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="delete the stage Jobs this long after the FineTuneJob finished"
    )
    startup_timeout_seconds: int | None = Field(
        900,
        gt=0,
        description="a stage whose pods cannot start (image pull failing, a Secret, ServiceAccount or ConfigMap "
        "missing, unschedulable) fails after this long, with the pod's reason; the reason shows in status at once. "
        "null: wait (and say why) for as long as it takes",
    )


class MetricsSpec(SpecModel):
    """Prometheus endpoint served by every rank (port + local rank)."""

    enabled: bool = True
    port: int = Field(9400, ge=1024, le=65535, description="first rank's port; local rank r serves port + r")
    linger_seconds: float = Field(
        0, ge=0, le=600, description="keep serving after the job ends so the last values get scraped"
    )
