from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.builders import job_doc

ROOT = Path(__file__).resolve().parents[2]


def write_job(tmp_path: Path, doc: dict, name: str = "job.yaml") -> Path:
    doc["spec"].setdefault("checkpoint", {"uri": f"file://{tmp_path}/store"})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def run(cmd: list[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "torchrun"
    return run([str(exe), "--standalone", f"--nproc_per_node={nproc}", *args], timeout=timeout)


@pytest.fixture
def small_job():
    """Digits at 32 px, bundled EfficientNet-Lite0: two short stages, a few seconds each."""
    return job_doc(
        data={
            "source": "digits",
            "imageSize": 32,
            "trainPerClass": 20,
            "valPerClass": 5,
            "testLimit": 200,
            "batchSize": 24,
        },
        seed=7,
    )


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One SeaweedFS per session, fresh data dir; tests that stop it start it again."""
    from testbed.seaweedfs import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), buckets=("thaw", "data")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """Admin credentials and the endpoint in this process' environment (boto3's standard chain)."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    return seaweed.env()
