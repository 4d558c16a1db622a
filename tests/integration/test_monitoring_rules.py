"""The chart's alerts: promtool checks the rendered rules, and a promtool unit test per alert
shows each fires when it should and not before."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from testbed.control_plane import bin_dir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def rendered_rules(tmp_path: Path) -> Path:
    out = subprocess.run(
        [
            str(bin_dir() / "helm"),
            "template",
            "t",
            str(ROOT / "charts" / "thaw"),
            "--kube-version",
            "1.34.0",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(out)["spec"]))
    return rules


def test_rules_are_valid(tmp_path):
    out = subprocess.run(["promtool", "check", "rules", str(rendered_rules(tmp_path))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


def test_every_alert_has_a_unit_test_that_passes(tmp_path):
    rendered_rules(tmp_path)
    tests = ROOT / "tests" / "monitoring" / "alerts_test.yaml"
    shutil.copy(tests, tmp_path / tests.name)
    alerts = {r["alert"] for g in yaml.safe_load((tmp_path / "rules.yaml").read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(tests.read_text())["tests"] for t in case["alert_rule_test"]}
    assert alerts == tested
    out = subprocess.run(["promtool", "test", "rules", tests.name], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
