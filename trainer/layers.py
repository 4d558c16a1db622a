"""Layer groups: every supported network cut into an ordered list, stem first, head last.

`top: N` in a stage means the last N groups of this list, so it means the same thing for
every family. Groups are lists of parameter-name prefixes; together they partition the
model's parameters (tests/unit/test_layer_groups.py checks that for every family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from thaw_contract.catalog import TIMM, family_of
from thaw_contract.layer_table import LayerGroup, assign_groups, in_prefix

__all__ = ["HEAD", "LayerGroup", "assign_groups", "family", "in_prefix", "layer_groups", "head_module_name"]
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


def _resnet(model: nn.Module) -> list[LayerGroup]:
    return [_g("stem", "conv1", "bn1")] + [_g(f"layer{i}", f"layer{i}") for i in range(1, 5)]


def _regnet(model: nn.Module) -> list[LayerGroup]:
    trunk = _children(model, "trunk_output")
    return [_g("stem", "stem")] + [_g(f"stage{i + 1}", f"trunk_output.{n}") for i, n in enumerate(trunk)]


def _densenet(model: nn.Module) -> list[LayerGroup]:
    body = [_g("stem", "features.conv0", "features.norm0")]
    for i in range(1, 5):
        extra = f"features.transition{i}" if i < 4 else "features.norm5"
        body.append(_g(f"block{i}", f"features.denseblock{i}", extra))
    return body


def _vit(model: nn.Module) -> list[LayerGroup]:
    layers = _children(model, "encoder.layers")
    body = [_g("stem", "conv_proj", "class_token", "encoder.pos_embedding")]
    body += [_g(f"layer{i + 1}", f"encoder.layers.{n}") for i, n in enumerate(layers)]
    body[-1] = LayerGroup(body[-1].name, body[-1].prefixes + ("encoder.ln",))
    return body


def _maxvit(model: nn.Module) -> list[LayerGroup]:
    return [_g("stem", "stem")] + [_g(f"stage{i + 1}", f"blocks.{n}") for i, n in enumerate(_children(model, "blocks"))]


@dataclass(frozen=True)
class Family:
    """What the trainer knows about one family of thaw_contract.catalog (which names its members)."""

    body: Callable[[nn.Module], list[LayerGroup]]  # the groups, stem first, without the head
    head: str  # the module applied last in forward(); its input is what the feature cache stores
    conv: bool  # convolutional: channels_last pays off (speed.channelsLast: auto)
    depthwise: bool = False  # depthwise convolutions: on CUDA, warm-up measures the layout instead


FAMILIES = {
    "resnet": Family(_resnet, "fc", conv=True),
    "efficientnet": Family(_sequential_features, "classifier", conv=True, depthwise=True),
    "mobilenet": Family(_sequential_features, "classifier", conv=True, depthwise=True),
    "convnext": Family(_paired_stages, "classifier", conv=True, depthwise=True),
    "regnet": Family(_regnet, "fc", conv=True),
    "densenet": Family(_densenet, "classifier", conv=True),
    "vit": Family(_vit, "heads", conv=False),
    "swin": Family(lambda m: _paired_stages(m, tail=("norm",)), "head", conv=False),
    "maxvit": Family(_maxvit, "classifier", conv=False),
    "efficientnet_lite": Family(_lite_stages, "classifier", conv=True, depthwise=True),
}
# timm models: grouped by timm's own group_matcher (trainer/timm_models.py), layout left alone.
TIMM_FAMILY = Family(lambda m: [], "", conv=False)


def family(architecture: str) -> Family:
    return TIMM_FAMILY if architecture.startswith(TIMM) else FAMILIES[family_of(architecture)]


def layer_groups(model: nn.Module, architecture: str) -> list[LayerGroup]:
    """Ordered groups, stem first and `head` last."""
    if architecture.startswith(TIMM):
        from trainer.timm_models import layer_groups as timm_groups

        return timm_groups(model)
    return family(architecture).body(model) + [_g(HEAD, head_module_name(architecture))]


def head_module_name(architecture: str) -> str:
    """The module applied last in forward(); its input is what the feature cache stores."""
    if architecture.startswith(TIMM):
        from trainer.timm_models import head_of

        return head_of(architecture)
    return family(architecture).head
