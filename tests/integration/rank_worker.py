"""Run under torchrun by test_rank_agreement.py.

`resume STORE OUT`: rank 1 sees the store through a stale listing (the newest epoch missing, as
when a dying attempt commits between two ranks' reads); both ranks record what they resume from.
`stuck`: rank 0 enters an all_reduce that rank 1 never joins, then waits for SIGTERM there.
`finish OUT`: rank 0 finishes at once (its agent then waits in torchrun's exit barrier), rank 1 sleeps.
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

from trainer import signals
from trainer.distributed import init_distributed, shutdown
from trainer.storage import LocalStore


class StaleListing:
    """A store whose listing lags: the newest epoch of stage 0 is not listed yet."""

    def __init__(self, store: LocalStore, hidden: str):
        self.store, self.hidden = store, hidden
        self.uri = store.uri

    def list(self, prefix: str) -> list[str]:
        return [k for k in self.store.list(prefix) if not k.startswith(self.hidden)]

    def __getattr__(self, name):
        return getattr(self.store, name)


def resume(store_dir: str, out: str) -> None:
    from trainer.stage_checkpoints import choose_resume

    env = init_distributed()
    store = LocalStore(store_dir)
    if env.rank == 1:
        store = StaleListing(store, "stage-00-head/epoch-0001")
    spec = SimpleNamespace(checkpoint=SimpleNamespace(upload_timeout_seconds=5))
    setup = SimpleNamespace(store=store, env=env, job=SimpleNamespace(spec=spec))
    prefix, _ = choose_resume(setup, SimpleNamespace(index=0, name="head"))
    with open(f"{out}/rank{env.rank}.json", "w") as f:
        json.dump({"rank": env.rank, "prefix": prefix}, f)
    shutdown()


def stuck(out: str) -> None:
    signals.install()
    env = init_distributed()
    with open(f"{out}/ready{env.rank}", "w"):
        pass
    if env.rank == 0:
        try:
            dist.all_reduce(torch.ones(1))  # rank 1 never joins: blocked in gloo, not in Python
        except signals.Terminated:
            sys.exit(143)
    time.sleep(120)


def finish(out: str) -> None:
    import os

    rank = int(os.environ["RANK"])
    with open(f"{out}/done{rank}", "w"):
        pass
    if rank != 0:
        time.sleep(600)


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        resume(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "finish":
        finish(sys.argv[2])
    else:
        stuck(sys.argv[2])
