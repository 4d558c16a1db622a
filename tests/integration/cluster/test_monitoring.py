"""Every PromQL expression of the dashboard and the alerts, evaluated against a real Prometheus
that scraped a real 2-process training run and the operator driving a FineTuneJob, returns data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from testbed.control_plane import DELAY, EXIT_CODE
from testbed.net import free_ports, stop_group, wait_until
from testbed.prometheus import Prometheus
from tests.integration.cluster.conftest import ROOT
from tests.integration.cluster.test_operator import Api, ftj_doc, reported
from tests.integration.test_monitoring_rules import rendered_rules

pytestmark = pytest.mark.cluster
DASHBOARD = ROOT / "charts" / "thaw" / "files" / "dashboard.json"
CUDA_ONLY = ("thaw_gpu_memory_",)  # exported only by ranks on a CUDA device
SELECTOR = re.compile(r"\b((?:thaw_[a-z_]+|up)(?:\{[^}]*\})?)")


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    # Grafana evaluates annotation queries across the dashboard's time range, step by step; one
    # instant query stands in for that only if its window covers the whole run (not the last 2 min).
    exprs += [a["expr"].replace("[2m:]", "[30m:]") for a in dash["annotations"]["list"] if a.get("expr")]
    # Grafana's macros, as Grafana would substitute them for "All" and a 1 s scrape interval.
    return [e.replace("$finetunejob", ".*").replace("$__rate_interval", "1m") for e in exprs]


def test_dashboard_and_alert_queries_return_data(api, namespace, operator, tmp_path):
    trainer_port = free_ports(1, offset=1)[0]
    prom = Prometheus(
        tmp_path / "prom",
        {
            "thaw-trainer": [f"127.0.0.1:{trainer_port}", f"127.0.0.1:{trainer_port + 1}"],
            "t-thaw-metrics": [f"127.0.0.1:{operator.metrics_port}"],  # the alerts' operator job for release "t"
        },
    ).start()
    try:
        # The operator drives a FineTuneJob (kwok) ...
        k = Api(api, namespace)
        annotations = {EXIT_CODE: "0", DELAY: "200ms", **reported({0: 0.5, 1: 0.6})}
        k.create(ftj_doc("watched", f"file://{tmp_path}/store", stages=2, podAnnotations=annotations))
        k.phase("watched", "Succeeded", 60)
        # ... while a real training run serves its metrics, lingering after it ends.
        from tests.builders import job_doc

        job = job_doc(
            data={
                "source": "digits",
                "imageSize": 32,
                "trainPerClass": 20,
                "valPerClass": 5,
                "testLimit": 100,
                "batchSize": 24,
            },
            checkpoint={"uri": f"file://{tmp_path}/train-store"},
            metrics={"port": trainer_port, "lingerSeconds": 120},
        )
        job["metadata"]["name"] = "mon"
        job["spec"]["stages"][1]["epochs"] = 4
        path = tmp_path / "mon.yaml"
        path.write_text(yaml.safe_dump(job))

        def train_stage(index: int, done: str) -> subprocess.Popen:
            """One process group per stage, as the operator runs them; it lingers, serving its final
            values, until Prometheus has scraped `done` (a head stage on cached features ends in about
            a second: without this wait the scrape could miss stage 0 on a loaded machine)."""
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
                + ["-m", "trainer", "run", str(path), "--stage", str(index)],
                cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # SIGTERM to torchrun: it stops its workers (their own sessions)
            )

            def scraped():
                if proc.poll() is not None:
                    raise AssertionError(f"stage {index} exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
                return prom.query(done)

            try:
                wait_until(scraped, 300, f"Prometheus to scrape the end of stage {index}", 1)
            except BaseException:
                stop_group(proc)
                raise
            return proc

        # Stage 0 is 1 of the 5 epochs: its end is progress 0.2 while the stage index is still 0.
        first = train_stage(
            0,
            'thaw_job_progress_ratio{finetunejob="mon"} == 0.2 '
            'and on (finetunejob) thaw_job_stage_index{finetunejob="mon"} == 0',
        )
        stop_group(first)
        proc = train_stage(1, 'thaw_job_progress_ratio{finetunejob="mon"} == 1')
        try:
            time.sleep(3)  # a few more scrapes of the final values

            empty = []
            for expr in dashboard_queries():
                if any(c in expr for c in CUDA_ONLY):
                    continue
                if not prom.query(expr):
                    empty.append(expr)
            assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

            rules = yaml.safe_load(rendered_rules(tmp_path).read_text())
            for group in rules["groups"]:
                for rule in group["rules"]:
                    prom.query(rule["expr"])  # valid PromQL (raises on an error status)
                    for selector in SELECTOR.findall(rule["expr"]):
                        assert prom.query(f"count({selector})"), (rule["alert"], selector)
        finally:
            stop_group(proc)
    finally:
        prom.stop()
