"""The model artifact (trainer/artifact.py): exported from a real job's checkpoints, read back
with the architecture's own code, and run on image files by `predict`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torchvision.io import encode_png

from tests.builders import job_doc
from tests.integration.conftest import ROOT, run, write_job
from thaw_contract.spec import SpecError, load_job
from trainer import artifact
from trainer import checkpoint as ckpt
from trainer.models import build_model
from trainer.storage import open_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A two-stage digits job run to the end (its last stage publishes the model), then `trainer
    export` writes the same weights again: (job, artifact URI, folder)."""
    tmp = tmp_path_factory.mktemp("artifact")

    doc = job_doc(
        data={"source": "digits", "imageSize": 32, "trainPerClass": 20, "valPerClass": 5, "testLimit": 100},
        checkpoint={"uri": f"file://{tmp}/store"},
        metrics={"enabled": False},
        seed=7,
        export=["safetensors", "onnx", "torchscript"],
    )
    path = write_job(tmp, doc)
    trained = run([sys.executable, "-m", "trainer", "run", str(path)])
    published = next(line for line in trained.stdout.splitlines() if line.startswith("model: "))
    uri = published.removeprefix("model: ")
    sha = json.loads((tmp / "store" / "t" / "model" / "config.json").read_text())["weightsSha256"]
    store = open_store(load_job(path).spec.checkpoint, "t", write=False)
    assert ckpt.read_pointer(store, 1, "top3")["metrics"]["model"] == {"uri": uri, "sha256": sha}
    out = run([sys.executable, "-m", "trainer", "export", str(path)])  # again, from the checkpoints
    assert out.stdout.strip() == f"model: {uri}"
    assert json.loads((tmp / "store" / "t" / "model" / "config.json").read_text())["weightsSha256"] == sha
    return load_job(path), uri, tmp


def test_the_artifact_gives_the_last_checkpoints_logits_bit_for_bit(exported):
    job, uri, _ = exported
    assert uri == f"{job.spec.checkpoint.uri}/{job.metadata.name}/model"
    m = artifact.load(uri)
    store = open_store(job.spec.checkpoint, job.metadata.name, write=False)
    prefix, manifest = ckpt.read_final(store, 1, "top3")
    reference = build_model(job.spec.model).model
    reference.load_state_dict(ckpt.load_object(store, prefix, "model.pt"))
    reference.eval()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference((x.float() / 255 - m.mean) / m.std)
    assert torch.equal(artifact.logits(m, x), want)
    c = m.config
    assert c["classes"] == [str(i) for i in range(10)] and c["numClasses"] == 10
    assert c["input"]["size"] == 32 and c["input"]["channels"] == "RGB"
    assert c["from"]["checkpoint"].endswith(prefix) and c["from"]["name"] == "top3"
    assert c["from"]["manifestSha256"] == ckpt.read_pointer(store, 1, "top3")["manifestSha256"]
    assert c["specHash"] == manifest["specHash"] and [s["name"] for s in c["stages"]] == ["head", "top3"]


def test_the_onnx_and_torchscript_files_take_uint8_pixels_and_agree_with_the_artifact(exported):
    """spec.export's formats: the normalization inside, a dynamic batch, the test split's check in
    config.json, and the logits of the safetensors model on images they were not checked on."""
    import onnxruntime

    job, uri, tmp = exported
    folder = tmp / "store" / "t" / "model"
    m = artifact.load(uri)
    ex = m.config["exports"]
    assert ex["input"] == {"name": "pixels", "dtype": "uint8", "shape": ["N", 3, 32, 32], "channels": "RGB"}
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.torchscript.pt")):
        check = ex[fmt]["check"]
        assert ex[fmt]["file"] == name and (folder / name).stat().st_size > 1_000_000
        assert check["images"] == 100 and check["top1Agreement"] == 1.0 and check["maxLogitDiff"] < 1e-4, (fmt, check)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want = artifact.logits(m, x)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"pixels": x.numpy()})[0])
    assert got.shape == (3, 10) and torch.allclose(got, want, atol=1e-4)
    scripted = torch.jit.load(str(folder / "model.torchscript.pt"))
    assert torch.allclose(scripted(x), want, atol=1e-5)


def test_predict_names_the_top_classes_of_image_files_and_skips_what_does_not_decode(exported):
    from sklearn.datasets import load_digits

    _, uri, tmp = exported
    folder = tmp / "images"
    folder.mkdir(exist_ok=True)
    d = load_digits()
    for i in range(5):
        img = torch.from_numpy((d.images[i] * (255 / 16)).round().astype("uint8")).unsqueeze(0).expand(3, -1, -1)
        (folder / f"{i}.png").write_bytes(encode_png(img.contiguous()).numpy().tobytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = run([sys.executable, "-m", "trainer", "predict", uri, str(folder), "--top-k", "2"])
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == [f"{i}.png" for i in range(5)]
    assert all(len(r["top"]) == 2 and r["top"][0][1] >= r["top"][1][1] for r in rows)
    assert "skipped: " in out.stderr and "broken.png" in out.stderr
    # The same answers as the model in-process on the same decoded pixels.
    m = artifact.load(uri)
    from trainer.data import decode_file

    x = torch.stack([decode_file(folder / f"{i}.png", 32) for i in range(5)])
    top1 = artifact.logits(m, x).argmax(1).tolist()
    assert [r["top"][0][0] for r in rows] == [str(c) for c in top1]
    # The same answers as CSV in a file.
    run([sys.executable, "-m", "trainer", "predict", uri, str(folder), "--top-k", "2", "--output", f"{tmp}/p.csv"])
    import csv

    table = list(csv.reader((tmp / "p.csv").open()))
    assert table[0] == ["image", "class_1", "p_1", "class_2", "p_2"]
    assert [[r[0], r[1], float(r[2])] for r in table[1:]] == [[r["image"], *r["top"][0]] for r in rows]


def test_an_artifact_uri_that_is_not_a_thaw_model_is_one_line(exported, tmp_path):
    _, uri, _ = exported
    with pytest.raises(SpecError, match=r"^predict: file://.*/nothing is not a Thaw model: cannot read"):
        artifact.load(f"file://{tmp_path}/nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(SpecError, match=r"is not a Thaw model \(config.json has no format 'thaw-model/1'\)"):
        artifact.load(f"file://{tmp_path}/other")
    import shutil

    shutil.copytree(uri.removeprefix("file://"), tmp_path / "swapped")
    (tmp_path / "swapped" / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(SpecError, match=r"model.safetensors does not match the digest in config.json"):
        artifact.load(f"file://{tmp_path}/swapped")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "predict", f"file://{tmp_path}/other", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_predict_reads_an_s3_prefix_of_images_as_it_reads_a_folder(exported, s3_env, seaweed):
    _, uri, tmp = exported
    folder = tmp / "images"
    assert folder.is_dir(), "the folder test runs first and writes the images"
    client = seaweed.client()
    for f in sorted(folder.iterdir()):
        client.put_object(Bucket="data", Key=f"predict/{f.name}", Body=f.read_bytes())
    local = run([sys.executable, "-m", "trainer", "predict", uri, str(folder)], **s3_env)
    remote = run([sys.executable, "-m", "trainer", "predict", uri, "s3://data/predict"], **s3_env)
    strip = lambda out: [(json.loads(x)["image"].rsplit("/", 1)[-1], json.loads(x)["top"]) for x in out.splitlines()]  # noqa: E731
    assert strip(remote.stdout) == strip(local.stdout) and len(strip(local.stdout)) == 5
    assert "skipped: s3://data/predict/broken.png" in remote.stderr
    with pytest.raises(SpecError, match=r"^predict: s3://data/none: no objects under this prefix"):
        artifact.predict(uri, ["s3://data/none"])
