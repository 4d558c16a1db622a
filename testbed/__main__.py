"""make cluster-up / cluster-down: the same cluster the tests use, left running for a person."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from testbed.control_plane import DEFAULT_STATE, ControlPlane, stop_leftovers
from testbed.node_agent import teardown_network


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m testbed")
    ap.add_argument("command", choices=["up", "down"])
    ap.add_argument("--state", type=Path, default=DEFAULT_STATE)
    ap.add_argument("--kwok-nodes", type=int, default=int(os.environ.get("KWOK_NODES", "2")))
    ap.add_argument("--process-nodes", type=int, default=1)
    args = ap.parse_args()
    if args.command == "down":
        stop_leftovers(args.state)
        teardown_network()
        print(f"cluster in {args.state} stopped")
        return
    t0 = time.monotonic()
    cp = ControlPlane(args.state, kwok_nodes=args.kwok_nodes, process_nodes=args.process_nodes).start()
    print(f"cluster up in {time.monotonic() - t0:.1f}s")
    print(f"export KUBECONFIG={cp.kubeconfig_path}")
    print(f"kubectl: {cp.bins}/kubectl   logs: {args.state}/logs   down: make cluster-down")


if __name__ == "__main__":
    main()
