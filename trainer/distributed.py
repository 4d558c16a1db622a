"""The process group, from torchrun's environment: gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed() -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    return DistEnv(rank, world, local_rank, local_world, device)


def all_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats over all ranks (float64, so counts stay exact)."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def decided_by_main(fn, env: DistEnv):
    """fn() run on rank 0 only, its result (or its error) given to every rank: one decision,
    taken once, that all ranks act on (e.g. which checkpoint a stage resumes from)."""
    if not env.distributed:
        return fn()
    box: list = [None]
    error: BaseException | None = None
    if env.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
            box[0] = ("error", type(err).__name__, str(err), getattr(err, "transient", False))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][0] == "ok":
        return box[0][1]
    from thaw_contract.spec import SpecError
    from trainer.storage import CheckpointError, StoreError

    _, kind, message, transient = box[0]
    if kind == "SpecError":
        raise SpecError(message)
    if kind == "StoreError" or kind == "MissingObject":
        raise StoreError(message, transient=transient)
    raise CheckpointError(f"rank 0: {kind}: {message}")


def average_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Average floating-point buffers (BatchNorm running stats) over ranks.

    DDP broadcasts rank 0's buffers before each forward, but the forward itself then
    updates them from the local batch, so replicas end every epoch a step apart.
    Averaging (as timm's distribute_bn does) makes them identical and uses every rank's data.
    """
    if not env.distributed:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(env.world)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
