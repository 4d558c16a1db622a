"""A stage's data loaders: the training shard of each rank, the evaluation shards, and the
head's inputs computed once when only the head trains (the feature cache)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from thaw_contract.spec import FineTuneJob
from trainer.cpus import auto_workers, available_cpus
from trainer.distributed import DistEnv, all_gather_objects
from trainer.layers import head_module_name
from trainer.loop import StepContext, image_preparer
from trainer.resident import ResidentBatches, ResidentImages
from trainer.setup import Setup
from trainer.shards import ShardSampler, ShardSplit


def train_loader(dataset, batch_size: int, env: DistEnv, shuffle: bool, seed: int, job: FineTuneJob) -> DataLoader:
    data = job.spec.data
    if shuffle and isinstance(getattr(getattr(dataset, "split", None), "folder", None), ShardSplit):
        sampler = ShardSampler(dataset, env.world, env.rank, seed)  # each rank reads its own shards
    else:
        sampler = DistributedSampler(dataset, num_replicas=env.world, rank=env.rank, shuffle=shuffle, seed=seed)
    # One batch shape per stage: the ragged last batch would cost a GPU a second set of
    # kernel plans (and a tiny noisy step). The shuffle drops different images each epoch.
    # A shard smaller than one batch keeps its single short batch.
    drop_last = len(sampler) >= batch_size
    if isinstance(dataset, ResidentImages):
        return ResidentBatches(dataset, batch_size, sampler, drop_last, env.rank, torch.Generator().manual_seed(seed))
    workers = loader_workers(job, env, dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=data.pin_memory and env.device.type == "cuda",
        persistent_workers=data.persistent_workers and workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(dataset, batch_size: int, env: DistEnv, job: FineTuneJob) -> DataLoader:
    """Each rank takes every world-th sample: no padding, so summed metrics are exact."""
    mine = range(env.rank, len(dataset), env.world)
    if isinstance(dataset, ResidentImages):
        return ResidentBatches(dataset, batch_size, mine, drop_last=False)
    shard = Subset(dataset, mine)
    workers = loader_workers(job, env, dataset)
    return DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=env.device.type == "cuda")


def loader_workers(job: FineTuneJob, env: DistEnv, dataset) -> int:
    """data.workers for this dataset: none for tensors already in memory (cached features); auto
    gives workers only to files that need decoding (an image folder), as many as the CPUs this
    pod's ranks share allow (trainer/cpus.py): an in-memory source would only pay their IPC."""
    workers = job.spec.data.workers
    if isinstance(dataset, TensorDataset):
        return 0
    if workers == "auto":
        split = getattr(dataset, "split", None) or getattr(getattr(dataset, "dataset", None), "split", None)
        if split is None or split.folder is None:
            return 0
        workers = auto_workers(available_cpus(job.spec.resources.cpu), env.local_world)
    return workers


def cached_features(setup: Setup, datasets: list, batch_size: int) -> list[TensorDataset]:
    """Inputs of the head for each dataset, computed once in eval mode, shared by all ranks."""
    model, env = setup.model, setup.env
    head = model.get_submodule(head_module_name(setup.job.spec.model.architecture))
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    prepare = image_preparer(setup.mean, setup.std, env.device, setup.channels_last, False)
    out = []
    try:
        model.eval()
        for ds in datasets:
            captured.clear()
            idx = list(range(env.rank, len(ds), env.world))  # the shard _eval_loader reads
            loader = eval_loader(ds, batch_size, env, setup.job)
            with torch.no_grad():
                for x, _ in loader:
                    with StepContext(env, prepare, setup.autocast_dtype, None).autocast():
                        model(prepare(x))
            mine = (idx, torch.cat(captured) if captured else torch.empty(0))
            parts = all_gather_objects(mine, env)
            feats = torch.cat([p[1] for p in parts if len(p[0])])
            order = [i for p in parts for i in p[0]]
            perm = torch.empty(len(order), dtype=torch.long)
            perm[torch.tensor(order)] = torch.arange(len(order))
            labels = ds.labels
            out.append(TensorDataset(feats[perm], labels))
    finally:
        handle.remove()
    return out
