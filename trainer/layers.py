"""Layer groups: every supported network cut into an ordered list, stem first, head last.

`top: N` in a stage means the last N groups of this list, so it means the same thing for
every family. Groups are lists of parameter-name prefixes; together they partition the
model's parameters (tests/unit/test_layer_groups.py checks that for every family).
"""

from __future__ import annotations

from torch import nn

from thaw_contract.catalog import family_of
from thaw_contract.layer_table import LayerGroup, assign_groups, in_prefix

__all__ = ["HEAD", "LayerGroup", "assign_groups", "in_prefix", "layer_groups", "head_module_name"]
HEAD = "head"


def _g(name: str, *prefixes: str) -> LayerGroup:
    return LayerGroup(name, tuple(prefixes))


def _children(model: nn.Module, path: str) -> list[str]:
    return [n for n, _ in model.get_submodule(path).named_children()]


def _sequential_features(model: nn.Module) -> list[LayerGroup]:
    """efficientnet / mobilenet: features.0 is the stem, the last is the final conv."""
    names = _children(model, "features")
    inner = names[1:-1]
    groups = [_g("stem", "features.0")]
    groups += [_g(f"block{i + 1}", f"features.{n}") for i, n in enumerate(inner)]
    groups.append(_g("top_conv", f"features.{names[-1]}"))
    return groups


def _paired_stages(model: nn.Module, tail: tuple[str, ...] = ()) -> list[LayerGroup]:
    """convnext / swin: features.0 stem, then (stage), (downsample, stage), ..."""
    names = _children(model, "features")
    groups = [_g("stem", "features.0"), _g("stage1", "features.1")]
    rest = names[2:]
    for i in range(0, len(rest), 2):
        groups.append(_g(f"stage{i // 2 + 2}", *(f"features.{n}" for n in rest[i : i + 2])))
    if tail:
        last = groups[-1]
        groups[-1] = LayerGroup(last.name, last.prefixes + tail)
    return groups


def _lite_stages(model: nn.Module) -> list[LayerGroup]:
    """The bundled EfficientNet-Lite0: blocks grouped into stages by output width."""
    blocks = model.get_submodule("net._blocks")
    stages: list[list[str]] = []
    width = None
    for i, block in enumerate(blocks):
        w = block._block_args.output_filters
        if w != width:
            stages.append([])
            width = w
        stages[-1].append(f"net._blocks.{i}")
    return (
        [_g("stem", "net._conv_stem", "net._bn0")]
        + [_g(f"stage{i + 1}", *s) for i, s in enumerate(stages)]
        + [_g("top_conv", "net._conv_head", "net._bn1")]
    )


def layer_groups(model: nn.Module, architecture: str) -> list[LayerGroup]:
    """Ordered groups, stem first and `head` last."""
    family = family_of(architecture)
    if family == "resnet":
        body = [_g("stem", "conv1", "bn1")] + [_g(f"layer{i}", f"layer{i}") for i in range(1, 5)]
    elif family in ("efficientnet", "mobilenet"):
        body = _sequential_features(model)
    elif family == "convnext":
        body = _paired_stages(model)
    elif family == "swin":
        body = _paired_stages(model, tail=("norm",))
    elif family == "regnet":
        body = [_g("stem", "stem")] + [
            _g(f"stage{i + 1}", f"trunk_output.{n}") for i, n in enumerate(_children(model, "trunk_output"))
        ]
    elif family == "densenet":
        body = [_g("stem", "features.conv0", "features.norm0")]
        for i in range(1, 5):
            extra = f"features.transition{i}" if i < 4 else "features.norm5"
            body.append(_g(f"block{i}", f"features.denseblock{i}", extra))
    elif family == "vit":
        layers = _children(model, "encoder.layers")
        body = [_g("stem", "conv_proj", "class_token", "encoder.pos_embedding")]
        body += [_g(f"layer{i + 1}", f"encoder.layers.{n}") for i, n in enumerate(layers)]
        body[-1] = LayerGroup(body[-1].name, body[-1].prefixes + ("encoder.ln",))
    elif family == "maxvit":
        body = [_g("stem", "stem")] + [
            _g(f"stage{i + 1}", f"blocks.{n}") for i, n in enumerate(_children(model, "blocks"))
        ]
    elif family == "efficientnet_lite":
        body = _lite_stages(model)
    elif family == "timm":
        from trainer.timm_models import layer_groups as timm_groups

        return timm_groups(model)
    else:  # pragma: no cover - catalog and this table are tested together
        raise KeyError(architecture)
    return body + [_g(HEAD, head_module_name(architecture))]


_HEAD_MODULE = {
    "resnet": "fc",
    "regnet": "fc",
    "efficientnet": "classifier",
    "mobilenet": "classifier",
    "convnext": "classifier",
    "densenet": "classifier",
    "maxvit": "classifier",
    "efficientnet_lite": "classifier",
    "vit": "heads",
    "swin": "head",
}


def head_module_name(architecture: str) -> str:
    """The module applied last in forward(); its input is what the feature cache stores."""
    if family_of(architecture) == "timm":
        from trainer.timm_models import head_of

        return head_of(architecture)
    return _HEAD_MODULE[family_of(architecture)]
