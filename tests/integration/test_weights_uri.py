"""Weights a user brings (spec.model.weightsUri): safetensors or a torch state_dict, from a
file or from S3 (SeaweedFS); what does not fit is one line and nothing trains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.integration.conftest import ROOT, run, write_job
from thaw_contract.spec import ModelSpec, SpecError
from trainer.checkpoint import FINAL, stage_prefix
from trainer.layers import head_module_name
from trainer.models import build_model
from trainer.setup import seed_everything
from trainer.stage_checkpoints import state_digest
from trainer.weights import fit, parse_state_dict, read_bytes

pytestmark = pytest.mark.integration
PY = sys.executable


def _resnet(classes: int):
    torch.manual_seed(0)
    return build_model(ModelSpec(architecture="resnet18", weights=None, num_classes=classes)).model


def _fit(model, state, uri="file:///w"):
    return fit(model, state, head_module_name("resnet18"), uri, "resnet18")


def test_imagenet_shaped_weights_load_the_backbone_and_keep_the_new_head(tmp_path):
    source = _resnet(1000)  # what a user downloads: the ImageNet head
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = _resnet(10)
    head_before = model.fc.weight.clone()
    state = parse_state_dict(read_bytes(f"file://{path}"), f"file://{path}")
    notes = _fit(model, state)
    assert notes == [
        "kept the new head (fc.weight (1000, 512) -> (10, 512), fc.bias (1000,) -> (10,): another class count)"
    ]
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.fc.weight, head_before)


def test_a_ddp_state_dict_in_a_training_checkpoint_loads(tmp_path):
    source = _resnet(10)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = _resnet(10)
    notes = _fit(model, parse_state_dict(path.read_bytes(), f"file://{path}"))
    assert notes == ["removed the 'module.' prefix (weights saved from DDP)"]
    assert state_digest(model) == state_digest(source)


def test_keys_that_do_not_fit_are_one_line_and_nothing_is_loaded():
    model = _resnet(10)
    before = state_digest(model)
    state = dict(_resnet(10).state_dict())
    for k in ("layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer2.0.conv1.weight", "layer3.0.conv1.weight"):
        del state[k]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(SpecError) as err:
        _fit(model, state, "file:///mine.pt")
    assert str(err.value) == (
        "spec.model.weightsUri: file:///mine.pt does not fit resnet18: keys 4 missing (layer1.0.conv1.weight, "
        "layer1.0.bn1.weight, layer2.0.conv1.weight, ...); 1 unexpected (extra.weight)"
    )
    assert state_digest(model) == before


def test_what_is_not_a_state_dict_is_refused_without_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Boom()}, path)
    with pytest.raises(SpecError, match=r"^spec.model.weightsUri: file://.*evil.pt is neither safetensors nor"):
        parse_state_dict(path.read_bytes(), f"file://{path}")
    with pytest.raises(SpecError, match=r"^spec.model.weightsUri: cannot read file:///nope.pt: No such file"):
        read_bytes("file:///nope.pt")


def test_weights_from_s3_load(s3_env, seaweed):
    import io

    from trainer.storage import s3_client

    source = _resnet(10)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    s3_client().put_object(Bucket="data", Key="weights/r18.pt", Body=buf.getvalue())
    model = _resnet(10)
    state = parse_state_dict(read_bytes("s3://data/weights/r18.pt"), "s3://data/weights/r18.pt")
    assert _fit(model, state) == [] and state_digest(model) == state_digest(source)
    with pytest.raises(SpecError, match=r"^spec.model.weightsUri: .*missing.pt"):
        read_bytes("s3://data/weights/missing.pt")


def test_a_job_started_from_a_weights_file_trains_like_the_bundled_weights(tmp_path, small_job):
    """The bundled model saved to safetensors and brought back: the same stage weights, bit for bit."""
    small_job["spec"]["deterministic"] = True
    seed_everything(small_job["spec"]["seed"])  # what the trainer does before building the model
    built = build_model(ModelSpec.model_validate(small_job["spec"]["model"]))
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in built.model.state_dict().items()}, str(path))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    small_job["spec"]["stages"] = small_job["spec"]["stages"][:1]
    run([PY, "-m", "trainer", "run", str(write_job(a, json.loads(json.dumps(small_job))))])
    small_job["spec"]["model"] = {
        "architecture": "efficientnet_lite0",
        "weightsUri": f"file://{path}",
        "numClasses": 10,
    }
    run([PY, "-m", "trainer", "run", str(write_job(b, small_job))])
    digest = lambda d: json.loads((d / "store/t" / stage_prefix(0, "head") / FINAL).read_text())["metrics"]  # noqa: E731
    assert digest(a)["weights_sha256"] == digest(b)["weights_sha256"]

    small_job["spec"]["model"]["architecture"] = "resnet18"  # the wrong architecture: nothing trains
    small_job["spec"].pop("checkpoint")  # write_job set b's store
    c = tmp_path / "c"
    c.mkdir()
    proc = subprocess.run(
        [PY, "-m", "trainer", "run", str(write_job(c, small_job))], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: spec.model.weightsUri: file://{path} does not fit resnet18: keys ")
    assert not (c / "store/t" / stage_prefix(0, "head")).exists()
