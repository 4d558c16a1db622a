"""python -m thaw_operator [--namespace NS ...] — run the FineTuneJob controller.

One active replica: kopf peering (the chart installs the peering resource) makes a second
replica wait instead of acting; with --standalone it never checks. Liveness: --health-port
serves kopf's /healthz; metrics: --metrics-port serves Prometheus text.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from thaw_operator import controller, metrics


class CountingApiClient(client.ApiClient):
    """Counts every request the reconciler sends (kopf's own watch streams are separate)."""

    def request(self, method, url, *args, **kwargs):
        metrics.API_REQUESTS.labels(method).inc()
        return super().request(method, url, *args, **kwargs)


def _load_kube_config() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = CountingApiClient()
    api.configuration.retries = 3
    return api


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m thaw_operator", description=__doc__)
    ap.add_argument("--namespace", action="append", default=[], help="watch only these (default: all)")
    ap.add_argument("--trainer-image", default=os.environ.get("THAW_TRAINER_IMAGE", controller.CONFIG.trainer_image))
    ap.add_argument("--metrics-port", type=int, default=8080)
    ap.add_argument("--health-port", type=int, default=8081)
    ap.add_argument("--resync-seconds", type=float, default=60.0)
    ap.add_argument("--standalone", action="store_true", help="no peering: assume this is the only replica")
    ap.add_argument(
        "--peering", default=None, help="kopf peering object (its CRD must exist); default: kopf's own auto-detection"
    )
    ap.add_argument("--log-format", choices=["plain", "json"], default="json")
    args = ap.parse_args(argv)

    kopf.configure(log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN)
    logging.getLogger("thaw").setLevel(logging.INFO)
    controller.CONFIG.trainer_image = args.trainer_image
    controller.CONFIG.resync_seconds = args.resync_seconds
    controller.CONFIG.namespaces = list(args.namespace)
    controller.CONFIG.api = _load_kube_config()
    if args.metrics_port:
        start_http_server(args.metrics_port)

    @kopf.on.startup()
    def _settings(settings: kopf.OperatorSettings, **_):
        settings.posting.enabled = False  # our events come from the planner, not kopf's handler chatter
        settings.execution.max_workers = 32
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60

    stop = threading.Event()
    loop = threading.Thread(target=controller.resync_forever, args=(stop,), name="resync", daemon=True)
    loop.start()
    try:
        kopf.run(
            standalone=args.standalone,
            peering_name=None if args.standalone else args.peering,
            namespaces=args.namespace or (),
            clusterwide=not args.namespace,
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        )
    finally:
        stop.set()


if __name__ == "__main__":
    main()
