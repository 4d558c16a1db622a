"""After a stage trains, every frozen parameter and frozen BN buffer is bit-identical."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.builders import job_doc, with_path
from thaw_contract.spec import parse_job
from trainer.freezing import apply_stage
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.setup import plan_job


def _setup(doc):
    job = parse_job(doc)
    torch.manual_seed(0)
    built, groups, group_of, stages = plan_job(job, device="cpu")
    return job, built.model, groups, group_of, stages


def _train_steps(job, model, groups, group_of, stage, steps=3, reapply_train=True):
    opt = build_optimizer(
        param_groups(model, groups, group_of, stage, 0.1), job.spec.optimizer, torch.device("cpu"), False
    )
    sched = build_scheduler(opt, stage, steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        if reapply_train:
            model.train()  # what every training loop does; must not wake frozen BN
        x = torch.randn(8, 3, 32, 32, generator=gen) * 3 + 1  # far from ImageNet stats
        y = torch.randint(0, 10, (8,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return opt


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_parameters_and_bn_buffers_do_not_move():
    job, model, groups, group_of, stages = _setup(job_doc())
    stage = stages[1]  # top3: head, top_conv, stage7
    state = apply_stage(model, groups, stage)
    before = _snapshot(model)
    _train_steps(job, model, groups, group_of, stage)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_keys = [
        k for k in before if not any(k.startswith(p) for g in stage.trainable_groups for p in groups[g].prefixes)
    ]
    assert frozen_keys and not (changed & set(frozen_keys)), sorted(changed & set(frozen_keys))[:5]
    assert any(k.startswith("classifier") for k in changed)
    assert any("running_mean" in k and k.startswith("net._blocks.15") for k in changed), "trainable BN still adapts"
    state.remove()


def test_train_bn_lets_frozen_bn_statistics_move_but_not_weights():
    doc = with_path(job_doc(), "spec.stages.0.trainBn", True)
    job, model, groups, group_of, stages = _setup(doc)
    stage = stages[0]
    apply_stage(model, groups, stage)
    before = _snapshot(model)
    _train_steps(job, model, groups, group_of, stage)
    after = model.state_dict()
    assert not torch.equal(before["net._bn0.running_mean"], after["net._bn0.running_mean"])
    assert torch.equal(before["net._bn0.weight"], after["net._bn0.weight"])


def test_freeze_bn_stats_keeps_even_trainable_bn_in_eval():
    doc = with_path(job_doc(), "spec.stages.1.freezeBnStats", True)
    job, model, groups, group_of, stages = _setup(doc)
    stage = stages[1]
    apply_stage(model, groups, stage)
    before = _snapshot(model)
    _train_steps(job, model, groups, group_of, stage)
    after = model.state_dict()
    assert torch.equal(before["net._bn1.running_mean"], after["net._bn1.running_mean"])
    assert not torch.equal(before["net._bn1.weight"], after["net._bn1.weight"]), "affine params still train"


def test_the_plain_loop_lets_frozen_bn_drift():
    """The reference loop (requires_grad=False + model.train()) moves BN stats: why we hook."""
    job, model, groups, group_of, stages = _setup(job_doc())
    stage = stages[0]
    for n, p in model.named_parameters():
        p.requires_grad_(n in stage.trainable_params)
    before = _snapshot(model)
    _train_steps(job, model, groups, group_of, stage)
    assert not torch.equal(before["net._bn0.running_mean"], model.state_dict()["net._bn0.running_mean"])


def test_remove_restores_normal_train_mode():
    job, model, groups, _, stages = _setup(job_doc())
    state = apply_stage(model, groups, stages[0])
    model.train()
    model(torch.zeros(2, 3, 32, 32))
    assert not model.net._bn0.training
    state.remove()
    model.train()
    model(torch.zeros(2, 3, 32, 32))
    assert model.net._bn0.training
