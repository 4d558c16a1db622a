"""Every kind of bad spec a user could write gets one clear line naming the field."""

from __future__ import annotations

import glob

import pytest

from tests.builders import job_doc, with_path
from thaw_contract.plan import resolve_stages
from thaw_contract.spec import SpecError, load_job, parse_job
from trainer.setup import plan_job

S = "spec.stages.0"

# (what the user did, document, expected message fragment — must name the field)
BAD_SPECS = [
    (
        "a data cache of no size",
        with_path(job_doc(), "spec.dataCache", {"size": "0Gi"}),
        "spec.dataCache.size: must be a Kubernetes quantity such as 50Gi (got '0Gi')",
    ),
    (
        "a data cache without a size",
        with_path(job_doc(), "spec.dataCache", {"storageClassName": "nfs"}),
        "spec.dataCache.size: is required",
    ),
    (
        "a data cache access mode",
        with_path(job_doc(), "spec.dataCache", {"size": "5Gi", "accessMode": "ReadOnlyMany"}),
        "spec.dataCache.accessMode: must be 'ReadWriteMany' or 'ReadWriteOnce' (got 'ReadOnlyMany')",
    ),
    (
        "unknown architecture",
        with_path(job_doc(), "spec.model.architecture", "resnet19"),
        "spec.model.architecture: unknown architecture 'resnet19'; did you mean resnet18",
    ),
    (
        "unsupported family",
        with_path(job_doc(), "spec.model.architecture", "alexnet"),
        "spec.model.architecture: unknown architecture 'alexnet'",
    ),
    (
        "one class",
        with_path(job_doc(), "spec.model.numClasses", 1),
        "spec.model.numClasses: must be greater than or equal to 2 (got 1)",
    ),
    (
        "missing numClasses",
        with_path(job_doc(), "spec.model.numClasses", "DELETE"),
        "spec.model.numClasses: is required",
    ),
    (
        "weights and checkpoint",
        with_path(job_doc(), "spec.model.checkpoint", "file:///x.pt"),
        "spec.model: set one of weights, checkpoint and weightsUri (got weights and checkpoint)",
    ),
    (
        "weights and weightsUri",
        with_path(job_doc(), "spec.model.weightsUri", "file:///w.safetensors"),
        "spec.model: set one of weights, checkpoint and weightsUri (got weights and weightsUri)",
    ),
    (
        "weightsUri scheme",
        with_path(with_path(job_doc(), "spec.model.weights", "DELETE"), "spec.model.weightsUri", "/w.pt"),
        "spec.model: weightsUri must start with file://, s3:// or https:// (got '/w.pt')",
    ),
    (
        "torchvision weights on bundled",
        with_path(job_doc(), "spec.model.weights", "IMAGENET1K_V1"),
        "spec.model: weights for efficientnet_lite0 must be BUNDLED or null",
    ),
    (
        "bundled weights elsewhere",
        with_path(with_path(job_doc(), "spec.model.architecture", "resnet18"), "spec.model.weights", "BUNDLED"),
        "spec.model: weights BUNDLED exist only for efficientnet_lite0",
    ),
    (
        "lowercase weights",
        with_path(with_path(job_doc(), "spec.model.architecture", "resnet18"), "spec.model.weights", "imagenet"),
        "spec.model: weights must be a torchvision enum name",
    ),
    (
        "unknown data source",
        with_path(job_doc(), "spec.data.source", "cifar10"),
        "spec.data.source: unknown data source 'cifar10'",
    ),
    (
        "s3 data source with an invalid bucket",
        with_path(job_doc(), "spec.data.source", "s3://B_ad/p"),
        "spec.data.source: 's3://B_ad/p' does not name a valid S3 bucket",
    ),
    (
        "tiny images",
        with_path(job_doc(), "spec.data.imageSize", 8),
        "spec.data.imageSize: must be greater than or equal to 16 (got 8)",
    ),
    (
        "zero batch",
        with_path(job_doc(), "spec.data.batchSize", 0),
        "spec.data.batchSize: must be greater than 0 (got 0)",
    ),
    (
        "negative workers",
        with_path(job_doc(), "spec.data.workers", -1),
        "spec.data.workers: must be a whole number >= 0 or auto (got -1)",
    ),
    ("typo in a field", with_path(job_doc(), "spec.data.batchsize", 8), "spec.data.batchsize: is not a known field"),
    ("empty stage list", job_doc(stages=[]), "spec: stages must not be empty"),
    ("no stages at all", with_path(job_doc(), "spec.stages", "DELETE"), "spec: give stages or gradual"),
    (
        "stages and gradual",
        job_doc(gradual={"stages": 2, "epochsPerStage": 1, "lr": 0.1}),
        "spec: give stages or gradual, not both",
    ),
    ("zero epochs", with_path(job_doc(), f"{S}.epochs", 0), "spec.stages[0].epochs: must be greater than 0 (got 0)"),
    (
        "negative lr",
        with_path(job_doc(), f"{S}.lr", -0.1),
        "spec.stages[0].lr: must be a positive number or auto (got -0.1)",
    ),
    ("zero lr", with_path(job_doc(), f"{S}.lr", 0), "spec.stages[0].lr: must be a positive number or auto (got 0)"),
    (
        "top zero",
        with_path(job_doc(), f"{S}.trainable", {"top": 0}),
        "spec.stages[0].trainable.top: must be greater than 0 (got 0)",
    ),
    (
        "trainable word",
        with_path(job_doc(), f"{S}.trainable", "head"),
        "spec.stages[0].trainable: must be 'all', {top: N} or {modules: [...]}",
    ),
    (
        "top and modules",
        with_path(job_doc(), f"{S}.trainable", {"top": 1, "modules": ["x"]}),
        "spec.stages[0].trainable: give exactly one of top or modules",
    ),
    (
        "empty module list",
        with_path(job_doc(), f"{S}.trainable", {"modules": []}),
        "spec.stages[0].trainable.modules: List should have at least 1 item",
    ),
    (
        "lrDecay below one",
        with_path(job_doc(), f"{S}.lrDecay", 0.5),
        "spec.stages[0].lrDecay: must be greater than or equal to 1 (got 0.5)",
    ),
    (
        "decay and explicit rates",
        with_path(job_doc(), "spec.stages.1.groupLrs", [0.01, 0.001, 0.0001]),
        "spec.stages[1]: set either lrDecay or groupLrs, not both",
    ),
    (
        "groupLrs head mismatch",
        with_path(job_doc(), f"{S}.groupLrs", [0.5]),
        "spec.stages[0]: groupLrs[0] is the head's rate and must equal lr (0.05)",
    ),
    (
        "negative group lr",
        with_path(with_path(job_doc(), "spec.stages.1.lrDecay", "DELETE"), "spec.stages.1.groupLrs", [0.01, -1, 0.1]),
        "spec.stages[1].groupLrs[1]: must be greater than 0 (got -1)",
    ),
    (
        "bad stage name",
        with_path(job_doc(), f"{S}.name", "Head_Stage"),
        "spec.stages[0].name: must be a lowercase DNS label",
    ),
    (
        "duplicate stage names",
        with_path(job_doc(), "spec.stages.1.name", "head"),
        "spec: stage names must be unique (repeated: head)",
    ),
    (
        "unknown schedule",
        job_doc(schedule={"name": "step"}),
        "spec.schedule.name: must be 'cosine', 'onecycle' or 'constant' (got 'step')",
    ),
    (
        "unknown optimizer",
        job_doc(optimizer={"name": "adam"}),
        "spec.optimizer.name: must be 'sgd' or 'adamw' (got 'adam')",
    ),
    ("momentum of one", job_doc(optimizer={"momentum": 1.0}), "spec.optimizer.momentum: must be less than 1 (got 1.0)"),
    (
        "negative weight decay",
        job_doc(optimizer={"weightDecay": -1}),
        "spec.optimizer.weightDecay: must be greater than or equal to 0 (got -1)",
    ),
    (
        "early stopping metric",
        job_doc(earlyStopping={"metric": "accuracy"}),
        "spec.earlyStopping.metric: must be 'val_accuracy' or 'val_loss' (got 'accuracy')",
    ),
    (
        "zero patience",
        job_doc(earlyStopping={"patience": 0}),
        "spec.earlyStopping.patience: must be greater than 0 (got 0)",
    ),
    ("zero accumulation", job_doc(gradientAccumulation=0), "spec.gradientAccumulation: must be greater than 0 (got 0)"),
    (
        "unknown amp",
        job_doc(speed={"amp": "fp8"}),
        "spec.speed.amp: must be 'auto', 'off', 'bf16' or 'fp16' (got 'fp8')",
    ),
    (
        "unquoted off in YAML",
        job_doc(speed={"channelsLast": False}),
        "spec.speed.channelsLast: must be 'auto', 'on' or 'off' (got False); YAML reads an unquoted off/on/no/yes "
        "as a boolean: quote the word",
    ),
    ("checkpoint scheme", job_doc(checkpoint={"uri": "gs://bucket/x"}), "spec.checkpoint.uri: must start with file://"),
    ("checkpoint bucket", job_doc(checkpoint={"uri": "s3://x"}), "spec.checkpoint.uri: 's3://x' does not name a valid"),
    ("checkpoint keepLast", job_doc(checkpoint={"keepLast": 0}), "spec.checkpoint.keepLast: must be greater than 0"),
    (
        "checkpoint upload timeout",
        job_doc(checkpoint={"uploadTimeoutSeconds": -1}),
        "spec.checkpoint.uploadTimeoutSeconds: must be greater than 0",
    ),
    ("metrics port", job_doc(metrics={"port": 80}), "spec.metrics.port: must be greater than or equal"),
    ("metrics unknown field", job_doc(metrics={"path": "/m"}), "spec.metrics.path: is not a known field"),
    (
        "gradual zero stages",
        with_path(job_doc(gradual={"stages": 0, "epochsPerStage": 1, "lr": 0.1}), "spec.stages", "DELETE"),
        "spec.gradual.stages: must be greater than 0 (got 0)",
    ),
    (
        "gradual negative warm-up",
        with_path(job_doc(gradual={"stages": 2, "epochsPerStage": 1, "warmupEpochs": -1}), "spec.stages", "DELETE"),
        "spec.gradual.warmupEpochs: must be greater than or equal to 0 (got -1)",
    ),
    (
        "gradual zero lr",
        with_path(job_doc(gradual={"stages": 2, "epochsPerStage": 1, "lr": 0}), "spec.stages", "DELETE"),
        "spec.gradual.lr: must be greater than 0 (got 0)",
    ),
    (
        "gradual zero last-stage epochs",
        with_path(job_doc(gradual={"stages": 2, "epochsPerStage": 1, "lastStageEpochs": 0}), "spec.stages", "DELETE"),
        "spec.gradual.lastStageEpochs: must be greater than 0 (got 0)",
    ),
    (
        "gradual zero groups per stage",
        with_path(job_doc(gradual={"stages": 2, "epochsPerStage": 1, "groupsPerStage": 0}), "spec.stages", "DELETE"),
        "spec.gradual.groupsPerStage: must be greater than 0 (got 0)",
    ),
    (
        "gradual both epoch budgets",
        with_path(job_doc(gradual={"stages": 3, "epochsPerStage": 1, "epochs": 12}), "spec.stages", "DELETE"),
        "spec.gradual: give exactly one of epochs or epochsPerStage",
    ),
    (
        "gradual no epoch budget",
        with_path(job_doc(gradual={"stages": 3, "lr": 0.1}), "spec.stages", "DELETE"),
        "spec.gradual: give exactly one of epochs or epochsPerStage",
    ),
    (
        "gradual total and last-stage epochs",
        with_path(job_doc(gradual={"stages": 3, "epochs": 12, "lastStageEpochs": 8}), "spec.stages", "DELETE"),
        "spec.gradual: lastStageEpochs goes with epochsPerStage; epochs already sizes the last stage",
    ),
    (
        "gradual fewer epochs than stages",
        with_path(job_doc(gradual={"stages": 3, "epochs": 2}), "spec.stages", "DELETE"),
        "spec.gradual: epochs 2 is fewer than the 3 stages (one epoch each at least)",
    ),
    (
        "gradual zero epochs",
        with_path(job_doc(gradual={"stages": 3, "epochs": 0}), "spec.stages", "DELETE"),
        "spec.gradual.epochs: must be greater than 0 (got 0)",
    ),
    ("wrong kind", with_path(job_doc(), "kind", "PyTorchJob"), "kind: must be 'FineTuneJob' (got 'PyTorchJob')"),
    (
        "wrong apiVersion",
        with_path(job_doc(), "apiVersion", "thaw.dev/v1"),
        "apiVersion: must be 'thaw.dev/v1alpha1' (got 'thaw.dev/v1')",
    ),
    ("bad job name", with_path(job_doc(), "metadata.name", "My Job"), "metadata.name: must be a DNS-1035 label"),
    (
        "job name starting with a digit (its stage Service <name>-<k> would be rejected)",
        with_path(job_doc(), "metadata.name", "1job"),
        "metadata.name: must be a DNS-1035 label: a-z, 0-9 and '-', starting with a letter (got '1job')",
    ),
    (
        "checkpoint endpoint without a scheme",
        with_path(job_doc(), "spec.checkpoint", {"uri": "s3://bucket/x", "endpoint": "seaweedfs:8333"}),
        "spec.checkpoint.endpoint: must be a URL with its scheme, e.g. http://seaweedfs:8333 (got 'seaweedfs:8333')",
    ),
    (
        "data endpoint without a scheme",
        with_path(with_path(job_doc(), "spec.data.source", "s3://data/set"), "spec.data.endpoint", "host:9000"),
        "spec.data.endpoint: must be a URL with its scheme",
    ),
]

# Errors that need the model's layer groups: found by the planner, same format.
BAD_PLANS = [
    (
        "top beyond the model",
        with_path(job_doc(), "spec.stages.1.trainable", {"top": 11}),
        "spec.stages[1].trainable.top: top 11 exceeds the 10 layer groups (stem, stage1,",
    ),
    (
        "unknown module name",
        with_path(job_doc(), "spec.stages.1.trainable", {"modules": ["layer4"]}),
        "spec.stages[1].trainable.modules[0]: 'layer4' matches no module or group; groups are stem, stage1",
    ),
    (
        "stage that unfreezes nothing",
        with_path(job_doc(), "spec.stages.1.trainable", {"modules": ["net._avg_pooling"]}),
        "spec.stages[1].trainable.modules[0]: 'net._avg_pooling' matches modules without parameters",
    ),
    (
        "explicit rates for the wrong number of groups",
        with_path(with_path(job_doc(), "spec.stages.1.lrDecay", "DELETE"), "spec.stages.1.groupLrs", [0.01, 0.001]),
        "spec.stages[1].groupLrs: gives 2 rates but the stage trains 3 groups (head, top_conv, stage7), head first",
    ),
    (
        "gradual past the top",
        with_path(
            job_doc(gradual={"stages": 5, "startTop": 8, "epochsPerStage": 1, "lr": 0.1}), "spec.stages", "DELETE"
        ),
        "spec.gradual.stages: top 12 exceeds the 10 layer groups (stem, stage1, stage2, stage3, stage4, stage5, "
        "stage6, stage7, top_conv, head); give fewer stages or a smaller groupsPerStage",
    ),
]


@pytest.mark.parametrize("what,doc,expected", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_one_clear_line(what, doc, expected):
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message, f"{what}: expected one line, got:\n{message}"


@pytest.mark.parametrize("what,doc,expected", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_bad_plan_is_one_clear_line(what, doc, expected):
    job = parse_job(doc)
    with pytest.raises(SpecError) as err:
        plan_job(job)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("what,doc,expected", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_bad_plan_is_found_without_torch_with_the_same_line(what, doc, expected):
    """The operator resolves stages against the shipped layer table before any pod starts."""
    from thaw_contract.layer_table import resolve_offline

    job = parse_job(doc)
    with pytest.raises(SpecError) as offline:
        resolve_offline(job.spec)
    with pytest.raises(SpecError) as trainer:
        plan_job(job)
    assert str(offline.value) == str(trainer.value)


def test_there_are_at_least_25_distinct_bad_specs():
    messages = {b[2] for b in BAD_SPECS + BAD_PLANS}
    assert len(messages) >= 25


def test_valid_document_round_trips_defaults():
    job = parse_job(job_doc())
    assert job.spec.optimizer.name == "sgd"
    assert job.spec.data.val_per_class == 5
    assert job.spec.stages[1].lr_decay == 2.6
    assert job.spec.early_stopping is None


def test_cluster_fields_are_accepted_and_ignored_by_the_plan():
    job = parse_job(job_doc(image="thaw:dev", nodes=2, gpusPerNode=4))
    assert job.spec.nodes == 2
    _, _, _, stages = plan_job(job)
    assert [s.name for s in stages] == ["head", "top3"]


def test_metadata_extras_like_labels_are_kept():
    doc = with_path(job_doc(), "metadata.labels", {"team": "vision"})
    assert parse_job(doc).metadata.name == "t"


def test_load_job_reports_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_job(tmp_path / "list.yaml")


def test_every_example_is_a_valid_job_that_plans():
    examples = sorted(glob.glob("examples/*.yaml"))
    assert examples, "no examples found"
    for path in examples:
        job = load_job(path)
        _, groups, group_of, _ = plan_job(job)
        assert resolve_stages(job.spec, groups, group_of)
