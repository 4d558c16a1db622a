"""The operator's read of rank 0's progress (thaw_operator.progress) against real HTTP servers on
loopback that behave as a hostile tenant's rank 0 might: it redirects, trickles, lies or floods."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from thaw_operator.progress import MAX_BYTES, fetch, parse_progress, scrape_progress

GOOD = (
    '# TYPE thaw_epoch gauge\nthaw_epoch{rank="0",stage="top3"} 3\nthaw_epoch{rank="1",stage="top3"} 9\n'
    'thaw_val_accuracy_ratio{rank="0"} 0.81\nthaw_eta_seconds{rank="0"} 42\n'
)


def serve(behaviour):
    """A loopback server whose GET runs `behaviour(handler)`; (port, requests seen, stop)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            behaviour(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], seen, server.shutdown


def answer(body: bytes, status: int = 200, headers=()):
    def run(h):
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return run


def test_rank0s_numbers_are_read_and_only_rank0s():
    port, seen, stop = serve(answer(GOOD.encode()))
    try:
        pod = {"status": {"podIP": "127.0.0.1"}}
        assert scrape_progress(pod, port) == {"epoch": 3, "valAccuracy": 0.81, "etaSeconds": 42.0}
        assert seen == ["/metrics"]
        assert scrape_progress({"status": {}}, port) is None  # no address yet
    finally:
        stop()


def test_a_redirect_is_not_followed():
    target_port, target_seen, stop_target = serve(answer(b"secret 1\n"))
    to = f"http://127.0.0.1:{target_port}/internal"
    port, _, stop = serve(answer(b"", 302, [("Location", to)]))
    try:
        assert fetch("127.0.0.1", port) is None
        assert target_seen == []  # the operator never asked the URL the pod named
    finally:
        stop(), stop_target()


def test_a_pod_that_trickles_bytes_is_cut_at_the_deadline():
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(600):  # 60 s of one byte per 0.1 s, unless the reader leaves
            try:
                h.wfile.write(b"#")
                h.wfile.flush()
            except OSError:
                return
            time.sleep(0.1)

    port, _, stop = serve(trickle)
    try:
        t0 = time.monotonic()
        assert fetch("127.0.0.1", port, deadline=1.0) is None
        assert time.monotonic() - t0 < 10  # cut near its 1 s deadline, not after the pod's 60 s
    finally:
        stop()


def test_a_flood_errors_and_lies_give_no_progress():
    port, _, stop = serve(answer(b"#" * (MAX_BYTES + 10)))
    try:
        assert fetch("127.0.0.1", port) is None
    finally:
        stop()
    port, _, stop = serve(answer(b"nope", 500))
    try:
        assert fetch("127.0.0.1", port) is None
    finally:
        stop()
    assert parse_progress('thaw_epoch{rank="0" 3\n<html>') is None  # unparseable: nothing, not the text
    lies = 'thaw_epoch{rank="0"} 2.5\nthaw_val_accuracy_ratio{rank="0"} 7\nthaw_eta_seconds{rank="0"} NaN\n'
    assert parse_progress(lies) is None  # each out of its range: dropped
    assert parse_progress('thaw_val_accuracy_ratio{rank="0"} 0.5\nthaw_eta_seconds{rank="0"} -1\n') == {
        "valAccuracy": 0.5
    }


def test_nothing_listening_is_none():
    assert fetch("127.0.0.1", 1) is None  # refused at once
