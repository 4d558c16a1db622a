"""Checkpoints as transactions: objects first, the manifest (sizes, sha256) last.

Layout in the job's store:
    stage-<k>-<name>/epoch-<e>/{model.pt, train_state.pt, manifest.json}
    stage-<k>-<name>/final.json      pointer to the stage's final (or best) epoch, written last
Nobody trusts a checkpoint whose manifest does not verify: readers skip it with a warning and
take the newest one that does. Deletion removes the manifest first, for the same reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from typing import Any

from thaw_contract.spec import SpecError
from thaw_contract.stage_result import INPUT_DIGEST_ENV
from trainer.storage import CheckpointError, Store, StoreError, delete_prefix

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FINAL = "final.json"
_EPOCH = re.compile(r"epoch-(\d{4,})$")


def stage_prefix(index: int, name: str) -> str:
    return f"stage-{index:02d}-{name}"


def epoch_prefix(index: int, name: str, epoch: int) -> str:
    return f"{stage_prefix(index, name)}/epoch-{epoch:04d}"


def to_bytes(obj: Any) -> bytes:
    import torch  # lazily: the operator verifies checkpoints without torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def encode(objects: dict[str, Any]) -> dict[str, bytes]:
    return {name: to_bytes(obj) for name, obj in objects.items()}


def commit(store: Store, prefix: str, blobs: dict[str, bytes], meta: dict) -> dict:
    """Write each object, then the manifest that commits them. Returns the manifest."""
    files = {}
    for name, data in blobs.items():
        store.put(f"{prefix}/{name}", data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**meta, "files": files, "time": time.time()}
    store.put(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return manifest


def verify(store: Store, prefix: str) -> dict | None:
    """The manifest if every object it names is present with its size and checksum."""
    try:
        manifest = json.loads(store.get(f"{prefix}/{MANIFEST}"))
        for name, info in manifest["files"].items():
            data = store.get(f"{prefix}/{name}")
            if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise CheckpointError(f"{name} does not match its manifest")
    except StoreError as err:
        if getattr(err, "transient", False):
            raise  # an unreachable store says nothing about the checkpoint
        log.warning("skipping checkpoint %s: %s", prefix, err)
        return None
    except (OSError, ValueError, KeyError, TypeError, CheckpointError) as err:
        log.warning("skipping checkpoint %s: %s", prefix, err)
        return None
    return manifest


def epoch_dirs(store: Store, index: int, name: str) -> list[str]:
    """Epoch folders of a stage that hold any object, oldest first (committed or not)."""
    base = stage_prefix(index, name)
    dirs = {"/".join(k.split("/")[:2]) for k in store.list(base) if k.count("/") >= 2}
    return sorted(d for d in dirs if _EPOCH.search(d))


def latest_valid(store: Store, index: int, name: str) -> tuple[str, dict] | None:
    """The newest epoch checkpoint of a stage that verifies; damaged ones are skipped with a warning."""
    for prefix in reversed(epoch_dirs(store, index, name)):
        manifest = verify(store, prefix)
        if manifest is not None:
            return prefix, manifest
    return None


def latest_manifest(store: Store, index: int, name: str) -> dict | None:
    """The newest epoch manifest of a stage, unverified: progress for status and followers (cheap:
    one listing and one small object), never a resume point."""
    for prefix in reversed(epoch_dirs(store, index, name)):
        try:
            return json.loads(store.get(f"{prefix}/{MANIFEST}"))
        except (FileNotFoundError, ValueError):
            continue
    return None


def load_object(store: Store, prefix: str, name: str) -> Any:
    """Tensors, containers and numbers only (torch's weights_only unpickler): whoever can write
    to the checkpoint prefix must not be able to run code in the pods that hold the store keys."""
    import pickle

    import torch

    data = store.get(f"{prefix}/{name}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError(
            f"spec.checkpoint.uri: {store.uri}/{prefix}/{name}: refused to load: it holds objects other than tensors, "
            f"containers and numbers ({first[:200]})"
        ) from None


def manifest_digest(manifest: dict) -> str:
    """A checkpoint's identity: the sha256 of its manifest (which holds every file's sha256)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def mark_final(store: Store, index: int, name: str, epoch_dir: str, manifest: dict, metrics: dict) -> dict:
    """Name the stage's final checkpoint; written only after that checkpoint verified."""
    digest = manifest_digest(manifest)
    pointer = {"checkpoint": epoch_dir, "epoch": manifest["epoch"], "manifestSha256": digest, "metrics": metrics}
    store.put(f"{stage_prefix(index, name)}/{FINAL}", json.dumps(pointer).encode())
    return pointer


def read_pointer(store: Store, index: int, name: str) -> dict | None:
    try:
        return json.loads(store.get(f"{stage_prefix(index, name)}/{FINAL}"))
    except FileNotFoundError:
        return None


def read_final(store: Store, index: int, name: str, recorded: str | None = None) -> tuple[str, dict] | None:
    """(checkpoint prefix, manifest) of a finished stage, or None if it has not finished.
    `recorded`: the manifest digest its rank 0 reported when it committed (the operator passes it
    to the next stage's pods): a checkpoint with another one was replaced in the store since, and
    is refused with one line (SpecError, exit 2: a retry would read the same objects)."""
    pointer = read_pointer(store, index, name)
    if pointer is None:
        return None
    manifest = verify(store, pointer["checkpoint"])
    if manifest is None:
        raise CheckpointError(f"stage {index} ({name}) is marked final but {pointer['checkpoint']} does not verify")
    if recorded and manifest_digest(manifest) != recorded:
        raise SpecError(
            f"stage {index} ({name})'s final checkpoint {store.uri}/{pointer['checkpoint']} has manifest sha256 "
            f"{manifest_digest(manifest)}, not {recorded} as its pods reported when it committed: it was replaced "
            "in the store since"
        )
    return pointer["checkpoint"], manifest


def recorded_input_digest() -> str | None:
    """The digest the operator recorded for the previous stage's final checkpoint (stage pods only)."""
    return os.environ.get(INPUT_DIGEST_ENV) or None


def prune(
    store: Store,
    index: int,
    name: str,
    keep_last: int,
    keep: set[str],
    upto: str | None = None,
    trusted: set[str] | None = None,
) -> list[str]:
    """Delete epoch checkpoints older than the newest `keep_last` valid ones, never one in `keep`.

    Only checkpoints that verify count towards keep_last, and nothing newer than `upto` (the one
    just committed) is touched: a failed or damaged newer checkpoint never causes a valid older
    one to be deleted. `trusted` holds prefixes already verified (the writer's own commits);
    others are verified once and added, so an epoch costs no re-download of kept checkpoints.
    Returns the deleted prefixes."""
    trusted = set() if trusted is None else trusted
    dirs = [d for d in epoch_dirs(store, index, name) if upto is None or d <= upto]
    valid = []
    for d in dirs:
        if d in trusted or verify(store, d) is not None:
            trusted.add(d)
            valid.append(d)
    if not valid:
        return []
    kept = valid[-keep_last:]
    doomed = [d for d in dirs if d < kept[0] and d not in keep]
    for d in doomed:
        delete_prefix(store, d, first=MANIFEST)
        trusted.discard(d)
    return doomed
