"""The optimizer holds only trainable parameters, at the planned rates, without decay on norms/biases."""

from __future__ import annotations

import pytest
import torch

from tests.builders import job_doc, with_path
from thaw_contract.spec import parse_job
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.schedule import lr_factor
from trainer.setup import plan_job


def _plan(doc):
    job = parse_job(doc)
    built, groups, group_of, stages = plan_job(job, device="cpu")
    return job, built.model, groups, group_of, stages


def test_only_trainable_parameters_and_no_decay_on_norm_or_bias():
    job, model, groups, group_of, stages = _plan(job_doc())
    stage = stages[1]
    pg = param_groups(model, groups, group_of, stage, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    in_opt = {names[id(p)] for g in pg for p in g["params"]}
    assert in_opt == set(stage.trainable_params)
    # Named for their layer group (no "/no_decay" suffix to parse back); "decay" marks the decayed one.
    assert {g["name"] for g in pg} == {groups[i].name for i in stage.trainable_groups}
    assert all(g["decay"] == (g["weight_decay"] == 0.01) for g in pg)
    for g in pg:
        for p in g["params"]:
            n = names[id(p)]
            is_norm_or_bias = n.endswith("bias") or "_bn" in n or p.ndim == 1
            assert (g["weight_decay"] == 0.0) == is_norm_or_bias, n


def test_discriminative_rates_fall_by_lr_decay_per_group():
    job, model, groups, group_of, stages = _plan(job_doc())
    lrs = {groups[g].name: lr for g, lr in stages[1].group_lrs.items()}
    assert lrs == pytest.approx({"head": 0.01, "top_conv": 0.01 / 2.6, "stage7": 0.01 / 2.6**2})


def test_explicit_group_rates_are_used_as_given():
    doc = with_path(
        with_path(job_doc(), "spec.stages.1.lrDecay", "DELETE"), "spec.stages.1.groupLrs", [0.01, 0.004, 0.001]
    )
    _, _, groups, _, stages = _plan(doc)
    assert [stages[1].group_lrs[g] for g in stages[1].trainable_groups] == [0.01, 0.004, 0.001]


def test_every_group_follows_the_schedule_at_every_step():
    doc = job_doc(schedule={"name": "cosine", "warmupEpochs": 1})
    job, model, groups, group_of, stages = _plan(doc)
    stage = stages[1]
    opt = build_optimizer(
        param_groups(model, groups, group_of, stage, 0.0), job.spec.optimizer, torch.device("cpu"), False
    )
    steps_per_epoch = 4
    sched = build_scheduler(opt, stage, steps_per_epoch)
    total = stage.epochs * steps_per_epoch
    p = next(iter(opt.param_groups[0]["params"]))
    for step in range(total):
        for g in opt.param_groups:
            base = stage.group_lrs[[i for i in stage.trainable_groups if groups[i].name == g["name"]][0]]
            assert g["lr"] == pytest.approx(base * lr_factor(step, total, steps_per_epoch, stage.schedule))
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()


def test_gradual_expands_by_groups_per_stage_with_lr_factor():
    doc = with_path(
        job_doc(gradual={"stages": 3, "epochsPerStage": 2, "lr": 0.1, "lrFactor": 0.5, "lastAll": True}),
        "spec.stages",
        "DELETE",
    )
    _, _, groups, _, stages = _plan(doc)
    assert [s.name for s in stages] == ["top1", "top3", "all"]
    assert [len(s.trainable_groups) for s in stages] == [1, 3, len(groups)]
    assert [s.group_lrs[len(groups) - 1] for s in stages] == pytest.approx([0.1, 0.05, 0.025])
    assert all(s.epochs == 2 for s in stages)
    one_by_one = with_path(with_path(doc, "spec.gradual.groupsPerStage", 1), "spec.gradual.stages", 4)
    _, _, _, _, stages = _plan(one_by_one)
    assert [len(s.trainable_groups) for s in stages] == [1, 2, 3, len(groups)]
    longest_last = with_path(doc, "spec.gradual.lastStageEpochs", 8)  # fastai's fine_tune: long unfrozen
    assert [s.epochs for s in _plan(longest_last)[4]] == [2, 2, 8]
    total = with_path(with_path(doc, "spec.gradual.epochsPerStage", "DELETE"), "spec.gradual.epochs", 12)
    assert [(s.name, s.epochs, s.group_lrs) for s in _plan(total)[4]] == [
        (s.name, s.epochs, s.group_lrs) for s in _plan(longest_last)[4]
    ]


@pytest.mark.parametrize(
    ("stages", "epochs", "split"),
    [(3, 12, [2, 2, 8]), (2, 12, [4, 8]), (4, 12, [1, 1, 1, 9]), (3, 3, [1, 1, 1]), (1, 5, [5]), (3, 30, [5, 5, 20])],
)
def test_a_total_epoch_budget_gives_the_last_stage_two_thirds(stages, epochs, split):
    from thaw_contract.spec import GradualSpec

    assert GradualSpec(stages=stages, epochs=epochs).stage_epochs() == split
    assert sum(split) == epochs


@pytest.mark.parametrize("request_layout", ["channels_last weight", "contiguous weight"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_parameters_step_like_the_reference_whatever_their_gradients_layout(name, request_layout):
    """Fused kernels (torch 2.14, CPU) assume a gradient laid out like its parameter; DDP's bucket
    views and some autograd paths give a channels_last weight a contiguous gradient."""
    from thaw_contract.spec import OptimizerSpec

    torch.manual_seed(0)
    w0 = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 3, 3, 3)  # contiguous
    # and the other way round: a contiguous weight, a channels_last gradient (a channels_last model)
    if request_layout == "contiguous weight":
        w0, grad = w0.contiguous(), grad.contiguous(memory_format=torch.channels_last)
    out = []
    for build in ("thaw", "reference"):
        p = torch.nn.Parameter(w0.clone(memory_format=torch.preserve_format))
        groups = [{"params": [p], "lr": 0.1, "weight_decay": 0.0}]
        spec = OptimizerSpec(name=name)
        if build == "thaw":
            opt = build_optimizer(groups, spec, torch.device("cpu"), channels_last=True)
        elif name == "sgd":
            opt = torch.optim.SGD(groups, lr=0.1, momentum=spec.momentum, foreach=False)
        else:
            opt = torch.optim.AdamW(groups, lr=0.1, betas=spec.betas, foreach=False)
        for _ in range(3):
            p.grad = grad.clone()
            opt.step()
        out.append(p.detach())
    assert torch.allclose(out[0], out[1], atol=1e-6)


def test_gradual_defaults_are_the_measured_recipe():
    """Only stages and epochsPerStage: head, top 3, all; discriminative rates, frozen BN statistics,
    no warm-up (it cost accuracy with discriminative rates, docs/results.md)."""
    doc = with_path(job_doc(gradual={"stages": 3, "epochsPerStage": 4}), "spec.stages", "DELETE")
    _, _, groups, _, stages = _plan(doc)
    head = len(groups) - 1
    assert [s.name for s in stages] == ["top1", "top3", "all"]
    assert [s.group_lrs[head] for s in stages] == [0.01] * 3
    assert stages[2].group_lrs[head - 1] == pytest.approx(0.01 / 1.5)
    assert stages[2].group_lrs[0] == pytest.approx(0.01 / 1.5 ** (len(groups) - 1))
    assert [s.schedule.warmup_epochs for s in stages] == [0.0, 0.0, 0.0]
    assert all(s.freeze_bn_stats for s in stages)

    adamw = with_path(with_path(doc, "spec.optimizer", {"name": "adamw"}), "spec.gradual.epochsPerStage", 2)
    _, _, _, _, stages = _plan(adamw)
    assert [s.group_lrs[head] for s in stages] == [0.001] * 3
    one_rate = with_path(adamw, "spec.gradual.lrDecay", 1)  # at one rate a warm-up eases the new groups in
    assert [s.schedule.warmup_epochs for s in _plan(one_rate)[4]] == [0.0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("change", "warmups"),
    [
        ({}, [0.0, 0.0]),  # discriminative rates by default: no warm-up
        ({"spec.gradual.lrDecay": 1}, [0.0, 1.0]),  # one rate: a quarter of epochsPerStage, at most 1
        ({"spec.gradual.lrDecay": 1, "spec.gradual.warmupEpochs": 0}, [0.0, 0.0]),
        ({"spec.gradual.warmupEpochs": 0.5}, [0.0, 0.5]),
        ({"spec.gradual.lrDecay": 1, "spec.schedule": {"name": "onecycle"}}, [0.0, 0.0]),  # rises on its own
    ],
)
def test_gradual_warmup_can_be_set_or_turned_off(change, warmups):
    doc = with_path(job_doc(gradual={"stages": 2, "epochsPerStage": 4}), "spec.stages", "DELETE")
    for path, value in change.items():
        doc = with_path(doc, path, value)
    _, _, _, _, stages = _plan(doc)
    assert [s.schedule.warmup_epochs for s in stages] == warmups


def test_module_globs_select_parameters_and_group_names():
    doc = with_path(job_doc(), "spec.stages.1.trainable", {"modules": ["net._blocks.15.*", "head"]})
    _, model, groups, _, stages = _plan(doc)
    sel = stages[1].trainable_params
    assert all(n.startswith(("net._blocks.15.", "classifier.")) for n in sel)
    assert any(n.startswith("net._blocks.15.") for n in sel) and "classifier.1.weight" in sel
