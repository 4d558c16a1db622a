"""Loopback helpers shared by the service launchers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int, offset: int = 0) -> list[int]:
    """n ports, each free together with port+offset (servers that also bind a gRPC port there)."""
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p + offset < 65536 and p not in out:
            try:
                if offset:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", p + offset))
                out.append(p)
            except OSError:
                continue
    return out


# Loopback never goes through a proxy, whatever http(s)_proxy says.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with OPENER.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str, **params) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = http_get(url + query)
    assert status == 200, f"{url}: HTTP {status}: {body[:300]!r}"
    return json.loads(body)


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError:  # the check decided it can never become true
            raise
        except Exception as err:  # noqa: BLE001 - polling until ready
            last = err
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s (last error: {last})")


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Signal a server started with start_new_session=True (its whole group); SIGKILL if it lingers."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
