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

from trainer.distributed import DistEnv, all_sum
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


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ctx: StepContext,
    progress: Progress,
    check_grads: list[nn.Parameter] | None = None,
    on_step: Callable[[float, float, int], None] | None = None,
) -> dict:
    model.train()
    loss_sum = correct = count = 0.0
    data_wait = 0.0
    steps = len(loader)
    t0 = time.perf_counter()
    mark = t0
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        waited = time.perf_counter() - mark
        data_wait += waited
        x = ctx.prepare(x)
        y = y.to(ctx.env.device, non_blocking=ctx.non_blocking)
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
            scheduler.step()
        n = y.numel()
        step_loss = loss.item()  # one device sync per step, not two
        loss_sum += step_loss * n
        correct += (logits.argmax(1) == y).sum().item()
        count += n
        progress.step(step_loss)
        now = time.perf_counter()
        if on_step is not None:
            on_step(now - mark, waited, n)  # step time includes its data wait
        mark = now
    seconds = time.perf_counter() - t0
    rank_images = count
    loss_sum, correct, count, images = all_sum([loss_sum, correct, count, count], ctx.env)
    return {
        "train_loss": loss_sum / max(count, 1),
        "train_accuracy": correct / max(count, 1),
        "seconds": seconds,
        "images_per_second": images / seconds if seconds else 0.0,
        "data_wait_seconds": data_wait,
        "step_seconds": seconds / max(steps, 1),
        "rank_images": rank_images,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: StepContext) -> dict:
    """Loss and accuracy over this rank's shard, summed over all ranks (exact, no padding)."""
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    for x, y in loader:
        x = ctx.prepare(x)
        y = y.to(ctx.env.device, non_blocking=ctx.non_blocking)
        with ctx.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += y.numel()
    loss_sum, correct, count = all_sum([loss_sum, correct, count], ctx.env)
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "count": int(count)}
