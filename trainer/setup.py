"""What every stage of a job shares: the model, its layer groups and planned stages, the
store, the checkpoint writer, metrics (Setup, built once per process by build_setup), and the
weights the first stage to run starts from (load_start).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from thaw_contract.plan import PlannedStage, resolve_stages
from thaw_contract.spec import FineTuneJob, ModelSpec, SpecError, training_hash
from trainer import checkpoint as ckpt
from trainer.distributed import DistEnv
from trainer.layers import LayerGroup, assign_groups, family, head_module_name, layer_groups
from trainer.metrics import TrainerMetrics
from trainer.models import BuiltModel, build_model
from trainer.progress import Progress
from trainer.storage import Store, open_store
from trainer.uploader import CheckpointWriter


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything a stage needs that does not change between stages (built by keyword)."""

    job: FineTuneJob
    env: DistEnv
    model: nn.Module
    mean: tuple
    std: tuple
    groups: list[LayerGroup]
    group_of: dict[str, int]
    stages: list[PlannedStage]
    store: Store
    progress: Progress
    autocast_dtype: torch.dtype | None
    channels_last: bool
    writer: CheckpointWriter
    metrics: TrainerMetrics | None


def plan_job(
    job: FineTuneJob, device: str = "meta", model_spec: ModelSpec | None = None
) -> tuple[BuiltModel, list[LayerGroup], dict[str, int], list[PlannedStage]]:
    """Build the model (shapes only by default) and resolve every stage against it."""
    built = build_model(model_spec or job.spec.model, device=device)
    groups = layer_groups(built.model, job.spec.model.architecture)
    group_of = assign_groups([n for n, _ in built.model.named_parameters()], groups)
    module_names = [n for n, _ in built.model.named_modules()]
    stages = resolve_stages(job.spec, groups, group_of, module_names)
    return built, groups, group_of, stages


def _autocast_dtype(job: FineTuneJob, device: torch.device) -> torch.dtype | None:
    """None for full precision; fp16 (which needs a GradScaler) only on CUDA."""
    amp = job.spec.speed.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise SpecError("spec.speed.amp: fp16 needs a CUDA device; use bf16 or off on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def use_feature_cache(setup: Setup, stage: PlannedStage) -> bool:
    """A head-only stage without BN updates or augmentation trains on the head's inputs, computed once."""
    spec = setup.job.spec
    aug = spec.data.augmentation
    return (
        spec.speed.feature_cache
        and stage.trains_only_head(len(setup.groups))
        and not stage.train_bn
        and not (aug.hflip or aug.crop_padding)
    )


def check_compatible(setup: Setup, prefix: str, manifest: dict) -> None:
    """A checkpoint of another architecture or written under other training fields is refused."""
    spec = setup.job.spec
    where = f"{setup.store.uri}/{prefix}"
    if manifest.get("architecture") != spec.model.architecture:
        raise SpecError(
            f"spec.model.architecture: checkpoint {where} holds a {manifest.get('architecture')}, the spec asks "
            f"for {spec.model.architecture}; use another checkpoint URI or job name"
        )
    if manifest.get("specHash") != training_hash(spec):
        raise SpecError(
            f"spec: checkpoint {where} was written by a different spec (training fields changed); "
            f"use another checkpoint URI or job name to start over"
        )


def build_setup(job: FineTuneJob, env: DistEnv, progress: Progress, first_stage: int) -> Setup:
    spec = job.spec
    torch.use_deterministic_algorithms(spec.deterministic, warn_only=True)
    threads = spec.speed.threads or max(1, (os.cpu_count() or 1) // env.local_world)
    if env.device.type == "cpu":
        torch.set_num_threads(threads)
    seed_everything(spec.seed)  # the new head starts identical on every rank
    # Weights for stage 0 come from the spec; a later stage loads its predecessor's checkpoint.
    model_spec = spec.model if first_stage == 0 else spec.model.model_copy(update={"weights": None})
    built, groups, group_of, stages = plan_job(job, device="cpu", model_spec=model_spec)
    model = built.model
    autocast_dtype = _autocast_dtype(job, env.device)
    cl = spec.speed.channels_last
    # channels_last measured 1.4x faster for full training on CPU too (docs/benchmarks.md).
    channels_last = cl == "on" or (cl == "auto" and family(spec.model.architecture).conv)
    model.to(env.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    store = open_store(spec.checkpoint, job.metadata.name, write=env.is_main)
    metrics = None
    if spec.metrics.enabled:
        metrics = TrainerMetrics(job.metadata.name, env.rank)
        metrics.serve(spec.metrics.port + env.local_rank)
        metrics.job_plan([s.epochs for s in stages], env.world)
    writer = CheckpointWriter(store, spec.checkpoint, metrics)
    return Setup(
        job=job,
        env=env,
        model=model,
        mean=built.mean,
        std=built.std,
        groups=groups,
        group_of=group_of,
        stages=stages,
        store=store,
        progress=progress,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
        writer=writer,
        metrics=metrics,
    )


def load_start(setup: Setup, first: int, found: tuple[str, dict] | None = None) -> None:
    """Weights the first stage to run starts from: a user checkpoint or stage first-1's final
    (`found`: that final, when the caller has verified it already)."""
    spec = setup.job.spec
    if first == 0 and spec.model.weights_uri is not None:
        from trainer.weights import fit, parse_state_dict, read_bytes

        uri = spec.model.weights_uri
        state = parse_state_dict(read_bytes(uri, spec.checkpoint.endpoint), uri)
        for note in fit(setup.model, state, head_module_name(spec.model.architecture), uri, spec.model.architecture):
            setup.progress.message(f"{uri}: {note}")
        return
    if first == 0 and spec.model.checkpoint is None:
        return
    if first == 0:
        uri = spec.model.checkpoint
        path = uri.removeprefix("file://")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise SpecError(f"spec.model.checkpoint: cannot load {uri}: {err}") from None
        state = state.get("model", state)
        what = f"spec.model.checkpoint {uri}"
    else:
        prev = setup.stages[first - 1]
        found = found or ckpt.read_final(setup.store, prev.index, prev.name, ckpt.recorded_input_digest())
        if found is None:
            raise SpecError(
                f"--stage {first}: stage {prev.index} ({prev.name}) has no final checkpoint "
                f"in {setup.store.uri}; run it first"
            )
        prefix, manifest = found
        check_compatible(setup, prefix, manifest)
        state = ckpt.load_object(setup.store, prefix, "model.pt")
        what = f"checkpoint {prefix}"
    try:
        setup.model.load_state_dict(state)
    except RuntimeError as err:
        first_line = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise SpecError(
            f"{what} does not fit {spec.model.architecture} with {spec.model.num_classes} classes: {first_line}"
        ) from None
    if first > 0:  # a rolled-back stage before it points here at an older stage's weights: say which
        setup.progress.message(f"{setup.stages[first].name}: starting from {setup.store.uri}/{prefix}")
