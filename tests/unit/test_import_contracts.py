"""The layers: the contract (thaw_contract) imports no torch (the operator image has none) and
neither side; the operator never reaches the object store; the operator package never shadows
the standard library's `operator`. import-linter checks every import statement (pyproject.toml);
the subprocesses here check what importing really loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_import_linter_contracts_are_kept():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_the_contract_imports_without_torch():
    out = _run(
        "import sys, thaw_contract.spec, thaw_contract.catalog, thaw_contract.plan, thaw_contract.layer_table, "
        "trainer.checkpoint, trainer.storage, thaw_operator.planner, thaw_operator.crd; print('torch' in sys.modules)"
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
