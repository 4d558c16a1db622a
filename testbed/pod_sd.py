"""Pod discovery for the demo's Prometheus, as a file_sd target list.

Debian's Prometheus is built without kubernetes_sd_configs, so this small loop stands in for
it: every 2 s it lists pods labelled thaw.dev/finetunejob that run and have an IP, and writes
`<podIP>:<container port named metrics or metrics-<r>>` (local rank r) with namespace/pod
labels (what the chart's PodMonitor keeps) to a JSON file that Prometheus' file_sd_configs re-reads.

    python -m testbed.pod_sd --kubeconfig K --out targets.json
    python pod_sd.py --out targets.json      (in a pod: the ServiceAccount's in-cluster config;
                                              the kind cluster's Prometheus runs it as a sidecar)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from thaw_operator.resources import METRICS_PORT


def targets(pods) -> list[dict]:
    out = []
    for pod in pods:
        if pod.status.phase != "Running" or not pod.status.pod_ip:
            continue
        for c in pod.spec.containers:
            for port in c.ports or []:
                if port.name and METRICS_PORT.fullmatch(port.name):
                    out.append(
                        {
                            "targets": [f"{pod.status.pod_ip}:{port.container_port}"],
                            "labels": {"namespace": pod.metadata.namespace, "pod": pod.metadata.name},
                        }
                    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubeconfig", help="default: the pod's in-cluster config")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--interval", type=float, default=2.0)
    args = ap.parse_args()
    from kubernetes import client, config

    if args.kubeconfig:
        core = client.CoreV1Api(config.new_client_from_config(args.kubeconfig))
    else:
        config.load_incluster_config()
        core = client.CoreV1Api()
    while True:
        try:
            pods = core.list_pod_for_all_namespaces(label_selector="thaw.dev/finetunejob").items
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(targets(pods)))
            os.replace(tmp, args.out)
        except Exception as err:  # noqa: BLE001 - the API server may be restarting; try again
            print(f"pod discovery: {err}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
