"""Run under torchrun by test_ddp_replicas: train a job, record what this rank ended with."""

from __future__ import annotations

import json
import sys

from thaw_contract.spec import load_job
from trainer.distributed import init_distributed, shutdown
from trainer.runner import run_job


def main(job_path: str, out_dir: str) -> None:
    env = init_distributed()
    results = run_job(load_job(job_path))
    record = {
        "rank": env.rank,
        "digests": [r.weights_sha256 for r in results],
        "feature_cache": [r.feature_cache for r in results],
        "test_accuracy": [r.test_accuracy for r in results],
    }
    with open(f"{out_dir}/rank{env.rank}.json", "w") as f:
        json.dump(record, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
