"""The API server itself rejects bad FineTuneJobs with clear messages (schema + CEL from the CRD)."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from thaw_operator.crd import GROUP, PLURAL, VERSION

from tests.builders import job_doc, with_path
from thaw_contract.spec import parse_job

pytestmark = pytest.mark.cluster


def _doc(name="ok", **spec):
    doc = job_doc(**spec)
    doc["metadata"] = {"name": name}
    return doc


INVALID = [
    ("missing model", with_path(_doc(), "spec.model", "DELETE"), "spec.model: Required value"),
    (
        "stages and gradual",
        with_path(_doc(), "spec.gradual", {"stages": 2, "epochsPerStage": 1, "lr": 0.1}),
        "give exactly one of stages or gradual",
    ),
    (
        "both gradual epoch budgets",
        with_path(
            with_path(_doc(), "spec.stages", "DELETE"), "spec.gradual", {"stages": 3, "epochs": 12, "epochsPerStage": 1}
        ),
        'spec.gradual: Invalid value: "object": give exactly one of gradual.epochs or gradual.epochsPerStage',
    ),
    ("neither stages nor gradual", with_path(_doc(), "spec.stages", "DELETE"), "give exactly one of stages or gradual"),
    (
        "empty stages",
        with_path(_doc(), "spec.stages", []),
        "spec.stages: Invalid value: 0: spec.stages in body should have at least 1 items",
    ),
    (
        "zero epochs",
        with_path(_doc(), "spec.stages.0.epochs", 0),
        "spec.stages[0].epochs in body should be greater than 0",
    ),
    ("negative lr", with_path(_doc(), "spec.stages.1.lr", -0.1), "spec.stages[1].lr in body should be greater than 0"),
    ("lr as a word", with_path(_doc(), "spec.stages.1.lr", "fast"), "spec.stages[1].lr in body should match '^auto$'"),
    (
        "one class",
        with_path(_doc(), "spec.model.numClasses", 1),
        "spec.model.numClasses in body should be greater than or equal to 2",
    ),
    (
        "epochs as text",
        with_path(_doc(), "spec.stages.0.epochs", "three"),
        'spec.stages[0].epochs: Invalid value: "string"',
    ),
    ("unknown amp", _doc(speed={"amp": "fp8"}), 'spec.speed.amp: Unsupported value: "fp8"'),
    ("unknown schedule", _doc(schedule={"name": "linear"}), 'spec.schedule.name: Unsupported value: "linear"'),
    ("checkpoint scheme", _doc(checkpoint={"uri": "gs://bucket/x"}), "spec.checkpoint.uri in body should match"),
    ("data source", with_path(_doc(), "spec.data.source", "imagenet"), "spec.data.source in body should match"),
    ("zero nodes", _doc(nodes=0), "spec.nodes in body should be greater than 0"),
    ("duplicate stage names", with_path(_doc(), "spec.stages.1.name", "head"), "stage names must be unique"),
    ("batch not divisible", _doc(nodes=3), "data.batchSize must split evenly over nodes x gpusPerNode"),
    (
        "stage batch not divisible",
        with_path(_doc(nodes=2), "spec.stages.0.batchSize", 9),
        "a stage's batchSize must split evenly",
    ),
    ("long stage name", with_path(_doc(), "spec.stages.0.name", "h" * 40), "may not be more than 32 bytes"),
    ("long job name", _doc(name="x" * 45), "metadata.name must be at most 40 characters"),
    # Its stage Service <name>-<k> must be a DNS-1035 label: rejected here, not by a 422 on every reconcile.
    ("job name starting with a digit", _doc(name="1job"), "metadata.name must start with a letter"),
    (
        "checkpoint endpoint without a scheme",
        _doc(checkpoint={"uri": "s3://bucket/x", "endpoint": "seaweedfs:8333"}),
        "spec.checkpoint.endpoint in body should match",
    ),
    (
        "privileged metrics port",
        _doc(metrics={"port": 80}),
        "spec.metrics.port in body should be greater than or equal to 1024",
    ),
    (
        "retry budget",
        _doc(runPolicy={"retriesPerStage": 50}),
        "spec.runPolicy.retriesPerStage in body should be less than or equal to 20",
    ),
    ("gate alpha", _doc(gate={"alpha": 0.5}), "spec.gate.alpha in body should be less than 0.5"),
    (
        "toleration effect",
        _doc(tolerations=[{"key": "a", "effect": "Sometimes"}]),
        'spec.tolerations[0].effect: Unsupported value: "Sometimes"',
    ),
]


def _message(err: ApiException) -> str:
    return json.loads(err.body)["message"]


@pytest.mark.parametrize("case,doc,expected", INVALID, ids=[c[0] for c in INVALID])
def test_api_server_rejects_invalid_finetunejob(api, namespace, crd, case, doc, expected):
    custom = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc)
    assert err.value.status == 422
    assert expected in _message(err.value), _message(err.value)


def test_the_api_server_takes_lr_auto_and_the_new_policy_fields(api, namespace, crd):
    doc = with_path(_doc(name="auto"), "spec.stages.1.lr", "auto")
    doc["spec"]["gate"] = {"onRegression": "keep", "minGain": 0.01}
    doc["spec"]["stages"][1]["gate"] = {"alpha": None}  # this stage compares as measured
    doc["spec"]["divergence"] = {"lossFactor": 3}
    doc["spec"]["model"] = {
        "architecture": "timm/convnext_atto",
        "weightsUri": "s3://w/convnext.safetensors",
        "numClasses": 10,
    }
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc)
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "auto")["spec"]
    assert stored["stages"][1]["lr"] == "auto" and stored["gate"]["onRegression"] == "keep"
    assert stored["gate"]["alpha"] == 0.05  # the paired test's default, filled in by the API server
    assert (
        "alpha" in stored["stages"][1]["gate"] and stored["stages"][1]["gate"]["alpha"] is None
    )  # kept, not defaulted
    assert parse_job({**doc, "spec": stored}).spec.stages[1].gate.alpha is None  # the trainer reads it the same
    assert stored["model"]["weightsUri"] == "s3://w/convnext.safetensors"


def test_training_fields_cannot_change_but_suspend_can(api, namespace, crd):
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _doc(name="fixed"))
    for patch, expected in [
        ({"seed": 5}, "spec.seed cannot change after creation"),
        ({"stages": [{"name": "x", "trainable": "all", "epochs": 1, "lr": 0.1}]}, "spec.stages cannot change"),
        ({"checkpoint": {"uri": "file:///elsewhere"}}, "spec.checkpoint.uri cannot change"),
        ({"data": {"source": "fashion-mnist"}}, "spec.data.source cannot change after creation"),
    ]:
        with pytest.raises(ApiException) as err:
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "fixed", {"spec": patch})
        assert expected in _message(err.value), _message(err.value)
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "fixed", {"spec": {"suspend": True}})
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "fixed")["spec"]["suspend"] is True
    # Not a training field: the data loader's worker count may change (the next stage reads it).
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "fixed", {"spec": {"data": {"workers": 2}}}
    )
    assert (
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "fixed")["spec"]["data"]["workers"] == 2
    )


def test_kubectl_explain_describes_stages(cluster, crd):
    out = cluster.kubectl("explain", "finetunejob.spec.stages").stdout
    assert "explicit stages, run in order" in out and "lrDecay" in out and "ULMFiT" in out
