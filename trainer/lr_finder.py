"""lr: auto — a learning-rate range test (Smith 2015; fastai's lr_find) at a stage's start.

On a copy of the model, frozen as the stage will be, the stage's optimizer takes one step per
batch while the head's rate grows exponentially from START to END (every group keeps its
planned ratio to the head). The smoothed loss is recorded until it passes STOP x its minimum.
The suggestion is fastai's `lr_min`: a tenth of the rate at the smoothed minimum, where the
loss still falls steadily. Rank 0 runs it once; the result is stored beside the stage's
checkpoints (lr_find.json, lr_find.png), so a resumed or retried stage trains at the same rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

START, END, STEPS, STOP, BETA = 1e-7, 10.0, 100, 4.0, 0.98


def schedule(steps: int = STEPS, start: float = START, end: float = END) -> list[float]:
    return [start * (end / start) ** (i / max(steps - 1, 1)) for i in range(steps)]


def suggest(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the rate at the smoothed loss's minimum (fastai's lr_min)."""
    finite = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    if not finite:
        raise ValueError("the range test recorded no finite loss")
    best_lr, _ = min(finite, key=lambda p: p[1])
    return best_lr / 10


def range_test(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    autocast,
    steps: int = STEPS,
) -> tuple[list[float], list[float]]:
    """(head rates, smoothed losses). `optimizer` holds the stage's groups at their relative
    rates (head 1.0); each step multiplies them by the scheduled head rate."""
    relative = [g["lr"] for g in optimizer.param_groups]
    lrs, losses = [], []
    avg, best = 0.0, math.inf
    model.train()
    it = iter(batches)
    for i, lr in enumerate(schedule(steps)):
        try:
            x, y = next(it)
        except StopIteration:  # a small data set: go round again
            it = iter(batches)
            x, y = next(it)
        for g, r in zip(optimizer.param_groups, relative):
            g["lr"] = lr * r
        with autocast():
            loss = F.cross_entropy(model(prepare(x)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        avg = BETA * avg + (1 - BETA) * value
        smoothed = avg / (1 - BETA ** (i + 1))  # bias-corrected, as fastai's
        lrs.append(lr)
        losses.append(smoothed)
        if not math.isfinite(smoothed) or smoothed > STOP * best:
            break
        best = min(best, smoothed)
    return lrs, losses


def plot(lrs: list[float], losses: list[float], chosen: float) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(chosen, color="C1", ls="--", label=f"chosen {chosen:.3g}")
    ax.set(xscale="log", xlabel="head learning rate", ylabel="smoothed training loss", title="lr range test")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
