"""Every catalogued architecture's layer groups and parameter names, as data (no torch).

The operator image has no torch, yet `trainable: {top: 999}`, a module glob that matches
nothing or a `groupLrs` of the wrong length must fail before any pod starts. The groups and
parameter names of a network do not depend on its weights, so they are computed once from the
models themselves and shipped as `layer_table.json.gz`; `resolve_offline` then runs the same
`resolve_stages` the trainer runs. The trainer writes it (`python -m trainer.layer_table --write`,
torch); tests/unit/test_layer_table.py fails when the table drifts from the models.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from thaw_contract.catalog import TIMM
from thaw_contract.spec import FineTuneJobSpec, SpecError

TABLE = Path(__file__).with_name("layer_table.json.gz")


@dataclass(frozen=True)
class LayerGroup:
    name: str
    prefixes: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """What planning needs from a network: its groups (stem first), parameter and module names,
    and the output count of its stock head (for `replaceHead: false`)."""

    groups: list[LayerGroup]
    params: list[str]
    modules: list[str]
    head: str
    head_outputs: int


def in_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def assign_groups(param_names: list[str], groups: list[LayerGroup]) -> dict[str, int]:
    """Map each parameter name to its group index; every parameter must land in exactly one."""
    out: dict[str, int] = {}
    for name in param_names:
        hits = [i for i, g in enumerate(groups) if any(in_prefix(name, p) for p in g.prefixes)]
        if len(hits) != 1:
            where = [groups[i].name for i in hits] or "no group"
            raise ValueError(f"parameter {name} falls in {where}")
        out[name] = hits[0]
    return out


@functools.cache
def _table() -> dict:
    with gzip.open(TABLE, "rt") as f:
        return json.load(f)


def layout(architecture: str) -> Layout:
    row = _table()[architecture]
    groups = [LayerGroup(name, tuple(prefixes)) for name, prefixes in row["groups"]]
    return Layout(groups, row["params"], row["modules"], row["head"], row["headOutputs"])


def resolve_offline(spec: FineTuneJobSpec):
    """Every stage resolved against the architecture's table: the trainer's own plan-time
    checks (SpecError naming the field), run without torch."""
    from thaw_contract.plan import resolve_stages

    if spec.model.architecture.startswith(TIMM):
        return None  # timm's groups are known where timm is: the trainer checks at its start (exit 2)
    lay = layout(spec.model.architecture)
    if not spec.model.replace_head and spec.model.checkpoint is None and lay.head_outputs != spec.model.num_classes:
        raise SpecError(  # the words of trainer.models._replace_head
            f"spec.model.numClasses: {spec.model.num_classes} does not match head {lay.head!r} "
            f"with {lay.head_outputs} outputs; set replaceHead: true"
        )
    return resolve_stages(spec, lay.groups, assign_groups(lay.params, lay.groups), lay.modules)
