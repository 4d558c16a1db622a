"""Optimizer and scheduler for one stage: only trainable parameters, one pair of param
groups per layer group (with and without weight decay), each at its planned rate."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from thaw_contract.plan import PlannedStage
from thaw_contract.spec import OptimizerSpec
from trainer.layers import LayerGroup
from trainer.schedule import lr_factor

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and every parameter of a normalization layer: weight decay never touches them."""
    out = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(module, _NORMS) or pname == "bias" or p.ndim <= 1:
                out.add(full)
    return out


def param_groups(
    model: nn.Module, groups: list[LayerGroup], group_of: dict[str, int], stage: PlannedStage, weight_decay: float
) -> list[dict]:
    skip_decay = no_decay_names(model)
    out = []
    params = dict(model.named_parameters())
    for g in stage.trainable_groups:
        names = [n for n in params if group_of[n] == g and n in stage.trainable_params]
        decay = [params[n] for n in names if n not in skip_decay]
        plain = [params[n] for n in names if n in skip_decay]
        lr = stage.group_lrs[g]
        # Two param groups per layer group, both named for it (torch keeps extra keys in each
        # group); "decay" says which one weight decay applies to.
        for ps, wd, decays in ((decay, weight_decay, True), (plain, 0.0, False)):
            if ps:
                out.append({"params": ps, "lr": lr, "weight_decay": wd, "name": groups[g].name, "decay": decays})
    return out


def build_optimizer(
    groups: list[dict], spec: OptimizerSpec, device: torch.device, channels_last: bool
) -> torch.optim.Optimizer:
    # Fused kernels: one launch for all parameters on CUDA; on CPU a one-off check here found
    # them faster than the default too (no committed benchmark isolates this). Never with
    # channels_last in play: fused SGD and AdamW (torch 2.14, CPU) update the wrong elements when
    # a gradient's memory layout differs from its parameter's, which cost staged runs on
    # channels_last models 2 points of accuracy, silently (docs/results.md).
    standard = not channels_last and all(p.is_contiguous() for g in groups for p in g["params"])
    fused = {"fused": True} if device.type in ("cuda", "cpu") and standard else {}
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=spec.momentum, nesterov=spec.nesterov, **fused)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=spec.betas, **fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage: PlannedStage, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = stage.epochs * steps_per_epoch
    warmup = round(stage.schedule.warmup_epochs * steps_per_epoch)
    fn = partial(lr_factor, total=total, warmup=warmup, cfg=stage.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
