"""A real Prometheus (Debian package `prometheus`) scraping loopback targets every second."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed.net import free_port, get_json, http_get, stop_group, wait_until


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise RuntimeError("prometheus not found: apt-get install prometheus (make install does)")
    return found


@dataclass
class Prometheus:
    root: Path
    targets: dict[str, list[str]]  # scrape job name -> ["127.0.0.1:port", ...]
    rule_files: list[Path] = field(default_factory=list)
    extra_scrape_configs: list[dict] = field(default_factory=list)  # e.g. kubernetes_sd for pods
    port: int | None = None
    scrape_interval: str = "1s"
    proc: subprocess.Popen | None = None

    def __post_init__(self):
        self.port = self.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": name, "static_configs": [{"targets": t}]} for name, t in self.targets.items()
            ]
            + self.extra_scrape_configs,
        }
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        cmd = [
            prometheus_binary(),
            f"--config.file={self.root / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        log = open(self.root / "prometheus.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(lambda: http_get(self.url + "/-/ready", timeout=1)[0] == 200, 60, "Prometheus")
        return self

    def query(self, expr: str) -> list[dict]:
        out = get_json(self.url + "/api/v1/query", query=expr)
        assert out["status"] == "success", out
        return out["data"]["result"]

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None
