"""`make kind-demo`: the quickstart cluster job on the local kind cluster (`make kind-up`).

The same FineTuneJob as `make demo` (examples/quickstart-cluster.yaml), pointed at the
in-cluster SeaweedFS and free to run on any worker: each stage's two pods run on the two
workers and train in DDP over the pod network. Follows the job from its status, then prints
the per-stage table, read from the checkpoint store through a port-forward.

    python -m testbed.kind_demo [--job examples/quickstart-cluster.yaml] [--name NAME]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from testbed.demo import JOB, ROOT, follow, report
from testbed.net import free_port, http_get, wait_until
from testbed.seaweedfs import ADMIN

CLUSTER = os.environ.get("KIND_CLUSTER", "thaw")
S3_IN_CLUSTER = "http://seaweedfs.default.svc:8333"


def bins() -> Path:
    out = subprocess.run(["hack/build-k8s.sh", "--node"], cwd=ROOT, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class Kind:
    """kubectl on the kind cluster; what testbed.demo.follow needs."""

    kubectl_bin: Path
    context: str = f"kind-{CLUSTER}"
    s3_endpoint: str = ""  # a port-forward to SeaweedFS, while one is open

    def kubectl(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run([str(self.kubectl_bin), "--context", self.context, *args], check=check, **kw)

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1], "AWS_REGION": "us-east-1"}

    def port_forward(self, target: str, port: int, namespace: str = "default") -> subprocess.Popen:
        local = free_port()
        proc = subprocess.Popen(
            [str(self.kubectl_bin), "--context", self.context, "-n", namespace]
            + ["port-forward", target, f"{local}:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.local_port = local
        wait_until(lambda: http_get(f"http://127.0.0.1:{local}/", timeout=1)[0] != 0, 30, f"port-forward {target}")
        return proc


def job_manifest(job: dict, endpoint: str = S3_IN_CLUSTER, name: str | None = None) -> dict:
    """The cluster job for kind: the in-cluster S3 endpoint, no node selector (any worker)."""
    doc = yaml.safe_load(yaml.safe_dump(job))
    doc["spec"]["checkpoint"]["endpoint"] = endpoint
    doc["spec"].pop("nodeSelector", None)
    if name:
        doc["metadata"]["name"] = name
    return doc


def stage_table(kind: Kind, doc: dict) -> str:
    """The per-stage table from the checkpoint store (SeaweedFS through a port-forward)."""
    pf = kind.port_forward("svc/seaweedfs", 8333)
    try:
        local = job_manifest(doc, f"http://127.0.0.1:{pf.local_port}")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(local, f)
        return report(kind, Path(f.name))
    finally:
        pf.terminate()
        pf.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m testbed.kind_demo")
    ap.add_argument("--job", type=Path, default=JOB)
    ap.add_argument("--name", help="FineTuneJob name (default: the file's)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    kind = Kind(bins() / "kubectl")
    if kind.kubectl("get", "nodes", check=False).returncode != 0:
        sys.exit(f"no kind cluster {CLUSTER} answers (context kind-{CLUSTER}): run `make kind-up` first")
    doc = job_manifest(yaml.safe_load(args.job.read_text()), name=args.name)
    name = doc["metadata"]["name"]
    kind.kubectl("delete", "ftj", name, "--ignore-not-found", "--wait=true")
    kind.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    print(f"applied {args.job.relative_to(ROOT)} as FineTuneJob {name} on kind-{CLUSTER}", flush=True)
    t0 = time.monotonic()
    status = follow(kind, name, args.timeout)
    print(f"{name}: {status['phase']} after {time.monotonic() - t0:.0f}s ({status.get('message', '')})", flush=True)
    if status["phase"] == "Succeeded":
        print(stage_table(kind, doc), flush=True)
    pods = kind.kubectl("get", "pods", "-l", f"thaw.dev/finetunejob={name}", "-o", "wide", check=False).stdout
    print(re.sub(r"\n+$", "", pods))
    sys.exit(0 if status["phase"] == "Succeeded" else 1)


if __name__ == "__main__":
    main()
