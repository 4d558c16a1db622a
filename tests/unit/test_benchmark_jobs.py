"""The benchmarks' jobs are valid specs before anything trains: a variant whose name is not a
DNS-1035 label, or whose fields contradict each other, fails here in a second instead of after
a ten-minute run's first stage."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from thaw_contract.spec import parse_job

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gradual_variants  # noqa: E402


@pytest.mark.parametrize("variant", sorted(gradual_variants.VARIANTS))
def test_every_gradual_variant_is_a_valid_job_at_every_budget(variant):
    for budget in (10, 100, 1000):
        job = parse_job(gradual_variants.job(budget, 0, variant, "file:///tmp/store"))
        assert job.metadata.name == f"{variant}-{budget}-0"
        assert job.spec.gradual is not None and job.spec.stages is None
