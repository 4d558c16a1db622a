"""The spec imports no torch (the operator image has none); the operator package never
shadows the standard library's `operator`."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_spec_and_plan_import_without_torch():
    out = _run(
        "import sys, trainer.spec, trainer.catalog, trainer.plan, trainer.checkpoint, trainer.storage, "
        "thaw_operator.planner, thaw_operator.crd; print('torch' in sys.modules)"
    )
    assert out == "False"


def test_operator_package_does_not_shadow_stdlib():
    out = _run(
        "import operator, thaw_operator; "
        "print(operator.__file__.endswith('operator.py'), hasattr(operator, 'itemgetter'))"
    )
    assert out == "True True"


def test_the_operator_cannot_reach_the_object_store():
    """It holds no storage credentials and verifies nothing itself: no storage code, no boto3."""
    out = _run(
        "import sys, thaw_operator.controller, thaw_operator.__main__; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'boto3', 'botocore') "
        "or m in ('trainer.storage', 'trainer.checkpoint', 'trainer.datasync', 'trainer.uploader')))"
    )
    assert out == "[]"
