"""Checkpoints as transactions: objects first, the manifest (sizes, sha256) last.

Layout in the job's store:
    stage-<k>-<name>/epoch-<e>/{model.pt, train_state.pt, manifest.json}
    stage-<k>-<name>/final.json      pointer to the stage's final (or best) epoch, written last
Nobody trusts a checkpoint whose manifest does not verify.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from typing import Any

import torch

from trainer.storage import LocalStore

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FINAL = "final.json"


class CheckpointError(RuntimeError):
    pass


def stage_prefix(index: int, name: str) -> str:
    return f"stage-{index:02d}-{name}"


def epoch_prefix(index: int, name: str, epoch: int) -> str:
    return f"{stage_prefix(index, name)}/epoch-{epoch:04d}"


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(store: LocalStore, prefix: str, objects: dict[str, Any], meta: dict) -> dict:
    """Write each object, then the manifest that commits them. Returns the manifest."""
    files = {}
    for name, obj in objects.items():
        data = to_bytes(obj)
        store.put(f"{prefix}/{name}", data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**meta, "files": files, "time": time.time()}
    store.put(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return manifest


def verify(store: LocalStore, prefix: str) -> dict | None:
    """The manifest if every object it names is present with its size and checksum."""
    try:
        manifest = json.loads(store.get(f"{prefix}/{MANIFEST}"))
        for name, info in manifest["files"].items():
            data = store.get(f"{prefix}/{name}")
            if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise CheckpointError(f"{name} does not match its manifest")
    except (OSError, ValueError, KeyError, CheckpointError) as err:
        log.warning("skipping checkpoint %s: %s", prefix, err)
        return None
    return manifest


def load_object(store: LocalStore, prefix: str, name: str) -> Any:
    return torch.load(io.BytesIO(store.get(f"{prefix}/{name}")), map_location="cpu", weights_only=False)


def mark_final(store: LocalStore, index: int, name: str, epoch_dir: str, manifest: dict) -> None:
    pointer = {"checkpoint": epoch_dir, "epoch": manifest["epoch"], "metrics": manifest.get("metrics", {})}
    store.put(f"{stage_prefix(index, name)}/{FINAL}", json.dumps(pointer).encode())


def read_final(store: LocalStore, index: int, name: str) -> tuple[str, dict] | None:
    """(checkpoint prefix, manifest) of a finished stage, or None if it has not finished."""
    key = f"{stage_prefix(index, name)}/{FINAL}"
    if not store.exists(key):
        return None
    pointer = json.loads(store.get(key))
    manifest = verify(store, pointer["checkpoint"])
    if manifest is None:
        raise CheckpointError(f"stage {index} ({name}) is marked final but {pointer['checkpoint']} does not verify")
    return pointer["checkpoint"], manifest


def prune(store: LocalStore, index: int, name: str, keep_last: int, keep: set[str]) -> None:
    """Delete epoch checkpoints beyond the newest `keep_last`, never one in `keep`."""
    base = stage_prefix(index, name)
    epochs = sorted({k.split("/")[1] for k in store.list(base) if k.count("/") >= 2})
    for e in epochs[:-keep_last]:
        if f"{base}/{e}" not in keep:
            store.delete_prefix(f"{base}/{e}")
