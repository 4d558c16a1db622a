"""How a stage ends: the weights it passes on (its best epoch, or its input where the gate
rolls it back; trainer/gates.py decides) and its test accuracy on those weights."""

from __future__ import annotations

from thaw_contract.plan import PlannedStage
from trainer import checkpoint as ckpt
from trainer.data import Datasets
from trainer.distributed import barrier, decided_by_main
from trainer.gates import METRICS, Answers, GateOutcome, StageDiverged, decide, previous_carried, rolled_back
from trainer.loaders import eval_loader
from trainer.loop import StepContext, evaluate, image_preparer
from trainer.setup import Setup


def best_weights(setup: Setup, fit) -> str | None:
    """The stage's best epoch loaded into the model where one is kept (after a divergence:
    always), else its last; that epoch's prefix."""
    if fit.diverged is not None and fit.best_state is None and fit.best_dir is not None:
        setup.writer.flush()  # the best epoch may still be uploading
        barrier(setup.env)
        fit.best_state = ckpt.load_object(setup.store, fit.best_dir, "model.pt")
    if fit.best_state is None:
        return fit.last_dir
    setup.model.load_state_dict(fit.best_state)
    return fit.best_dir


def kept_row(stage: PlannedStage, fit, final_dir: str | None) -> dict | None:
    """The history row of the epoch whose weights the stage would commit (what the gate judges,
    and what the report and status show as its validation accuracy); None if no epoch ended."""
    return next((r for r in fit.history if ckpt.epoch_prefix(stage.index, stage.name, r["epoch"]) == final_dir), None)


def gated_weights(
    setup: Setup, stage: PlannedStage, fit, final_dir: str | None, data: Datasets, batch: int
) -> tuple[str, GateOutcome]:
    """The gate's verdict on those weights; where it rolls the stage back, the stage's input
    (the previous stage's final weights) is loaded instead. The prefix passed on."""
    outcome = gate(setup, stage, kept_row(stage, fit, final_dir), fit.diverged, data, batch)
    if outcome.decision in ("rolled_back", "stopped"):
        final_dir = _load_input(setup, stage)
        then = (
            "the job ends with its input (gate: stop)"
            if outcome.decision == "stopped"
            else "the next stage starts from its input"
        )
        setup.progress.message(f"{stage.name}: rolled back ({outcome.reason}); {then}")
    elif outcome.decision == "kept":
        setup.progress.message(f"{stage.name}: worse than the stage before ({outcome.reason}); kept (gate: keep)")
    elif outcome.collapsed:  # a first stage: nothing to roll back to
        setup.progress.message(f"warning: {stage.name}: its final weights predict {outcome.collapsed}")
    elif outcome.p is not None:
        setup.progress.message(f"{stage.name}: advances ({outcome.reason})")
    return final_dir, outcome


def _load_input(setup: Setup, stage: PlannedStage) -> str:
    """The stage's input (the stage before's final weights, the checkpoint its rank 0 reported)
    loaded into the model on every rank; its prefix."""
    prev = setup.stages[stage.index - 1]
    recorded = ckpt.recorded_input_digest()
    final_dir, _ = decided_by_main(lambda: ckpt.read_final(setup.store, prev.index, prev.name, recorded), setup.env)
    setup.model.load_state_dict(ckpt.load_object(setup.store, final_dir, "model.pt"))
    return final_dir


def gate(
    setup: Setup, stage: PlannedStage, final_row: dict | None, diverged: str | None, data: Datasets, batch: int
) -> GateOutcome:
    """The gate's verdict on the weights the stage would commit (trainer/gates.py), against
    what the stage before it passed on (its committed summary, read once by rank 0). With
    gate.alpha, both are measured again on the validation images, image by image, for the
    paired test; the model holds the stage's weights again afterwards."""
    previous = None
    if stage.index > 0:
        prev = setup.stages[stage.index - 1]
        pointer = decided_by_main(lambda: ckpt.read_pointer(setup.store, prev.index, prev.name), setup.env)
        previous = previous_carried(pointer.get("metrics") if pointer else None)
    if final_row is None:  # diverged before its first epoch ended: nothing of its own to keep
        if previous is None:
            raise StageDiverged(
                f"stage {stage.name} diverged before its first epoch ended ({diverged}); lower {stage.field}.lr"
            )
        return rolled_back(stage.gate, None, previous, f"diverged before its first epoch ended: {diverged}")
    own = {m: final_row[m] for m in METRICS}
    answers = None
    if previous is not None and stage.gate.alpha is not None:
        new = _evaluate(setup, data.val, batch, per_image=True)
        weights = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
        _load_input(setup, stage)
        old = _evaluate(setup, data.val, batch, per_image=True)
        setup.model.load_state_dict(weights)
        answers = Answers(new["correct"], old["correct"], new["losses"], old["losses"])
        # Rounded as the epochs' history rows are (the values a report and the next gate show).
        own = {"val_accuracy": round(new["accuracy"], 6), "val_loss": round(new["loss"], 6)}
        previous = {"val_accuracy": round(old["accuracy"], 6), "val_loss": round(old["loss"], 6)}
    return decide(stage.gate, own, previous, final_row.get("collapsed"), answers)


def _evaluate(setup: Setup, dataset, batch: int, per_image: bool = False) -> dict:
    """A split through the whole model, at the training batch shape (no new kernel plans)."""
    env = setup.env
    prepare = image_preparer(setup.mean, setup.std, env.device, setup.channels_last, False)
    loader = eval_loader(dataset, batch, env, setup.job)
    ctx = StepContext(env, prepare, setup.autocast_dtype, None)
    return evaluate(setup.model, loader, ctx, setup.job.spec.model.num_classes, pad_to=batch, per_image=per_image)


def evaluate_test(setup: Setup, data: Datasets, batch: int) -> dict:
    return _evaluate(setup, data.test, batch)
