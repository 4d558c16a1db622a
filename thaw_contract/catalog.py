"""Which architectures Thaw knows, by family, without importing torch.

The spec validates `model.architecture` against this table (the operator image has no
torch); tests/unit/test_layer_groups.py fails if it drifts from torchvision's own list.
"""

from __future__ import annotations

import difflib
import re

BUNDLED = "efficientnet_lite0"

# family -> architectures; names are torchvision's builder names.
FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet": (
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "wide_resnet50_2",
        "wide_resnet101_2",
    ),
    "efficientnet": tuple(f"efficientnet_b{i}" for i in range(8))
    + ("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"),
    "mobilenet": ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"),
    "convnext": ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"),
    "regnet": tuple(
        f"regnet_{k}_{s}"
        for k, sizes in (
            ("x", ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")),
            ("y", ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")),
        )
        for s in sizes
    ),
    "densenet": ("densenet121", "densenet161", "densenet169", "densenet201"),
    "vit": ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"),
    "swin": ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"),
    "maxvit": ("maxvit_t",),
    "efficientnet_lite": (BUNDLED,),
}

ARCHITECTURES: dict[str, str] = {a: fam for fam, archs in FAMILIES.items() for a in archs}


# Any timm model by name: "timm/<name>". Its groups come from timm's own group_matcher
# (trainer/timm_models.py); whether the name exists is known only where timm is installed.
TIMM = "timm/"
TIMM_NAME = re.compile(r"timm/[a-z0-9_.]+")


def is_known(architecture: str) -> bool:
    return architecture in ARCHITECTURES or bool(TIMM_NAME.fullmatch(architecture))


def family_of(architecture: str) -> str:
    return "timm" if architecture.startswith(TIMM) else ARCHITECTURES[architecture]


def unknown_architecture_message(name: str) -> str:
    close = difflib.get_close_matches(name, ARCHITECTURES, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"families: {', '.join(FAMILIES)}, or timm/<name>"
    return f"unknown architecture {name!r}; {hint}"
