"""What keeps a stage from making the model worse: the gate between stages and the divergence
guard inside one. Pure decisions; trainer/stage.py and stage_end.py act on them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from thaw_contract.spec import GATE_FAILED, DivergenceSpec, GateSpec, SpecError

METRICS = ("val_accuracy", "val_loss")


class GateFailed(SpecError):
    """gate.onRegression: fail. A deterministic outcome: retrying the stage would repeat it, so
    it leaves like a configuration error (exit 2, not retried), with this line as the reason."""


class StageDiverged(SpecError):
    """The first stage diverged before an epoch ended: there is nothing to keep or roll back to.
    Deterministic like a configuration error (exit 2, not retried)."""


class Diverged(Exception):
    """The stage's loss turned non-finite or grew past the guard's factor."""


@dataclass(frozen=True)
class GateOutcome:
    metric: str
    value: float | None  # this stage's committed weights; None when it has none (diverged early)
    previous: float | None  # what the stage before carried forward; None for the first stage
    decision: str  # first | advanced | rolled_back | kept | stopped (rolled back, and the job ends)
    reason: str = ""
    carried: dict[str, float] = field(default_factory=dict)  # metric -> value of the weights passed on
    collapsed: str = ""  # the weights passed on predict one class (a first stage's, or kept): why
    own: dict[str, float] = field(default_factory=dict)  # this stage's values, as compared
    p: float | None = None  # the paired test's one-sided p-value (gate.alpha), where it ran

    def as_dict(self) -> dict:
        return asdict(self)


ACTIONS = {
    "rollback": "roll back to the weights before it",
    "keep": "keep it and warn",
    "fail": "fail the job",
    "stop": "roll back and end the job (later stages skipped)",
}


def describe(gate: GateSpec) -> str:
    """The gate in one line, as `trainer plan` prints it for every stage after the first."""
    if gate.alpha is None:
        below = "worse than the stage before (as measured)"
    else:
        test = "McNemar" if gate.metric == "val_accuracy" else "paired z-test on per-image losses"
        below = f"worse than the stage before on the same validation images ({test}, p < {gate.alpha:g})"
    if gate.min_gain:
        below += f", or a gain under {gate.min_gain:.3g}" + (" x the stage before's value" if gate.relative else "")
    return f"gate: {gate.metric} {below} -> {ACTIONS[gate.on_regression]}"


SHARES = (0.05, 0.1, 0.2)  # of the validation images whose answer changes between two stages


def sensitivity(gate: GateSpec, val_images: int) -> str | None:
    """How small an accuracy drop the paired gate can see on `val_images` images (None where it
    runs no paired test on accuracy): the figure to weigh valPerClass against."""
    if gate.alpha is None or gate.metric != "val_accuracy" or val_images <= 0:
        return None
    seen = [visible_drop(val_images, s, gate.alpha) for s in SHARES]
    drops = " / ".join("none" if d is None else f"{100 * d:.1f}" for d in seen)
    shares = " / ".join(f"{s:.0%}" for s in SHARES)
    return f"the gate sees a drop of {drops} points on {val_images} validation images where {shares} of them change"


def mcnemar_worse(worse: int, better: int) -> float:
    """One-sided exact McNemar: the chance, were both models equally good, that at least `worse`
    of the `worse + better` images they disagree on go against the new one (a binomial tail)."""
    n = worse + better
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n if n else 1.0


def paired_z_worse(new_losses: list[float], old_losses: list[float]) -> float:
    """One-sided paired z-test that the new per-image losses are higher (normal tail of the mean
    difference; validation sets are hundreds of images)."""
    d = [a - b for a, b in zip(new_losses, old_losses, strict=True)]
    n = len(d)
    mean = sum(d) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    if var == 0:
        return 0.0 if mean > 0 else 1.0
    return 0.5 * math.erfc(mean / math.sqrt(var / n) / math.sqrt(2))


def visible_drop(images: int, share: float, alpha: float) -> float | None:
    """The smallest accuracy drop McNemar calls significant on `images` validation images when
    `share` of them change their answer between the two models (None: no drop is)."""
    d = max(1, round(images * share))
    worse = next((b for b in range((d + 1) // 2, d + 1) if mcnemar_worse(b, d - b) < alpha), None)
    return None if worse is None else (2 * worse - d) / images


def gain(metric: str, value: float, previous: float) -> float:
    return value - previous if metric == "val_accuracy" else previous - value


@dataclass(frozen=True)
class Answers:
    """Both models on the same validation images, image by image in one order (the weights a
    stage would commit, `new`, and its input, `old`): what the paired test reads."""

    new_correct: list[bool]
    old_correct: list[bool]
    new_losses: list[float]
    old_losses: list[float]

    def test(self, metric: str) -> tuple[float, str]:
        """The one-sided p-value that the new model is worse, and the counts behind it in words."""
        if metric == "val_accuracy":
            pairs = list(zip(self.new_correct, self.old_correct, strict=True))
            worse = sum(1 for n, o in pairs if o and not n)
            better = sum(1 for n, o in pairs if n and not o)
            p = mcnemar_worse(worse, better)
            return p, f"on the same {len(pairs)} images: worse on {worse}, better on {better}, McNemar p {p:.3g}"
        p = paired_z_worse(self.new_losses, self.old_losses)
        return p, f"on the same {len(self.new_losses)} images: paired z-test p {p:.3g}"


def decide(
    gate: GateSpec,
    own: dict[str, float],
    previous: dict[str, float] | None,
    collapse: str | None = None,
    answers: Answers | None = None,
) -> GateOutcome:
    """Compare a stage's committed weights (`own`: val metrics) with what the stage before it
    passed on. A regression rolls back (the previous weights are passed on), is kept, fails, or
    stops the job (rolls back, and no later stage runs). Weights that collapsed to a constant
    prediction (`collapse`, from `collapsed`) are a regression whatever their metrics say.

    With gate.alpha and both models' `answers`, a drop is a regression only where the paired
    test finds it beyond chance: one image in 300 is noise, and the same images were compared.
    Without them (alpha null), any drop is, and a tie on accuracy goes to the lower loss."""
    m = gate.metric
    if previous is None or previous.get(m) is None:
        return GateOutcome(m, own[m], None, "first", carried=dict(own), collapsed=collapse or "", own=dict(own))
    before = previous[m]
    g = gain(m, own[m], before)
    need = gate.min_gain * abs(before) if gate.relative else gate.min_gain
    p, tested = (None, "")
    if gate.alpha is not None and answers is not None:
        p, tested = answers.test(m)
        worse = p < gate.alpha or (need > 0 and g < need)
        tied = False
    else:
        tied = g == 0 and need == 0 and m == "val_accuracy"
        worse = g < need or (tied and _loss_is_higher(own, previous))
    if collapse is None and not worse:
        return GateOutcome(m, own[m], before, "advanced", tested, carried=dict(own), own=dict(own), p=p)
    why = f"{m} {own[m]:.4f} against {before:.4f} from the stage before (gain {g:+.4f}, needed {need:+.4f})"
    if tested:
        why += f"; {tested} < {gate.alpha:g}" if p < gate.alpha else f"; {tested}"
    if collapse is not None:
        why = f"it predicts {collapse}; {why}"
    elif tied:
        why += f"; tied, and val_loss {own['val_loss']:.4f} against {previous['val_loss']:.4f}"
    if gate.on_regression == "fail":
        raise GateFailed(f"{GATE_FAILED} {why}; spec.gate.onRegression is fail")
    if gate.on_regression == "keep":
        return GateOutcome(m, own[m], before, "kept", why, dict(own), collapse or "", dict(own), p)
    return GateOutcome(m, own[m], before, _back(gate), why, carried=dict(previous), own=dict(own), p=p)


def _back(gate: GateSpec) -> str:
    return "stopped" if gate.on_regression == "stop" else "rolled_back"


def _loss_is_higher(own: dict[str, float], previous: dict[str, float]) -> bool:
    """Accuracy on a small validation set ties often (one image in 300 moves it 0.0033): a
    stage that only ties goes on only if its validation loss is no higher. Summaries written
    before gates carry no loss: the tie then advances, as it did."""
    if own.get("val_loss") is None or previous.get("val_loss") is None:
        return False
    return own["val_loss"] > previous["val_loss"]


def rolled_back(gate: GateSpec, own: dict[str, float] | None, previous: dict[str, float], why: str) -> GateOutcome:
    """A stage that has nothing of its own to keep (it diverged before an epoch ended)."""
    value = own[gate.metric] if own else None
    return GateOutcome(gate.metric, value, previous.get(gate.metric), _back(gate), why, carried=dict(previous))


def previous_carried(summary: dict | None) -> dict[str, float] | None:
    """The metrics the stage before passed on, from its committed result summary. Summaries
    written before gates existed carry only their best validation accuracy."""
    if not summary:
        return None
    gate = summary.get("gate")
    if gate and gate.get("carried"):
        return {k: v for k, v in gate["carried"].items() if k in METRICS}
    if summary.get("best_val_accuracy") is not None:
        return {"val_accuracy": summary["best_val_accuracy"]}
    return None


@dataclass
class DivergenceGuard:
    """Watches the running training loss, read every few steps (loop.SYNC_EVERY) and summed over
    ranks, so every rank reaches the same verdict at the same step.

    The reference is the loss of the stage's input weights: the first step's, read before the
    optimizer has moved anything (a mean over the first steps would already hold an explosion
    at a rate that diverges within a few steps, and then never be exceeded). It is one batch, so
    the limit is never below the loss of a uniform guess, ln(classes): a well-fit input with a
    small first loss does not make an ordinary noisy reading look like divergence. A non-finite
    step makes its reading non-finite (the reading is the steps' sum), so it is caught there."""

    spec: DivergenceSpec
    num_classes: int
    reference: float | None = None  # the loss of the stage's input weights on its first batch

    @property
    def limit(self) -> float | None:
        if self.reference is None:
            return None
        return max(self.spec.loss_factor * self.reference, math.log(self.num_classes))

    def check(self, mean_loss: float, where: str) -> None:
        if not self.spec.enabled:
            return
        if not math.isfinite(mean_loss):
            raise Diverged(f"loss {mean_loss} at {where}")
        if self.reference is None:
            self.reference = mean_loss
        elif mean_loss > self.limit:
            raise Diverged(
                f"loss {mean_loss:.4g} above {self.limit:.4g} ({self.spec.loss_factor:g} x {self.reference:.4g}, the "
                f"input weights' loss, and at least ln {self.num_classes}) at {where}"
            )


# A model that gives (nearly) every validation image the same class has collapsed to a constant
# prediction: its loss can sit at chance with nothing non-finite, so the guard never sees it.
COLLAPSE_SHARE = 0.99


def collapsed(predicted: list[int], labels: list[int]) -> str | None:
    """Why the validation predictions show a collapse (None if they do not): one class takes at
    least COLLAPSE_SHARE of the predictions while the labels are not that one-sided. Counts per
    class, summed over ranks."""
    total = sum(predicted)
    if total == 0 or max(labels) >= COLLAPSE_SHARE * total:
        return None
    top = max(range(len(predicted)), key=predicted.__getitem__)
    share = predicted[top] / total
    if share < COLLAPSE_SHARE:
        return None
    return (
        f"class {top} for {share:.1%} of {total} validation images ({labels[top] / total:.1%} of the labels): "
        "collapsed to a constant prediction"
    )
