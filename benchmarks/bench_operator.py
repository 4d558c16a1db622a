"""Operator at scale on the local control plane: many FineTuneJobs x stages x nodes on kwok nodes.

    python benchmarks/bench_operator.py --jobs 100 --nodes 200 --out docs/benchmarks.md

Every stage's kwok pods end with rank 0's termination message (annotations), so a stage's
next Job can start as soon as the operator sees the previous one complete with its result.
A watch in this process timestamps each Job's Complete condition and each Job's creation with
one clock; latency = next stage Job created - previous stage Job seen complete. API requests
are the reconciler's own (thaw_operator_api_requests_total); peak RSS is the operator
process' VmHWM.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_section  # noqa: E402

from tests.cluster.control_plane import DELAY, EXIT_CODE, ControlPlane  # noqa: E402
from tests.integration.cluster.conftest import OperatorProcess  # noqa: E402
from tests.integration.cluster.test_operator import KWOK, reported  # noqa: E402
from tests.services.net import http_get  # noqa: E402

STAGES = 3


def doc(name: str, store: str, nodes: int) -> dict:
    from tests.builders import job_doc

    annotations = {EXIT_CODE: "0", DELAY: "0s", **reported({0: 0.5, 1: 0.5, 2: 0.5})}
    d = job_doc(nodes=nodes, checkpoint={"uri": store}, podAnnotations=annotations, **KWOK)
    d["spec"]["data"]["batchSize"] = 32
    d["spec"]["stages"] = [
        {"name": n, "trainable": t, "epochs": 1, "lr": 0.01}
        for n, t in [("head", {"top": 1}), ("top3", {"top": 3}), ("all", "all")]
    ]
    d["metadata"] = {"name": name}
    return d


def scrape(port: int, name: str) -> float:
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    return sum(float(ln.split()[-1]) for ln in body.decode().splitlines() if ln.startswith(name))


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=200, help="kwok nodes")
    ap.add_argument("--pods-per-stage", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from kubernetes import client, config, watch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cp = ControlPlane(tmp / "cluster", kwok_nodes=args.nodes, process_nodes=0)
        cp.start()
        op = None
        try:
            cp.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests" / "crd"))
            cp.kubectl("wait", "--for", "condition=established", "crd/finetunejobs.thaw.dev", "--timeout=60s")
            api = config.new_client_from_config(str(cp.kubeconfig_path))
            docs = [doc(f"ft-{i:03d}", f"file://{tmp}/store", args.pods_per_stage) for i in range(args.jobs)]
            completed: dict[str, float] = {}
            created: dict[str, float] = {}
            stop = threading.Event()

            def watch_jobs():
                w = watch.Watch()
                batch = client.BatchV1Api(api)
                while not stop.is_set():
                    for ev in w.stream(batch.list_namespaced_job, "default", timeout_seconds=5):
                        j, now = ev["object"], time.monotonic()
                        created.setdefault(j.metadata.name, now)
                        if any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or []):
                            completed.setdefault(j.metadata.name, now)

            watcher = threading.Thread(target=watch_jobs, daemon=True)
            watcher.start()
            op = OperatorProcess(cp.kubeconfig_path, tmp / "operator.log").start()
            custom = client.CustomObjectsApi(api)
            t0 = time.monotonic()
            for d in docs:
                custom.create_namespaced_custom_object("thaw.dev", "v1alpha1", "default", "finetunejobs", d)
            deadline = t0 + args.timeout
            while time.monotonic() < deadline:
                items = custom.list_namespaced_custom_object("thaw.dev", "v1alpha1", "default", "finetunejobs")["items"]
                if sum((o.get("status") or {}).get("phase") == "Succeeded" for o in items) == args.jobs:
                    break
                time.sleep(1)
            wall = time.monotonic() - t0
            stop.set()
            succeeded = sum((o.get("status") or {}).get("phase") == "Succeeded" for o in items)
            latencies = []
            for d in docs:
                n = d["metadata"]["name"]
                for k in range(STAGES - 1):
                    a, b = f"{n}-{k}-a1", f"{n}-{k + 1}-a1"
                    if a in completed and b in created:
                        latencies.append(created[b] - completed[a])
            requests = scrape(op.metrics_port, "thaw_operator_api_requests_total")
            reconciles = scrape(op.metrics_port, "thaw_operator_reconciles_total")
            rss = vm_hwm_mib(op.proc.pid)
        finally:
            if op is not None:
                op.stop()
            cp.stop()

    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")
    lines = [
        "## Operator at scale (local control plane, kwok nodes)",
        "",
        f"Command: `python benchmarks/bench_operator.py --jobs {args.jobs} --nodes {args.nodes} "
        "--out docs/benchmarks.md`",
        "",
        f"{args.jobs} FineTuneJobs x {STAGES} stages x {args.pods_per_stage} pods on {args.nodes} kwok GPU nodes; "
        f"real kube-apiserver, etcd, controller-manager and scheduler on the same {os.cpu_count()}-CPU machine as "
        "the operator (one process, kopf + kubernetes client).",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| FineTuneJobs succeeded | {succeeded}/{args.jobs} | all |",
        f"| stage hand-off latency p50 (Job seen complete -> next Job created) | {q(0.5):.2f} s | |",
        f"| stage hand-off latency p99 | {q(0.99):.2f} s | < 2 s |",
        f"| hand-offs measured | {len(latencies)} | {args.jobs * (STAGES - 1)} |",
        f"| total wall time, first create -> all Succeeded | {wall:.0f} s | |",
        f"| reconciler API requests per FineTuneJob | {requests / args.jobs:.0f} | |",
        f"| reconciliations per FineTuneJob | {reconciles / args.jobs:.0f} | |",
        f"| operator peak RSS | {rss:.0f} MiB | < 200 MiB |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_section(args.out, "operator", table)


if __name__ == "__main__":
    main()
