"""`python -m trainer launch JOB --stage K`: what a stage pod runs.

1. **Preflight**, in this one process, before any rendezvous: the spec, every stage resolved
   against the model's layer groups (meta device, no weights), the data source and the
   checkpoint store. A configuration error exits 2 with one line on stderr and in the
   termination message; the Job's podFailurePolicy (FailJob on 2) then ends the stage at once,
   and the operator shows that line. No launcher traceback, no retry.
2. **torchrun**, run in-process through `torch.distributed.run` with the pod's rendezvous
   settings (env: MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE). torchrun exits
   1 whatever its workers did, so a worker that finds a configuration error later leaves it in
   the termination message and the launcher turns that into exit 2; any other worker failure
   is one line and exit 1 (retried by the operator).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from thaw_contract.spec import EXIT_CONFIG_ERROR, FineTuneJob, SpecError, load_job


def write_termination(doc: dict) -> None:
    """The container's termination message (Kubernetes keeps 4 KiB): JSON the operator reads."""
    path = os.environ.get("THAW_TERMINATION_LOG")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump(doc, f)
    except OSError as err:  # outside a pod the path may not exist
        print(f"warning: termination message not written to {path}: {err.strerror}", file=sys.stderr, flush=True)


def config_error(message: str) -> int:
    """Report a configuration error where a user and the operator look for it."""
    line = message.replace("\n", "; ")
    print(f"error: {line}", file=sys.stderr, flush=True)
    write_termination({"error": line[:3500], "configuration": True})
    return EXIT_CONFIG_ERROR


def read_termination() -> dict | None:
    path = os.environ.get("THAW_TERMINATION_LOG")
    try:
        with open(path or "") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def preflight(job: FineTuneJob, stage: int | None) -> None:
    """Everything a worker would refuse, checked once per pod; raises SpecError."""
    from thaw_contract.plan import stages_to_run
    from trainer.data import check_source
    from trainer.setup import plan_job
    from trainer.storage import open_store

    _, _, _, stages = plan_job(job)  # layer groups, trainable globs, groupLrs, head size
    stages_to_run(stages, stage, int(os.environ.get("NNODES", "1")) * int(os.environ.get("NPROC_PER_NODE", "1")))
    check_source(job.spec.data)
    # Transient store errors are waited out here (uploadTimeoutSeconds); what is left is the user's to fix.
    open_store(job.spec.checkpoint, job.metadata.name, write=os.environ.get("NODE_RANK", "0") == "0")


def torchrun_args(job_file: str, stage: int | None) -> list[str]:
    env = os.environ
    args = [
        f"--nnodes={env.get('NNODES', '1')}",
        f"--node_rank={env.get('NODE_RANK', '0')}",
        f"--nproc_per_node={env.get('NPROC_PER_NODE', '1')}",
        f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={env.get('MASTER_PORT', '29500')}",
        "-m",
        "trainer",
        "run",
        job_file,
    ]
    return args + (["--stage", str(stage)] if stage is not None else [])


def describe_failures(failures: dict) -> str:
    """torchrun's failed workers ({global rank: ProcessFailure}) as one line."""
    return ", ".join(f"rank {rank}: exit {f.exitcode}" for rank, f in sorted(failures.items()))


def torchrun(args: list[str]) -> None:
    """torchrun in this process, deaf to SIGTERM no longer than signals.install_for_launcher allows."""
    from torch.distributed.run import parse_args, run

    from trainer import signals

    signals.install_for_launcher()
    run(parse_args(args))


def launch(job_file: str, stage: int | None) -> int:
    from trainer.storage import StoreError

    try:
        job = load_job(job_file)
        preflight(job, stage)
    except SpecError as err:
        return config_error(str(err))
    except StoreError as err:  # still unreachable after uploadTimeoutSeconds: a retryable failure
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun(torchrun_args(job_file, stage))
    except ChildFailedError as err:
        found = read_termination() or {}
        if found.get("configuration"):
            print(f"error: {found['error']}", file=sys.stderr, flush=True)
            return EXIT_CONFIG_ERROR
        failed = describe_failures(err.failures)
        print(f"error: training failed ({failed}); see the worker output above", file=sys.stderr)
        return 1
    except SignalException as err:  # SIGTERM (pod deleted, suspended): workers were stopped first
        print(f"terminated by {signal.Signals(err.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0
