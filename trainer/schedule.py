"""Learning-rate schedules as pure multipliers of each group's peak rate.

One function of (step, total steps) per schedule, applied through LambdaLR so every
param group keeps its own discriminative peak. Built fresh for every stage: a scheduler
never sees param groups added later (PyTorch issue, see DESIGN.md).
"""

from __future__ import annotations

import math

from thaw_contract.spec import ScheduleSpec


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def lr_factor(step: int, total: int, warmup: int, cfg: ScheduleSpec) -> float:
    """Multiplier for optimizer step `step` (0-based) of `total`; warmup in steps."""
    if cfg.name == "onecycle":
        # Same curve as torch.optim.lr_scheduler.OneCycleLR (cosine annealing both ways).
        initial = 1.0 / cfg.div_factor
        final = initial / cfg.final_div_factor
        peak_step = float(cfg.pct_start * total) - 1
        if step <= peak_step:
            return _cos(initial, 1.0, step / peak_step) if peak_step > 0 else 1.0
        return _cos(1.0, final, (step - peak_step) / max(total - 1 - peak_step, 1e-9))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.name == "constant":
        return 1.0
    span = max(total - warmup, 1)
    return _cos(1.0, cfg.min_lr_factor, min((step - warmup) / span, 1.0))
