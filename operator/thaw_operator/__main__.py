"""python -m thaw_operator [--namespace NS ...] — run the FineTuneJob controller.

One active replica: replicas elect a leader through a Lease (thaw_operator.leader); the
others watch and stand by, and take over within the lease duration when it dies. With
--standalone there is no election (the only replica). Liveness: --health-port serves kopf's
/healthz; metrics: --metrics-port serves Prometheus text.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from thaw_operator import controller, events, metrics, state
from thaw_operator.leader import LeaderElector


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
    ap.add_argument("--trainer-image", default=os.environ.get("THAW_TRAINER_IMAGE", state.CONFIG.trainer_image))
    ap.add_argument("--metrics-port", type=int, default=8080)
    ap.add_argument("--health-port", type=int, default=8081)
    ap.add_argument("--resync-seconds", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=4, help="threads reconciling FineTuneJobs (one per job at a time)")
    ap.add_argument("--standalone", action="store_true", help="no leader election: assume this is the only replica")
    ap.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the Lease (default: $POD_NAMESPACE, set by the chart)",
    )
    ap.add_argument("--lease-name", default="thaw-operator")
    ap.add_argument("--lease-seconds", type=float, default=6.0, help="a silent leader is replaced after this long")
    ap.add_argument("--log-format", choices=["plain", "json"], default="json")
    args = ap.parse_args(argv)

    kopf.configure(log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN)
    logging.getLogger("thaw").setLevel(logging.INFO)
    state.CONFIG.trainer_image = args.trainer_image
    state.CONFIG.resync_seconds = args.resync_seconds
    state.CONFIG.namespaces = list(args.namespace)
    state.CONFIG.api = _load_kube_config()
    if args.metrics_port:
        start_http_server(args.metrics_port)

    @kopf.on.startup()
    def _settings(settings: kopf.OperatorSettings, **_):
        settings.posting.enabled = False  # our events come from the planner, not kopf's handler chatter
        settings.execution.max_workers = 32
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60

    elector = None
    if not args.standalone:
        elector = LeaderElector(
            state.CONFIG.api,
            args.leader_election_namespace,
            args.lease_name,
            lease_seconds=args.lease_seconds,
            retry_seconds=max(0.5, args.lease_seconds / 4),
            on_started_leading=state.resync_now,
        ).start()
    state.CONFIG.leader = elector
    stop = threading.Event()
    threading.Thread(target=events.resync_forever, args=(stop,), name="resync", daemon=True).start()
    for i in range(args.workers):
        threading.Thread(target=controller.work_forever, args=(stop,), name=f"worker-{i}", daemon=True).start()
    events.start_watches(stop, list(args.namespace))
    try:
        # kopf watches and dispatches; who acts is decided by the Lease, not by kopf's peering.
        kopf.run(
            standalone=True,
            namespaces=args.namespace or (),
            clusterwide=not args.namespace,
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        )
    finally:
        stop.set()
        if elector is not None:
            elector.stop()


if __name__ == "__main__":
    main()
