"""Small builders for test fixtures: a valid FineTuneJob document, changed where a test says."""

from __future__ import annotations

import copy
from typing import Any


def job_doc(**spec_overrides: Any) -> dict:
    doc = {
        "apiVersion": "thaw.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": {
            "model": {"architecture": "efficientnet_lite0", "weights": "BUNDLED", "numClasses": 10},
            "data": {"source": "digits", "imageSize": 32, "valPerClass": 5, "batchSize": 32},
            "stages": [
                {"name": "head", "trainable": {"top": 1}, "epochs": 1, "lr": 0.05},
                {"name": "top3", "trainable": {"top": 3}, "epochs": 1, "lr": 0.01, "lrDecay": 2.6},
            ],
        },
    }
    doc["spec"].update(copy.deepcopy(spec_overrides))
    return doc


def with_path(doc: dict, path: str, value: Any) -> dict:
    """Set a dotted path (list indexes as numbers) in a copy; value DELETE removes the key."""
    doc = copy.deepcopy(doc)
    parts = path.split(".")
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if value == "DELETE":
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc
