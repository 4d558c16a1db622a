"""One epoch of training and one pass of evaluation. No policy here: the runner decides
what trains; this moves batches, steps the optimizer and counts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from trainer.distributed import DistEnv, all_gather_objects, all_sum
from trainer.progress import Progress


@dataclass
class StepContext:
    env: DistEnv
    prepare: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch (or features) -> model input
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    accumulation: int = 1
    non_blocking: bool = False

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)


def image_preparer(mean, std, device: torch.device, channels_last: bool, non_blocking: bool):
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=non_blocking).float().sub_(m).div_(s)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return prepare


def feature_preparer(device: torch.device, non_blocking: bool):
    return lambda x: x.to(device, non_blocking=non_blocking)


# Host syncs (a .item()) stall a launch-bound GPU loop: the CPU cannot queue the next step
# until the device has finished this one. Metrics stay on the device and are read every
# SYNC_EVERY steps (the progress bar and per-step metrics update then) and at the epoch's end.
SYNC_EVERY = 25


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ctx: StepContext,
    progress: Progress,
    check_grads: list[nn.Parameter] | None = None,
    on_step: Callable[[float, float, int], None] | None = None,
    on_read: Callable[[float, int, int], None] | None = None,
    read_first: bool = False,
) -> dict:
    """One pass over `loader`. `on_read(loss sum, images, step)` sees the loss of the steps since
    the last read (the divergence guard); what it raises stops the epoch. `read_first`: a read
    after the first step alone, whose loss is the input weights' (the forward ran before the
    optimizer's first step): the guard's reference, one host sync per stage."""
    model.train()
    device = ctx.env.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    data_wait = 0.0
    steps = len(loader)
    t0 = time.perf_counter()
    mark = interval_start = t0
    unread: list[tuple[float, int]] = []  # (data wait, images) of the steps since the last read
    read_sum, read_count = 0.0, 0
    trained_at = None  # the rates of the epoch's last optimizer step (the schedule then moves on)
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        waited = time.perf_counter() - mark
        data_wait += waited
        x = ctx.prepare(x)
        y = y.to(device, non_blocking=ctx.non_blocking)
        last_micro = (i + 1) % ctx.accumulation == 0 or i + 1 == steps
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with ctx.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            scaled = loss / ctx.accumulation
            (ctx.scaler.scale(scaled) if ctx.scaler else scaled).backward()
        if last_micro:
            if check_grads is not None:
                missing = [p for p in check_grads if p.grad is None]
                if missing:
                    raise RuntimeError(
                        f"{len(missing)} trainable parameters got no gradient; is the model's forward unusual?"
                    )
                check_grads = None
            if ctx.scaler:
                ctx.scaler.step(optimizer)
                ctx.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trained_at = {g.get("name", str(k)): g["lr"] for k, g in enumerate(optimizer.param_groups)}
            scheduler.step()
        n = y.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.argmax(1) == y).sum()
        count += n
        unread.append((waited, n))
        reading = len(unread) == SYNC_EVERY or i + 1 == steps or (read_first and i == 0)
        if not reading:
            progress.step()  # the bar moves every step; the loss shows at each read
        mark = time.perf_counter()
        if reading:
            total = loss_sum.item()  # the one host sync of the interval
            interval_sum, interval_count = total - read_sum, count - read_count
            read_sum, read_count = total, count
            step_loss = interval_sum / interval_count
            now = time.perf_counter()
            per_step = (now - interval_start) / len(unread)  # a step's time includes its data wait
            progress.step(step_loss)
            if on_step is not None:
                for step_wait, images in unread:
                    on_step(per_step, step_wait, images)
            unread = []
            if on_read is not None:
                on_read(interval_sum, interval_count, i + 1)
            interval_start = mark = time.perf_counter()
    seconds = time.perf_counter() - t0
    rank_images = count
    loss_total, correct_total = torch.stack([loss_sum, correct.double()]).tolist()
    loss_total, correct_total, count, images = all_sum([loss_total, correct_total, count, count], ctx.env)
    return {
        "train_loss": loss_total / max(count, 1),
        "train_accuracy": correct_total / max(count, 1),
        "seconds": seconds,
        "images_per_second": images / seconds if seconds else 0.0,
        "data_wait_seconds": data_wait,
        "step_seconds": seconds / max(steps, 1),
        "rank_images": rank_images,
        "lr": trained_at,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    ctx: StepContext,
    classes: int,
    pad_to: int | None = None,
    per_image: bool = False,
) -> dict:
    """Loss, accuracy and images per class (predicted and labelled) over this rank's shard,
    summed over all ranks (exact, no padding of the data set; every rank sends `classes`
    counts, even one whose shard is empty). A short last batch is padded to `pad_to` and the padding masked out, so
    the model meets one batch shape (each new shape costs a GPU its kernel plans again).
    `per_image`: also each image's answer and loss, in the data set's order (what a paired test
    of two models reads), gathered from every rank."""
    was_training = model.training
    model.eval()
    device = ctx.env.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    predicted = torch.zeros(classes, dtype=torch.int64, device=device)  # images per class the model names
    labels = torch.zeros_like(predicted)  # ... and the labels name
    count = 0
    answers: list[torch.Tensor] = []  # per batch: right or wrong, then the loss, per image
    for x, y in loader:
        n = y.shape[0]
        if pad_to is not None and n < pad_to:
            x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
        x = ctx.prepare(x)
        y = y.to(device, non_blocking=ctx.non_blocking)
        with ctx.autocast():
            logits = model(x)[:n]
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        loss_sum += losses.sum().double()
        guess = logits.argmax(1)
        correct += (guess == y).sum()
        if per_image:
            answers.append(torch.stack([(guess == y).float(), losses]).cpu())
        predicted += torch.bincount(guess, minlength=classes)
        labels += torch.bincount(y, minlength=classes)
        count += n
    totals = torch.cat([torch.stack([loss_sum, correct.double()]), predicted.double(), labels.double()]).tolist()
    loss_total, correct_total, count, *counts = all_sum([*totals[:2], count, *totals[2:]], ctx.env)  # one sync
    model.train(was_training)
    out = {
        "loss": loss_total / max(count, 1),
        "accuracy": correct_total / max(count, 1),
        "count": int(count),
        "predicted": [int(c) for c in counts[:classes]],
        "labels": [int(c) for c in counts[classes:]],
    }
    if per_image:
        mine = torch.cat(answers, 1).tolist() if answers else [[], []]
        out["correct"], out["losses"] = _interleave(all_gather_objects(mine, ctx.env))
    return out


def _interleave(parts: list[list[list[float]]]) -> tuple[list[bool], list[float]]:
    """Rank r evaluated images r, r + world, ... (loaders.eval_loader): back into one order."""
    correct: list[bool] = []
    losses: list[float] = []
    for i in range(max((len(p[0]) for p in parts), default=0)):
        for rank_correct, rank_losses in parts:
            if i < len(rank_correct):
                correct.append(rank_correct[i] > 0.5)
                losses.append(rank_losses[i])
    return correct, losses
