"""The reduced chaos set in `make test`: the undisturbed reference run, then one trial each of a
stage pod SIGKILLed, the operator SIGKILLed and restarted, and a damaged newest checkpoint, at
moments drawn from a seed printed here (replay: `python -m tests.chaos --replay FAULT:SEED`).
The full set with its trial counts is `make chaos` (docs/reliability.md)."""

from __future__ import annotations

import os
import time

import pytest

from tests import chaos

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
REDUCED = {"pod-kill": 1, "operator-kill": 1, "corrupt-checkpoint": 1}


def test_reduced_chaos_set(cluster, namespace, tmp_path):
    seed = int(os.environ.get("THAW_CHAOS_SEED", time.time_ns() % 100000))
    print(f"chaos master seed {seed}")
    bed = chaos.Bed(tmp_path / "chaos", cp=cluster, namespace=namespace).start()
    try:
        ref, outcomes = chaos.run_trials(bed, REDUCED, seed)
    finally:
        bed.stop()
    assert [o.fault for o in outcomes] == list(REDUCED)
    failed = [f"{o.fault} (replay --replay {o.fault}:{o.seed}): {o.detail}" for o in outcomes if not o.ok]
    assert not failed, failed
