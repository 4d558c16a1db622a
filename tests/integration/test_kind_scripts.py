"""The kind scripts' bad paths, without a cluster: no Docker engine and no root to start one."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [["hack/kind.sh", "up"], ["hack/images.sh"], ["hack/docker.sh", "up"]])
def test_without_docker_and_without_root_the_scripts_say_what_is_missing(command):
    if os.geteuid() != 0:
        pytest.fail("needs root to drop to another user (the suite runs as root, like the cluster tests)")
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed to run as another user")
    tmp_path = Path(tempfile.mkdtemp(prefix="thaw-nodocker-"))  # pytest's own tmp is root-only
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "THAW_DOCKER_DIR": str(tmp_path / "docker"),  # no private engine of ours there
        "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",  # and none the caller points at
    }
    tmp_path.chmod(0o777)
    try:
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert out.returncode != 0
    said = out.stderr
    assert "Docker engine" in said or "dockerd" in said, said
    assert "root" in said or "DOCKER_HOST" in said, said  # what to do about it


def test_kind_down_with_nothing_to_delete_says_so_and_succeeds(tmp_path):
    """`make kind-down` after a failed or never-run `kind-up`: nothing to delete is not an error.
    A cluster name nobody uses, so a Docker engine that does answer here loses nothing."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "THAW_DOCKER_DIR": str(tmp_path / "docker"),
        "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",
        "KIND_CLUSTER": "thaw-never-created",
    }
    out = subprocess.run(["hack/kind.sh", "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    said = out.stderr
    assert "no Docker engine is running: no kind cluster to delete" in said or "thaw-never-created deleted" in said
