"""The spec's training parts: the model, the data, the optimizer and schedule, early stopping,
gates and the divergence guard, the stages (explicit or `gradual:`) and speed settings. Part of
thaw_contract.spec, which is what callers import.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from thaw_contract.catalog import BUNDLED, TIMM, is_known, unknown_architecture_message
from thaw_contract.spec_fields import NAMED_DATASETS, PositiveFloat, SpecModel, bucket_of, check_endpoint


class ModelSpec(SpecModel):
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


class AugmentationSpec(SpecModel):
    hflip: bool = Field(False, description="random horizontal flips")
    crop_padding: int = Field(0, ge=0, description="pad by this many pixels, then random-crop back")


class DataSpec(SpecModel):
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
    workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes per rank (each decodes images beside the training process); "
        "auto: the CPUs a rank has (the pod's resources.cpu or the host's, shared by its ranks) less one for the "
        "training process, at most 8",
    )
    pin_memory: bool = Field(True, description="pinned host memory + non_blocking copies (CUDA only)")
    persistent_workers: bool = True
    cache_dir: str = Field("~/.cache/thaw", description="where datasets are unpacked once per node")
    max_bad_fraction: float = Field(
        0.001,
        ge=0,
        le=1,
        description="images that do not decode are skipped and named; above this fraction of the job's images "
        "the stage fails (exit 2)",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in NAMED_DATASETS or v.startswith("file://"):
            return v
        if v.startswith("s3://"):
            bucket_of(v)
            return v
        raise ValueError(
            f"unknown data source {v!r}; use {' | '.join(NAMED_DATASETS)} | file:///path | s3://bucket/prefix"
        )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        return check_endpoint(v)

    @field_validator("workers", mode="before")
    @classmethod
    def _count_or_auto(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"must be a whole number >= 0 or auto (got {v!r})")


class OptimizerSpec(SpecModel):
    name: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0, description="never applied to norm and bias parameters")
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleSpec(SpecModel):
    name: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup (cosine only)")
    min_lr_factor: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of the peak")
    pct_start: float = Field(0.3, gt=0, lt=1, description="one-cycle: fraction of steps spent rising")
    div_factor: float = Field(25.0, ge=1, description="one-cycle: start lr = peak / divFactor")
    final_div_factor: float = Field(1e4, ge=1, description="one-cycle: end lr = start / finalDivFactor")


class EarlyStoppingSpec(SpecModel):
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    mode: Literal["max", "min"] | None = Field(None, description="default: max for accuracy, min for loss")
    patience: int = Field(3, gt=0, description="epochs without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = True

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("max" if self.metric == "val_accuracy" else "min")


class GateSpec(SpecModel):
    """What happens when a stage leaves the model worse than the stage before it left it."""

    metric: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy",
        description="compared between stages; with alpha null, a tie on val_accuracy advances only if val_loss "
        "is no higher",
    )
    on_regression: Literal["rollback", "keep", "fail", "stop"] = Field(
        "rollback",
        description="rollback: the next stage starts from the previous stage's weights; keep: go on with this "
        "stage's; fail: the job fails; stop: the job ends here with the previous stage's weights and succeeds "
        "(later stages, which would start from the same weights, are skipped)",
    )
    min_gain: float = Field(
        0.0, ge=0, description="the least gain that advances: absolute, or a fraction of the previous value"
    )
    relative: bool = Field(False, description="minGain is a fraction of the previous stage's value")
    alpha: float | None = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="both models answer the same validation images; a stage is a regression only where a "
        "one-sided paired test (McNemar on accuracy, a paired z-test on per-image losses) finds it worse with "
        "p < alpha. null: compare the two values as measured (any drop, even one image, is a regression)",
    )


class DivergenceSpec(SpecModel):
    """A stage whose loss turns non-finite or grows past lossFactor x its input weights' loss
    (and past a uniform guess's) stops, restores its best epoch (or its input weights), and the
    gate decides what follows."""

    enabled: bool = True
    loss_factor: float = Field(4.0, gt=1, description="a running loss above this multiple of the input weights' loss")


class Top(SpecModel):
    top: int = Field(gt=0, description="this many layer groups counted from the head")


class Modules(SpecModel):
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


class StageSpec(SpecModel):
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


class GradualSpec(SpecModel):
    """Shorthand: stage i trains the top (startTop + i * groupsPerStage) groups at lr * lrFactor^i,
    the last stage every group.

    The defaults are the recipe measured in docs/results.md, so `stages` and `epochs` (or
    `epochsPerStage`) alone give a good run: head, top 3 groups, all; discriminative rates;
    BatchNorm statistics kept frozen.
    Discriminative rates are what keep a stage that unfreezes the body under a trained head from
    diverging in its first steps (docs/results.md, "Why one rate collapsed"); a warm-up after each
    unfreeze is the default only at one rate (lrDecay 1), since with discriminative rates it cost
    accuracy on every label budget measured.
    """

    stages: int = Field(gt=0, description="how many stages to expand into")
    start_top: int = Field(1, gt=0, description="groups trained in the first stage (1 = head only)")
    groups_per_stage: int = Field(
        2, gt=0, description="groups each later stage unfreezes beyond the one before (2: head, top 3, top 5, ...)"
    )
    epochs_per_stage: int | None = Field(None, gt=0, description="every stage's epochs (or give epochs)")
    last_stage_epochs: int | None = Field(
        None, gt=0, description="the last stage's epochs instead (like fastai's fine_tune: short frozen, long unfrozen)"
    )
    epochs: int | None = Field(
        None,
        gt=0,
        description="all stages' epochs together, instead of epochsPerStage: the earlier stages share a third "
        "(at least 1 each), the last stage trains the rest (12 over 3 stages: 2, 2, 8)",
    )
    lr: PositiveFloat | None = Field(None, description="the head's peak rate; default 0.01 for sgd, 0.001 for adamw")
    lr_factor: float = Field(1.0, gt=0, le=1, description="per-stage multiplier on the head lr")
    lr_decay: float = Field(1.5, ge=1, description="each lower group at the rate of the one above / lrDecay")
    last_all: bool = Field(True, description="make the last stage train every group (false: stop at the top N)")
    warmup_epochs: float | None = Field(
        None,
        ge=0,
        description="linear warm-up at the start of every stage after the first (each unfreezes groups); "
        "default: at one rate (lrDecay 1) a quarter of the first stage's epochs, at most 1, otherwise 0",
    )
    freeze_bn_stats: bool = Field(True, description="BatchNorm statistics stay frozen (small batches)")

    @model_validator(mode="after")
    def _one_epoch_budget(self) -> GradualSpec:
        if (self.epochs is None) == (self.epochs_per_stage is None):
            raise ValueError("give exactly one of epochs or epochsPerStage")
        if self.epochs is not None and self.last_stage_epochs is not None:
            raise ValueError("lastStageEpochs goes with epochsPerStage; epochs already sizes the last stage")
        if self.epochs is not None and self.epochs < self.stages:
            raise ValueError(f"epochs {self.epochs} is fewer than the {self.stages} stages (one epoch each at least)")
        return self

    def stage_epochs(self) -> list[int]:
        """Each stage's epochs. Given a total, the last stage (every group trainable) gets two
        thirds: 2/2/8 of 12 beat 4/4/4 at 10, 100 and 1,000 images per class (docs/results.md)."""
        if self.epochs is None:
            assert self.epochs_per_stage is not None
            last = self.last_stage_epochs or self.epochs_per_stage
            return [self.epochs_per_stage] * (self.stages - 1) + [last]
        if self.stages == 1:
            return [self.epochs]
        early = max(1, self.epochs // 3 // (self.stages - 1))
        return [early] * (self.stages - 1) + [self.epochs - early * (self.stages - 1)]

    def resolved_lr(self, optimizer: str) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[optimizer]

    @property
    def resolved_warmup(self) -> float:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        # A quarter of an unfreezing stage's epochs (the earlier stages' length), at most 1.
        return min(1.0, self.stage_epochs()[0] / 4) if self.lr_decay == 1 else 0.0


DEFAULT_LR = {"sgd": 0.01, "adamw": 0.001}  # the head's peak rate when gradual: gives none


class SpeedSpec(SpecModel):
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
