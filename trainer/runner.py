"""The recipe: for each stage, freeze -> optimizer and DDP -> fit (early stopping) -> checkpoint.

One process runs every stage (`run`), or exactly one (`--stage K`, what a Kubernetes stage pod
runs), starting from stage K-1's committed checkpoint. Each stage is reseeded from (seed, stage,
rank), so both ways give the same weights. Here: the job around the stages (what is already
done, the start weights, the data, the warm-up); trainer/stage.py runs one stage; setup.py
holds what the stages share.
"""

from __future__ import annotations

import copy
import json
import time

import torch

from thaw_contract.plan import PlannedStage, recipe_warnings, stages_to_run
from thaw_contract.spec import DataSpec, FineTuneJob, SpecError
from thaw_contract.stage_result import stopped_the_job
from trainer import checkpoint as ckpt
from trainer.cpus import available_cpus
from trainer.data import Datasets, build_datasets
from trainer.distributed import DistEnv, barrier, decided_by_main, init_distributed
from trainer.freezing import apply_stage
from trainer.layers import family
from trainer.loaders import loader_workers
from trainer.loop import StepContext, image_preparer
from trainer.progress import Progress
from trainer.resident import ResidentImages, fits
from trainer.setup import Setup, build_setup, check_compatible, load_start, use_feature_cache
from trainer.signals import Terminated
from trainer.stage import run_stage
from trainer.stage_checkpoints import StageResult, write_termination_message
from trainer.storage import StoreError
from trainer.uploader import retrying
from trainer.warmup import Background, warm_up


def run_job(job: FineTuneJob, only_stage: int | None = None) -> list[StageResult]:
    env = init_distributed()
    progress = Progress(env.is_main)
    setup = build_setup(job, env, progress, only_stage or 0)
    todo = stages_to_run(setup.stages, only_stage, env.world)
    for line in recipe_warnings(job.spec, setup.stages):
        progress.message(line)
    todo = not_stopped(setup, todo)
    if not todo:
        return []

    # A finished stage is not run again: its committed checkpoint stands.
    done = {s.index: ckpt.read_final(setup.store, s.index, s.name) for s in todo}
    for found in done.values():
        if found is not None:
            check_compatible(setup, *found)
    pending = [s for s in todo if done[s.index] is None]
    if not pending:
        progress.message(f"{job.metadata.name}: all requested stages already finished; nothing to do")
        if only_stage is not None and env.is_main:  # a retried pod that finds its stage committed reports it
            prefix, _ = done[only_stage]
            pointer = ckpt.read_pointer(setup.store, only_stage, setup.stages[only_stage].name)
            write_termination_message(
                only_stage,
                setup.stages[only_stage].name,
                f"{setup.store.uri}/{prefix}",
                pointer["manifestSha256"],
                pointer.get("metrics", {}),
            )
        return []
    first = pending[0].index
    if first > 0 and only_stage is None:
        progress.message(f"resuming at stage {first} ({pending[0].name}); stages before it are finished")
    warming = start_warmup(setup, pending[0])  # runs while the checkpoint and the data load
    try:
        load_start(setup, first, done.get(first - 1))  # verified above when it was in todo
        data = build_datasets(local_data(job.spec.data, env), job.spec.model.num_classes, job.spec.seed)
        data = resident_data(data, job.spec, env.device)
        if env.is_main:
            progress.message(workers_line(job, env, data))
        if env.local_rank == 0 and shard_files(data) is not None:  # every node says what its cache held
            print(shard_files(data).cache_line(), flush=True)
    except BaseException:
        if warming is not None:
            warming.join()  # a process must not exit under a thread running torch (it aborts)
        raise
    if warming is not None:
        finish_warmup(setup, warming)
    results = []
    for i, stage in enumerate(pending):
        progress.message(
            json.dumps(
                {
                    "event": "stage_start",
                    "stage": stage.name,
                    "index": stage.index,
                    "trainable_groups": [setup.groups[g].name for g in stage.trainable_groups],
                }
            )
        )
        try:
            results.append(run_stage(setup, stage, data))
            if stopped_the_job({"gate": results[-1].gate}) and pending[i + 1 :]:
                progress.message(skipped_line(stage, pending[i + 1 :]))
                break
        except Terminated:  # what is queued still commits
            progress.message("SIGTERM: waiting for pending checkpoint uploads")
            setup.writer.flush()
            raise
        except BaseException:
            # A failed gate or any other error: queued epochs still commit (a rerun resumes
            # from them), and no uploading thread outlives the process (exiting under one aborts).
            setup.writer.close()
            raise
    setup.writer.close()
    if env.local_rank == 0 and shard_files(data) is not None:
        print(shard_files(data).cache_line(), flush=True)
    if setup.metrics is not None and job.spec.metrics.linger_seconds:
        time.sleep(job.spec.metrics.linger_seconds)
    return results


def not_stopped(setup: Setup, todo: list[PlannedStage]) -> list[PlannedStage]:
    """`todo` without the stages after one whose gate ended the job (onRegression: stop): a
    rerun, or a pod started for a later stage by hand, does nothing for them."""
    last = todo[-1].index

    def find() -> int | None:
        for s in setup.stages[:last]:
            pointer = ckpt.read_pointer(setup.store, s.index, s.name)
            if pointer is not None and stopped_the_job(pointer.get("metrics")):
                return s.index
        return None

    stop = decided_by_main(find, setup.env)
    if stop is None:
        return todo
    if skipped := [s for s in todo if s.index > stop]:
        setup.progress.message(skipped_line(setup.stages[stop], skipped))
    return [s for s in todo if s.index <= stop]


def skipped_line(stopper: PlannedStage, skipped: list[PlannedStage]) -> str:
    return f"{stopper.name} ended the job (spec.gate.onRegression: stop); skipped: {', '.join(s.name for s in skipped)}"


def start_warmup(setup: Setup, stage: PlannedStage) -> Background | None:
    """The stage's passes on a frozen copy of the model, in a thread (trainer/warmup.py)."""
    spec, env = setup.job.spec, setup.env
    cuda = env.device.type == "cuda"
    if spec.speed.warmup == "off" or (spec.speed.warmup == "auto" and not cuda):
        return None
    measure = cuda and spec.speed.channels_last == "auto" and family(spec.model.architecture).depthwise
    # A head-only stage on cached features runs the network forward only, at the cache's batch.
    train = not use_feature_cache(setup, stage)
    n = stage.batch_size // env.world if train else stage.batch_size
    size = spec.data.image_size
    raw = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = image_preparer(setup.mean, setup.std, env.device, setup.channels_last, False)(raw)
    twin = copy.deepcopy(setup.model)  # here, before the main thread loads weights into the model
    apply_stage(twin, setup.groups, stage, no_grad_prefix=spec.speed.frozen_prefix_no_grad)
    autocast = StepContext(env, lambda t: t, setup.autocast_dtype, None).autocast
    return Background(lambda: warm_up(twin, x, autocast, train, measure))


def finish_warmup(setup: Setup, warming: Background) -> None:
    """Join the warm-up; adopt the layout it measured faster, as rank 0 measured it (DDP's
    gradient buckets follow each parameter's strides: ranks must not differ)."""
    r = warming.result()
    text = f"warm-up: {r.seconds:.1f} s beside loading the checkpoint and the data"
    if r.channels_last is not None:
        use = decided_by_main(lambda: r.channels_last, setup.env)
        per_step = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r.step_seconds.items())
        text += f"; channelsLast auto: {per_step} per step -> {'channels_last' if use else 'contiguous'}"
        if use != setup.channels_last:
            setup.channels_last = use
            setup.model.to(memory_format=torch.channels_last if use else torch.contiguous_format)
    setup.progress.message(text)


def workers_line(job: FineTuneJob, env: DistEnv, data: Datasets) -> str:
    """How the images reach the training processes, said once: resident, or decoded by how many workers."""
    if isinstance(data.train, ResidentImages):
        return "data: held on the device (speed.dataOnDevice); no DataLoader workers"
    workers = loader_workers(job, env, data.train)
    said = f"data: {workers} DataLoader worker{'' if workers == 1 else 's'} per rank"
    if job.spec.data.workers != "auto":
        return f"{said} (data.workers)"
    if data.train.split.folder is None:
        return f"{said} (data.workers auto: the images are in memory, nothing to decode)"
    cpus, ranks = available_cpus(job.spec.resources.cpu), env.local_world
    return f"{said} (data.workers auto: {cpus:g} CPUs for {ranks} rank{'' if ranks == 1 else 's'} here)"


def shard_files(data: Datasets):
    """The shard files a shard source reads (trainer/shards.py), else None."""
    folder = getattr(getattr(data.train, "split", None), "folder", None)
    return getattr(folder, "files", None)


def resident_data(data: Datasets, spec, device: torch.device) -> Datasets:
    """The splits held on the device (trainer/resident.py) where spec.speed.dataOnDevice says so."""
    mode = spec.speed.data_on_device
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return data
    splits = [data.train, data.val, data.test]
    if not fits(splits, device):
        if mode == "on":
            raise SpecError(
                f"spec.speed.dataOnDevice: on needs an in-memory source that takes under a quarter of the "
                f"device's free memory; {spec.data.source} does not (use auto or off)"
            )
        return data
    return Datasets(*(ResidentImages(s, device) for s in splits), data.classes, data.bad)


def local_data(spec: DataSpec, env: DistEnv) -> DataSpec:
    """An s3:// source mirrored into the data cache (local rank 0 syncs, the rest wait; pods that
    share the cache volume, spec.dataCache, take turns, and the later ones find it current). A shard
    set is not mirrored: its shards are fetched as the ranks read them (trainer/shards.py)."""
    from trainer.shards import is_shard_source

    if not spec.source.startswith("s3://") or is_shard_source(spec.source, spec.endpoint):
        return spec
    from trainer.datasync import RETRY_SECONDS, cache_lock, cache_path, sync_prefix

    dest = cache_path(spec.cache_dir, spec.source)
    if env.local_rank == 0:
        try:
            with cache_lock(dest):
                n = retrying(
                    lambda: sync_prefix(spec.source, dest, spec.endpoint),
                    RETRY_SECONDS,
                    "data sync",
                    transient_only=True,
                )
        except StoreError as err:
            if err.transient:
                raise
            raise SpecError(f"spec.data.source: {err}") from None
        print(f"data: {spec.source} -> {dest} ({n} objects downloaded)", flush=True)  # by each node
    barrier(env)
    return spec.model_copy(update={"source": f"file://{dest}"})
