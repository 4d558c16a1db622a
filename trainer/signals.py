"""SIGTERM as an exception: pod deletion, suspend and preemption stop training at the next
bytecode, and the runner lets already-queued checkpoint uploads commit before exiting 143.

Python runs signal handlers only between bytecodes of the main thread. A rank blocked in a
collective whose peer died (gloo, NCCL) never gets there and would ignore SIGTERM until the
collective times out. So the C-level handler also writes the signal to a pipe
(`signal.set_wakeup_fd`), a watchdog thread reads it, and if the Python handler has not run
within `STUCK_SECONDS`, the process exits 143 at once: a hung rank never outlives its
peers' failure by more than that.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

STUCK_SECONDS = 10.0
_handled = threading.Event()


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (a BaseException: no `except Exception` swallows it)."""


def _raise(signum, frame):
    _handled.set()
    raise Terminated()


def _sigterms(fd: int):
    """Yields each time the wakeup pipe reports a SIGTERM; returns when the pipe closes."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGTERM in data:
            yield


def _watch(fd: int, stuck_seconds: float) -> None:
    for _ in _sigterms(fd):
        if not _handled.wait(stuck_seconds):
            print(
                f"SIGTERM not handled within {stuck_seconds:g}s (blocked in native code, e.g. a collective "
                "whose peer is gone): exiting 143 without waiting for it",
                file=sys.stderr,
                flush=True,
            )
            os._exit(143)


def _detach() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from a thread other than the main one: nothing was inherited there
        pass


def install(stuck_seconds: float = STUCK_SECONDS) -> None:
    signal.signal(signal.SIGTERM, _raise)
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    # A forked DataLoader worker must not report its own signals into this process's pipe.
    os.register_at_fork(after_in_child=_detach)
    threading.Thread(target=_watch, args=(read, stuck_seconds), name="sigterm-watchdog", daemon=True).start()


def _has_children(pid: int) -> bool:
    """A live child (an exited worker stays a zombie until the blocked main thread reaps it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state not in ("Z", "X"):
            return True
    return False


def _watch_launcher(fd: int, stuck_seconds: float) -> None:
    for _ in _sigterms(fd):
        idle_since = None
        while True:  # the process normally exits long before this loop ends
            time.sleep(0.5)
            if _has_children(os.getpid()):
                idle_since = None  # workers still stopping (committing queued checkpoints): torchrun's job
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= stuck_seconds:
                print(
                    f"SIGTERM: no worker left and still here after {stuck_seconds:g}s (torchrun's exit barrier "
                    "waits for peers that are gone): exiting 143",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(143)


def install_for_launcher(stuck_seconds: float = STUCK_SECONDS) -> None:
    """The stage pod's launcher: torchrun's agent handles SIGTERM itself (it stops the workers,
    which commit what is queued), but once its own workers have finished it waits in its exit
    barrier, in native code, up to 300 s for agents that may be dead (a failed peer pod), deaf
    to SIGTERM, and the Job's next attempt waits for this pod to stop. So: after SIGTERM, once
    no worker is left, exit 143 within stuck_seconds. torchrun installs the Python handler;
    the wakeup fd reports any handled signal whichever handler it is."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    os.register_at_fork(after_in_child=_detach)
    threading.Thread(target=_watch_launcher, args=(read, stuck_seconds), name="sigterm-watchdog", daemon=True).start()
