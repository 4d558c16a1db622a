"""One stage, top to bottom: resume -> freeze -> inputs -> optimizer and DDP -> fit (early
stopping, divergence guard, a checkpoint every epoch) -> final weights (best epoch, gate) ->
test -> commit. Each step is a function below, in that order; `run_stage` reads as the list.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from thaw_contract.plan import PlannedStage
from thaw_contract.spec import training_hash
from trainer import bad_images
from trainer import checkpoint as ckpt
from trainer.data import Datasets
from trainer.distributed import all_gather_objects, all_sum, average_buffers, barrier
from trainer.early_stopping import EarlyStopping
from trainer.freezing import FreezeState, apply_stage
from trainer.gates import Diverged, DivergenceGuard, collapsed
from trainer.loaders import eval_loader, train_loader
from trainer.loop import StepContext, evaluate, train_epoch
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.setup import Setup, seed_everything
from trainer.stage_checkpoints import (
    Resume,
    StageResult,
    choose_resume,
    commit_stage,
    find_resume,
    save_epoch,
    state_digest,
)
from trainer.stage_end import best_weights, evaluate_test, gated_weights, kept_row
from trainer.stage_inputs import Inputs, auto_lr, stage_inputs
from trainer.train_state import TrainState, rng_state, set_rng_state
from trainer.uploader import retrying

# Seeds: each stage its own stream (a stage's run does not depend on how many batches the one
# before drew); a resume on another world size reseeds per epoch (prime: no two (epoch, rank)
# pairs of a job collide for worlds under 7,919 ranks).
STAGE_SEED_STRIDE = 1000
RESEED_EPOCH_STRIDE = 7919


@dataclass
class Training:
    """A stage's optimizer, schedule, loaders, wrapped module and judges: built once, then stepped."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    train_loader: object
    val_loader: object
    batch: int  # per rank
    steps_per_epoch: int
    wrapped: nn.Module | None  # DDP around Inputs.net when distributed
    trains_bn: bool  # some BatchNorm still updates its running statistics
    step: StepContext
    trainable: list[torch.Tensor]
    stopper: EarlyStopping | None  # spec.earlyStopping
    tracker: EarlyStopping  # the best epoch for retention: the stopper, or val accuracy without one
    best_metric: str
    guard: DivergenceGuard


@dataclass
class Fit:
    """Where the epochs got to: restored from a checkpoint, then advanced epoch by epoch."""

    seed: int
    train_seconds: float
    first_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None
    best_dir: str | None = None
    last_dir: str | None = None
    diverged: str | None = None


def run_stage(setup: Setup, stage: PlannedStage, data: Datasets) -> StageResult:
    t_start = time.perf_counter()
    seed = setup.job.spec.seed + STAGE_SEED_STRIDE * stage.index
    seed_everything(seed + setup.env.rank)
    resume = _resume(setup, stage)
    freeze = apply_stage(  # requires_grad, eval-mode frozen modules, no-grad prefix: before DDP
        setup.model, setup.groups, stage, no_grad_prefix=setup.job.spec.speed.frozen_prefix_no_grad
    )
    inputs = stage_inputs(setup, stage, data)
    lr_found = None
    if stage.lr_auto:  # the range test's rate, found once per stage (trainer/lr_finder.py)
        lr_found = auto_lr(setup, stage, inputs)
        stage = dataclasses.replace(stage, group_lrs={g: r * lr_found for g, r in stage.group_lrs.items()})
    tr = _training(setup, stage, inputs, freeze, seed)
    n_trainable = sum(p.numel() for p in tr.trainable)
    n_total = sum(p.numel() for p in setup.model.parameters())
    if setup.metrics is not None:
        setup.metrics.start_stage(stage.index, stage.name, n_trainable, n_total, stage.epochs, tr.steps_per_epoch)
    fit = Fit(seed, inputs.seconds)
    if resume is not None:
        _restore(setup, stage, tr, fit, resume)
    _fit(setup, stage, inputs, tr, fit, t_start, data)
    final_dir = best_weights(setup, fit)
    judged = kept_row(stage, fit, final_dir)
    freeze.remove()
    tr.wrapped = None
    final_dir, outcome = gated_weights(setup, stage, fit, final_dir, data, tr.batch)
    test = evaluate_test(setup, data, tr.batch)
    bad = _bad_images(setup, data)
    result = StageResult(
        index=stage.index,
        name=stage.name,
        trainable_params=n_trainable,
        total_params=n_total,
        epochs_run=len(fit.history),
        # The weights judged (as the gate measured them), not the max over epochs.
        best_val_accuracy=outcome.own.get("val_accuracy", judged["val_accuracy"] if judged else None),
        test_accuracy=test["accuracy"],
        test_loss=test["loss"],
        seconds=time.perf_counter() - t_start,
        train_seconds=fit.train_seconds,
        feature_cache=inputs.cached,
        weights_sha256=state_digest(setup.model),
        history=fit.history,
        gate=outcome.as_dict(),
        diverged=fit.diverged,
        collapsed=outcome.collapsed or None,
        bad_images=bad,
        lr_found=lr_found,
    )
    if setup.metrics is not None:
        setup.metrics.end_stage(len(fit.history))
    if setup.env.is_main:
        commit_stage(setup, stage, final_dir, result, data.test)
    barrier(setup.env)
    return result


def _resume(setup: Setup, stage: PlannedStage) -> Resume | None:
    """The stage's newest valid checkpoint, loaded into the model (a store that is briefly
    unreachable at start is waited for, like one that fails mid-stage)."""
    timeout = setup.job.spec.checkpoint.upload_timeout_seconds
    found = choose_resume(setup, stage)
    resume = retrying(lambda: find_resume(setup, stage, found), timeout, "resume load")
    if resume is not None:
        setup.model.load_state_dict(resume.model_state)
        setup.progress.message(
            f"{stage.name}: resuming after epoch {resume.train_state.epoch + 1} from {setup.store.uri}/{resume.prefix}"
        )
    return resume


def _training(setup: Setup, stage: PlannedStage, inputs: Inputs, freeze: FreezeState, seed: int) -> Training:
    """Optimizer and scheduler for this stage's parameters only; DDP over the frozen state."""
    spec, env, model = setup.job.spec, setup.env, setup.model
    groups = param_groups(model, setup.groups, setup.group_of, stage, spec.optimizer.weight_decay)
    optimizer = build_optimizer(groups, spec.optimizer, env.device, setup.channels_last)
    # batchSize is global: every rank takes its share, so the optimization does not depend on
    # how many processes run it (the same YAML locally and on a cluster).
    batch = stage.batch_size // env.world
    loader = train_loader(inputs.train, batch, env, True, seed, setup.job)
    steps_per_epoch = math.ceil(len(loader) / spec.gradient_accumulation)
    # Buffers need broadcasting only if some BatchNorm still updates its running stats.
    eval_names = set(freeze.eval_modules)
    frozen = {id(m) for n, m in model.named_modules() if n in eval_names}
    net = inputs.net
    trains_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in frozen for m in net.modules())
    scaler = torch.amp.GradScaler(env.device.type) if setup.autocast_dtype == torch.float16 else None
    pinned = spec.data.pin_memory and env.device.type == "cuda"
    es = spec.early_stopping
    stopper = EarlyStopping(es.resolved_mode, es.patience, es.min_delta) if es else None
    best_metric = es.metric if es else "val_accuracy"
    return Training(
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, stage, steps_per_epoch),
        scaler=scaler,
        train_loader=loader,
        val_loader=eval_loader(inputs.val, batch, env, setup.job),
        batch=batch,
        steps_per_epoch=steps_per_epoch,
        wrapped=DDP(net, broadcast_buffers=trains_bn) if env.distributed else net,
        trains_bn=trains_bn,
        step=StepContext(env, inputs.prepare, setup.autocast_dtype, scaler, spec.gradient_accumulation, pinned),
        trainable=[p for p in model.parameters() if p.requires_grad],
        stopper=stopper,
        tracker=stopper or EarlyStopping("min" if best_metric.endswith("loss") else "max", 10**9),
        best_metric=best_metric,
        guard=DivergenceGuard(spec.divergence, spec.model.num_classes),
    )


def _restore(setup: Setup, stage: PlannedStage, tr: Training, fit: Fit, resume: Resume) -> None:
    """Optimizer, schedule, judges, history and random streams as the checkpoint left them."""
    env, es, st = setup.env, setup.job.spec.early_stopping, resume.train_state
    tr.optimizer.load_state_dict(st.optimizer)
    tr.scheduler.load_state_dict(st.scheduler)
    if tr.scaler is not None and st.scaler:
        tr.scaler.load_state_dict(st.scaler)
    tr.tracker.load_state_dict(st.tracker)
    tr.guard.reference = st.divergence_reference
    fit.history, fit.best_dir, fit.last_dir = st.history, st.best_dir, resume.prefix
    fit.train_seconds += st.train_seconds
    fit.first_epoch = st.epoch + 1
    if resume.best_state is not None:
        fit.best_state = resume.best_state
    elif es and es.restore_best and fit.best_dir == resume.prefix:
        fit.best_state = copy.deepcopy(resume.model_state)
    if len(st.rng) == env.world:
        set_rng_state(st.rng[env.rank])
    else:  # another world size: the run goes on, but not bit-identically
        seed_everything(fit.seed + RESEED_EPOCH_STRIDE * fit.first_epoch + env.rank)
    if tr.stopper is not None and tr.stopper.should_stop:
        fit.first_epoch = stage.epochs  # it had stopped early; only the commit was missing


def _bad_images(setup: Setup, data: Datasets) -> dict | None:
    """Images that did not decode so far, on every rank: fatal above spec.data.maxBadFraction."""
    total = len(data.train) + len(data.val) + len(data.test)
    limit = setup.job.spec.data.max_bad_fraction
    return bad_images.check(data.bad, total, limit, setup.env, setup.progress.message)


def _fit(
    setup: Setup, stage: PlannedStage, inputs: Inputs, tr: Training, fit: Fit, t_start: float, data: Datasets
) -> None:
    """The epochs: train, evaluate, checkpoint; stop early, or on divergence."""
    for epoch in range(fit.first_epoch, stage.epochs):
        try:
            m = _train_epoch(setup, stage, tr, fit, epoch)
        except Diverged as err:
            fit.diverged = str(err)
            setup.progress.message(f"{stage.name}: diverged ({fit.diverged}); stopping the stage")
            break
        fit.train_seconds += m["seconds"]
        if tr.trains_bn:
            average_buffers(inputs.net, setup.env)
        val = evaluate(inputs.net, tr.val_loader, tr.step, setup.job.spec.model.num_classes, pad_to=tr.batch)
        _bad_images(setup, data)  # before the epoch commits: a stage over the limit ends here
        elapsed = time.perf_counter() - t_start
        row = {
            "stage": stage.name,
            "stage_index": stage.index,
            "epoch": epoch,
            **{k: round(v, 6) for k, v in m.items() if k not in ("rank_images", "lr")},
            "val_loss": round(val["loss"], 6),
            "val_accuracy": round(val["accuracy"], 6),
            # The rates the epoch's last step trained at (after it the schedule has moved on: 0 at a cosine's end).
            "lr": m["lr"] or {g["name"]: g["lr"] for g in tr.optimizer.param_groups},
            "eta_seconds": round(elapsed / (epoch + 1 - fit.first_epoch) * (stage.epochs - epoch - 1), 1),
        }
        collapse = collapsed(val["predicted"], val["labels"])
        if collapse is not None:
            row["collapsed"] = collapse
            setup.progress.message(f"warning: {stage.name}: epoch {epoch + 1} predicts {collapse}")
        fit.history.append(row)
        _checkpoint_epoch(setup, stage, tr, fit, row, epoch)
        if setup.metrics is not None:
            step = (epoch + 1) * tr.steps_per_epoch
            setup.metrics.end_epoch(row, row["lr"], m["rank_images"] / max(m["seconds"], 1e-9), step)
            if setup.env.device.type == "cuda":
                device = setup.env.device
                setup.metrics.gpu(torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device))
        setup.progress.end_epoch(row)
        if tr.stopper is not None and tr.stopper.should_stop and epoch + 1 < stage.epochs:
            best = tr.stopper.best_epoch + 1
            setup.progress.message(f"{stage.name}: early stop after epoch {epoch + 1} (best epoch {best})")
            break


def _train_epoch(setup: Setup, stage: PlannedStage, tr: Training, fit: Fit, epoch: int) -> dict:
    env, metrics = setup.env, setup.metrics
    tr.train_loader.sampler.set_epoch(epoch)
    tr.train_loader.generator.manual_seed(fit.seed + epoch)  # worker seeds: a function of the epoch alone
    setup.progress.start_epoch(stage.name, epoch, stage.epochs, len(tr.train_loader))
    on_step = None
    if metrics is not None:
        on_step = lambda t, w, n: metrics.step(t, w, n, {g["name"]: g["lr"] for g in tr.optimizer.param_groups})

    def on_read(loss_sum: float, images: int, step: int) -> None:
        total, n = all_sum([loss_sum, images], env)  # every rank reaches the same verdict
        tr.guard.check(total / max(n, 1), f"epoch {epoch + 1} step {step}")

    return train_epoch(
        tr.wrapped,
        tr.train_loader,
        tr.optimizer,
        tr.scheduler,
        tr.step,
        setup.progress,
        tr.trainable if epoch == 0 else None,
        on_step,
        on_read,
        read_first=tr.guard.spec.enabled and tr.guard.reference is None,
    )


def _checkpoint_epoch(setup: Setup, stage: PlannedStage, tr: Training, fit: Fit, row: dict, epoch: int) -> None:
    """The best epoch so far (kept in memory where early stopping restores it), and this
    epoch's checkpoint with every rank's random streams (rank 0 writes it)."""
    es = setup.job.spec.early_stopping
    improved = tr.tracker.update(row[tr.best_metric], epoch)
    if improved and tr.stopper is not None and es.restore_best:
        fit.best_state = copy.deepcopy(setup.model.state_dict())
    epoch_dir = ckpt.epoch_prefix(stage.index, stage.name, epoch)
    if improved:
        fit.best_dir = epoch_dir
    fit.last_dir = epoch_dir
    rngs = all_gather_objects(rng_state(), setup.env)  # resuming restores each rank's own
    if setup.env.is_main:
        state = TrainState(
            epoch=epoch,
            optimizer=tr.optimizer.state_dict(),
            scheduler=tr.scheduler.state_dict(),
            scaler=tr.scaler.state_dict() if tr.scaler is not None else None,
            tracker=tr.tracker.state_dict(),
            history=fit.history,
            best_dir=fit.best_dir,
            divergence_reference=tr.guard.reference,
            train_seconds=fit.train_seconds,
            rng=rngs,
            spec_hash=training_hash(setup.job.spec),
        )
        save_epoch(setup, stage, epoch_dir, row, (epoch + 1) * tr.steps_per_epoch, setup.model, state)
