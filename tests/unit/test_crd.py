"""The CRD in manifests/ is generated from the spec models and must not drift from them."""

from __future__ import annotations

from pathlib import Path

import yaml
from thaw_operator import crd

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "manifests" / "crd" / "finetunejobs.thaw.dev.yaml"


def test_manifest_is_generated_from_the_models():
    assert MANIFEST.read_text() == crd.render(), "run: python -m thaw_operator.crd > " + str(MANIFEST.relative_to(ROOT))


def test_every_spec_field_is_in_the_schema_with_descriptions_for_kubectl_explain():
    from thaw_contract.spec import FineTuneJobSpec

    schema = yaml.safe_load(MANIFEST.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    for field in FineTuneJobSpec.model_fields.values():
        assert field.alias in spec["properties"], field.alias
    stage = spec["properties"]["stages"]["items"]
    assert stage["description"] and stage["properties"]["lrDecay"]["description"]
    assert stage["properties"]["lrDecay"]["default"] == 1.0
    assert spec["properties"]["checkpoint"]["properties"]["uri"]["default"] == "file://./runs"


def test_structural_schema_has_no_json_schema_only_keywords():
    text = MANIFEST.read_text()
    for keyword in ("$ref", "anyOf", "oneOf", "prefixItems", "const:", "title:"):
        assert keyword not in text, keyword


def test_immutable_fields_have_transition_rules():
    rules = [r["rule"] for r in crd.spec_schema()["x-kubernetes-validations"]]
    for f in ("model", "data.source", "stages", "seed"):
        assert any(f"self.{f} == oldSelf.{f}" in r for r in rules), f
    assert not any("suspend" in r for r in rules)  # suspend is meant to change


def test_immutable_fields_are_the_training_fields_of_the_spec():
    """One source: thaw_contract.spec.TRAINING_FIELDS (what the checkpoint hash covers) gives the CRD's
    immutability rules; data.workers and the other non-training fields stay mutable."""
    from thaw_contract.spec import TRAINING_FIELDS

    assert "data.source" in crd.IMMUTABLE and "data.batchSize" in crd.IMMUTABLE and "stages" in crd.IMMUTABLE
    assert "data" not in crd.IMMUTABLE and "data.workers" not in crd.IMMUTABLE
    assert len(crd.IMMUTABLE) == sum(1 if v is True else len(v) for v in TRAINING_FIELDS.values())
    rules = [
        r["rule"]
        for r in crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "x-kubernetes-validations"
        ]
    ]
    assert all(any(f"self.{f} == oldSelf.{f}" in r for r in rules) for f in crd.IMMUTABLE)
