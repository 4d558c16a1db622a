"""Operator at scale on the local control plane: many FineTuneJobs x stages x pods on kwok nodes.

    python benchmarks/bench_operator.py --runs 100x3,1000x3,100x20 --nodes 2000 --out docs/benchmarks.md

Each run starts a fresh control plane (etcd, kube-apiserver, controller-manager, scheduler,
kwok) and one operator process. Every stage's kwok pods end with rank 0's termination message
(annotations), so a stage's next Job can start as soon as the operator sees the previous one
complete with its result. A watch in this process timestamps each Job's Complete condition and
each Job's creation with one clock: hand-off latency = next stage Job created - previous stage
Job seen complete. Sampled every second: the operator's work-queue depth (its own gauge), the
hand-offs waiting at that moment (seen from outside), its TCP connections to the API server.
API requests are the reconciler's own (thaw_operator_api_requests_total); peak RSS is the
operator process' VmHWM, CPU its utime + stime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_section  # noqa: E402

from testbed.control_plane import DELAY, EXIT_CODE, MESSAGE, ControlPlane  # noqa: E402
from testbed.net import http_get  # noqa: E402
from testbed.operator_process import OperatorProcess  # noqa: E402
from tests.integration.cluster.test_operator import KWOK  # noqa: E402


def stage_names(stages: int) -> list[str]:
    return ["head", "top3", "all"] if stages == 3 else [f"s{k:02d}" for k in range(stages)]


def doc(name: str, store: str, pods: int, stages: int) -> dict:
    from tests.builders import job_doc

    names = stage_names(stages)
    trainable = [{"top": 1}, {"top": 3}, "all"] if stages == 3 else [{"top": 1 + k % 10} for k in range(stages)]
    messages = {
        f"{MESSAGE}{k}": json.dumps(
            {
                "stage": k,
                "name": n,
                "checkpoint": f"{store}/{n}/epoch-0000",
                "manifestSha256": "0" * 64,
                "metrics": {"valAccuracy": 0.5, "testAccuracy": 0.5, "epochs": 1},
            }
        )
        for k, n in enumerate(names)
    }
    d = job_doc(nodes=pods, checkpoint={"uri": store}, podAnnotations={EXIT_CODE: "0", DELAY: "0s", **messages}, **KWOK)
    d["spec"]["data"]["batchSize"] = 32
    d["spec"]["stages"] = [{"name": n, "trainable": t, "epochs": 1, "lr": 0.01} for n, t in zip(names, trainable)]
    d["metadata"] = {"name": name}
    return d


def scrape(port: int, name: str) -> float:
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    return sum(float(ln.split()[-1]) for ln in body.decode().splitlines() if ln.startswith(name))


def bucket_quantile(port: int, name: str, priority: str, q: float) -> float:
    """The upper bound of the histogram bucket holding quantile q (Prometheus' buckets)."""
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    buckets = []
    for ln in body.decode().splitlines():
        if ln.startswith(f"{name}_bucket") and f'priority="{priority}"' in ln:
            le = ln.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(ln.split()[-1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    return next((le for le, n in buckets if total and n >= q * total), float("nan"))


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def connections_to(pid: int, port: int) -> int:
    """ESTABLISHED TCP connections of one process to a local port (its sockets' inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port and cols[9] in inodes:
                count += 1
    return count


@dataclass
class Run:
    jobs: int
    stages: int
    pods: int
    nodes: int
    succeeded: int = 0
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    requests: float = 0.0
    reconciles: float = 0.0
    rss: float = 0.0
    cpu: float = 0.0
    connections: int = 0
    handoff_wait_p99: float = float("nan")  # inside the operator: queued -> a worker took it
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (t, queue depth, hand-offs waiting)
    source: Path = ROOT  # the tree whose operator ran
    name: str = ""  # "" for this tree, else the base commit

    @property
    def label(self) -> str:
        return f"{self.jobs} jobs x {self.stages} stages" + (f" (base {self.name})" if self.name else "")

    def q(self, p: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")


def run(r: Run, timeout: float) -> Run:
    from kubernetes import client, config, watch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for attempt in range(3):  # a port picked free can be taken before the server binds it
            cp = ControlPlane(tmp / f"cluster-{attempt}", kwok_nodes=0, process_nodes=0)
            try:
                cp.start()
                break
            except RuntimeError as err:
                cp.stop()
                if attempt == 2 or "address already in use" not in str(err):
                    raise
        cp.add_kwok_nodes(r.nodes, timeout=max(60, r.nodes / 10))
        op = None
        stop = threading.Event()
        try:
            cp.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests" / "crd"))
            cp.kubectl("wait", "--for", "condition=established", "crd/finetunejobs.thaw.dev", "--timeout=60s")
            api = config.new_client_from_config(str(cp.kubeconfig_path))
            api_port = int(api.configuration.host.rsplit(":", 1)[1])
            docs = [doc(f"ft-{i:04d}", f"file://{tmp}/store", r.pods, r.stages) for i in range(r.jobs)]
            completed: dict[str, float] = {}
            created: dict[str, float] = {}

            def watch_jobs():  # one stream, resumed where it ended: events in the API server's order
                batch = client.BatchV1Api(api)
                version = None
                while not stop.is_set():
                    try:
                        for ev in watch.Watch().stream(
                            batch.list_namespaced_job, "default", timeout_seconds=30, resource_version=version
                        ):
                            j, now = ev["object"], time.monotonic()
                            version = j.metadata.resource_version
                            created.setdefault(j.metadata.name, now)
                            if any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or []):
                                completed.setdefault(j.metadata.name, now)
                    except Exception as err:  # noqa: BLE001 - 410 Gone: list again; else resume
                        if getattr(err, "status", None) == 410:
                            version = None
                        time.sleep(0.5)

            def waiting_handoffs() -> int:
                n = 0
                for name in list(completed):
                    job, k, attempt = name.rsplit("-", 2)
                    if int(k) < r.stages - 1 and f"{job}-{int(k) + 1}-a1" not in created:
                        n += 1
                return n

            def sample():
                while not stop.wait(1.0):
                    try:
                        depth = scrape(op.metrics_port, "thaw_operator_queue_depth")
                        r.connections = max(r.connections, connections_to(op.proc.pid, api_port))
                    except OSError:
                        continue
                    r.samples.append((time.monotonic() - t0, depth, waiting_handoffs()))

            threading.Thread(target=watch_jobs, daemon=True).start()
            # As the chart deploys it (resyncSeconds: 60; the test suite's 5 s is for test speed).
            op = OperatorProcess(
                cp.kubeconfig_path, tmp / "operator.log", extra=["--resync-seconds=60"], root=r.source
            ).start()
            custom = client.CustomObjectsApi(api)
            t0 = time.monotonic()
            threading.Thread(target=sample, daemon=True).start()
            for d in docs:
                custom.create_namespaced_custom_object("thaw.dev", "v1alpha1", "default", "finetunejobs", d)
            deadline = t0 + timeout
            while time.monotonic() < deadline:
                items = custom.list_namespaced_custom_object("thaw.dev", "v1alpha1", "default", "finetunejobs")["items"]
                r.succeeded = sum((o.get("status") or {}).get("phase") == "Succeeded" for o in items)
                if r.succeeded == r.jobs:
                    break
                time.sleep(2)
            r.wall = time.monotonic() - t0
            stop.set()
            for d in docs:
                n = d["metadata"]["name"]
                for k in range(r.stages - 1):
                    a, b = f"{n}-{k}-a1", f"{n}-{k + 1}-a1"
                    if a in completed and b in created:
                        r.latencies.append(created[b] - completed[a])
            r.handoff_wait_p99 = bucket_quantile(op.metrics_port, "thaw_operator_queue_wait_seconds", "handoff", 0.99)
            r.requests = scrape(op.metrics_port, "thaw_operator_api_requests_total")
            r.reconciles = scrape(op.metrics_port, "thaw_operator_reconciles_total")
            r.rss = vm_hwm_mib(op.proc.pid)
            r.cpu = cpu_seconds(op.proc.pid)
        finally:
            stop.set()
            if op is not None:
                op.stop()
            cp.stop()
    return r


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.6 * len(runs)), squeeze=False)
    for ax, r in zip(axes[:, 0], runs):
        t = [s[0] for s in r.samples]
        ax.plot(t, [s[1] for s in r.samples], label="operator work queue depth")
        ax.plot(t, [s[2] for s in r.samples], label="hand-offs waiting (seen from outside)")
        ax.set_title(f"{r.label} x {r.pods} pods, {r.nodes} kwok nodes")
        ax.set_xlabel("seconds since the first create")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def table(runs: list[Run], argv: str, plot_name: str = "operator-queue.png") -> str:
    cols = " | ".join(r.label for r in runs)
    rows = [
        ("FineTuneJobs succeeded", lambda r: f"{r.succeeded}/{r.jobs}", "all"),
        ("stage hand-offs measured", lambda r: f"{len(r.latencies)}/{r.jobs * (r.stages - 1)}", "all"),
        ("hand-off latency p50 (Job seen complete -> next Job created)", lambda r: f"{r.q(0.5):.2f} s", ""),
        ("hand-off latency p99", lambda r: f"**{r.q(0.99):.2f} s**", "< 1 s"),
        ("... of which in the operator's queue, p99 (bucket bound)", lambda r: f"<= {r.handoff_wait_p99:g} s", ""),
        ("total wall time, first create -> all Succeeded", lambda r: f"{r.wall:.0f} s", ""),
        ("reconciler API requests per FineTuneJob", lambda r: f"{r.requests / r.jobs:.0f}", "no more than at 100"),
        ("... per stage", lambda r: f"{r.requests / r.jobs / r.stages:.1f}", ""),
        ("reconciliations per FineTuneJob", lambda r: f"{r.reconciles / r.jobs:.0f}", ""),
        ("operator peak RSS", lambda r: f"**{r.rss:.0f} MiB**", "< 300 MiB"),
        ("operator CPU (user + system)", lambda r: f"{r.cpu:.0f} s", ""),
        ("operator TCP connections to the API server (max)", lambda r: f"{r.connections}", ""),
        ("max work-queue depth", lambda r: f"{max((s[1] for s in r.samples), default=0):.0f}", ""),
        ("max hand-offs waiting at once", lambda r: f"{max((s[2] for s in r.samples), default=0)}", ""),
    ]
    lines = [
        "## Operator at scale (local control plane, kwok nodes)",
        "",
        f"Command: `python benchmarks/bench_operator.py {argv}`",
        "",
        f"Each column a fresh control plane: real kube-apiserver, etcd, controller-manager and scheduler, kwok, "
        f"and the operator (one process, kopf + kubernetes client), all on one {os.cpu_count()}-CPU machine; "
        f"{runs[0].pods} pods per stage. Queue depth over time: [{plot_name}]({plot_name}).",
        "",
        f"| measure | {cols} | goal |",
        "|---|" + "---|" * len(runs) + "---|",
        *(f"| {name} | " + " | ".join(fn(r) for r in runs) + f" | {goal} |" for name, fn, goal in rows),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="100x3", help="comma-separated JOBSxSTAGES, one fresh cluster each")
    ap.add_argument("--nodes", type=int, default=200, help="kwok GPU nodes")
    ap.add_argument("--pods-per-stage", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="per run")
    ap.add_argument("--out", type=Path, help="docs/benchmarks.md; the plot goes beside it")
    ap.add_argument("--base", metavar="COMMIT", help="also run each size with this commit's operator, first")
    ap.add_argument("--section", default="operator", help="the section of --out to replace (and NAME-queue.png)")
    args = ap.parse_args()
    sources = [("", ROOT)]
    with contextlib.ExitStack() as stack:
        if args.base:
            sources.insert(0, (args.base[:7], stack.enter_context(worktree(args.base))))
        runs = []
        for spec in args.runs.split(","):
            jobs, stages = (int(x) for x in spec.split("x"))
            for name, source in sources:
                r = run(Run(jobs, stages, args.pods_per_stage, args.nodes, source=source, name=name), args.timeout)
                print(
                    f"{r.label}: {r.succeeded}/{r.jobs} in {r.wall:.0f} s, p99 {r.q(0.99):.2f} s, "
                    f"RSS {r.rss:.0f} MiB, {r.requests / r.jobs:.0f} requests/job",
                    flush=True,
                )
                runs.append(r)
                # After every run: a long series keeps what it measured.
                text = table(runs, " ".join(sys.argv[1:]), f"{args.section}-queue.png")
                if args.out:
                    write_section(args.out, args.section, text)
                    plot(runs, args.out.parent / f"{args.section}-queue.png")
    print(text)


@contextlib.contextmanager
def worktree(commit: str):
    """A detached checkout of `commit` beside this one, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="thaw-base-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), commit], cwd=ROOT, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
