"""The FineTuneJob spec: the one contract between the trainer, the operator and the CRD.

Torch-free on purpose (the operator image has no torch). Field names are camelCase in
YAML (Kubernetes style) and snake_case in Python. Defaults live here and nowhere else.
Checks that need the model's layer groups (module globs, `top` ranges) happen in
`thaw_contract.plan`, which reports errors in the same `path: message` form.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from thaw_contract.catalog import BUNDLED, TIMM, is_known, unknown_architecture_message

API_VERSION = "thaw.dev/v1alpha1"
KIND = "FineTuneJob"
NAMED_DATASETS = ("fashion-mnist", "digits")


class SpecError(ValueError):
    """A user-caused problem with a FineTuneJob; each line names the field."""


# The exit code of a process that found a SpecError: retrying cannot help (the stage Job's
# podFailurePolicy fails at once on it).
EXIT_CONFIG_ERROR = 2
# How a stage that failed its gate (gate.onRegression: fail) begins its one-line reason.
GATE_FAILED = "stage gate:"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]


class ModelSpec(_Model):
    """Where the pretrained network comes from and what its new head predicts."""

    architecture: str = Field(
        description="torchvision builder name, efficientnet_lite0 (bundled, offline), or timm/<name> (any timm model)"
    )
    weights: str | None = Field(
        None,
        description="torchvision weights enum name (IMAGENET1K_V1, DEFAULT), BUNDLED for "
        "efficientnet_lite0, DEFAULT (hub weights) for a timm model, or null for random init",
    )
    checkpoint: str | None = Field(None, description="URI of a Thaw checkpoint to start from instead of weights")
    weights_uri: str | None = Field(
        None,
        description="weights you bring: file://, s3:// or https:// to a safetensors file or a torch state_dict "
        "for this architecture (a head of another class count is replaced)",
    )
    num_classes: int = Field(ge=2, description="classes of the new task")
    replace_head: bool = Field(
        True, description="replace the head's last Linear with a fresh one of numClasses outputs"
    )

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v: str) -> str:
        if not is_known(v):
            raise ValueError(unknown_architecture_message(v))
        return v

    @model_validator(mode="after")
    def _weights_fit_architecture(self) -> ModelSpec:
        given = [
            n
            for n, v in (("weights", self.weights), ("checkpoint", self.checkpoint), ("weightsUri", self.weights_uri))
            if v
        ]
        if len(given) > 1:
            raise ValueError(f"set one of weights, checkpoint and weightsUri (got {' and '.join(given)})")
        if self.weights_uri and not re.match(r"(file|s3|https)://.", self.weights_uri):
            raise ValueError(f"weightsUri must start with file://, s3:// or https:// (got {self.weights_uri!r})")
        if self.architecture == BUNDLED and self.weights not in (None, "BUNDLED"):
            raise ValueError(f"weights for {BUNDLED} must be BUNDLED or null (got {self.weights!r})")
        if self.architecture.startswith(TIMM) and self.weights not in (None, "DEFAULT"):
            raise ValueError(f"weights for a timm model must be DEFAULT (hub weights) or null (got {self.weights!r})")
        if self.architecture != BUNDLED and self.weights == "BUNDLED":
            raise ValueError(f"weights BUNDLED exist only for {BUNDLED}")
        if self.weights and self.weights != "BUNDLED" and not re.fullmatch(r"[A-Z0-9_]+", self.weights):
            raise ValueError(f"weights must be a torchvision enum name like IMAGENET1K_V1 (got {self.weights!r})")
        return self


class AugmentationSpec(_Model):
    hflip: bool = Field(False, description="random horizontal flips")
    crop_padding: int = Field(0, ge=0, description="pad by this many pixels, then random-crop back")


class DataSpec(_Model):
    """Images in, labels out. Splits are fixed by the job seed."""

    source: str = Field(
        description="fashion-mnist | digits | file:///path/to/ImageFolder | s3://bucket/prefix (ImageFolder, "
        "downloaded once per node into cacheDir)"
    )
    endpoint: str | None = Field(None, description="S3 endpoint URL for an s3:// source; default AWS_ENDPOINT_URL")
    image_size: int = Field(224, ge=16, le=1024)
    train_per_class: int | None = Field(None, gt=0, description="few-shot subset of the training set")
    val_per_class: int = Field(50, gt=0, description="held-out validation images per class, taken from train")
    test_limit: int | None = Field(None, gt=0, description="evaluate on the first N test images only")
    augmentation: AugmentationSpec = AugmentationSpec()
    batch_size: int = Field(64, gt=0, description="global batch per optimizer step, split evenly across ranks")
    workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    pin_memory: bool = Field(True, description="pinned host memory + non_blocking copies (CUDA only)")
    persistent_workers: bool = True
    cache_dir: str = Field("~/.cache/thaw", description="where datasets are unpacked once per node")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in NAMED_DATASETS or v.startswith("file://"):
            return v
        if v.startswith("s3://"):
            _bucket_of(v)
            return v
        raise ValueError(
            f"unknown data source {v!r}; use {' | '.join(NAMED_DATASETS)} | file:///path | s3://bucket/prefix"
        )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        return _endpoint(v)


class OptimizerSpec(_Model):
    name: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0, description="never applied to norm and bias parameters")
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleSpec(_Model):
    name: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup (cosine only)")
    min_lr_factor: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of the peak")
    pct_start: float = Field(0.3, gt=0, lt=1, description="one-cycle: fraction of steps spent rising")
    div_factor: float = Field(25.0, ge=1, description="one-cycle: start lr = peak / divFactor")
    final_div_factor: float = Field(1e4, ge=1, description="one-cycle: end lr = start / finalDivFactor")


class EarlyStoppingSpec(_Model):
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    mode: Literal["max", "min"] | None = Field(None, description="default: max for accuracy, min for loss")
    patience: int = Field(3, gt=0, description="epochs without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = True

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("max" if self.metric == "val_accuracy" else "min")


class GateSpec(_Model):
    """What happens when a stage leaves the model worse than the stage before it left it."""

    metric: Literal["val_accuracy", "val_loss"] = Field("val_accuracy", description="compared between stages")
    on_regression: Literal["rollback", "keep", "fail"] = Field(
        "rollback",
        description="rollback: the next stage starts from the previous stage's weights; keep: go on with this "
        "stage's; fail: the job fails",
    )
    min_gain: float = Field(
        0.0, ge=0, description="the least gain that advances: absolute, or a fraction of the previous value"
    )
    relative: bool = Field(False, description="minGain is a fraction of the previous stage's value")


class DivergenceSpec(_Model):
    """A stage whose loss turns non-finite or grows past lossFactor x its first reading stops,
    restores its best epoch (or its input weights), and the gate decides what follows."""

    enabled: bool = True
    loss_factor: float = Field(4.0, gt=1, description="a running loss above this multiple of the stage's first")


class Top(_Model):
    top: int = Field(gt=0, description="this many layer groups counted from the head")


class Modules(_Model):
    modules: list[str] = Field(min_length=1, description="module-name or group-name globs")


def _trainable_tag(v: Any) -> str | None:
    if v == "all":
        return "All"
    if isinstance(v, dict):
        return "Top" if "top" in v else "Modules" if "modules" in v else None
    return "Top" if isinstance(v, Top) else "Modules" if isinstance(v, Modules) else None


Trainable = Annotated[
    Annotated[Literal["all"], Tag("All")] | Annotated[Top, Tag("Top")] | Annotated[Modules, Tag("Modules")],
    Discriminator(_trainable_tag),
]


class StageSpec(_Model):
    """One stage: a freeze state, a learning-rate layout and an epoch budget."""

    name: str | None = Field(None, description="default: stage-<index>")
    trainable: Trainable = Field(description="all | {top: N} | {modules: [globs]}")
    epochs: int = Field(gt=0)
    lr: float | Literal["auto"] = Field(
        description="learning rate of the head group; auto: a range test on rank 0 picks it when the stage starts"
    )
    lr_decay: float = Field(1.0, ge=1, description="each lower trainable group gets lr / lrDecay^depth (ULMFiT: 2.6)")
    group_lrs: list[PositiveFloat] | None = Field(None, description="explicit rates per trainable group, head first")
    batch_size: int | None = Field(None, gt=0, description="overrides data.batchSize")
    schedule: ScheduleSpec | None = Field(None, description="overrides spec.schedule")
    train_bn: bool = Field(False, description="let BatchNorm layers in frozen groups update running stats")
    freeze_bn_stats: bool = Field(
        False, description="keep every BatchNorm in eval mode, trainable ones too (small batches, domain shift)"
    )
    gate: GateSpec | None = Field(None, description="overrides spec.gate for this stage")
    nodes: int | None = Field(None, gt=0, description="cluster: overrides spec.nodes for this stage")
    gpus_per_node: int | None = Field(None, ge=0, description="cluster: overrides spec.gpusPerNode for this stage")

    @field_validator("lr", mode="before")
    @classmethod
    def _number_or_auto(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"must be a positive number or auto (got {v!r})")

    @model_validator(mode="after")
    def _auto_lr_picks_every_rate(self) -> StageSpec:
        if self.lr == "auto" and self.group_lrs is not None:
            raise ValueError("groupLrs fixes the rates that lr: auto would pick; give one of them")
        return self

    @field_validator("trainable", mode="before")
    @classmethod
    def _one_trainable_form(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all":
            raise ValueError(f"must be 'all', {{top: N}} or {{modules: [...]}} (got {v!r})")
        if isinstance(v, dict) and (len(v) != 1 or not {"top", "modules"} & set(v)):
            raise ValueError(f"give exactly one of top or modules (got {sorted(v)})")
        if not isinstance(v, (str, dict, Top, Modules)):
            raise ValueError(f"must be 'all', {{top: N}} or {{modules: [...]}} (got {v!r})")
        return v

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?", v):
            raise ValueError(f"must be a lowercase DNS label of at most 32 characters (got {v!r})")
        return v

    @model_validator(mode="after")
    def _lrs_consistent(self) -> StageSpec:
        if self.group_lrs is not None and self.lr_decay != 1.0:
            raise ValueError("set either lrDecay or groupLrs, not both")
        if self.group_lrs is not None and self.group_lrs[0] != self.lr:
            raise ValueError(f"groupLrs[0] is the head's rate and must equal lr ({self.lr})")
        return self


class GradualSpec(_Model):
    """Shorthand: stage i trains the top (start + i) groups at lr * lrFactor^i."""

    stages: int = Field(gt=0, description="how many stages to expand into")
    start_top: int = Field(1, gt=0, description="groups trained in the first stage (1 = head only)")
    epochs_per_stage: int = Field(gt=0)
    lr: float = Field(gt=0)
    lr_factor: float = Field(1.0, gt=0, le=1, description="per-stage multiplier on the head lr")
    # The defaults are the recipe measured best in docs/results.md (discriminative rates, BatchNorm
    # statistics kept frozen); one rate for every group collapsed there (plan warns about lrDecay 1).
    lr_decay: float = Field(1.5, ge=1, description="each lower group at the rate of the one above / lrDecay")
    last_all: bool = Field(False, description="make the last stage train every group")
    freeze_bn_stats: bool = Field(True, description="BatchNorm statistics stay frozen (small batches)")


class SpeedSpec(_Model):
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA, off on CPU")
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: on for convolutional families (measured faster on CPU too); on CUDA, depthwise-heavy "
        "families (EfficientNet, MobileNet, ConvNeXt) time both layouts during warm-up and keep the faster",
    )
    data_on_device: Literal["auto", "on", "off"] = Field(
        "auto",
        description="in-memory sources (fashion-mnist, digits) resized once and held on the device as uint8, "
        "batches drawn and augmented there; auto: on CUDA when they take under a quarter of free memory",
    )
    warmup: Literal["auto", "on", "off"] = Field(
        "auto",
        description="a forward and backward pass on the stage's batch shape, on a copy of the model, while the "
        "checkpoint and data load (builds a GPU's kernel plans before the first step); auto: on CUDA",
    )
    frozen_prefix_no_grad: bool = Field(
        True, description="run frozen groups below the first trainable one under no_grad"
    )
    feature_cache: bool = Field(True, description="head-only stages without augmentation train on cached features")
    threads: int | None = Field(None, gt=0, description="torch threads per rank; default cores / local ranks")


# An S3 endpoint is a URL with a scheme: botocore raises a bare ValueError for "host:8333".
ENDPOINT_PATTERN = r"^https?://[^\s/?#]+(/[^\s]*)?$"
# Object names: stage Services are <name>-<k> and must be DNS-1035 labels (start with a letter).
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# S3's bucket naming rules (3-63 of a-z 0-9 . -), and the URIs built on them; the CRD carries
# the same patterns (thaw_operator.crd), so the API server refuses what the models refuse.
BUCKET_PATTERN = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
CHECKPOINT_URI_PATTERN = rf"^(s3://{BUCKET_PATTERN}(/.*)?|file://.+)$"
DATA_SOURCE_PATTERN = rf"^({'|'.join(NAMED_DATASETS)}|file:///.+|s3://{BUCKET_PATTERN}(/.*)?)$"


def _endpoint(v: str | None) -> str | None:
    if v is not None and not re.fullmatch(ENDPOINT_PATTERN, v):
        raise ValueError(f"must be a URL with its scheme, e.g. http://seaweedfs:8333 (got {v!r})")
    return v


def _bucket_of(uri: str) -> str:
    """The bucket of an s3:// URI, checked against S3's naming rules."""
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if not re.fullmatch(BUCKET_PATTERN, bucket):
        raise ValueError(f"{uri!r} does not name a valid S3 bucket (3-63 of a-z 0-9 . -)")
    return bucket


class CheckpointSpec(_Model):
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
            _bucket_of(v)
            return v.rstrip("/")
        if not v.startswith("file://"):
            raise ValueError(f"must start with file:// or s3:// (got {v!r})")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        return _endpoint(v)


class ResourcesSpec(_Model):
    """Per pod. GPUs come from gpusPerNode."""

    cpu: str | None = Field(None, description="requests and limits, e.g. '4' or '3500m'")
    memory: str | None = Field(None, description="requests and limits, e.g. '16Gi'")
    shm_size: str = Field("1Gi", description="memory-backed /dev/shm for DataLoader workers")

    @field_validator("cpu", "memory", "shm_size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?", v):
            raise ValueError(f"must be a Kubernetes quantity such as 2, 500m or 8Gi (got {v!r})")
        return v


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class RunPolicy(_Model):
    retries_per_stage: int = Field(2, ge=0, le=20, description="fresh Jobs per stage after the first fails")
    active_deadline_seconds: int | None = Field(None, gt=0, description="per stage Job")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="delete the stage Jobs this long after the FineTuneJob finished"
    )


class MetricsSpec(_Model):
    """Prometheus endpoint served by every rank (port + local rank)."""

    enabled: bool = True
    port: int = Field(9400, ge=1024, le=65535, description="first rank's port; local rank r serves port + r")
    linger_seconds: float = Field(
        0, ge=0, le=600, description="keep serving after the job ends so the last values get scraped"
    )


class FineTuneJobSpec(_Model):
    model: ModelSpec
    data: DataSpec
    stages: list[StageSpec] | None = Field(None, description="explicit stages, run in order")
    gradual: GradualSpec | None = Field(None, description="expands into stages; alternative to stages")
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    early_stopping: EarlyStoppingSpec | None = None
    gate: GateSpec = Field(default_factory=lambda: GateSpec(), description="after each stage: compare with the last")
    divergence: DivergenceSpec = Field(default_factory=lambda: DivergenceSpec())
    seed: int = Field(0, ge=0)
    gradient_accumulation: int = Field(1, gt=0)
    deterministic: bool = Field(False, description="deterministic kernels (slower; exact reruns)")
    speed: SpeedSpec = SpeedSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    metrics: MetricsSpec = MetricsSpec()
    # Cluster-only fields: the trainer ignores them; the operator reads them.
    image: str | None = Field(None, description="trainer image; default: the operator's --trainer-image")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secret names for pulling the image")
    nodes: int = Field(1, gt=0, description="pods per stage (torchrun nodes)")
    gpus_per_node: int = Field(0, ge=0, description="nvidia.com/gpu per pod; 0 trains on CPU, one process per pod")
    resources: ResourcesSpec = Field(default_factory=lambda: ResourcesSpec())
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(None, description="a core/v1 Affinity, passed to every stage pod")
    priority_class_name: str | None = None
    service_account_name: str | None = Field(None, description="ServiceAccount of the stage pods")
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="added to every stage pod")
    run_policy: RunPolicy = Field(default_factory=lambda: RunPolicy())
    suspend: bool = Field(False, description="true stops running stage pods (after a checkpoint); false resumes")

    @model_validator(mode="after")
    def _stages_xor_gradual(self) -> FineTuneJobSpec:
        if self.stages is None and self.gradual is None:
            raise ValueError("give stages or gradual")
        if self.stages is not None and self.gradual is not None:
            raise ValueError("give stages or gradual, not both")
        if self.stages is not None and not self.stages:
            raise ValueError("stages must not be empty")
        names = [s.name for s in self.stages or [] if s.name]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique (repeated: {', '.join(dup)})")
        return self


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v) or len(v) > 63:
            raise ValueError(f"must be a DNS-1035 label: a-z, 0-9 and '-', starting with a letter (got {v!r})")
        return v


class FineTuneJob(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    api_version: Literal["thaw.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: Metadata
    spec: FineTuneJobSpec


# Fields that change what a stage computes. A checkpoint written under other values of these is
# not resumed from; the rest (image, nodes, workers, metrics, suspend...) may change freely.
TRAINING_FIELDS = {
    "model": True,
    "data": {"source", "image_size", "train_per_class", "val_per_class", "test_limit", "augmentation", "batch_size"},
    "stages": True,
    "gradual": True,
    "optimizer": True,
    "schedule": True,
    "early_stopping": True,
    "seed": True,
    "gradient_accumulation": True,
    "deterministic": True,
}


def training_hash(spec: FineTuneJobSpec) -> str:
    """Digest of the training-relevant part of a spec, stored in every checkpoint manifest."""
    dumped = spec.model_dump(mode="json", include=TRAINING_FIELDS)
    # Gates and the divergence guard decide what is kept after an epoch, not what an epoch
    # computes: changing them resumes (and older checkpoints keep their digest).
    for stage in dumped.get("stages") or []:
        stage.pop("gate", None)
    if dumped["model"].get("weights_uri") is None:  # a field newer than older checkpoints' digests
        dumped["model"].pop("weights_uri", None)
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or part in ("Top", "Modules", "All"):
            continue  # pydantic's names for validators and union members
        else:
            out += f".{part}" if out else str(part)
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        path = _path(tuple(e["loc"]))
        if e["type"] == "missing":
            msg = "is required"
        elif e["type"] == "extra_forbidden":
            msg = "is not a known field"
        elif msg.startswith("Input should be"):
            got = e.get("input")
            msg = "must be" + msg.removeprefix("Input should be")
            if not isinstance(got, (dict, list)):
                msg += f" (got {got!r})"
            if isinstance(got, bool) and e["type"] == "literal_error":  # YAML 1.1: off, on, no, yes
                msg += "; YAML reads an unquoted off/on/no/yes as a boolean: quote the word"
        lines.append(f"{path}: {msg}" if path else msg)
    # Union members repeat the same complaint; keep each line once, in order.
    return "\n".join(dict.fromkeys(lines))


def parse_job(doc: Any) -> FineTuneJob:
    """Validate a parsed YAML document; raise SpecError with `field: message` lines."""
    if not isinstance(doc, dict):
        raise SpecError("a FineTuneJob must be a YAML mapping with apiVersion, kind, metadata and spec")
    try:
        return FineTuneJob.model_validate(doc)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def load_job(path: str | Path) -> FineTuneJob:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SpecError(f"cannot read {path}: {err.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_job(doc)
