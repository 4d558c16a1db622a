"""From a spec and a model's layer groups to the exact list of stages to run.

Pure: takes names and counts, never tensors. `expand_stages` turns `gradual` into plain
stages; `resolve_stages` decides, per stage, which parameters train and at what rate.
Errors are SpecError lines naming the field, like the spec's own.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thaw_contract.layer_table import LayerGroup
from thaw_contract.spec import FineTuneJobSpec, GateSpec, ScheduleSpec, SpecError, StageSpec


@dataclass(frozen=True)
class PlannedStage:
    index: int
    name: str
    epochs: int
    batch_size: int
    schedule: ScheduleSpec
    train_bn: bool
    freeze_bn_stats: bool
    trainable_groups: tuple[int, ...]  # indices into the group list, head first
    group_lrs: dict[int, float]  # group index -> learning rate
    trainable_params: frozenset[str]
    field: str  # where this stage came from in the spec, for error messages
    gate: GateSpec  # the stage's own, or spec.gate
    lr_auto: bool = False  # group_lrs are relative (head 1.0) until the range test scales them

    def trains_only_head(self, n_groups: int) -> bool:
        return self.trainable_groups == (n_groups - 1,)


def expand_stages(spec: FineTuneJobSpec) -> list[tuple[str, StageSpec]]:
    """(field path, stage) pairs; `gradual` becomes one stage per unfrozen group."""
    if spec.stages is not None:
        return [(f"spec.stages[{i}]", s) for i, s in enumerate(spec.stages)]
    g = spec.gradual
    assert g is not None
    out = []
    epochs = g.stage_epochs()
    for i in range(g.stages):
        last_all = g.last_all and i == g.stages - 1
        top = g.start_top + i * g.groups_per_stage
        # At one rate, the newly trainable groups meet a trained head's large gradients at full
        # rate: a warm-up eases them in (one-cycle rises on its own).
        warm = i > 0 and g.resolved_warmup > 0 and spec.schedule.name != "onecycle"
        stage = StageSpec(
            name="all" if last_all else f"top{top}",
            trainable="all" if last_all else {"top": top},
            epochs=epochs[i],
            lr=g.resolved_lr(spec.optimizer.name) * g.lr_factor**i,
            lr_decay=g.lr_decay,
            freeze_bn_stats=g.freeze_bn_stats,
            schedule=spec.schedule.model_copy(update={"warmup_epochs": g.resolved_warmup}) if warm else None,
        )
        out.append(("spec.gradual", stage))
    return out


def stage_names(spec: FineTuneJobSpec) -> list[str]:
    """Each stage's name, as checkpoints and Kubernetes objects call it (no model needed)."""
    return [stage.name or f"stage-{i}" for i, (_, stage) in enumerate(expand_stages(spec))]


def _match(pattern: str, param: str, groups: list[LayerGroup], group_of: dict[str, int]) -> bool:
    if groups[group_of[param]].name == pattern:
        return True
    parts = param.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:k]), pattern) for k in range(1, len(parts) + 1))


def _selected_params(
    field: str, stage: StageSpec, groups: list[LayerGroup], group_of: dict[str, int], module_names: list[str]
) -> set[str]:
    params = list(group_of)
    t = stage.trainable
    if t == "all":
        return set(params)
    if hasattr(t, "top"):
        if t.top > len(groups):
            where = f"{field}.trainable.top" if field.startswith("spec.stages") else f"{field}.stages"
            hint = "; give fewer stages or a smaller groupsPerStage" if field == "spec.gradual" else ""
            raise SpecError(
                f"{where}: top {t.top} exceeds the {len(groups)} layer groups "
                f"({', '.join(g.name for g in groups)}){hint}"
            )
        first = len(groups) - t.top
        return {p for p in params if group_of[p] >= first}
    selected: set[str] = set()
    for k, pattern in enumerate(t.modules):
        hits = {p for p in params if _match(pattern, p, groups, group_of)}
        if not hits:
            modules = [m for m in module_names if fnmatch.fnmatchcase(m, pattern)]
            why = "matches modules without parameters" if modules else "matches no module or group"
            raise SpecError(
                f"{field}.trainable.modules[{k}]: {pattern!r} {why}; groups are {', '.join(g.name for g in groups)}"
            )
        selected |= hits
    return selected


def resolve_stages(
    spec: FineTuneJobSpec,
    groups: list[LayerGroup],
    group_of: dict[str, int],
    module_names: list[str] | None = None,
) -> list[PlannedStage]:
    """Decide every stage against the model's groups; raise SpecError on the first bad one."""
    planned = []
    names_of = stage_names(spec)
    for index, (field, stage) in enumerate(expand_stages(spec)):
        params = _selected_params(field, stage, groups, group_of, module_names or [])
        trainable = tuple(sorted({group_of[p] for p in params}, reverse=True))
        if stage.group_lrs is not None:
            if len(stage.group_lrs) != len(trainable):
                names = ", ".join(groups[i].name for i in trainable)
                raise SpecError(
                    f"{field}.groupLrs: gives {len(stage.group_lrs)} rates but the stage trains "
                    f"{len(trainable)} groups ({names}), head first"
                )
            lrs = dict(zip(trainable, stage.group_lrs))
        else:
            base = 1.0 if stage.lr == "auto" else stage.lr  # auto: rates relative to the head's, scaled later
            lrs = {g: base / stage.lr_decay**depth for depth, g in enumerate(trainable)}
        planned.append(
            PlannedStage(
                index=index,
                name=names_of[index],
                epochs=stage.epochs,
                batch_size=stage.batch_size or spec.data.batch_size,
                schedule=stage.schedule or spec.schedule,
                train_bn=stage.train_bn,
                freeze_bn_stats=stage.freeze_bn_stats,
                trainable_groups=trainable,
                group_lrs=lrs,
                trainable_params=frozenset(params),
                field=field,
                gate=stage.gate or spec.gate,
                lr_auto=stage.lr == "auto",
            )
        )
    names = [s.name for s in planned]
    if len(set(names)) != len(names):
        raise SpecError(f"spec.stages: stage names must be unique (got {', '.join(names)})")
    return planned


def recipe_warnings(spec: FineTuneJobSpec, stages: list[PlannedStage]) -> list[str]:
    """Recipes known to go wrong (docs/results.md), said before anything trains. The gate
    (rollback by default) keeps such a stage from costing the model; this keeps it from being silent."""
    out = []
    trained: set[int] = set()
    for s in stages:
        new = set(s.trainable_groups) - trained
        one_rate = len(s.trainable_groups) > 2 and len(set(s.group_lrs.values())) == 1
        warm = s.schedule.name == "onecycle" or s.schedule.warmup_epochs > 0
        if trained and new and one_rate and not warm:
            # Measured: the newly unfrozen groups meet the trained head's large gradients at full
            # rate and momentum; the loss jumps within a few steps and the network dies (one class).
            out.append(
                f"warning: {s.field}: stage {s.name} unfreezes {len(new)} groups under a trained head at one learning "
                "rate without a warm-up; that diverged in its first steps and collapsed to one class on every seed "
                "in docs/results.md (the gate rolls such a stage back). Set lrDecay (1.5-2.6) or a warm-up"
            )
        trained |= set(s.trainable_groups)
    return out


def stages_to_run(stages: list[PlannedStage], only_stage: int | None, world: int) -> list[PlannedStage]:
    """The stages a run executes (all, or `--stage K`), checked against the number of training
    processes; SpecError otherwise. The runner and a stage pod's preflight both ask here."""
    n = len(stages)
    if only_stage is not None and not 0 <= only_stage < n:
        raise SpecError(f"--stage {only_stage}: the job has stages 0..{n - 1}")
    for s in stages:
        if s.batch_size % world:
            raise SpecError(
                f"{s.field}: batch size {s.batch_size} (spec.data.batchSize or the stage's batchSize) "
                f"does not split evenly over {world} processes"
            )
    return stages if only_stage is None else [stages[only_stage]]
