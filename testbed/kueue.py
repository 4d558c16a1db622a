"""Kueue's controller in the test bed: built from its Go module (hack/build-k8s.sh), CRDs read
from the same module, run as a process against the local API server.

No webhooks are registered with the API server (they would need a Service the API server can
reach): the operator creates queued stage Jobs suspended itself, which is all Kueue's Job
integration needs to queue, admit and resume them. Kueue still starts its webhook and metrics
servers; they get a throwaway self-signed certificate. Its metrics certificate path is fixed
(/etc/kueue/metrics/certs): created here when missing and removed again by `stop_kueue`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from testbed.net import free_port

KUEUE_VERSION = os.environ.get("KUEUE_VERSION", "v0.17.0")
METRICS_CERTS = Path("/etc/kueue/metrics/certs")
_CREATED = Path("/etc/kueue/.created-by-thaw-tests")


def _self_signed(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kueue"]
        + ["-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt")],
        check=True,
        capture_output=True,
    )


def _crd_dir() -> Path:
    modcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    base = Path(modcache) / f"sigs.k8s.io/kueue@{KUEUE_VERSION}"
    if not base.is_dir():
        subprocess.run(["go", "mod", "download", f"sigs.k8s.io/kueue@{KUEUE_VERSION}"], check=True, capture_output=True)
    return base / "config" / "components" / "crd" / "bases"


def start_kueue(cp) -> None:
    """Kueue's CRDs and controller on a running ControlPlane (stopped with it)."""
    crds = _crd_dir()
    cp.kubectl("apply", "--server-side", "-f", str(crds))
    for f in sorted(crds.glob("*.yaml")):
        name = yaml.safe_load(f.read_text())["metadata"]["name"]
        cp.kubectl("wait", "--for", "condition=established", f"crd/{name}", "--timeout=60s")
    cp.kubectl("create", "namespace", "kueue-system", check=False)
    state = cp.state / "kueue"
    _self_signed(state / "webhook-certs")
    if not METRICS_CERTS.is_dir():
        _self_signed(METRICS_CERTS)
        _CREATED.write_text("")
    health = free_port()
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
        "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
        "webhook": {"port": free_port(), "host": "127.0.0.1", "certDir": str(state / "webhook-certs")},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"]},
        # The on-demand visibility API server wants certificates at a fixed /visibility path.
        "featureGates": {"VisibilityOnDemand": False},
    }
    (state / "config.yaml").write_text(yaml.safe_dump(config))
    cp._spawn(
        "kueue",
        [
            cp._bin("kueue"),
            f"--config={state / 'config.yaml'}",
            f"--kubeconfig={cp.kubeconfig_path}",
        ],
    )
    cp._wait_http(f"http://127.0.0.1:{health}/readyz", "kueue", timeout=120)


def stop_kueue() -> None:
    """Remove what start_kueue put outside the cluster's state directory (the process goes with the cluster)."""
    if _CREATED.exists():
        shutil.rmtree(_CREATED.parent, ignore_errors=True)
