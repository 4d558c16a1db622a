"""Two gloo processes under torchrun keep bit-identical replicas of a partially frozen model."""

from __future__ import annotations

import json

import pytest
import torch

from tests.builders import with_path
from tests.integration.conftest import torchrun, write_job
from thaw_contract.spec import load_job
from trainer.checkpoint import load_object, read_final
from trainer.models import build_model
from trainer.storage import open_store

pytestmark = pytest.mark.integration


def test_replicas_stay_identical_and_frozen_weights_untouched(tmp_path, small_job):
    doc = with_path(small_job, "spec.stages.0.epochs", 2)
    doc = with_path(doc, "spec.stages.1.epochs", 2)
    # augmentation turns the feature cache off: the head stage then runs the full model under DDP
    doc["spec"]["data"]["augmentation"] = {"hflip": True, "cropPadding": 2}
    path = write_job(tmp_path, doc)
    torchrun(2, "tests/integration/ddp_worker.py", str(path), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digests"] == ranks[1]["digests"], "replicas diverged"
    assert ranks[0]["feature_cache"] == [False, False]
    assert len(set(ranks[0]["digests"])) == 2, "the second stage changed the weights"

    job = load_job(path)
    pretrained = build_model(job.spec.model).model.state_dict()
    store = open_store(job.spec.checkpoint, job.metadata.name)
    after0 = load_object(store, read_final(store, 0, "head")[0], "model.pt")
    after1 = load_object(store, read_final(store, 1, "top3")[0], "model.pt")
    below_head = [k for k in pretrained if not k.startswith("classifier")]
    assert all(torch.equal(pretrained[k], after0[k]) for k in below_head), "head stage moved frozen weights or BN stats"
    frozen_in_1 = [k for k in below_head if not k.startswith(("net._conv_head", "net._bn1", "net._blocks.15"))]
    assert all(torch.equal(pretrained[k], after1[k]) for k in frozen_in_1)
    assert not torch.equal(pretrained["net._conv_head.weight"], after1["net._conv_head.weight"])


def test_feature_cache_under_ddp_matches_across_ranks(tmp_path, small_job):
    path = write_job(tmp_path, small_job)
    torchrun(2, "tests/integration/ddp_worker.py", str(path), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["feature_cache"] == [True, False]
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert ranks[0]["test_accuracy"] == ranks[1]["test_accuracy"]
