"""A stage's checkpoints and what it reports: where it resumes (chosen once by rank 0), each
epoch's save (through the asynchronous writer, then retention), and the final commit: the
stage's pointer in the store and its result in the container's termination message.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from thaw_contract.plan import PlannedStage
from thaw_contract.stage_result import status_summary, stopped_the_job, termination_message
from trainer import checkpoint as ckpt
from trainer.distributed import decided_by_main
from trainer.setup import Setup, check_compatible
from trainer.train_state import TrainState
from trainer.uploader import retrying


@dataclass
class StageResult:
    index: int
    name: str
    trainable_params: int
    total_params: int
    epochs_run: int
    # The val accuracy of the epoch whose weights it committed (its best where one is kept, else its
    # last): the value the gate judged. None when it diverged before an epoch ended. The name is
    # older than that rule (committed summaries and gates.previous_carried read it).
    best_val_accuracy: float | None
    test_accuracy: float
    test_loss: float
    seconds: float
    train_seconds: float  # feature-cache building plus the training passes, no evaluation
    feature_cache: bool
    weights_sha256: str  # of the stage's final state_dict: equal weights, equal digest
    history: list[dict] = field(default_factory=list)
    gate: dict | None = None  # gates.GateOutcome: advanced, rolled back, kept
    diverged: str | None = None  # why the divergence guard stopped it
    collapsed: str | None = None  # the weights it passes on predict one class (gates.collapsed): why
    bad_images: dict | None = None  # images that did not decode and were skipped: count, first files
    lr_found: float | None = None  # lr: auto, the head's rate the range test picked
    model: dict | None = None  # the job's last stage: the model artifact it published (uri, sha256)


def state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def result_summary(r: StageResult) -> dict:
    return dataclasses.asdict(r)


@dataclass
class Resume:
    """Where a stage picks up: the epoch after its newest valid checkpoint."""

    prefix: str
    train_state: TrainState
    model_state: dict
    best_state: dict | None


def choose_resume(setup: Setup, stage: PlannedStage) -> tuple[str, dict] | None:
    """The stage's newest valid checkpoint, chosen once by rank 0 and given to every rank. Ranks
    that each listed the store could pick different epochs (one listing a moment before a late
    commit of a dying attempt) and then train out of step until a collective breaks."""
    timeout = setup.job.spec.checkpoint.upload_timeout_seconds
    find = lambda: retrying(lambda: ckpt.latest_valid(setup.store, stage.index, stage.name), timeout, "resume lookup")
    return decided_by_main(find, setup.env)


def find_resume(setup: Setup, stage: PlannedStage, found: tuple[str, dict] | None) -> Resume | None:
    """Load what `choose_resume` picked (every rank loads the same prefix)."""
    if found is None:
        return None
    prefix, manifest = found
    spec = setup.job.spec
    check_compatible(setup, prefix, manifest)
    state = TrainState.from_dict(ckpt.load_object(setup.store, prefix, "train_state.pt"))
    best = None
    if state.best_dir and state.best_dir != prefix and spec.early_stopping and spec.early_stopping.restore_best:
        best = ckpt.load_object(setup.store, state.best_dir, "model.pt")
    return Resume(prefix, state, ckpt.load_object(setup.store, prefix, "model.pt"), best)


def save_epoch(
    setup: Setup,
    stage: PlannedStage,
    epoch_dir: str,
    row: dict,
    global_step: int,
    model: nn.Module,
    train_state: TrainState,
) -> None:
    spec = setup.job.spec
    meta = {
        "stage": stage.index,
        "stageName": stage.name,
        "epoch": train_state.epoch,
        "globalStep": global_step,
        "metrics": row,
        "architecture": spec.model.architecture,
        "specHash": train_state.spec_hash,
    }
    objects = {"model.pt": model.state_dict(), "train_state.pt": train_state.to_dict()}
    best_dir = train_state.best_dir
    # The divergence guard restores the best epoch: keep it while the guard is on.
    kept = spec.checkpoint.keep_best or spec.early_stopping or spec.divergence.enabled
    keep = {best_dir} if best_dir and kept else set()
    store, keep_last = setup.store, spec.checkpoint.keep_last
    trusted = setup.writer.trusted
    after = lambda _m: ckpt.prune(store, stage.index, stage.name, keep_last, keep, upto=epoch_dir, trusted=trusted)
    setup.writer.save(epoch_dir, objects, meta, after)


def commit_stage(setup: Setup, stage: PlannedStage, final_dir: str, result: StageResult, test=None) -> None:
    """The stage's final checkpoint must be in the store before its pointer is; else the process fails."""
    setup.writer.flush()
    where = f"{setup.store.uri}/{final_dir}"
    if final_dir in setup.writer.failed:
        raise ckpt.CheckpointError(
            f"stage {stage.name}: final checkpoint {where} was not committed: {setup.writer.failed[final_dir]}"
        )
    manifest = setup.writer.committed.get(final_dir) or ckpt.verify(setup.store, final_dir)
    if manifest is None:
        raise ckpt.CheckpointError(f"stage {stage.name}: final checkpoint {where} does not verify")
    if ends_the_job(setup, stage, result):  # before the pointer: a committed last stage has its model
        result.model = publish_model(setup, stage, final_dir, manifest, result, test)
        setup.progress.message(f"model: {result.model['uri']}")
    pointer = retrying(
        lambda: ckpt.mark_final(setup.store, stage.index, stage.name, final_dir, manifest, result_summary(result)),
        setup.job.spec.checkpoint.upload_timeout_seconds,
        f"stage {stage.name}: final pointer",
    )
    write_termination_message(
        stage.index, stage.name, f"{setup.store.uri}/{final_dir}", pointer["manifestSha256"], result_summary(result)
    )


def ends_the_job(setup: Setup, stage: PlannedStage, result: StageResult) -> bool:
    """The job's last stage, or one whose gate stopped the job: its weights are the job's model."""
    return stage.index == len(setup.stages) - 1 or stopped_the_job({"gate": result.gate})


def publish_model(
    setup: Setup, stage: PlannedStage, final_dir: str, manifest: dict, result: StageResult, test=None
) -> dict:
    """The model artifact (trainer/artifact.py) of the weights this stage passes on; `test`, the
    test split's images, checks the serving formats spec.export asks for."""
    from trainer import artifact
    from trainer.report import stage_summaries

    timeout, what = setup.job.spec.checkpoint.upload_timeout_seconds, f"stage {stage.name}: model artifact"
    earlier = retrying(lambda: stage_summaries(setup.store, setup.stages[: stage.index]), timeout, what)
    digest = ckpt.manifest_digest(manifest)
    summaries = [*earlier, result_summary(result)]
    # A store error can come only from reading the checkpoint, before the (slow) exports.
    built = retrying(
        lambda: artifact.build(setup.job, setup.store, stage, final_dir, manifest, digest, summaries, test),
        timeout,
        what,
    )
    return retrying(lambda: artifact.put(setup.store, *built), timeout, what)


def write_termination_message(index: int, name: str, checkpoint: str, digest: str, result: dict) -> None:
    """The stage result where Kubernetes shows it (the container's termination message): the
    operator takes the stage's checkpoint and numbers from here, never from the store."""
    from trainer.launch import write_termination

    write_termination(termination_message(index, name, checkpoint, digest, status_summary(result)))
