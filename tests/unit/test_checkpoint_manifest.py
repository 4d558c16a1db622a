"""Checkpoints are trusted only when their manifest verifies."""

from __future__ import annotations

import pytest
import torch

from thaw_contract.spec import CheckpointSpec, SpecError
from trainer import checkpoint as ckpt
from trainer.storage import LocalStore, open_store


def _save(store, epoch):
    prefix = ckpt.epoch_prefix(0, "head", epoch)
    blobs = ckpt.encode({"model.pt": {"w": torch.full((3,), float(epoch))}})
    manifest = ckpt.commit(store, prefix, blobs, {"epoch": epoch, "architecture": "resnet18"})
    return prefix, manifest


def test_manifest_lists_sizes_and_checksums_and_verifies(tmp_path):
    store = LocalStore(tmp_path)
    prefix, manifest = _save(store, 0)
    assert set(manifest["files"]) == {"model.pt"}
    assert manifest["files"]["model.pt"]["size"] == len(store.get(f"{prefix}/model.pt"))
    assert ckpt.verify(store, prefix)["epoch"] == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_object", "delete_manifest", "garbage_manifest"])
def test_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    store = LocalStore(tmp_path)
    prefix, _ = _save(store, 0)
    obj = tmp_path / prefix / "model.pt"
    if damage == "truncate":
        obj.write_bytes(obj.read_bytes()[:-1])
    elif damage == "flip":
        data = bytearray(obj.read_bytes())
        data[-1] ^= 1
        obj.write_bytes(bytes(data))
    elif damage == "delete_object":
        obj.unlink()
    elif damage == "delete_manifest":
        (tmp_path / prefix / "manifest.json").unlink()
    else:
        (tmp_path / prefix / "manifest.json").write_text("{not json")
    assert ckpt.verify(store, prefix) is None
    assert prefix in caplog.text


def test_final_pointer_names_a_verified_checkpoint(tmp_path):
    store = LocalStore(tmp_path)
    assert ckpt.read_final(store, 0, "head") is None
    prefix, manifest = _save(store, 2)
    ckpt.mark_final(store, 0, "head", prefix, manifest, {"test_accuracy": 0.5})
    found_prefix, found = ckpt.read_final(store, 0, "head")
    assert found_prefix == prefix and found["epoch"] == 2
    torch.testing.assert_close(ckpt.load_object(store, prefix, "model.pt")["w"], torch.full((3,), 2.0))
    (tmp_path / prefix / "model.pt").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match="does not verify"):
        ckpt.read_final(store, 0, "head")


def test_a_final_checkpoint_replaced_after_it_committed_is_refused_by_its_recorded_digest(tmp_path):
    """Whoever can write to the store can swap in another checkpoint that verifies on its own
    (objects and a manifest that match each other); the digest rank 0 reported does not follow."""
    store = LocalStore(tmp_path)
    prefix, manifest = _save(store, 2)
    recorded = ckpt.mark_final(store, 0, "head", prefix, manifest, {})["manifestSha256"]
    assert ckpt.read_final(store, 0, "head", recorded)[0] == prefix
    other, other_manifest = _save(store, 3)  # a valid checkpoint of its own
    ckpt.mark_final(store, 0, "head", other, other_manifest, {})
    with pytest.raises(SpecError) as err:
        ckpt.read_final(store, 0, "head", recorded)
    line = str(err.value)
    assert line.startswith(f"stage 0 (head)'s final checkpoint {store.uri}/{other} has manifest sha256 ")
    assert f"not {recorded} as its pods reported when it committed" in line and "\n" not in line
    assert ckpt.read_final(store, 0, "head")[0] == other  # no digest recorded (a local run): not checked


def test_prune_keeps_the_last_n_and_the_best(tmp_path):
    store = LocalStore(tmp_path)
    prefixes = [_save(store, e)[0] for e in range(5)]
    ckpt.prune(store, 0, "head", keep_last=2, keep={prefixes[1]})
    left = sorted({k.split("/")[1] for k in store.list("stage-00-head")})
    assert left == ["epoch-0001", "epoch-0003", "epoch-0004"]


def test_interrupted_write_leaves_no_visible_object(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".tmp-123").write_bytes(b"half")
    assert store.list("a") == []


def test_unwritable_checkpoint_uri_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpecError, match=r"spec.checkpoint.uri: cannot create .*file/job"):
        open_store(CheckpointSpec(uri=f"file://{blocker}"), "job")


class _RunsCode:
    """A pickle that calls a function when loaded: what a writer of the checkpoint prefix could plant."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/thaw-pwned",))


def test_a_checkpoint_that_would_run_code_is_refused_with_one_line(tmp_path):
    import pickle

    store = LocalStore(tmp_path)
    prefix = ckpt.epoch_prefix(0, "head", 0)
    ckpt.commit(store, prefix, {"train_state.pt": pickle.dumps({"epoch": 0, "x": _RunsCode()})}, {"epoch": 0})
    marker = __import__("pathlib").Path("/tmp/thaw-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(SpecError) as err:
        ckpt.load_object(store, prefix, "train_state.pt")
    assert not marker.exists(), "the pickle ran code"
    msg = str(err.value)
    assert msg.startswith(f"spec.checkpoint.uri: {store.uri}/{prefix}/train_state.pt: refused to load")
    assert "\n" not in msg


def test_what_the_trainer_saves_loads_under_weights_only(tmp_path):
    """The train state holds the RNG states of python, numpy and torch: plain containers, no numpy pickles."""
    import random

    import numpy as np

    from trainer.train_state import rng_state, set_rng_state

    store = LocalStore(tmp_path)
    prefix = ckpt.epoch_prefix(0, "head", 0)
    state = {"epoch": 3, "rng": [rng_state()], "history": [{"loss": 0.5}], "best_dir": None}
    ckpt.commit(store, prefix, ckpt.encode({"train_state.pt": state}), {"epoch": 3})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = ckpt.load_object(store, prefix, "train_state.pt")
    set_rng_state(loaded["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
