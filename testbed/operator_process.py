"""The operator as its own process (`python -m thaw_operator`), as it runs in its Deployment:
tests kill and restart it, benchmarks run a base commit's tree beside this one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testbed.net import free_port, http_get, wait_until

ROOT = Path(__file__).resolve().parents[1]


class OperatorProcess:
    """`python -m thaw_operator` as a separate process, as it runs in its Deployment."""

    def __init__(self, kubeconfig, log_path, extra=(), standalone=True, root=ROOT):
        """root: the source tree to run (benchmarks run a base commit's worktree beside this one)."""
        self.kubeconfig, self.log_path, self.root = kubeconfig, log_path, Path(root)
        self.extra = (["--standalone"] if standalone else []) + list(extra)
        self.metrics_port = self.health_port = None
        self.proc = None

    def start(self):
        # Fresh ports on every start: a restarted operator's old port may meanwhile be some
        # connection's source port (its bind then fails with EADDRINUSE).
        self.metrics_port, self.health_port = free_port(), free_port()
        cmd = [
            sys.executable,
            "-m",
            "thaw_operator",
            "--log-format",
            "plain",
            f"--metrics-port={self.metrics_port}",
            f"--health-port={self.health_port}",
            "--resync-seconds=5",
            "--trainer-image=thaw-trainer:test",
            *self.extra,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        if self.root != ROOT:  # its packages before the editable install of this tree
            env["PYTHONPATH"] = os.pathsep.join([str(self.root / "operator"), str(self.root)])
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_until(self._healthy, 60, "operator")
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            tail = Path(self.log_path).read_text(errors="replace").strip().splitlines()[-3:]
            raise AssertionError(f"operator exited {self.proc.returncode} while starting: {' | '.join(tail)}")
        return http_get(f"http://127.0.0.1:{self.health_port}/healthz", 1)[0] == 200

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
