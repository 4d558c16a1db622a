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
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The parts, in modules of their own; this module is the one callers import them from.
from thaw_contract.spec_fields import (
    API_VERSION,
    BUCKET_PATTERN,
    CHECKPOINT_URI_PATTERN,
    DATA_SOURCE_PATTERN,
    ENDPOINT_PATTERN,
    EXIT_CONFIG_ERROR,
    GATE_FAILED,
    KIND,
    NAME_PATTERN,
    NAMED_DATASETS,
    SpecError,
    SpecModel,
)
from thaw_contract.spec_runtime import (
    QUANTITY,
    CheckpointSpec,
    DataCacheSpec,
    MetricsSpec,
    ResourcesSpec,
    RunPolicy,
    Toleration,
)
from thaw_contract.spec_training import (
    AugmentationSpec,
    DataSpec,
    DivergenceSpec,
    EarlyStoppingSpec,
    GateSpec,
    GradualSpec,
    ModelSpec,
    Modules,
    OptimizerSpec,
    ScheduleSpec,
    SpeedSpec,
    StageSpec,
    Top,
)

__all__ = [
    "API_VERSION",
    "BUCKET_PATTERN",
    "CHECKPOINT_URI_PATTERN",
    "DATA_SOURCE_PATTERN",
    "ENDPOINT_PATTERN",
    "EXIT_CONFIG_ERROR",
    "GATE_FAILED",
    "KIND",
    "NAME_PATTERN",
    "QUANTITY",
    "NAMED_DATASETS",
    "TRAINING_FIELDS",
    "AugmentationSpec",
    "CheckpointSpec",
    "DataCacheSpec",
    "DataSpec",
    "DivergenceSpec",
    "EarlyStoppingSpec",
    "FineTuneJob",
    "FineTuneJobSpec",
    "GateSpec",
    "GradualSpec",
    "Metadata",
    "MetricsSpec",
    "ModelSpec",
    "Modules",
    "OptimizerSpec",
    "ResourcesSpec",
    "RunPolicy",
    "ScheduleSpec",
    "SpecError",
    "SpeedSpec",
    "StageSpec",
    "Toleration",
    "Top",
    "format_validation_error",
    "load_job",
    "parse_job",
    "training_hash",
]


class FineTuneJobSpec(SpecModel):
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
    export: list[Literal["safetensors", "onnx", "torchscript"]] = Field(
        default_factory=lambda: ["safetensors"],
        description="the model artifact's files: safetensors (always), onnx, torchscript (checked on the test split)",
    )
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
    data_cache: DataCacheSpec | None = Field(
        None, description="one volume per job for the data cache (s3:// sources fetched once per job); null: emptyDir"
    )
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

    @field_validator("export")
    @classmethod
    def _export_has_safetensors(cls, v: list[str]) -> list[str]:
        # config.json describes the safetensors file; the other formats are made from it.
        if "safetensors" not in v:
            raise ValueError("must include safetensors (the artifact's weights; onnx and torchscript are added to it)")
        if len(set(v)) != len(v):
            raise ValueError("each format once")
        return v


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
    # Fields newer than older checkpoints' digests, left out while unset.
    if dumped["model"].get("weights_uri") is None:
        dumped["model"].pop("weights_uri", None)
    if dumped.get("gradual") and dumped["gradual"].get("epochs") is None:
        dumped["gradual"].pop("epochs", None)
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
