"""What a stage trains on: images through the whole model, or, where only the head trains,
the head's inputs computed once (the feature cache); and `lr: auto`'s range test on them.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from thaw_contract.plan import PlannedStage
from trainer import checkpoint as ckpt
from trainer.data import Datasets
from trainer.distributed import DistEnv, decided_by_main
from trainer.layers import head_module_name
from trainer.loaders import cached_features, train_loader
from trainer.loop import StepContext, feature_preparer, image_preparer
from trainer.optim import build_optimizer, param_groups
from trainer.setup import Setup, use_feature_cache


@dataclass
class Inputs:
    """What a stage trains on: images through the whole model, or the head's inputs, cached."""

    train: object
    val: object
    net: nn.Module  # what is trained and evaluated: the model, or its head on cached features
    prepare: Callable
    cached: bool
    seconds: float  # building the feature cache


def stage_inputs(setup: Setup, stage: PlannedStage, data: Datasets) -> Inputs:
    spec, env = setup.job.spec, setup.env
    if not use_feature_cache(setup, stage):
        prepare = image_preparer(setup.mean, setup.std, env.device, setup.channels_last, spec.data.pin_memory)
        return Inputs(data.train, data.val, setup.model, prepare, False, 0.0)
    t = time.perf_counter()
    train, val = cached_features(setup, [data.train, data.val], stage.batch_size)
    seconds = time.perf_counter() - t
    head = setup.model.get_submodule(head_module_name(spec.model.architecture))
    return Inputs(train, val, head, feature_preparer(env.device, spec.data.pin_memory), True, seconds)


def auto_lr(setup: Setup, stage: PlannedStage, inputs: Inputs) -> float:
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
            net = twin.get_submodule(head_module_name(spec.model.architecture)) if inputs.cached else twin
            groups = param_groups(twin, setup.groups, setup.group_of, stage, spec.optimizer.weight_decay)
            optimizer = build_optimizer(groups, spec.optimizer, env.device, setup.channels_last)
            loader = train_loader(inputs.train, stage.batch_size // env.world, one, True, spec.seed, setup.job)
            autocast = StepContext(env, inputs.prepare, setup.autocast_dtype, None).autocast
            lrs, losses = range_test(net, loader, optimizer, inputs.prepare, env.device, autocast)
            del twin, optimizer
        lr = suggest(lrs, losses)
        store.put(f"{prefix}/lr_find.json", json.dumps({"lr": lr, "lrs": lrs, "losses": losses}).encode())
        store.put(f"{prefix}/lr_find.png", plot(lrs, losses, lr))
        return lr

    lr = decided_by_main(find, env)
    setup.progress.message(f"{stage.name}: lr auto -> {lr:.3g} (range test: {store.uri}/{prefix}/lr_find.png)")
    return lr
