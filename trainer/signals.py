"""SIGTERM as an exception: pod deletion, suspend and preemption stop training at the next
bytecode, and the runner lets already-queued checkpoint uploads commit before exiting 143."""

from __future__ import annotations

import signal


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (a BaseException: no `except Exception` swallows it)."""


def _raise(signum, frame):
    raise Terminated()


def install() -> None:
    signal.signal(signal.SIGTERM, _raise)
