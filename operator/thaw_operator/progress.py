"""Live progress of a running stage: what rank 0 serves on its metrics port.

Rank 0 runs the tenant's image, so its answer is untrusted input: the request follows no
redirect (the pod could point the operator at an internal URL and have the answer shown back),
the whole read has a deadline (a pod that trickles bytes cannot hold a reconcile worker), the
body is bounded, nothing of the response is ever quoted (in logs, events or status), and only
three numbers within their ranges come out of it.
"""

from __future__ import annotations

import http.client
import math
import time

DEADLINE_SECONDS = 2.0  # the whole answer; one wait on the socket is at most WAIT_SECONDS beyond it
WAIT_SECONDS = 1.0
MAX_BYTES = 1 << 20
WANTED = {"thaw_epoch": "epoch", "thaw_val_accuracy_ratio": "valAccuracy", "thaw_eta_seconds": "etaSeconds"}


def scrape_progress(pod: dict, port: int, deadline: float = DEADLINE_SECONDS) -> dict | None:
    """Epoch, validation accuracy and ETA that rank 0 serves (best effort: None on any failure).
    `port` is the one the operator set in the pod spec; the address is the pod status'."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    text = fetch(ip, port, deadline)
    return None if text is None else parse_progress(text)


def fetch(host: str, port: int, deadline: float = DEADLINE_SECONDS) -> str | None:
    """GET /metrics with http.client: one request, no redirect followed (a 3xx is just not 200),
    no proxy; None past the deadline, above MAX_BYTES, or on any error."""
    end = time.monotonic() + deadline
    conn = http.client.HTTPConnection(host, port, timeout=min(WAIT_SECONDS, deadline))
    try:
        conn.request("GET", "/metrics", headers={"Accept": "text/plain"})
        r = conn.getresponse()
        if r.status != 200:
            return None
        chunks, size = [], 0
        while chunk := r.read1(65536):
            size += len(chunk)
            if size > MAX_BYTES or time.monotonic() > end:
                return None
            chunks.append(chunk)
    except (OSError, http.client.HTTPException, ValueError):  # refused, reset, timed out, malformed
        return None
    finally:
        conn.close()
    return b"".join(chunks).decode("utf-8", "replace")


def parse_progress(text: str) -> dict | None:
    """The three numbers from Prometheus text (rank 0's samples), each kept only within its range;
    None when none is there or the text does not parse."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in WANTED and sample.labels.get("rank", "0") == "0":
                    out[WANTED[sample.name]] = float(sample.value)
    except Exception:  # noqa: BLE001 - any parse failure: no progress, and nothing of it repeated
        return None
    ok = {
        "epoch": lambda v: v.is_integer() and 0 <= v < 1e6,
        "valAccuracy": lambda v: 0 <= v <= 1,
        "etaSeconds": lambda v: 0 <= v < 1e8,
    }
    out = {k: v for k, v in out.items() if math.isfinite(v) and ok[k](v)}
    if "epoch" in out:
        out["epoch"] = int(out["epoch"])
    return out or None
