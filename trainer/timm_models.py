"""timm models by name (`architecture: timm/<name>`), grouped by timm's own `group_matcher`.

timm knows each of its architectures' coarse structure (stem, stages or blocks, head) and
exposes it for layer-wise learning-rate decay; Thaw uses the same grouping for `top: N`
instead of a hand-written table. The one change: Thaw's head group is exactly the classifier
module (`get_classifier()`), so a head-only stage can train on cached features; whatever
else timm puts in its last group (a final norm or conv) becomes the group `top` below it.
"""

from __future__ import annotations

import difflib
import functools

import torch
from torch import nn

from thaw_contract.catalog import TIMM
from thaw_contract.layer_table import LayerGroup
from thaw_contract.spec import ModelSpec, SpecError


def _timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - the trainer extra installs it
        raise SpecError("spec.model.architecture: timm models need the timm package (pip install timm)") from None
    return timm


def model_name(architecture: str) -> str:
    return architecture.removeprefix(TIMM)


def create(spec: ModelSpec, device: str) -> tuple[nn.Module, tuple, tuple]:
    """(model with a numClasses head, mean, std)."""
    timm = _timm()
    name = model_name(spec.architecture)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(TIMM + c for c in close)}?" if close else ""
        raise SpecError(f"spec.model.architecture: timm has no model {name!r}{hint}")
    pretrained = spec.weights == "DEFAULT" and device != "meta"
    try:
        with torch.device(device):
            model = timm.create_model(name, pretrained=pretrained, num_classes=spec.num_classes)
    except Exception as err:  # hub errors of every kind mean "not reachable"
        if not pretrained:
            raise
        raise SpecError(
            f"spec.model.weights: cannot download timm's weights for {name} ({type(err).__name__}); offline, "
            "bring them with model.weightsUri"
        ) from None
    cfg = model.pretrained_cfg or {}
    return model, tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def head_name(model: nn.Module) -> str:
    classifier = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is classifier)


@functools.cache
def head_of(architecture: str) -> str:
    """The classifier's module name, from the architecture alone (built on the meta device)."""
    model, _, _ = create(ModelSpec(architecture=architecture, num_classes=2), "meta")
    return head_name(model)


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """timm's coarse groups, stem first, then `top` (what else timm's last group holds beside
    the classifier, if anything) and `head` (the classifier)."""
    from timm.models import group_parameters

    head = head_name(model)
    in_head = lambda p: p == head or p.startswith(head + ".")  # noqa: E731
    timm_groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    residue = [p for p in timm_groups[-1] if not in_head(p)]
    body = [[p for p in g if not in_head(p)] for g in timm_groups[:-1]]
    body = [g for g in body if g]
    params = [n for n, _ in model.named_parameters()]
    groups = [LayerGroup("stem" if i == 0 else f"stage{i}", _prefixes(params, g)) for i, g in enumerate(body)]
    if residue:
        groups.append(LayerGroup("top", _prefixes(params, residue)))
    return groups + [LayerGroup("head", (head,))]


def _prefixes(params: list[str], mine: list[str]) -> tuple[str, ...]:
    """The group as module names, as Thaw's other families write theirs (freezing hooks modules):
    each parameter's highest enclosing module whose parameters are all in the group, or the
    parameter itself (a model-level token such as ViT's cls_token)."""
    own = set(mine)
    out = []
    for p in mine:
        parts, best = p.split("."), p
        for k in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:k])
            if any(q not in own for q in params if q.startswith(module + ".")):
                break
            best = module
        out.append(best)
    return tuple(dict.fromkeys(out))
