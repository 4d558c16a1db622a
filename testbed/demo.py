"""`make demo`: the quickstart through the real Kubernetes path on this machine.

Starts the local cluster (API server, etcd, controller-manager, scheduler, a process node),
SeaweedFS on the pod bridge (pods reach it at 10.244.0.1:8333), installs the Helm chart,
creates the S3 credentials Secret, runs the operator as the chart's ServiceAccount, starts a
Prometheus that discovers stage pods through the API server, applies the FineTuneJob and
follows it: one line per stage and epoch from the FineTuneJob's status. Then the per-stage
table and the curves from the checkpoint store. Everything is left running;
`make demo-down` stops it.

    python -m testbed.demo up [--job examples/quickstart-cluster.yaml]
    python -m testbed.demo down
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from testbed.control_plane import ControlPlane, stop_leftovers
from testbed.net import free_port, http_get, wait_until
from testbed.node_agent import GATEWAY, teardown_network
from testbed.prometheus import Prometheus
from testbed.seaweedfs import ADMIN, SeaweedFS

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("THAW_DEMO_DIR", "/tmp/thaw-demo"))
JOB = ROOT / "examples" / "quickstart-cluster.yaml"
S3_PORT = 8333
PROMETHEUS_PORT = 9090
CRED_SECRET = "thaw-s3"


@dataclass
class Demo:
    state: Path
    cp: ControlPlane
    seaweed: SeaweedFS
    prometheus: Prometheus
    operator_metrics: int

    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.cp.kubectl(*args, **kw)

    def s3_env(self) -> dict[str, str]:
        return self.seaweed.env()


def _record(state: Path, name: str, pid: int) -> None:
    (state / "pids").mkdir(exist_ok=True)
    (state / "pids" / name).write_text(str(pid))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _sa_kubeconfig(cp: ControlPlane, namespace: str, sa: str) -> Path:
    token = cp.kubectl("create", "token", sa, "-n", namespace, "--duration=24h").stdout.strip()
    config = yaml.safe_load(cp.kubeconfig_path.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path = cp.state / f"{sa}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def _pod_scrape_config(cp: ControlPlane) -> dict:
    """Prometheus scrapes every training rank the way a PodMonitor would: pods labelled
    thaw.dev/finetunejob, container port named `metrics` (found by testbed/pod_sd.py)."""
    log = open(cp.state / "logs" / "pod-sd.log", "ab")  # noqa: SIM115 - owned by the process
    targets = cp.state / "pod-targets.json"
    targets.write_text("[]")
    sd = subprocess.Popen(
        [sys.executable, "-m", "testbed.pod_sd", f"--kubeconfig={cp.kubeconfig_path}", f"--out={targets}"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    _record(cp.state, "pod-sd", sd.pid)
    return {"job_name": "thaw-trainer", "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "2s"}]}


def start(state: Path = STATE, s3_port: int = S3_PORT, prometheus_port: int = PROMETHEUS_PORT) -> Demo:
    stop(state, quiet=True)
    t0 = time.monotonic()
    cp = ControlPlane(state, kwok_nodes=0, process_nodes=1).start()
    _say(f"cluster up in {time.monotonic() - t0:.0f}s (API server, etcd, controller-manager, scheduler, process node)")

    seaweed = SeaweedFS(state / "seaweedfs", buckets=("thaw",), ip=str(GATEWAY), s3_port=s3_port).start()
    _record(state, "seaweedfs", seaweed.proc.pid)
    _say(f"SeaweedFS S3 at {seaweed.endpoint} (bucket thaw)")

    helm = [str(cp.bins / "helm"), f"--kubeconfig={cp.kubeconfig_path}"]
    # No container runtime here: the chart's Deployment is scaled to 0 and the operator runs as
    # a process with the chart's ServiceAccount token, so its RBAC is what a cluster would give it.
    subprocess.run(
        [
            *helm,
            "install",
            "thaw",
            str(ROOT / "charts" / "thaw"),
            "-n",
            "thaw-system",
            "--create-namespace",
            "--set",
            "replicaCount=0",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    cp.kubectl(
        "create",
        "secret",
        "generic",
        CRED_SECRET,
        "-n",
        "default",
        f"--from-literal=AWS_ACCESS_KEY_ID={ADMIN[0]}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={ADMIN[1]}",
    )
    _say(f"chart installed (namespace thaw-system); Secret default/{CRED_SECRET} holds the S3 keys")

    metrics_port = free_port()
    log = open(state / "logs" / "operator.log", "ab")  # noqa: SIM115 - owned by the process
    op = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thaw_operator",
            "--leader-election-namespace=thaw-system",
            "--log-format=plain",
            "--resync-seconds=3",
            f"--metrics-port={metrics_port}",
            f"--health-port={free_port()}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "KUBECONFIG": str(_sa_kubeconfig(cp, "thaw-system", "thaw"))},
    )
    log.close()
    _record(state, "operator", op.pid)
    wait_until(lambda: http_get(f"http://127.0.0.1:{metrics_port}/metrics", 1)[0] == 200, 60, "operator")
    _say("operator running as system:serviceaccount:thaw-system:thaw")

    prom = Prometheus(
        state / "prometheus",
        {"thaw-operator": [f"127.0.0.1:{metrics_port}"]},
        extra_scrape_configs=[_pod_scrape_config(cp)],
        port=prometheus_port,
        scrape_interval="2s",
    )
    prom.start()
    _record(state, "prometheus", prom.proc.pid)
    _say(f"Prometheus at {prom.url} (stage pods discovered through the API server)")
    return Demo(state, cp, seaweed, prom, metrics_port)


def get_ftj(demo: Demo, name: str, namespace: str = "default") -> dict:
    out = demo.kubectl("get", "ftj", name, "-n", namespace, "-o", "yaml")
    return yaml.safe_load(out.stdout)


def _line(status: dict) -> str:
    k = status.get("currentStage", 0)
    stages = status.get("stages") or []
    if not stages:
        return f"{status.get('phase', 'Pending')}"
    st = stages[min(k, len(stages) - 1)]
    prog = st.get("progress") or {}
    parts = [f"stage {k + 1}/{len(stages)} {st['name']:<5}", f"{st['phase']:<9}"]
    if prog:
        acc = prog.get("valAccuracy")
        parts.append(f"epoch {prog['epoch']}/{st.get('epochs', '?')}")
        parts.append(f"val acc {acc:.3f}" if isinstance(acc, (int, float)) else "val acc -")
        if prog.get("etaSeconds") is not None:
            parts.append(f"eta {prog['etaSeconds']:.0f}s")
    if st.get("attempts", 1) > 1:
        parts.append(f"attempt {st['attempts']}")
    return "  ".join(parts)


def follow(demo: Demo, name: str, timeout: float = 1800, quiet: bool = False, on_poll=None) -> dict:
    """Print a line whenever the FineTuneJob's stage, epoch or phase changes; return the final status."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        status = get_ftj(demo, name).get("status") or {}
        line = _line(status)
        if line != last and not quiet:
            print(f"  {time.strftime('%H:%M:%S')}  {line}", flush=True)
        last = line
        if on_poll is not None:
            on_poll(status)
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        time.sleep(2)
    raise TimeoutError(f"FineTuneJob {name} did not finish in {timeout:.0f}s; last: {last}")


def report(demo: Demo, job_file: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "report", str(job_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **demo.s3_env()},
    )
    if out.returncode != 0:
        raise RuntimeError(f"report failed: {out.stderr[-2000:]}")
    return out.stdout


def samples(folder: Path, n: int = 8) -> list[str]:
    """The first n Fashion-MNIST test images as PNG files named <i>-<class>.png (what `predict`
    is shown on); returns their class names."""
    from PIL import Image

    from trainer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx

    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:n]
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:n]
    folder.mkdir(parents=True, exist_ok=True)
    names = [FASHION_MNIST_CLASSES[int(y)] for y in labels]
    for i, (img, name) in enumerate(zip(images, names)):
        Image.fromarray(img).save(folder / f"{i}-{name.replace('/', '_').replace(' ', '_')}.png")
    return names


def predict_command(demo: Demo, model_uri: str, folder: Path) -> list[str]:
    """`python -m trainer predict` on the demo's model, with the store's endpoint and keys."""
    env = [f"{k}={v}" for k, v in sorted(demo.s3_env().items()) if k.startswith("AWS_")]
    return ["env", *env, sys.executable, "-m", "trainer", "predict", model_uri, str(folder)]


def stop(state: Path = STATE, quiet: bool = False) -> None:
    stop_leftovers(state)  # every process recorded under state/pids: cluster, SeaweedFS, operator, Prometheus
    teardown_network()
    if not quiet:
        _say(f"stopped everything recorded in {state}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m testbed.demo")
    ap.add_argument("command", choices=["up", "down"])
    ap.add_argument("--job", type=Path, default=JOB)
    ap.add_argument("--state", type=Path, default=STATE)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    if args.command == "down":
        stop(args.state)
        return
    if os.geteuid() != 0:
        sys.exit("make demo needs root: the process node gives every pod its own network namespace")
    demo = start(args.state)
    name = yaml.safe_load(args.job.read_text())["metadata"]["name"]
    demo.kubectl("apply", "-f", str(args.job))
    _say(f"applied {args.job.relative_to(ROOT)}; following FineTuneJob {name}")
    t0 = time.monotonic()
    status = follow(demo, name, args.timeout)
    _say(f"{name}: {status['phase']} after {time.monotonic() - t0:.0f}s ({status.get('message', '')})")
    try_model = ""
    if status["phase"] == "Succeeded":
        print(report(demo, args.job), flush=True)
        model = (status.get("model") or {}).get("uri")
        if model:
            folder = args.state / "samples"
            samples(folder)
            try_model = (
                f"\nThe model (status.model): {model}\n"
                f"  on 8 test images ({folder}): {' '.join(predict_command(demo, model, folder))}\n"
            )
    kube = f"KUBECONFIG={demo.cp.kubeconfig_path} {demo.cp.bins}/kubectl"
    print(
        f"{try_model}\nThe cluster is still up. Look around:\n"
        f"  {kube} get ftj,jobs,pods\n"
        f"  {kube} describe ftj {name}\n"
        f"  Prometheus: {demo.prometheus.url}  (try thaw_val_accuracy_ratio, thaw_images_per_second)\n"
        f"  logs: {args.state}/logs, pod logs: {args.state}/nodes/process-0/pods\n"
        "Tear it all down: make demo-down",
        flush=True,
    )
    sys.exit(0 if status["phase"] == "Succeeded" else 1)


if __name__ == "__main__":
    main()
