"""The fine-tuned model as an artifact a user can serve: `<checkpoint uri>/<job>/model/`.

`python -m trainer export JOB.yaml` writes it from the job's committed checkpoints: the weights
the last finished stage passed on (a rolled-back or stopping stage passes on its input's), as
`model.safetensors`, beside `config.json`, which says what a user needs to run it: the
architecture, the class names in output order, the input size and normalization, the
checkpoint it came from with its manifest digest, the training spec's digest and each stage's
metrics. spec.export adds model.onnx and model.torchscript.pt (trainer/exports.py), each checked
on the test split first. `python -m trainer predict MODEL_URI IMAGES...` runs it on image files.

The artifact is read back with the architecture's own code (trainer.models.build_model with no
pretrained weights, then a strict load_state_dict): nothing in it is code, nothing pickled.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from thaw_contract.spec import FineTuneJob, ModelSpec, SpecError

FORMAT = "thaw-model/1"
FOLDER = "model"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def class_names(job: FineTuneJob) -> list[str]:
    """The source's classes in label order (what the model's outputs mean), read without images."""
    from trainer.data import FASHION_MNIST_CLASSES
    from trainer.shards import is_shard_source, open_manifest

    data = job.spec.data
    if data.source == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    if data.source == "digits":
        return [str(i) for i in range(10)]
    if is_shard_source(data.source, data.endpoint):
        return list(open_manifest(data.source, data.endpoint).classes)
    if data.source.startswith("s3://"):
        from trainer.storage import s3_client, split_s3_uri

        bucket, prefix = split_s3_uri(data.source)
        pages = s3_client(data.endpoint).get_paginator("list_objects_v2")
        found = []
        for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/train/" if prefix else "train/", Delimiter="/"):
            found += [p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in page.get("CommonPrefixes", [])]
        return sorted(found)
    from torchvision.datasets.folder import find_classes

    from trainer.data import _folder_dirs

    return find_classes(str(_folder_dirs(data.source)[0]))[0]


def final_weights(job: FineTuneJob):
    """(store, planned stages, the last finished one, its checkpoint prefix, manifest, pointer);
    a SpecError naming the job when no stage has finished."""
    from trainer import checkpoint as ckpt
    from trainer.setup import plan_job
    from trainer.storage import open_store

    _, _, _, stages = plan_job(job)
    store = open_store(job.spec.checkpoint, job.metadata.name, write=False)
    for stage in reversed(stages):
        pointer = ckpt.read_pointer(store, stage.index, stage.name)
        if pointer is None:
            continue
        prefix, manifest = ckpt.read_final(store, stage.index, stage.name)
        return store, stages, stage, prefix, manifest, pointer
    raise SpecError(f"export: job {job.metadata.name!r} has no finished stage in {store.uri}")


def export(job: FineTuneJob) -> str:
    """Write the artifact from the committed checkpoints; returns its URI."""
    from trainer.report import stage_summaries

    store, stages, stage, prefix, manifest, pointer = final_weights(job)
    summaries = stage_summaries(store, stages)
    test = None
    if set(job.spec.export) - {"safetensors"}:  # the formats are checked on the test split
        from trainer.data import build_datasets

        test = build_datasets(job.spec.data, job.spec.model.num_classes, job.spec.seed).test
    return write(job, store, stage, prefix, manifest, pointer["manifestSha256"], summaries, test)["uri"]


def test_batches(images, batch: int = 64):
    """The test split's uint8 images at the model's input size, batch by batch (labels dropped), on
    the CPU where the artifact is built (a split held on the GPU, trainer/resident.py, is copied)."""
    from torch.utils.data import DataLoader

    return lambda: (x.cpu() for x, _ in DataLoader(images, batch_size=batch, shuffle=False))


def write(
    job: FineTuneJob, store, stage, prefix: str, manifest: dict, digest: str, summaries: list[dict], test=None
) -> dict:
    """The artifact of the weights in checkpoint `prefix` (stage `stage`'s final one, manifest
    digest `digest`), written: what status shows of it ({"uri", "sha256"}). Rank 0 builds and puts
    it before it marks the job's last stage final; `export` after the fact."""
    return put(store, *build(job, store, stage, prefix, manifest, digest, summaries, test))


def build(
    job: FineTuneJob, store, stage, prefix: str, manifest: dict, digest: str, summaries: list[dict], test=None
) -> tuple[dict[str, bytes], dict]:
    """(files, config.json) of the artifact; reads only the checkpoint. `test` (the test split's
    images) checks the formats spec.export asks for beside safetensors."""
    from safetensors.torch import save

    from trainer import checkpoint as ckpt
    from trainer import exports
    from trainer.models import build_model

    state = ckpt.load_object(store, prefix, "model.pt")
    built = build_model(_architecture_only(job.spec.model))
    built.model.load_state_dict(state, strict=True)  # the architecture's own code takes every key
    weights = save({k: v.detach().contiguous() for k, v in built.model.state_dict().items()})
    size, arch = job.spec.data.image_size, job.spec.model.architecture
    files, made = {WEIGHTS: weights}, {}
    wrapped = exports.Pixels(built.model, built.mean, built.std)
    for fmt in (f for f in job.spec.export if f != "safetensors"):
        data, check = exports.export(fmt, wrapped, size, test_batches(test), arch)
        files[exports.FILES[fmt]] = data
        made[fmt] = {"file": exports.FILES[fmt], "sha256": _sha256(data), "check": check}
    config = {
        "format": FORMAT,
        "architecture": job.spec.model.architecture,
        "numClasses": job.spec.model.num_classes,
        "classes": class_names(job),
        "input": {
            "size": job.spec.data.image_size,
            "channels": "RGB",
            "scale": "pixels / 255, then (x - mean) / std per channel",
            "mean": list(built.mean),
            "std": list(built.std),
        },
        "job": job.metadata.name,
        "specHash": manifest.get("specHash"),
        "from": {
            "stage": stage.index,
            "name": stage.name,
            "checkpoint": f"{store.uri}/{prefix}",
            "manifestSha256": digest,
        },
        "stages": summaries,
        "weightsSha256": _sha256(weights),
    }
    if made:  # the serving formats take uint8 pixels, the normalization inside the graph
        config["exports"] = {
            "input": {"name": exports.INPUT, "dtype": "uint8", "shape": ["N", 3, size, size], "channels": "RGB"},
            "output": {"name": exports.OUTPUT, "shape": ["N", job.spec.model.num_classes]},
            **made,
        }
    if len(config["classes"]) != config["numClasses"]:
        raise SpecError(
            f"export: the source has {len(config['classes'])} classes, the model {config['numClasses']} outputs"
        )
    return files, config


def put(store, files: dict[str, bytes], config: dict) -> dict:
    """The artifact into the store; config.json last: a config means every file it names is whole."""
    for name, data in files.items():
        store.put(f"{FOLDER}/{name}", data)
    store.put(f"{FOLDER}/{CONFIG}", json.dumps(config, indent=2).encode())
    return {"uri": f"{store.uri}/{FOLDER}", "sha256": config["weightsSha256"]}


def _architecture_only(spec: ModelSpec) -> ModelSpec:
    return ModelSpec(architecture=spec.architecture, num_classes=spec.num_classes, weights=None)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@dataclass
class Model:
    model: torch.nn.Module
    config: dict
    mean: torch.Tensor
    std: torch.Tensor


def _read(uri: str, name: str) -> bytes:
    from trainer.weights import read_bytes

    try:
        return read_bytes(f"{uri.rstrip('/')}/{name}")
    except SpecError as err:
        raise SpecError(f"predict: {uri} is not a Thaw model: {str(err).split(': ', 1)[-1]}") from None


def load(uri: str) -> Model:
    """The artifact at uri (file:// or s3://), checked: a one-line SpecError for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    from trainer.models import build_model

    raw = _read(uri, CONFIG)
    try:
        config = json.loads(raw)
    except ValueError:
        raise SpecError(f"predict: {uri}/{CONFIG} is not JSON") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise SpecError(f"predict: {uri} is not a Thaw model ({CONFIG} has no format {FORMAT!r})")
    data = _read(uri, WEIGHTS)
    if _sha256(data) != config.get("weightsSha256"):
        raise SpecError(f"predict: {uri}/{WEIGHTS} does not match the digest in {CONFIG} (replaced or truncated)")
    try:
        state = load_tensors(data)
    except SafetensorError as err:
        raise SpecError(f"predict: {uri}/{WEIGHTS} is not a readable safetensors file ({err})") from None
    spec = ModelSpec(architecture=config["architecture"], num_classes=config["numClasses"], weights=None)
    model = build_model(spec).model
    model.load_state_dict(state, strict=True)
    model.eval()
    shape = (1, 3, 1, 1)
    mean = torch.tensor(config["input"]["mean"]).view(shape)
    std = torch.tensor(config["input"]["std"]).view(shape)
    return Model(model, config, mean, std)


def logits(m: Model, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) uint8 at the model's input size -> (N, classes) logits."""
    with torch.no_grad():
        return m.model((images.float() / 255 - m.mean) / m.std)


def image_files(inputs: list[str], endpoint: str | None = None) -> list:
    """Files named, every file under the folders named (sorted), and every object under the
    s3:// prefixes named (as (uri, reader) pairs, read when their batch comes)."""
    out: list = []
    for item in inputs:
        if item.startswith("s3://"):
            out += _objects(item, endpoint)
            continue
        p = Path(item.removeprefix("file://"))
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise SpecError(f"predict: {item}: no such file or folder")
    return out


def _objects(uri: str, endpoint: str | None) -> list:
    from trainer.storage import s3_client, s3_error, split_s3_uri

    client = s3_client(endpoint)
    bucket, prefix = split_s3_uri(uri)
    keys = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
    except Exception as err:  # noqa: BLE001 - botocore's errors, made one line
        raise SpecError(f"predict: {s3_error(err, uri, bucket, 'list')}") from None
    if not keys:
        raise SpecError(f"predict: {uri}: no objects under this prefix")

    def reader(key: str):
        def read() -> io.BytesIO:
            try:
                return io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            except Exception as err:  # noqa: BLE001 - a store problem is no bad image: one line, stop
                raise SpecError(f"predict: {s3_error(err, f's3://{bucket}/{key}', bucket, 'read')}") from None

        return read

    return [(f"s3://{bucket}/{k}", reader(k)) for k in sorted(keys)]


def predict(
    uri: str,
    inputs: list[str],
    top_k: int = 3,
    batch: int = 64,
    endpoint=None,
    out=sys.stdout,
    err=sys.stderr,
    output: str | None = None,
) -> int:
    """One JSON line per image that decodes ({"image", "top": [[class, probability], ...]}) on
    `out`, or into the file `output` (CSV when it ends in .csv: image, class_1, p_1, ...); the ones
    that do not decode are skipped and listed on `err`. Returns how many were skipped."""
    m = load(uri)
    files = image_files(inputs, endpoint)
    if output is None:
        return _predict(m, files, top_k, batch, out, err)
    with open(output, "w", newline="") as f:  # a bar on the terminal while the answers go to a file
        return _predict(m, files, top_k, batch, f, err, as_csv=output.endswith(".csv"), bar=err.isatty())


def _predict(m: Model, files: list, top_k: int, batch: int, out, err, as_csv=False, bar=False) -> int:
    import csv

    from tqdm import tqdm

    from trainer.data import decode_file

    size, classes = m.config["input"]["size"], m.config["classes"]
    k = min(top_k, len(classes))
    writer = csv.writer(out) if as_csv else None
    if writer is not None:
        writer.writerow(["image", *(f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "p"))])
    skipped = 0
    progress = tqdm(total=len(files), unit="img", file=err, disable=not bar)
    for start in range(0, len(files), batch):
        names, decoded = [], []
        for f in files[start : start + batch]:
            name, source = f if isinstance(f, tuple) else (f, None)
            data = source() if source else f
            try:
                decoded.append(decode_file(data, size))
                names.append(name)
            except Exception as e:  # noqa: BLE001 - PIL's errors for files that are no image
                skipped += 1
                print(f"skipped: {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=err)
        progress.update(len(files[start : start + batch]))
        if not decoded:
            continue
        probs = torch.softmax(logits(m, torch.stack(decoded)), dim=1)
        top = probs.topk(k, dim=1)
        for name, p, i in zip(names, top.values.tolist(), top.indices.tolist()):
            pairs = [[classes[c], round(v, 6)] for c, v in zip(i, p)]
            if writer is not None:
                writer.writerow([str(name), *(x for pair in pairs for x in pair)])
            else:
                out.write(json.dumps({"image": str(name), "top": pairs}) + "\n")
    progress.close()
    return skipped
