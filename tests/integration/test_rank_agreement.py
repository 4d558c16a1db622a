"""Every rank resumes from the same checkpoint, chosen once; a rank stuck in a collective
still honours SIGTERM within a bounded time. Both run real gloo process groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import ROOT, torchrun
from trainer import checkpoint as ckpt
from trainer.signals import STUCK_SECONDS
from trainer.storage import LocalStore

pytestmark = pytest.mark.integration


def test_every_rank_resumes_from_the_checkpoint_rank_zero_chose(tmp_path):
    store = LocalStore(tmp_path / "store")
    for epoch in (0, 1):
        ckpt.commit(
            store,
            ckpt.epoch_prefix(0, "head", epoch),
            ckpt.encode({"model.pt": {"w": torch.full((2,), float(epoch))}}),
            {"epoch": epoch},
        )
    stale = [k for k in store.list("stage-00-head") if "epoch-0001" not in k]
    assert stale and all("epoch-0000" in k for k in stale)  # what rank 1 alone would have resumed from
    out = tmp_path / "out"
    out.mkdir()
    torchrun(2, "tests/integration/rank_worker.py", "resume", str(tmp_path / "store"), str(out), timeout=120)
    chosen = [json.loads((out / f"rank{r}.json").read_text())["prefix"] for r in (0, 1)]
    assert chosen == ["stage-00-head/epoch-0001"] * 2


def test_a_rank_blocked_in_a_collective_exits_soon_after_sigterm(tmp_path):
    """Python handlers cannot run while gloo blocks; the watchdog exits 143 instead of hanging
    until torchrun's SIGKILL (30 s) or the collective timeout (10 min)."""
    exe = Path(sys.executable).parent / "torchrun"
    proc = subprocess.Popen(
        [str(exe), "--standalone", "--nproc_per_node=2", "tests/integration/rank_worker.py", "stuck", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, "workers did not start"
            time.sleep(0.2)
        time.sleep(2)  # rank 0 is inside all_reduce now
        pids = subprocess.run(
            ["pgrep", "-f", f"rank_worker.py stuck {tmp_path}"], capture_output=True, text=True
        ).stdout.split()
        workers = [int(p) for p in pids if int(p) != proc.pid]
        rank0 = [
            p
            for p in workers
            if "LOCAL_RANK=0" in Path(f"/proc/{p}/environ").read_text().replace("\0", "\n").split("\n")
        ]
        assert len(rank0) == 1, f"rank 0 worker not found among {workers}"
        t0 = time.monotonic()
        os.kill(rank0[0], signal.SIGTERM)
        while Path(f"/proc/{rank0[0]}").exists() and _state(rank0[0]) != "Z":
            assert time.monotonic() - t0 < STUCK_SECONDS + 10, "rank 0 ignored SIGTERM"
            time.sleep(0.2)
        waited = time.monotonic() - t0
    finally:
        proc.terminate()  # torchrun stops its remaining worker (rank 1, asleep: SIGTERM ends it)
        try:
            out = proc.communicate(timeout=60)[0]
        finally:
            proc.kill()
            subprocess.run(["pkill", "-KILL", "-f", f"rank_worker.py stuck {tmp_path}"], check=False)
    # The watchdog's line: the Python handler never ran (rank 0 was really blocked in gloo).
    assert "SIGTERM not handled within" in out, out[-2000:]
    assert waited < STUCK_SECONDS + 10


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return "Z"


def test_a_launcher_waiting_for_a_dead_peer_exits_soon_after_sigterm(tmp_path):
    """A stage pod whose worker finished while its peer pod died: torchrun's agent waits in its
    exit barrier (native code, up to 300 s) for the dead agent, deaf to SIGTERM, and the next
    attempt waits for this pod to stop. The launcher's watchdog exits 143 soon after SIGTERM."""
    from testbed.net import free_port

    port = free_port()
    code = "import sys; from trainer.launch import torchrun; torchrun(sys.argv[1:])"

    def agent(node: int) -> subprocess.Popen:
        args = ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1"]
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                *args,
                f"--master_port={port}",
                "tests/integration/rank_worker.py",
                "finish",
                str(tmp_path),
            ],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    node0, node1 = agent(0), agent(1)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"done{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and node0.poll() is None, "workers did not start"
            time.sleep(0.2)
        os.killpg(node1.pid, signal.SIGKILL)  # the peer pod dies: its agent never reaches the barrier
        time.sleep(3)  # node 0's worker has exited; its agent waits in the exit barrier
        assert node0.poll() is None
        t0 = time.monotonic()
        node0.send_signal(signal.SIGTERM)
        out = node0.communicate(timeout=STUCK_SECONDS + 30)[0]
        waited = time.monotonic() - t0
    finally:
        for p in (node0, node1):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert node0.returncode == 143, out[-2000:]
    assert waited < STUCK_SECONDS + 5, waited
    assert "exit barrier" in out, out[-2000:]
