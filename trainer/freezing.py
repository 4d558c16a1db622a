"""Setting a stage's freeze state on a model, and undoing it.

Three things per stage, all decided before DDP wraps the model (DDP registers its hooks
at construction; mutating requires_grad under it is a known PyTorch/Lightning bug):
- requires_grad per parameter, from the plan;
- modules of frozen groups (and frozen BatchNorm anywhere, unless train_bn) run in eval
  mode. A forward pre-hook re-asserts it on every call, so no `model.train()` — ours,
  DDP's or a user's — can let frozen BatchNorm statistics drift;
- optionally, the frozen prefix of the network (the groups below the lowest trainable
  one) runs with grad mode off, so autograd records nothing there whatever the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from thaw_contract.plan import PlannedStage
from trainer.layers import LayerGroup, in_prefix


@dataclass
class FreezeState:
    eval_modules: list[str]
    no_grad_prefix: bool
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _module_group(name: str, groups: list[LayerGroup]) -> int | None:
    for i, g in enumerate(groups):
        if any(in_prefix(name, p) for p in g.prefixes):
            return i
    return None


def _force_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def frozen_modules(model: nn.Module, groups: list[LayerGroup], stage: PlannedStage) -> list[str]:
    """Names of modules that must run in eval mode during this stage."""
    trainable_groups = set(stage.trainable_groups)
    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        is_bn = isinstance(module, _BatchNorm)
        if is_bn and stage.freeze_bn_stats:
            out.append(name)
            continue
        if is_bn and stage.train_bn:
            continue
        g = _module_group(name, groups)
        own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if g is not None and g not in trainable_groups:
            out.append(name)
        elif is_bn and own and not any(p in stage.trainable_params for p in own):
            out.append(name)
    return out


def _install_no_grad_prefix(model: nn.Module, groups: list[LayerGroup], stage: PlannedStage) -> list:
    lowest = min(stage.trainable_groups)
    if lowest == 0:
        return []
    module_names = dict(model.named_modules())
    entries = [module_names[p] for g in stage.trainable_groups for p in groups[g].prefixes if p in module_names]
    saved: list[bool] = []

    def enter(_m, _args):
        saved.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def resume(_m, _args):
        if saved and saved[-1] and not torch.is_grad_enabled():
            torch.set_grad_enabled(True)

    def leave(_m, _args, _out):
        torch.set_grad_enabled(saved.pop() if saved else True)

    handles = [model.register_forward_pre_hook(enter)]
    handles += [m.register_forward_pre_hook(resume) for m in entries]
    handles.append(model.register_forward_hook(leave, always_call=True))
    return handles


def apply_stage(
    model: nn.Module, groups: list[LayerGroup], stage: PlannedStage, no_grad_prefix: bool = True
) -> FreezeState:
    for name, p in model.named_parameters():
        p.requires_grad_(name in stage.trainable_params)
    names = frozen_modules(model, groups, stage)
    state = FreezeState(eval_modules=names, no_grad_prefix=no_grad_prefix)
    modules = dict(model.named_modules())
    state.handles = [modules[n].register_forward_pre_hook(_force_eval) for n in names]
    if no_grad_prefix:
        state.handles += _install_no_grad_prefix(model, groups, stage)
    return state
