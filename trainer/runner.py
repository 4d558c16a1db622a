"""The recipe: for each stage, freeze -> optimizer and DDP -> fit (early stopping) -> checkpoint.

Reads top to bottom. One process runs every stage (`run`), or exactly one (`--stage K`,
what a Kubernetes stage pod runs), starting from stage K-1's committed checkpoint. Each
stage is reseeded from (seed, stage, rank), so both ways give the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from thaw_contract.catalog import family_of
from thaw_contract.plan import PlannedStage, recipe_warnings, resolve_stages, stages_to_run
from thaw_contract.spec import DataSpec, FineTuneJob, ModelSpec, SpecError, training_hash
from trainer import checkpoint as ckpt
from trainer.data import Datasets, build_datasets
from trainer.distributed import (
    DistEnv,
    all_gather_objects,
    all_sum,
    average_buffers,
    barrier,
    decided_by_main,
    init_distributed,
)
from trainer.early_stopping import EarlyStopping
from trainer.freezing import apply_stage
from trainer.gates import (
    METRICS,
    Diverged,
    DivergenceGuard,
    GateOutcome,
    StageDiverged,
    decide,
    previous_carried,
    rolled_back,
)
from trainer.layers import LayerGroup, assign_groups, head_module_name, layer_groups
from trainer.loop import StepContext, evaluate, feature_preparer, image_preparer, train_epoch
from trainer.metrics import TrainerMetrics
from trainer.models import BuiltModel, build_model
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.progress import Progress
from trainer.resident import ResidentBatches, ResidentImages, fits
from trainer.signals import Terminated
from trainer.storage import Store, StoreError, open_store
from trainer.uploader import CheckpointWriter, retrying
from trainer.warmup import DEPTHWISE_FAMILIES, Background, warm_up

# Seeds: each stage its own stream (a stage's run does not depend on how many batches the one
# before drew); a resume on another world size reseeds per epoch (prime: no two (epoch, rank)
# pairs of a job collide for worlds under 7,919 ranks).
STAGE_SEED_STRIDE = 1000
RESEED_EPOCH_STRIDE = 7919

CONV_FAMILIES = ("resnet", "efficientnet", "mobilenet", "convnext", "regnet", "densenet", "efficientnet_lite")


@dataclass
class StageResult:
    index: int
    name: str
    trainable_params: int
    total_params: int
    epochs_run: int
    best_val_accuracy: float | None  # None when it diverged before an epoch ended
    test_accuracy: float
    test_loss: float
    seconds: float
    train_seconds: float  # feature-cache building plus the training passes, no evaluation
    feature_cache: bool
    weights_sha256: str  # of the stage's final state_dict: equal weights, equal digest
    history: list[dict] = field(default_factory=list)
    gate: dict | None = None  # gates.GateOutcome: advanced, rolled back, kept
    diverged: str | None = None  # why the divergence guard stopped it
    lr_found: float | None = None  # lr: auto, the head's rate the range test picked


def state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything a stage needs that does not change between stages."""

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


def _loader(dataset, batch_size: int, env: DistEnv, shuffle: bool, seed: int, job: FineTuneJob) -> DataLoader:
    data = job.spec.data
    sampler = DistributedSampler(dataset, num_replicas=env.world, rank=env.rank, shuffle=shuffle, seed=seed)
    # One batch shape per stage: the ragged last batch would cost a GPU a second set of
    # kernel plans (and a tiny noisy step). The shuffle drops different images each epoch.
    # A shard smaller than one batch keeps its single short batch.
    drop_last = len(sampler) >= batch_size
    if isinstance(dataset, ResidentImages):
        return ResidentBatches(dataset, batch_size, sampler, drop_last, env.rank, torch.Generator().manual_seed(seed))
    workers = 0 if isinstance(dataset, TensorDataset) else data.workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=data.pin_memory and env.device.type == "cuda",
        persistent_workers=data.persistent_workers and workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def _eval_loader(dataset, batch_size: int, env: DistEnv, job: FineTuneJob) -> DataLoader:
    """Each rank takes every world-th sample: no padding, so summed metrics are exact."""
    mine = range(env.rank, len(dataset), env.world)
    if isinstance(dataset, ResidentImages):
        return ResidentBatches(dataset, batch_size, mine, drop_last=False)
    shard = Subset(dataset, mine)
    workers = job.spec.data.workers if not isinstance(dataset, TensorDataset) else 0
    return DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=env.device.type == "cuda")


def _cached_features(setup: Setup, datasets: list, batch_size: int) -> list[TensorDataset]:
    """Inputs of the head for each dataset, computed once in eval mode, shared by all ranks."""
    model, env = setup.model, setup.env
    head = model.get_submodule(head_module_name(setup.job.spec.model.architecture))
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    prepare = image_preparer(setup.mean, setup.std, env.device, setup.channels_last, False)
    out = []
    try:
        model.eval()
        for ds in datasets:
            captured.clear()
            idx = list(range(env.rank, len(ds), env.world))  # the shard _eval_loader reads
            loader = _eval_loader(ds, batch_size, env, setup.job)
            with torch.no_grad():
                for x, _ in loader:
                    with StepContext(env, prepare, setup.autocast_dtype, None).autocast():
                        model(prepare(x))
            mine = (idx, torch.cat(captured) if captured else torch.empty(0))
            parts = all_gather_objects(mine, env)
            feats = torch.cat([p[1] for p in parts if len(p[0])])
            order = [i for p in parts for i in p[0]]
            perm = torch.empty(len(order), dtype=torch.long)
            perm[torch.tensor(order)] = torch.arange(len(order))
            labels = ds.labels
            out.append(TensorDataset(feats[perm], labels))
    finally:
        handle.remove()
    return out


def _use_feature_cache(setup: Setup, stage: PlannedStage) -> bool:
    spec = setup.job.spec
    aug = spec.data.augmentation
    return (
        spec.speed.feature_cache
        and stage.trains_only_head(len(setup.groups))
        and not stage.train_bn
        and not (aug.hflip or aug.crop_padding)
    )


def rng_state() -> dict:
    """Plain containers and tensors only, so checkpoints load with torch's weights_only unpickler."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Resume:
    """Where a stage picks up: the epoch after its newest valid checkpoint."""

    prefix: str
    train_state: dict
    model_state: dict
    best_state: dict | None


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


def choose_resume(setup: Setup, stage: PlannedStage) -> tuple[str, dict] | None:
    """The stage's newest valid checkpoint, chosen once by rank 0 and given to every rank. Ranks
    that each listed the store could pick different epochs (one listing a moment before a late
    commit of a dying attempt) and then train out of step until a collective breaks."""
    timeout = setup.job.spec.checkpoint.upload_timeout_seconds
    find = lambda: retrying(lambda: ckpt.latest_valid(setup.store, stage.index, stage.name), timeout, "resume lookup")
    return decided_by_main(find, setup.env)


def find_resume(setup: Setup, stage: PlannedStage, found: tuple[str, dict] | None) -> Resume | None:
    """Load what `choose_resume` picked (every rank loads the same prefix)."""
    if found is None:
        return None
    prefix, manifest = found
    spec = setup.job.spec
    check_compatible(setup, prefix, manifest)
    state = ckpt.load_object(setup.store, prefix, "train_state.pt")
    best = None
    if (
        state.get("best_dir")
        and state["best_dir"] != prefix
        and spec.early_stopping
        and spec.early_stopping.restore_best
    ):
        best = ckpt.load_object(setup.store, state["best_dir"], "model.pt")
    return Resume(prefix, state, ckpt.load_object(setup.store, prefix, "model.pt"), best)


def run_stage(setup: Setup, stage: PlannedStage, data: Datasets) -> StageResult:
    job, env, model = setup.job, setup.env, setup.model
    spec = job.spec
    t_start = time.perf_counter()
    seed = spec.seed + STAGE_SEED_STRIDE * stage.index
    seed_everything(seed + env.rank)
    # A store that is briefly unreachable at start is waited for, like one that fails mid-stage.
    found = choose_resume(setup, stage)
    resume = retrying(lambda: find_resume(setup, stage, found), spec.checkpoint.upload_timeout_seconds, "resume load")
    if resume is not None:
        model.load_state_dict(resume.model_state)
        setup.progress.message(
            f"{stage.name}: resuming after epoch {resume.train_state['epoch'] + 1} "
            f"from {setup.store.uri}/{resume.prefix}"
        )

    # 1. Freeze: requires_grad, eval-mode frozen modules, no-grad prefix. Before DDP.
    freeze = apply_stage(model, setup.groups, stage, no_grad_prefix=spec.speed.frozen_prefix_no_grad)
    use_cache = _use_feature_cache(setup, stage)
    train_seconds = 0.0
    if use_cache:
        t_cache = time.perf_counter()
        train_ds, val_ds = _cached_features(setup, [data.train, data.val], stage.batch_size)
        train_seconds += time.perf_counter() - t_cache
        net = model.get_submodule(head_module_name(spec.model.architecture))
        prepare = feature_preparer(env.device, spec.data.pin_memory)
    else:
        train_ds, val_ds, net = data.train, data.val, model
        prepare = image_preparer(setup.mean, setup.std, env.device, setup.channels_last, spec.data.pin_memory)

    lr_found = None
    if stage.lr_auto:  # the range test's rate, found once per stage (trainer/lr_finder.py)
        lr_found = _auto_lr(setup, stage, train_ds, prepare, use_cache)
        stage = dataclasses.replace(stage, group_lrs={g: r * lr_found for g, r in stage.group_lrs.items()})

    # 2. Optimizer and scheduler for this stage's parameters only; DDP over the frozen state.
    groups = param_groups(model, setup.groups, setup.group_of, stage, spec.optimizer.weight_decay)
    optimizer = build_optimizer(groups, spec.optimizer, env.device)
    # batchSize is global: every rank takes its share, so the optimization does not depend on
    # how many processes run it (the same YAML locally and on a cluster).
    batch = stage.batch_size // env.world
    train_loader = _loader(train_ds, batch, env, True, seed, job)
    val_loader = _eval_loader(val_ds, batch, env, job)
    steps_per_epoch = math.ceil(len(train_loader) / spec.gradient_accumulation)
    scheduler = build_scheduler(optimizer, stage, steps_per_epoch)
    # Buffers need broadcasting only if some BatchNorm still updates its running stats.
    eval_names = set(freeze.eval_modules)
    frozen = {id(m) for n, m in model.named_modules() if n in eval_names}
    trains_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in frozen for m in net.modules())
    wrapped = DDP(net, broadcast_buffers=trains_bn) if env.distributed else net
    scaler = torch.amp.GradScaler(env.device.type) if setup.autocast_dtype == torch.float16 else None
    ctx = StepContext(
        env,
        prepare,
        setup.autocast_dtype,
        scaler,
        spec.gradient_accumulation,
        spec.data.pin_memory and env.device.type == "cuda",
    )
    es_spec = spec.early_stopping
    stopper = EarlyStopping(es_spec.resolved_mode, es_spec.patience, es_spec.min_delta) if es_spec else None
    # "Best" for retention: the early-stopping metric, or validation accuracy without it.
    best_metric = es_spec.metric if es_spec else "val_accuracy"
    tracker = stopper or EarlyStopping("min" if best_metric.endswith("loss") else "max", 10**9)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    metrics = setup.metrics
    if metrics is not None:
        metrics.start_stage(stage.index, stage.name, n_trainable, n_total, stage.epochs, steps_per_epoch)

    history: list[dict] = []
    best_state, best_dir, last_dir = None, None, None
    first_epoch = 0
    guard, diverged = DivergenceGuard(spec.divergence), None
    if resume is not None:
        st = resume.train_state
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        for k, v in st["tracker"].items():
            setattr(tracker, k, v)
        history, best_dir, last_dir = st["history"], st["best_dir"], resume.prefix
        guard.reference = st.get("divergence_reference")
        train_seconds += st["train_seconds"]
        first_epoch = st["epoch"] + 1
        if resume.best_state is not None:
            best_state = resume.best_state
        elif es_spec and es_spec.restore_best and best_dir == resume.prefix:
            best_state = copy.deepcopy(resume.model_state)
        if len(st["rng"]) == env.world:
            set_rng_state(st["rng"][env.rank])
        else:  # another world size: the run goes on, but not bit-identically
            seed_everything(seed + RESEED_EPOCH_STRIDE * first_epoch + env.rank)
        if stopper is not None and stopper.should_stop:
            first_epoch = stage.epochs  # it had stopped early; only the commit was missing

    # 3. Fit.
    for epoch in range(first_epoch, stage.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(seed + epoch)  # worker seeds: a function of the epoch alone
        setup.progress.start_epoch(stage.name, epoch, stage.epochs, len(train_loader))
        on_step = None
        if metrics is not None:
            on_step = lambda t, w, n: metrics.step(t, w, n, {g["name"]: g["lr"] for g in optimizer.param_groups})

        def on_read(loss_sum: float, images: int, step: int, epoch: int = epoch) -> None:
            total, n = all_sum([loss_sum, images], env)  # every rank reaches the same verdict
            guard.check(total / max(n, 1), f"epoch {epoch + 1} step {step}")

        try:
            m = train_epoch(
                wrapped,
                train_loader,
                optimizer,
                scheduler,
                ctx,
                setup.progress,
                trainable if epoch == 0 else None,
                on_step,
                on_read,
            )
        except Diverged as err:
            diverged = str(err)
            setup.progress.message(f"{stage.name}: diverged ({diverged}); stopping the stage")
            break
        train_seconds += m["seconds"]
        if trains_bn:
            average_buffers(net, env)
        val = evaluate(net, val_loader, ctx, pad_to=batch)
        elapsed = time.perf_counter() - t_start
        done_here = epoch + 1 - first_epoch
        row = {
            "stage": stage.name,
            "stage_index": stage.index,
            "epoch": epoch,
            **{k: round(v, 6) for k, v in m.items() if k != "rank_images"},
            "val_loss": round(val["loss"], 6),
            "val_accuracy": round(val["accuracy"], 6),
            "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
            "eta_seconds": round(elapsed / done_here * (stage.epochs - epoch - 1), 1),
        }
        history.append(row)
        improved = tracker.update(row[best_metric], epoch)
        if improved and stopper is not None and es_spec.restore_best:
            best_state = copy.deepcopy(model.state_dict())
        epoch_dir = ckpt.epoch_prefix(stage.index, stage.name, epoch)
        if improved:
            best_dir = epoch_dir
        last_dir = epoch_dir
        # Every rank's RNG goes into the checkpoint: resuming restores each rank's own.
        rngs = all_gather_objects(rng_state(), env)
        if env.is_main:
            train_state = {
                "epoch": epoch,
                "sampler_epoch": epoch + 1,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "tracker": tracker.state_dict(),
                "history": history,
                "best_dir": best_dir,
                "divergence_reference": guard.reference,
                "train_seconds": train_seconds,
                "rng": rngs,
                "spec_hash": training_hash(spec),
            }
            _save_epoch(setup, stage, epoch_dir, row, (epoch + 1) * steps_per_epoch, model, train_state)
        if metrics is not None:
            metrics.end_epoch(row, row["lr"], m["rank_images"] / max(m["seconds"], 1e-9), (epoch + 1) * steps_per_epoch)
            if env.device.type == "cuda":
                metrics.gpu(torch.cuda.memory_allocated(env.device), torch.cuda.max_memory_allocated(env.device))
        setup.progress.end_epoch(row)
        if stopper is not None and stopper.should_stop and epoch + 1 < stage.epochs:
            setup.progress.message(
                f"{stage.name}: early stop after epoch {epoch + 1} (best epoch {stopper.best_epoch + 1})"
            )
            break

    # 4. Restore best (after a divergence: always), pass the gate, test, commit the stage.
    if diverged is not None and best_state is None and best_dir is not None:
        setup.writer.flush()  # the best epoch may still be uploading
        barrier(env)
        best_state = ckpt.load_object(setup.store, best_dir, "model.pt")
    final_dir = last_dir
    if best_state is not None:
        model.load_state_dict(best_state)
        final_dir = best_dir
    freeze.remove()
    del wrapped
    final_row = next((r for r in history if ckpt.epoch_prefix(stage.index, stage.name, r["epoch"]) == final_dir), None)
    outcome = _gate(setup, stage, final_row, diverged)
    if outcome.decision == "rolled_back":
        prev = setup.stages[stage.index - 1]
        final_dir, _ = decided_by_main(lambda: ckpt.read_final(setup.store, prev.index, prev.name), env)
        model.load_state_dict(ckpt.load_object(setup.store, final_dir, "model.pt"))
        setup.progress.message(f"{stage.name}: rolled back ({outcome.reason}); the next stage starts from its input")
    elif outcome.decision == "kept":
        setup.progress.message(f"{stage.name}: worse than the stage before ({outcome.reason}); kept (gate: keep)")
    test_prepare = image_preparer(setup.mean, setup.std, env.device, setup.channels_last, False)
    test = evaluate(
        model,
        _eval_loader(data.test, batch, env, job),  # the training batch shape: no new kernel plans
        StepContext(env, test_prepare, setup.autocast_dtype, None),
        pad_to=batch,
    )
    result = StageResult(
        index=stage.index,
        name=stage.name,
        trainable_params=n_trainable,
        total_params=n_total,
        epochs_run=len(history),
        best_val_accuracy=max((r["val_accuracy"] for r in history), default=None),
        test_accuracy=test["accuracy"],
        test_loss=test["loss"],
        seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds,
        feature_cache=use_cache,
        weights_sha256=state_digest(model),
        history=history,
        gate=outcome.as_dict(),
        diverged=diverged,
        lr_found=lr_found,
    )
    if metrics is not None:
        metrics.end_stage(len(history))
    if env.is_main:
        _commit_stage(setup, stage, final_dir, result)
    barrier(env)
    return result


def _auto_lr(setup: Setup, stage: PlannedStage, train_ds, prepare, use_cache: bool) -> float:
    """Rank 0 runs the range test on a copy of the frozen model, or reads the rate an earlier
    attempt stored; every rank gets the same. The random streams are left as they were, so
    a stage trains the same whether the test ran in this process or before it."""
    from trainer.lr_finder import plot, range_test, suggest

    spec, env, store = setup.job.spec, setup.env, setup.store
    prefix = ckpt.stage_prefix(stage.index, stage.name)

    def find() -> float:
        if store.exists(f"{prefix}/lr_find.json"):
            return json.loads(store.get(f"{prefix}/lr_find.json"))["lr"]
        one = DistEnv(0, 1, 0, 1, env.device)
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            twin = copy.deepcopy(setup.model)
            net = twin.get_submodule(head_module_name(spec.model.architecture)) if use_cache else twin
            groups = param_groups(twin, setup.groups, setup.group_of, stage, spec.optimizer.weight_decay)
            optimizer = build_optimizer(groups, spec.optimizer, env.device)
            loader = _loader(train_ds, stage.batch_size // env.world, one, True, spec.seed, setup.job)
            autocast = StepContext(env, prepare, setup.autocast_dtype, None).autocast
            lrs, losses = range_test(net, loader, optimizer, prepare, env.device, autocast)
            del twin, optimizer
        lr = suggest(lrs, losses)
        store.put(f"{prefix}/lr_find.json", json.dumps({"lr": lr, "lrs": lrs, "losses": losses}).encode())
        store.put(f"{prefix}/lr_find.png", plot(lrs, losses, lr))
        return lr

    lr = decided_by_main(find, env)
    setup.progress.message(f"{stage.name}: lr auto -> {lr:.3g} (range test: {store.uri}/{prefix}/lr_find.png)")
    return lr


def _gate(setup: Setup, stage: PlannedStage, final_row: dict | None, diverged: str | None) -> GateOutcome:
    """The gate's verdict on the weights the stage would commit (trainer/gates.py), against
    what the stage before it passed on (its committed summary, read once by rank 0)."""
    previous = None
    if stage.index > 0:
        prev = setup.stages[stage.index - 1]
        pointer = decided_by_main(lambda: ckpt.read_pointer(setup.store, prev.index, prev.name), setup.env)
        previous = previous_carried(pointer.get("metrics") if pointer else None)
    if final_row is None:  # diverged before its first epoch ended: nothing of its own to keep
        if previous is None:
            raise StageDiverged(
                f"stage {stage.name} diverged before its first epoch ended ({diverged}); lower {stage.field}.lr"
            )
        return rolled_back(stage.gate, None, previous, f"diverged before its first epoch ended: {diverged}")
    return decide(stage.gate, {m: final_row[m] for m in METRICS}, previous)


def _save_epoch(
    setup: Setup, stage: PlannedStage, epoch_dir: str, row: dict, global_step: int, model: nn.Module, train_state: dict
) -> None:
    spec = setup.job.spec
    meta = {
        "stage": stage.index,
        "stageName": stage.name,
        "epoch": train_state["epoch"],
        "globalStep": global_step,
        "metrics": row,
        "architecture": spec.model.architecture,
        "specHash": train_state["spec_hash"],
    }
    objects = {"model.pt": model.state_dict(), "train_state.pt": train_state}
    best_dir = train_state["best_dir"]
    # The divergence guard restores the best epoch: keep it while the guard is on.
    kept = spec.checkpoint.keep_best or spec.early_stopping or spec.divergence.enabled
    keep = {best_dir} if best_dir and kept else set()
    store, keep_last = setup.store, spec.checkpoint.keep_last
    trusted = setup.writer.trusted
    after = lambda _m: ckpt.prune(store, stage.index, stage.name, keep_last, keep, upto=epoch_dir, trusted=trusted)
    setup.writer.save(epoch_dir, objects, meta, after)


def _commit_stage(setup: Setup, stage: PlannedStage, final_dir: str, result: StageResult) -> None:
    """The stage's final checkpoint must be in the store before its pointer is; else the process fails."""
    setup.writer.flush()
    where = f"{setup.store.uri}/{final_dir}"
    if final_dir in setup.writer.failed:
        raise ckpt.CheckpointError(
            f"stage {stage.name}: final checkpoint {where} was not committed: {setup.writer.failed[final_dir]}"
        )
    manifest = setup.writer.committed.get(final_dir) or ckpt.verify(setup.store, final_dir)
    if manifest is None:
        raise ckpt.CheckpointError(f"stage {stage.name}: final checkpoint {where} does not verify")
    pointer = retrying(
        lambda: ckpt.mark_final(setup.store, stage.index, stage.name, final_dir, manifest, result_summary(result)),
        setup.job.spec.checkpoint.upload_timeout_seconds,
        f"stage {stage.name}: final pointer",
    )
    write_termination_message(
        stage.index, stage.name, f"{setup.store.uri}/{final_dir}", pointer["manifestSha256"], result_summary(result)
    )


def write_termination_message(index: int, name: str, checkpoint: str, digest: str, result: dict) -> None:
    """The stage result where Kubernetes shows it (the container's termination message): the
    operator takes the stage's checkpoint and numbers from here, never from the store."""
    from trainer.checkpoint import status_summary
    from trainer.launch import write_termination

    write_termination(
        {
            "stage": index,
            "name": name,
            "checkpoint": checkpoint,
            "manifestSha256": digest,
            "metrics": status_summary(result),
        }
    )


def result_summary(r: StageResult) -> dict:
    return dataclasses.asdict(r)


def _load_start(setup: Setup, first: int, found: tuple[str, dict] | None = None) -> None:
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
        found = found or ckpt.read_final(setup.store, prev.index, prev.name)
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
    channels_last = cl == "on" or (cl == "auto" and family_of(spec.model.architecture) in CONV_FAMILIES)
    model.to(env.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    store = open_store(spec.checkpoint, job.metadata.name, write=env.is_main)
    metrics = None
    if spec.metrics.enabled:
        metrics = TrainerMetrics(job.metadata.name, env.rank)
        metrics.serve(spec.metrics.port + env.local_rank)
        metrics.job_plan([s.epochs for s in stages], env.world)
    cs = spec.checkpoint
    writer = CheckpointWriter(store, cs.asynchronous, cs.max_pending, cs.upload_timeout_seconds, metrics)
    return Setup(
        job,
        env,
        model,
        built.mean,
        built.std,
        groups,
        group_of,
        stages,
        store,
        progress,
        autocast_dtype,
        channels_last,
        writer,
        metrics,
    )


def start_warmup(setup: Setup, stage: PlannedStage) -> Background | None:
    """The stage's passes on a frozen copy of the model, in a thread (trainer/warmup.py)."""
    spec, env = setup.job.spec, setup.env
    cuda = env.device.type == "cuda"
    if spec.speed.warmup == "off" or (spec.speed.warmup == "auto" and not cuda):
        return None
    measure = cuda and spec.speed.channels_last == "auto" and family_of(spec.model.architecture) in DEPTHWISE_FAMILIES
    # A head-only stage on cached features runs the network forward only, at the cache's batch.
    train = not _use_feature_cache(setup, stage)
    n = stage.batch_size // env.world if train else stage.batch_size
    size = spec.data.image_size
    raw = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = image_preparer(setup.mean, setup.std, env.device, setup.channels_last, False)(raw)
    twin = copy.deepcopy(setup.model)  # here, before the main thread loads weights into the model
    apply_stage(twin, setup.groups, stage, no_grad_prefix=spec.speed.frozen_prefix_no_grad)
    autocast = StepContext(env, lambda t: t, setup.autocast_dtype, None).autocast
    return Background(lambda: warm_up(twin, x, autocast, train, measure))


def finish_warmup(setup: Setup, warming: Background) -> None:
    """Join the warm-up; adopt the layout it measured faster, as rank 0 measured it (DDP's
    gradient buckets follow each parameter's strides: ranks must not differ)."""
    r = warming.result()
    text = f"warm-up: {r.seconds:.1f} s beside loading the checkpoint and the data"
    if r.channels_last is not None:
        use = decided_by_main(lambda: r.channels_last, setup.env)
        per_step = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r.step_seconds.items())
        text += f"; channelsLast auto: {per_step} per step -> {'channels_last' if use else 'contiguous'}"
        if use != setup.channels_last:
            setup.channels_last = use
            setup.model.to(memory_format=torch.channels_last if use else torch.contiguous_format)
    setup.progress.message(text)


def run_job(job: FineTuneJob, only_stage: int | None = None) -> list[StageResult]:
    env = init_distributed()
    progress = Progress(env.is_main)
    setup = build_setup(job, env, progress, only_stage or 0)
    todo = stages_to_run(setup.stages, only_stage, env.world)
    for line in recipe_warnings(job.spec, setup.stages):
        progress.message(line)

    # A finished stage is not run again: its committed checkpoint stands.
    done = {s.index: ckpt.read_final(setup.store, s.index, s.name) for s in todo}
    for found in done.values():
        if found is not None:
            check_compatible(setup, *found)
    pending = [s for s in todo if done[s.index] is None]
    if not pending:
        progress.message(f"{job.metadata.name}: all requested stages already finished; nothing to do")
        if only_stage is not None and env.is_main:  # a retried pod that finds its stage committed reports it
            prefix, _ = done[only_stage]
            pointer = ckpt.read_pointer(setup.store, only_stage, setup.stages[only_stage].name)
            write_termination_message(
                only_stage,
                setup.stages[only_stage].name,
                f"{setup.store.uri}/{prefix}",
                pointer["manifestSha256"],
                pointer.get("metrics", {}),
            )
        return []
    first = pending[0].index
    if first > 0 and only_stage is None:
        progress.message(f"resuming at stage {first} ({pending[0].name}); stages before it are finished")
    warming = start_warmup(setup, pending[0])  # runs while the checkpoint and the data load
    try:
        _load_start(setup, first, done.get(first - 1))  # verified above when it was in todo
        data = build_datasets(local_data(job.spec.data, env), job.spec.model.num_classes, job.spec.seed)
        data = resident_data(data, job.spec, env.device)
    except BaseException:
        if warming is not None:
            warming.join()  # a process must not exit under a thread running torch (it aborts)
        raise
    if warming is not None:
        finish_warmup(setup, warming)
    results = []
    for stage in pending:
        progress.message(
            json.dumps(
                {
                    "event": "stage_start",
                    "stage": stage.name,
                    "index": stage.index,
                    "trainable_groups": [setup.groups[g].name for g in stage.trainable_groups],
                }
            )
        )
        try:
            results.append(run_stage(setup, stage, data))
        except Terminated:  # what is queued still commits
            progress.message("SIGTERM: waiting for pending checkpoint uploads")
            setup.writer.flush()
            raise
        except BaseException:
            # A failed gate or any other error: queued epochs still commit (a rerun resumes
            # from them), and no uploading thread outlives the process (exiting under one aborts).
            setup.writer.close()
            raise
    setup.writer.close()
    if setup.metrics is not None and job.spec.metrics.linger_seconds:
        time.sleep(job.spec.metrics.linger_seconds)
    return results


def resident_data(data: Datasets, spec, device: torch.device) -> Datasets:
    """The splits held on the device (trainer/resident.py) where spec.speed.dataOnDevice says so."""
    mode = spec.speed.data_on_device
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return data
    splits = [data.train, data.val, data.test]
    if not fits(splits, device):
        if mode == "on":
            raise SpecError(
                f"spec.speed.dataOnDevice: on needs an in-memory source that takes under a quarter of the "
                f"device's free memory; {spec.data.source} does not (use auto or off)"
            )
        return data
    return Datasets(*(ResidentImages(s, device) for s in splits), data.classes)


def local_data(spec: DataSpec, env: DistEnv) -> DataSpec:
    """An s3:// source mirrored into the node's cache (local rank 0 syncs, the rest wait)."""
    if not spec.source.startswith("s3://"):
        return spec
    from trainer.datasync import RETRY_SECONDS, cache_path, sync_prefix

    dest = cache_path(spec.cache_dir, spec.source)
    if env.local_rank == 0:
        try:
            n = retrying(
                lambda: sync_prefix(spec.source, dest, spec.endpoint), RETRY_SECONDS, "data sync", transient_only=True
            )
        except StoreError as err:
            if err.transient:
                raise
            raise SpecError(f"spec.data.source: {err}") from None
        if env.is_main:
            print(f"data: {spec.source} -> {dest} ({n} objects downloaded)", flush=True)
    barrier(env)
    return spec.model_copy(update={"source": f"file://{dest}"})
