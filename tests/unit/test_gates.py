"""Stage gates and the divergence guard: the verdicts, the spec, the status and the operator's events."""

from __future__ import annotations

import math

import pytest

from tests.builders import job_doc, with_path
from thaw_contract.spec import DivergenceSpec, GateSpec, SpecError, parse_job, training_hash
from thaw_contract.stage_result import status_summary, stopped_the_job
from trainer.gates import (
    Answers,
    Diverged,
    DivergenceGuard,
    GateFailed,
    decide,
    mcnemar_worse,
    paired_z_worse,
    previous_carried,
    rolled_back,
    visible_drop,
)

BEFORE = {"val_accuracy": 0.809, "val_loss": 0.55}


def test_a_stage_that_improves_or_ties_advances_and_passes_its_own_weights_on():
    for acc in (0.84, 0.809):
        out = decide(GateSpec(), {"val_accuracy": acc, "val_loss": 0.5}, BEFORE)
        assert out.decision == "advanced" and out.carried == {"val_accuracy": acc, "val_loss": 0.5}
    first = decide(GateSpec(), {"val_accuracy": 0.3, "val_loss": 2.0}, None)
    assert first.decision == "first" and first.previous is None


def test_a_tie_on_accuracy_is_decided_by_the_validation_loss():
    worse_loss = decide(GateSpec(), {"val_accuracy": 0.809, "val_loss": 0.56}, BEFORE)
    assert worse_loss.decision == "rolled_back" and worse_loss.carried == BEFORE
    assert worse_loss.reason.endswith("; tied, and val_loss 0.5600 against 0.5500")
    same_loss = decide(GateSpec(), {"val_accuracy": 0.809, "val_loss": 0.55}, BEFORE)
    assert same_loss.decision == "advanced"
    # Only a tie: a gain wins whatever the loss, a summary without a loss (written before gates)
    # lets a tie advance, and a required gain met exactly is met.
    assert decide(GateSpec(), {"val_accuracy": 0.81, "val_loss": 0.9}, BEFORE).decision == "advanced"
    assert decide(GateSpec(), {"val_accuracy": 0.809, "val_loss": 0.9}, {"val_accuracy": 0.809}).decision == "advanced"
    exact = decide(
        GateSpec(min_gain=0.25), {"val_accuracy": 0.75, "val_loss": 0.9}, {"val_accuracy": 0.5, "val_loss": 0.5}
    )
    assert exact.decision == "advanced"
    loss_metric = decide(GateSpec(metric="val_loss"), {"val_accuracy": 0.7, "val_loss": 0.55}, BEFORE)
    assert loss_metric.decision == "advanced"  # a tie on the loss itself has nothing finer to ask


def test_a_regression_rolls_back_by_default_and_passes_the_previous_weights_on():
    out = decide(GateSpec(), {"val_accuracy": 0.784, "val_loss": 0.6}, BEFORE)
    assert out.decision == "rolled_back" and out.carried == BEFORE
    assert out.reason == "val_accuracy 0.7840 against 0.8090 from the stage before (gain -0.0250, needed +0.0000)"
    kept = decide(GateSpec(on_regression="keep"), {"val_accuracy": 0.784, "val_loss": 0.6}, BEFORE)
    assert kept.decision == "kept" and kept.carried["val_accuracy"] == 0.784


def test_stop_rolls_back_like_rollback_and_says_the_job_ends():
    out = decide(GateSpec(on_regression="stop"), {"val_accuracy": 0.784, "val_loss": 0.6}, BEFORE)
    assert out.decision == "stopped" and out.carried == BEFORE
    assert out.reason == decide(GateSpec(), {"val_accuracy": 0.784, "val_loss": 0.6}, BEFORE).reason
    assert stopped_the_job({"gate": out.as_dict()}) and not stopped_the_job({"gate": {"decision": "rolled_back"}})
    assert not stopped_the_job(None) and not stopped_the_job({"valAccuracy": 0.8})
    better = decide(GateSpec(on_regression="stop"), {"val_accuracy": 0.85, "val_loss": 0.5}, BEFORE)
    assert better.decision == "advanced"
    early = rolled_back(GateSpec(on_regression="stop"), None, BEFORE, "diverged before its first epoch ended: nan")
    assert early.decision == "stopped" and early.carried == BEFORE


def test_fail_is_one_line_naming_the_field():
    with pytest.raises(GateFailed) as err:
        decide(GateSpec(on_regression="fail"), {"val_accuracy": 0.7, "val_loss": 0.6}, BEFORE)
    assert str(err.value).startswith("stage gate: val_accuracy 0.7000 against 0.8090")
    assert str(err.value).endswith("spec.gate.onRegression is fail") and "\n" not in str(err.value)
    assert isinstance(err.value, SpecError)  # exit 2: a deterministic outcome is not retried


def test_a_required_gain_absolute_relative_and_for_a_loss():
    need = GateSpec(min_gain=0.02)
    assert decide(need, {"val_accuracy": 0.82, "val_loss": 0.5}, BEFORE).decision == "rolled_back"
    assert decide(need, {"val_accuracy": 0.83, "val_loss": 0.5}, BEFORE).decision == "advanced"
    rel = GateSpec(min_gain=0.05, relative=True)  # 5% of 0.809 = 0.04045
    assert decide(rel, {"val_accuracy": 0.85, "val_loss": 0.5}, BEFORE).decision == "advanced"
    assert decide(rel, {"val_accuracy": 0.849, "val_loss": 0.5}, BEFORE).decision == "rolled_back"
    loss = GateSpec(metric="val_loss")
    assert decide(loss, {"val_accuracy": 0.9, "val_loss": 0.56}, BEFORE).decision == "rolled_back"
    assert decide(loss, {"val_accuracy": 0.1, "val_loss": 0.54}, BEFORE).decision == "advanced"


def test_what_the_stage_before_passed_on_is_read_from_its_summary():
    out = decide(GateSpec(), {"val_accuracy": 0.7, "val_loss": 0.9}, BEFORE)
    summary = {"best_val_accuracy": 0.75, "gate": out.as_dict()}
    assert previous_carried(summary) == BEFORE  # rolled back: its input's metrics, not its own
    assert previous_carried({"best_val_accuracy": 0.75}) == {"val_accuracy": 0.75}  # written before gates
    assert previous_carried(None) is None
    early = rolled_back(GateSpec(), None, BEFORE, "diverged before its first epoch ended: loss nan")
    assert early.value is None and early.carried == BEFORE


def test_the_guard_stops_on_a_non_finite_or_exploding_loss_only():
    g = DivergenceGuard(DivergenceSpec(loss_factor=4), num_classes=10)
    g.check(2.3, "epoch 1 step 1")  # the input weights' loss: the reference
    g.check(9.0, "epoch 1 step 26")  # under 4 x 2.3
    exploded = r"loss 9.3 above 9.2 \(4 x 2.3, the input weights' loss, and at least ln 10\) at epoch 2 step 25"
    with pytest.raises(Diverged, match=exploded):
        g.check(9.3, "epoch 2 step 25")
    with pytest.raises(Diverged, match="loss nan at epoch 1 step 25"):
        DivergenceGuard(DivergenceSpec(), 10).check(math.nan, "epoch 1 step 25")
    DivergenceGuard(DivergenceSpec(enabled=False), 10).check(math.inf, "anywhere")


def test_a_small_input_loss_does_not_turn_ordinary_noise_into_divergence():
    """A well-fit input (first-batch loss 0.05): 4 x 0.05 would stop a stage at 0.3; the limit is
    never below a uniform guess's loss, ln(classes)."""
    g = DivergenceGuard(DivergenceSpec(loss_factor=4), num_classes=10)
    g.check(0.05, "epoch 1 step 1")
    assert g.limit == pytest.approx(math.log(10))
    g.check(2.2, "epoch 1 step 26")
    floor = r"above 2.303 \(4 x 0.05, the input weights' loss, and at least ln 10\) at epoch 1 step 51"
    with pytest.raises(Diverged, match=floor):
        g.check(2.4, "epoch 1 step 51")


def _explode(steps: int, lr: float, read_first: bool) -> tuple[float, float | None, str | None]:
    """Real SGD on a tiny linear model at `lr`, the guard on the loop's reads as a stage wires
    it: (the input weights' loss on the first batch, the guard's reference, why it stopped)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from trainer.distributed import DistEnv
    from trainer.loop import StepContext, train_epoch
    from trainer.progress import Progress

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(steps * 16, 8, generator=g), torch.randint(0, 4, (steps * 16,), generator=g)
    with torch.no_grad():
        first = F.cross_entropy(model(x[:16]), y[:16]).item()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    guard = DivergenceGuard(DivergenceSpec(loss_factor=4), num_classes=4)
    ctx = StepContext(DistEnv(0, 1, 0, 1, torch.device("cpu")), lambda t: t, None, None)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    try:
        train_epoch(
            model, loader, opt, sched, ctx, Progress(False),
            on_read=lambda s, n, step: guard.check(s / n, f"step {step}"), read_first=read_first,
        )  # fmt: skip
    except Diverged as err:
        return first, guard.reference, str(err)
    return first, guard.reference, None


def test_a_loss_that_explodes_inside_the_first_read_is_caught_against_the_input_weights_loss():
    """Issue 26: at a rate that explodes within a few steps, the mean of the first 25 steps
    already holds the explosion; taken as the reference, nothing later exceeds 4 x it. The
    reference is the first step's loss alone: the input weights', before any update."""
    first, reference, why = _explode(steps=60, lr=1e4, read_first=True)
    assert reference == pytest.approx(first, rel=1e-5)
    assert why is not None  # non-finite, or above the limit, within the first 26 steps
    _, late_reference, unseen = _explode(steps=60, lr=1e4, read_first=False)  # the old wiring
    assert late_reference > 100 * first and unseen is None  # the blind spot this closes


def test_collapse_is_one_class_for_nearly_every_validation_image_on_labels_that_are_not():
    from trainer.gates import collapsed

    assert collapsed([0, 300, 0], [100, 100, 100]) == (
        "class 1 for 100.0% of 300 validation images (33.3% of the labels): collapsed to a constant prediction"
    )
    assert collapsed([1, 299, 0], [100, 100, 100]) is not None  # 99.7%
    assert collapsed([5, 290, 5], [100, 100, 100]) is None  # 96.7%: a bad model, not a constant one
    assert collapsed([0, 300, 0], [0, 300, 0]) is None  # the labels are one class themselves
    assert collapsed([0, 0], [0, 0]) is None  # nothing evaluated


def test_collapsed_weights_are_a_regression_for_the_gate_and_reported_for_a_first_stage():
    why = "class 3 for 100.0% of 300 validation images (10.0% of the labels): collapsed to a constant prediction"
    better = {"val_accuracy": 0.85, "val_loss": 0.5}  # metrics alone would advance
    out = decide(GateSpec(), better, BEFORE, collapse=why)
    assert out.decision == "rolled_back" and out.carried == BEFORE and out.reason.startswith(f"it predicts {why}; ")
    assert out.collapsed == ""  # what it passes on did not collapse
    assert decide(GateSpec(on_regression="stop"), better, BEFORE, why).decision == "stopped"
    kept = decide(GateSpec(on_regression="keep"), better, BEFORE, why)
    assert kept.decision == "kept" and kept.collapsed == why
    with pytest.raises(GateFailed, match="it predicts class 3"):
        decide(GateSpec(on_regression="fail"), better, BEFORE, why)
    first = decide(GateSpec(), {"val_accuracy": 0.1, "val_loss": 2.3}, None, why)
    assert first.decision == "first" and first.collapsed == why
    summary = status_summary({"best_val_accuracy": 0.1, "test_accuracy": 0.1, "collapsed": why, "gate": {}})
    assert summary["collapsed"] == why


@pytest.mark.parametrize(
    "override,message",
    [
        ({"gate": {"metric": "f1"}}, "spec.gate.metric: must be 'val_accuracy' or 'val_loss' (got 'f1')"),
        ({"gate": {"onRegression": "ignore"}}, "spec.gate.onRegression: must be 'rollback', 'keep', 'fail' or 'stop'"),
        ({"gate": {"minGain": -0.1}}, "spec.gate.minGain: must be greater than or equal to 0"),
        ({"gate": {"alpha": 0.5}}, "spec.gate.alpha: must be less than 0.5"),
        ({"gate": {"alpha": 0}}, "spec.gate.alpha: must be greater than 0"),
        ({"gate": {"alpha": "often"}}, "spec.gate.alpha: must be a valid number"),
        ({"divergence": {"lossFactor": 1}}, "spec.divergence.lossFactor: must be greater than 1"),
    ],
)
def test_bad_gate_and_guard_fields_are_one_line_errors(override, message):
    with pytest.raises(SpecError) as err:
        parse_job(job_doc(**override))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_stage_overrides_the_jobs_gate_and_gates_do_not_change_the_training_digest():
    from trainer.setup import plan_job

    doc = job_doc(gate={"onRegression": "keep"})
    doc["spec"]["stages"][1]["gate"] = {"minGain": 0.01}
    _, _, _, stages = plan_job(parse_job(doc))
    assert stages[0].gate.on_regression == "keep" and stages[1].gate == GateSpec(min_gain=0.01)
    assert training_hash(parse_job(doc).spec) == training_hash(parse_job(job_doc()).spec)


def test_the_status_shows_the_verdict_without_the_metrics_it_passes_on():
    out = decide(GateSpec(), {"val_accuracy": 0.784, "val_loss": 0.6}, BEFORE).as_dict()
    summary = status_summary({"best_val_accuracy": 0.79, "test_accuracy": 0.78, "gate": out, "diverged": None})
    assert summary["gate"] == {
        "decision": "rolled_back",
        "metric": "val_accuracy",
        "value": 0.784,
        "previous": 0.809,
        "reason": out["reason"],
    }
    assert "diverged" not in summary


def test_the_operator_says_when_a_stage_was_rolled_back_or_failed_its_gate():
    from tests.unit.test_operator_planner import cond, ftj, job, reasons, result, run

    rolled = result(1)
    rolled["metrics"]["gate"] = {"decision": "rolled_back", "reason": "val_accuracy 0.78 against 0.81"}
    status = run(ftj()).status
    p = run(ftj(status), [job(0, 1, complete=True, result=result(0))])
    p = run(ftj(p.status), [job(0, 1, complete=True, result=result(0)), job(1, 1, complete=True, result=rolled)])
    assert p.status["phase"] == "Succeeded" and "StageRolledBack" in reasons(p)
    event = next(m for _, r, m in p.events if r == "StageRolledBack")
    assert event.startswith("stage 1 (top3) rolled back: val_accuracy 0.78 against 0.81")
    assert p.status["stages"][1]["result"]["gate"]["decision"] == "rolled_back"

    line = "stage gate: val_accuracy 0.7000 against 0.8090 from the stage before; spec.gate.onRegression is fail"
    bad = job(0, 1, failed=True, failed_reason="PodFailurePolicy", failed_message="exit code 2", failure=line)
    p = run(ftj(run(ftj()).status), [bad])
    assert p.status["phase"] == "Failed" and cond(p, "Failed")["reason"] == "StageRegressed"
    assert cond(p, "Failed")["message"] == f"stage 0 (head) failed its gate: {line}"


def test_the_operator_warns_when_a_first_stage_passes_on_a_collapsed_model():
    from tests.unit.test_operator_planner import ftj, job, result, run

    why = "class 3 for 100.0% of 300 validation images (10.0% of the labels): collapsed to a constant prediction"
    head = result(0)
    head["metrics"]["collapsed"] = why
    p = run(ftj(run(ftj()).status), [job(0, 1, complete=True, result=head)])
    assert ("Warning", "StageCollapsed", f"stage 0 (head) predicts {why}") in p.events
    assert p.status["stages"][0]["result"]["collapsed"] == why


def test_a_stage_whose_gate_says_stop_ends_the_job_and_no_later_stage_starts():
    from tests.unit.test_operator_planner import ftj, job, reasons, result, run

    three = {
        "stages": [
            {"name": "head", "trainable": {"top": 1}, "epochs": 1, "lr": 0.05},
            {"name": "top3", "trainable": {"top": 3}, "epochs": 1, "lr": 0.01},
            {"name": "all", "trainable": "all", "epochs": 1, "lr": 0.01},
        ],
        "gate": {"onRegression": "stop"},
    }
    stopped = result(1)
    stopped["metrics"]["gate"] = {"decision": "stopped", "reason": "val_accuracy 0.78 against 0.81"}
    observed = [job(0, 1, complete=True, result=result(0)), job(1, 1, complete=True, result=stopped)]
    p = run(ftj(run(ftj(**three)).status, **three), observed[:1])
    p = run(ftj(p.status, **three), observed)
    assert p.create == [] and p.status["phase"] == "Succeeded"
    assert [s["phase"] for s in p.status["stages"]] == ["Succeeded", "Succeeded", "Skipped"]
    done = next(c for c in p.status["conditions"] if c["type"] == "Succeeded")
    assert done["reason"] == "StoppedByGate" and done["message"] == (
        "stage 1 (top3) did not improve on the stage before (val_accuracy 0.78 against 0.81); the job ends with "
        "the weights before it (spec.gate.onRegression: stop); skipped: stage 2 (all)"
    )
    event = next(m for _, r, m in p.events if r == "StageRolledBack")
    assert event.endswith("; the job ends with the weights before it (spec.gate.onRegression: stop)")
    assert "Succeeded" in reasons(p)
    # The spec edited after the end (a new generation, so not sticky): stage 2 still never starts.
    again = run(ftj(p.status, generation=2, **three), observed)
    assert again.create == [] and again.status["phase"] == "Succeeded"
    assert again.status["stages"][2]["phase"] == "Skipped"


def test_one_rate_unfreezing_without_warmup_is_warned_about_before_anything_trains():
    from thaw_contract.plan import recipe_warnings
    from trainer.setup import plan_job

    def warnings(doc):
        job = parse_job(doc)
        return recipe_warnings(job.spec, plan_job(job)[3])

    def gradual(**fields):
        doc = job_doc(gradual={"stages": 3, "epochsPerStage": 1, "lr": 0.01, **fields})
        doc["spec"].pop("stages")
        return doc

    top3, everything = warnings(gradual(lrDecay=1, warmupEpochs=0))
    assert top3.startswith("warning: spec.gradual: stage top3 unfreezes 2 groups under a trained head at one learning")
    assert everything.startswith("warning: spec.gradual: stage all unfreezes 7 groups under a trained head")
    assert everything.endswith("Set lrDecay (1.5-2.6) or a warm-up")
    assert warnings(gradual(lrDecay=1)) == []  # at one rate gradual warms up by default
    assert warnings(gradual()) == []  # the default is discriminative (1.5)
    assert warnings(job_doc()) == []  # the quickstart's stages: discriminative
    one_rate = with_path(job_doc(), "spec.stages.1.lrDecay", 1.0)
    [line] = warnings(one_rate)
    assert line.startswith("warning: spec.stages[1]: stage top3 unfreezes 2 groups")
    assert warnings(with_path(one_rate, "spec.stages.1.schedule", {"name": "cosine", "warmupEpochs": 1})) == []
    full = with_path(job_doc(), "spec.stages", [{"name": "all", "trainable": "all", "epochs": 1, "lr": 0.01}])
    assert warnings(full) == []  # one rate from the start is full fine-tuning, a sound recipe


def test_mcnemar_is_the_binomial_tail_over_the_images_the_models_disagree_on():
    assert mcnemar_worse(0, 0) == 1.0  # no disagreement: no evidence
    assert mcnemar_worse(9, 1) == pytest.approx(11 / 1024)  # P(X >= 9), X ~ Bin(10, 1/2)
    assert mcnemar_worse(5, 5) == pytest.approx(0.623046875)
    assert mcnemar_worse(0, 7) == 1.0
    # The quickstart's 300 images with 30 changed answers: 20 against 10 is the least drop it sees.
    assert mcnemar_worse(20, 10) < 0.05 <= mcnemar_worse(19, 11)
    assert visible_drop(300, 0.1, 0.05) == pytest.approx(10 / 300)
    assert visible_drop(40, 0.05, 0.05) is None  # 2 changed answers can never be significant


def _answers(worse: int, better: int, same_right: int = 200, same_wrong: int = 50) -> Answers:
    new = [False] * worse + [True] * better + [True] * same_right + [False] * same_wrong
    old = [True] * worse + [False] * better + [True] * same_right + [False] * same_wrong
    return Answers(new, old, [0.5] * len(new), [0.5] * len(new))


def test_the_paired_gate_lets_a_drop_within_chance_advance_and_rolls_back_one_beyond_it():
    """The demo's case: top3 0.8300 against the head's 0.8333 on 300 images is one image; the
    measured rule rolls it back, the paired test (12 worse, 11 better) does not."""
    own, before = {"val_accuracy": 0.83, "val_loss": 0.5}, {"val_accuracy": 0.8333, "val_loss": 0.48}
    noise = decide(GateSpec(), own, before, answers=_answers(12, 11))
    assert noise.decision == "advanced" and noise.carried == own and noise.p == pytest.approx(0.5)
    assert noise.reason == "on the same 273 images: worse on 12, better on 11, McNemar p 0.5"
    assert decide(GateSpec(alpha=None), own, before, answers=_answers(12, 11)).decision == "rolled_back"
    assert decide(GateSpec(), own, before).decision == "rolled_back"  # no answers: as measured

    drop = {"val_accuracy": 0.76, "val_loss": 0.7}
    real = decide(GateSpec(), drop, before, answers=_answers(30, 8))
    assert real.decision == "rolled_back" and real.carried == before and real.p < 0.001
    assert real.reason.startswith("val_accuracy 0.7600 against 0.8333 from the stage before (gain -0.0733")
    assert real.reason.endswith("worse on 30, better on 8, McNemar p 0.000236 < 0.05")
    with pytest.raises(GateFailed, match=r"McNemar p 0.000236 < 0.05; spec.gate.onRegression is fail$"):
        decide(GateSpec(on_regression="fail"), drop, before, answers=_answers(30, 8))
    # A required gain still has to be met, and a collapse is a regression whatever the test says.
    assert decide(GateSpec(min_gain=0.01), own, before, answers=_answers(12, 11)).decision == "rolled_back"
    gained = {"val_accuracy": 0.86, "val_loss": 0.4}
    assert decide(GateSpec(min_gain=0.01), gained, before, answers=_answers(5, 13)).decision == "advanced"
    assert decide(GateSpec(), own, before, "class 3 for 99.7%", _answers(12, 11)).decision == "rolled_back"


def test_the_paired_gate_on_the_loss_is_a_z_test_on_per_image_differences():
    old = [0.4, 0.6, 0.5, 0.3, 0.7] * 60
    higher = Answers([True] * 300, [True] * 300, [x + 0.05 + 0.01 * (i % 3) for i, x in enumerate(old)], old)
    p, words = higher.test("val_loss")
    assert p < 1e-6 and words.startswith("on the same 300 images: paired z-test p")
    noisy = Answers([True] * 300, [True] * 300, [x + (0.1 if i % 2 else -0.1) for i, x in enumerate(old)], old)
    assert noisy.test("val_loss")[0] == pytest.approx(0.5)
    assert paired_z_worse([1.0, 1.0], [0.5, 0.5]) == 0.0 and paired_z_worse([0.5], [0.5]) == 1.0
    gate = GateSpec(metric="val_loss")
    before = {"val_accuracy": 0.8, "val_loss": 0.5}
    assert decide(gate, {"val_accuracy": 0.8, "val_loss": 0.56}, before, answers=higher).decision == "rolled_back"
    assert decide(gate, {"val_accuracy": 0.8, "val_loss": 0.5}, before, answers=noisy).decision == "advanced"


def test_the_per_image_answers_of_every_rank_come_back_in_the_data_sets_order():
    from trainer.loop import _interleave

    # 7 images over 3 ranks: rank r evaluated images r, r + 3, ... (its correct flags, its losses).
    parts = [[[1.0, 0.0, 1.0], [0.0, 3.0, 6.0]], [[0.0, 1.0], [1.0, 4.0]], [[1.0, 1.0], [2.0, 5.0]]]
    correct, losses = _interleave(parts)
    assert losses == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert correct == [True, False, True, False, True, True, True]
    assert _interleave([[[], []], [[], []]]) == ([], [])
