"""`top: N` means the same thing for every family: groups partition the parameters."""

from __future__ import annotations

import pytest
import torchvision

from thaw_contract.catalog import ARCHITECTURES, BUNDLED, FAMILIES
from thaw_contract.spec import ModelSpec
from trainer.layers import HEAD, assign_groups, layer_groups
from trainer.models import build_model

# RegNets cannot be built on the meta device; the small ones stand for the family.
ARCHS = [a for a in ARCHITECTURES if not a.startswith("regnet") or a.endswith("400mf")]


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_partition_every_parameter(arch):
    spec = ModelSpec(architecture=arch, num_classes=7, weights="BUNDLED" if arch == BUNDLED else None)
    model = build_model(spec, device="meta").model
    groups = layer_groups(model, arch)
    names = [n for n, _ in model.named_parameters()]
    group_of = assign_groups(names, groups)  # raises if a parameter is in none or two
    assert set(group_of.values()) == set(range(len(groups))), "every group holds parameters"
    assert groups[0].name == "stem" and groups[-1].name == HEAD
    head_params = [n for n in names if group_of[n] == len(groups) - 1]
    out = [p for n, p in model.named_parameters() if n in head_params and p.ndim == 2][-1]
    assert out.shape[0] == 7, "the new head predicts numClasses"


def test_catalog_names_are_torchvision_builders():
    tv = set(torchvision.models.list_models(module=torchvision.models))
    ours = {a for fam, archs in FAMILIES.items() if fam != "efficientnet_lite" for a in archs}
    assert ours <= tv
    for prefix in (
        "resnet",
        "resnext",
        "wide_resnet",
        "efficientnet",
        "mobilenet",
        "convnext",
        "regnet",
        "densenet",
        "vit",
        "swin",
        "maxvit",
    ):
        assert {a for a in tv if a.startswith(prefix)} <= ours, f"torchvision has {prefix} models we do not list"


def test_resnet_groups_are_the_familiar_ones():
    model = build_model(ModelSpec(architecture="resnet50", num_classes=3), device="meta").model
    assert [g.name for g in layer_groups(model, "resnet50")] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def test_assign_groups_rejects_overlap_and_orphans():
    from trainer.layers import LayerGroup

    with pytest.raises(ValueError, match="falls in no group"):
        assign_groups(["a.weight", "b.weight"], [LayerGroup("x", ("a",))])
    with pytest.raises(ValueError, match=r"\['x', 'y'\]"):
        assign_groups(["a.weight"], [LayerGroup("x", ("a",)), LayerGroup("y", ("a.weight",))])


def test_every_catalog_family_has_one_trainer_record():
    """The contract names the families (torch-free); the trainer keeps one record per family
    (groups, head, layout): neither may have a family the other lacks."""
    from trainer.layers import FAMILIES as RECORDS

    assert set(RECORDS) == set(FAMILIES)
