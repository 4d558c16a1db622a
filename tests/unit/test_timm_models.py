"""timm models by name: timm's own coarse groups, the classifier as Thaw's head, clear errors."""

from __future__ import annotations

import pytest
import torch

from tests.builders import job_doc, with_path
from thaw_contract.layer_table import assign_groups, resolve_offline
from thaw_contract.spec import ModelSpec, SpecError, parse_job
from trainer.layers import head_module_name, layer_groups
from trainer.models import build_model

CASES = {  # architecture -> (classifier module, first parameter of the stem, a `top` group?)
    "timm/resnet18": ("fc", "conv1.weight", False),
    "timm/convnext_atto": ("head.fc", "stem.0.weight", True),
    "timm/vit_tiny_patch16_224": ("head", "cls_token", False),
    "timm/mobilenetv3_small_050": ("classifier", "conv_stem.weight", True),
}


@pytest.mark.parametrize("arch", CASES)
def test_groups_partition_the_parameters_with_the_classifier_as_the_head(arch):
    head, stem_param, has_top = CASES[arch]
    model = build_model(ModelSpec(architecture=arch, num_classes=10), device="meta").model
    groups = layer_groups(model, arch)
    group_of = assign_groups([n for n, _ in model.named_parameters()], groups)  # raises unless a partition
    assert head_module_name(arch) == head and groups[-1].name == "head" and groups[-1].prefixes == (head,)
    assert group_of[stem_param] == 0 and groups[0].name == "stem"
    assert (groups[-2].name == "top") == has_top
    assert model.get_submodule(head).out_features == 10
    assert len(groups) >= 4


def test_a_top_n_stage_trains_the_last_n_groups_and_caches_features_for_the_head():
    from trainer.setup import plan_job

    doc = job_doc(model={"architecture": "timm/convnext_atto", "numClasses": 10})
    _, groups, _, stages = plan_job(parse_job(doc))
    assert [groups[g].name for g in stages[0].trainable_groups] == ["head"]
    assert [groups[g].name for g in stages[1].trainable_groups] == ["head", "top", "stage4"]
    assert all(p.startswith(("head.", "stages.3.")) for p in stages[1].trainable_params)
    assert resolve_offline(parse_job(doc).spec) is None  # the operator leaves timm's checks to the trainer


def test_unknown_or_malformed_timm_names_and_weights_are_one_line():
    from trainer.setup import plan_job

    with pytest.raises(SpecError) as err:
        plan_job(parse_job(job_doc(model={"architecture": "timm/resnet1", "numClasses": 10})))
    assert str(err.value).startswith("spec.model.architecture: timm has no model 'resnet1'; did you mean timm/")
    with pytest.raises(SpecError, match=r"^spec.model.architecture: unknown architecture 'timm/Res Net'"):
        parse_job(job_doc(model={"architecture": "timm/Res Net", "numClasses": 10}))
    bad = with_path(job_doc(model={"architecture": "timm/resnet18", "numClasses": 10}), "spec.model.weights", "V1")
    with pytest.raises(
        SpecError, match=r"^spec.model: weights for a timm model must be DEFAULT \(hub weights\) or null"
    ):
        parse_job(bad)


def test_imagenet_weights_saved_from_timm_load_with_a_new_head():
    import timm

    from trainer.weights import fit

    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=1000)
    model = build_model(ModelSpec(architecture="timm/resnet18", num_classes=10)).model
    notes = fit(model, source.state_dict(), head_module_name("timm/resnet18"), "file:///r18.pt", "timm/resnet18")
    assert notes == [
        "kept the new head (fc.weight (1000, 512) -> (10, 512), fc.bias (1000,) -> (10,): another class count)"
    ]
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
