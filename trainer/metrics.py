"""Prometheus metrics of a training process (prometheus-client, one registry per process).

Every rank serves its own endpoint (spec.metrics.port + local rank). Labels are finetunejob,
stage and rank (the learning rate adds the layer-group name: a handful per model), so series per
job are bounded by stages x ranks. Rank 0 also exports the job-level `thaw_job_*` series.
Names carry units and counters end in _total, as Prometheus' naming guide asks.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)
disable_created_metrics()  # *_created series double the count and no dashboard uses them
L = ("finetunejob", "stage", "rank")  # not "job": Prometheus reserves that for the scrape job
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SAVE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class TrainerMetrics:
    def __init__(self, job: str, rank: int, registry: CollectorRegistry | None = None):
        self.job, self.rank = job, str(rank)
        self.is_main = rank == 0  # job-level series come from rank 0 only
        self.stage_name = ""
        r = self.registry = registry or CollectorRegistry()
        g = lambda name, doc, labels=L: Gauge(name, doc, labels, registry=r)
        self.train_loss = g("thaw_train_loss", "Mean training cross-entropy of the last epoch")
        self.train_acc = g("thaw_train_accuracy_ratio", "Training accuracy of the last epoch")
        self.val_loss = g("thaw_val_loss", "Validation cross-entropy after the last epoch")
        self.val_acc = g("thaw_val_accuracy_ratio", "Validation accuracy after the last epoch")
        self.lr = g("thaw_learning_rate", "Current learning rate per layer group", (*L, "group"))
        self.ips = g("thaw_images_per_second", "Training images per second on this rank, last epoch")
        self.trainable = g("thaw_trainable_parameters", "Parameters the stage trains")
        self.params = g("thaw_parameters", "Parameters of the model")
        self.epoch_g = g("thaw_epoch", "Epochs of the stage finished")
        self.epochs_g = g("thaw_epochs", "Epochs the stage plans")
        self.step_g = g("thaw_step", "Optimizer steps of the stage done")
        self.steps_g = g("thaw_steps", "Optimizer steps the stage plans")
        self.eta = g("thaw_eta_seconds", "Estimated seconds until the stage ends")
        self.last_ckpt = g("thaw_checkpoint_last_success_timestamp_seconds", "When a checkpoint last committed")
        self.gpu_mem = g("thaw_gpu_memory_allocated_bytes", "CUDA memory allocated by tensors")
        self.gpu_peak = g("thaw_gpu_memory_peak_bytes", "Peak CUDA memory allocated in this stage")
        h = lambda name, doc, buckets: Histogram(name, doc, L, buckets=buckets, registry=r)
        self.step_time = h("thaw_step_duration_seconds", "Wall time of one training step", STEP_BUCKETS)
        self.data_wait = h("thaw_data_wait_seconds", "Time a step waited for its batch", STEP_BUCKETS)
        self.save_blocked = h("thaw_checkpoint_save_seconds", "Time training was blocked per checkpoint", SAVE_BUCKETS)
        self.upload_time = h("thaw_checkpoint_upload_seconds", "Encode and upload time per checkpoint", SAVE_BUCKETS)
        c = lambda name, doc: Counter(name, doc, L, registry=r)
        self.images = c("thaw_train_images", "Training images processed")
        self.upload_bytes = c("thaw_checkpoint_upload_bytes", "Checkpoint bytes committed to the store")
        self.upload_failures = c("thaw_checkpoint_upload_failures", "Failed checkpoint upload attempts")
        # Job level (rank 0 only sets them).
        self.job_stage = Gauge("thaw_job_stage_index", "Index of the stage running", ["finetunejob"], registry=r)
        self.job_stages = Gauge("thaw_job_stages", "Stages in the job", ["finetunejob"], registry=r)
        self.job_world = Gauge("thaw_job_world_size", "Training processes in the job", ["finetunejob"], registry=r)
        self.job_progress = Gauge(
            "thaw_job_progress_ratio", "Share of the job's epochs done", ["finetunejob"], registry=r
        )
        self._epochs_before = 0
        self._epochs_total = 1
        self._step = 0

    def serve(self, port: int) -> int | None:
        """Start the HTTP endpoint; a busy port is a warning, not a failed training run."""
        try:
            server, _ = start_http_server(port, registry=self.registry)
        except OSError as err:
            log.warning("metrics endpoint on port %d not started: %s", port, err.strerror)
            return None
        return server.server_port

    def _l(self) -> dict:
        return {"finetunejob": self.job, "stage": self.stage_name, "rank": self.rank}

    def job_plan(self, stage_epochs: list[int], world: int) -> None:
        self._epochs_total = max(1, sum(stage_epochs))
        self._stage_epochs = stage_epochs
        if self.is_main:
            self.job_stages.labels(self.job).set(len(stage_epochs))
            self.job_world.labels(self.job).set(world)

    def start_stage(self, index: int, name: str, trainable: int, total: int, epochs: int, steps: int) -> None:
        self.stage_name = name
        lab = self._l()
        self.trainable.labels(**lab).set(trainable)
        self.params.labels(**lab).set(total)
        self.epochs_g.labels(**lab).set(epochs)
        self.steps_g.labels(**lab).set(epochs * steps)
        if self.is_main:
            self.job_stage.labels(self.job).set(index)
        # Every per-stage series exists from the start (zeros), so rate() and alerts see it.
        for metric in (
            self.images,
            self.upload_bytes,
            self.upload_failures,
            self.step_time,
            self.data_wait,
            self.save_blocked,
            self.upload_time,
        ):
            metric.labels(**lab)
        self._epochs_before = sum(getattr(self, "_stage_epochs", [])[:index])
        self._step = 0

    def step(self, seconds: float, wait: float, images: int, lrs: dict[str, float] | None = None) -> None:
        lab = self._l()
        for group, lr in (lrs or {}).items():
            self.lr.labels(**lab, group=group).set(lr)
        self.step_time.labels(**lab).observe(seconds)
        self.data_wait.labels(**lab).observe(wait)
        self.images.labels(**lab).inc(images)
        self._step += 1
        self.step_g.labels(**lab).set(self._step)

    def end_epoch(self, row: dict, lrs: dict[str, float], rank_images_per_second: float, step: int) -> None:
        lab = self._l()
        self.train_loss.labels(**lab).set(row["train_loss"])
        self.train_acc.labels(**lab).set(row["train_accuracy"])
        self.val_loss.labels(**lab).set(row["val_loss"])
        self.val_acc.labels(**lab).set(row["val_accuracy"])
        self.ips.labels(**lab).set(rank_images_per_second)
        self.epoch_g.labels(**lab).set(row["epoch"] + 1)
        self.eta.labels(**lab).set(row["eta_seconds"])
        self._step = step
        self.step_g.labels(**lab).set(step)
        for group, lr in lrs.items():
            self.lr.labels(**lab, group=group).set(lr)
        if self.is_main:
            self.job_progress.labels(self.job).set((self._epochs_before + row["epoch"] + 1) / self._epochs_total)

    def end_stage(self, epochs_run: int) -> None:
        """Early stopping: the stage is done even if epochs remained."""
        lab = self._l()
        self.eta.labels(**lab).set(0)
        self.epoch_g.labels(**lab).set(epochs_run)

    def gpu(self, allocated: int, peak: int) -> None:
        self.gpu_mem.labels(**self._l()).set(allocated)
        self.gpu_peak.labels(**self._l()).set(peak)

    # Called from the checkpoint writer's thread: prometheus-client metrics are thread-safe.
    def checkpoint_blocked(self, seconds: float) -> None:
        self.save_blocked.labels(**self._l()).observe(seconds)

    def upload_done(self, seconds: float, size: int) -> None:
        lab = self._l()
        self.upload_time.labels(**lab).observe(seconds)
        self.upload_bytes.labels(**lab).inc(size)
        self.last_ckpt.labels(**lab).set(time.time())

    def upload_failed(self) -> None:
        self.upload_failures.labels(**self._l()).inc()
