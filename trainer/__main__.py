"""python -m trainer {run,plan,report,launch} JOB.yaml — the same file the cluster runs;
python -m trainer pack SRC DST — an image folder as shards (trainer/pack.py);
python -m trainer export JOB.yaml, predict MODEL_URI IMAGES... — the model artifact (trainer/artifact.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

from thaw_contract.spec import SpecError, load_job
from trainer import signals
from trainer.signals import Terminated
from trainer.storage import CheckpointError


def _plan(args) -> int:
    from trainer.gates import describe, sensitivity, visible_drop
    from trainer.setup import plan_job

    job = load_job(args.job)
    built, groups, group_of, stages = plan_job(job)
    counts = [0] * len(groups)
    for name, p in built.model.named_parameters():
        counts[group_of[name]] += p.numel()
    total = sum(counts)
    print(f"{job.metadata.name}: {job.spec.model.architecture}, {len(groups)} layer groups, {total:,} parameters")
    print("groups (stem -> head): " + ", ".join(f"{g.name}={c:,}" for g, c in zip(groups, counts)))
    fmt = lambda xs: "(" + ", ".join(f"{x:.3f}" for x in xs) + ")"  # noqa: E731
    print(
        f"input: RGB at {job.spec.data.image_size} px, scaled to [0, 1], then (x - mean) / std with mean "
        f"{fmt(built.mean)}, std {fmt(built.std)}"
    )
    val_images = job.spec.model.num_classes * job.spec.data.val_per_class
    for s in stages:
        n = sum(p.numel() for name, p in built.model.named_parameters() if name in s.trainable_params)
        lrs = ", ".join(f"{groups[g].name}={lr:.3g}" for g, lr in s.group_lrs.items())
        if s.lr_auto:
            lrs = f"auto (a range test picks the head's at the stage's start; relative: {lrs})"
        warm = f" after a {s.schedule.warmup_epochs:g}-epoch warm-up" if s.schedule.warmup_epochs else ""
        print(
            f"  [{s.index}] {s.name}: {s.epochs} epochs, batch {s.batch_size}, {s.schedule.name}{warm}, "
            f"trainable {n:,} ({100 * n / total:.1f}%), lr {lrs}"
        )
        print(f"      {bn_policy(s)}")
        if s.index > 0:
            print(f"      {describe(s.gate)}")
            seen = sensitivity(s.gate, val_images)
            if seen:
                print(f"      {seen}")
            drop = visible_drop(val_images, 0.1, s.gate.alpha) if seen else 0
            if drop is None or drop > BLIND_GATE:
                print(
                    f"warning: {s.name}: on {val_images} validation images the gate cannot see a drop of "
                    f"{100 * BLIND_GATE:.0f} points; raise spec.data.valPerClass"
                )
    from thaw_contract.plan import recipe_warnings

    for line in recipe_warnings(job.spec, stages):
        print(line)
    return 0


# A paired gate that cannot see a 5-point drop (where a tenth of the images change) mostly waves stages through.
BLIND_GATE = 0.05


def bn_policy(stage) -> str:
    """What the stage's BatchNorm layers do with their running statistics (trainer/freezing.py)."""
    if stage.freeze_bn_stats:
        return "BatchNorm: every layer's statistics stay fixed, trainable ones too (freezeBnStats)"
    if stage.train_bn:
        return "BatchNorm: every layer updates its statistics, in frozen groups too (trainBn)"
    return "BatchNorm: layers in trainable groups update their statistics; frozen groups' stay fixed"


def _run(args) -> int:
    from trainer.distributed import shutdown
    from trainer.runner import run_job

    job = load_job(args.job)
    signals.install()
    try:
        results = run_job(job, args.stage)
        from trainer.distributed import init_distributed

        if init_distributed().is_main and results:
            try:
                _report(job)
            except Exception as err:  # noqa: BLE001 - the stage is committed; the table is a courtesy
                print(f"warning: the per-stage report failed ({err}); the checkpoints stand", file=sys.stderr)
    finally:
        shutdown()
    return 0


def _report(job) -> None:
    from pathlib import Path

    from trainer.report import format_table, plot_curves, stage_summaries
    from trainer.setup import plan_job
    from trainer.storage import LocalStore, open_store

    _, _, _, stages = plan_job(job)
    store = open_store(job.spec.checkpoint, job.metadata.name, write=False)
    rows = stage_summaries(store, stages)
    if not rows:
        print(f"{job.metadata.name}: no finished stages in {store.uri}")
        return
    print(format_table(rows))
    if isinstance(store, LocalStore):
        print(f"curves: {plot_curves(rows, store.root / 'curves.png')}")
        return
    # Drawn in a temporary directory: rank 0 of a stage pod runs this on a read-only root.
    with tempfile.TemporaryDirectory() as tmp:
        store.put("curves.png", plot_curves(rows, Path(tmp) / "curves.png").read_bytes())
    print(f"curves: {store.uri}/curves.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run all stages, or one with --stage")
    run.add_argument("job")
    run.add_argument("--stage", type=int, help="run only this stage (0-based), from stage K-1's checkpoint")
    plan = sub.add_parser("plan", help="print the resolved stages with trainable parameter counts")
    plan.add_argument("job")
    report = sub.add_parser("report", help="print the per-stage table and write curves.png")
    report.add_argument("job")
    launch = sub.add_parser("launch", help="a stage pod's entry point: preflight checks, then torchrun (env)")
    launch.add_argument("job")
    launch.add_argument("--stage", type=int)
    pack = sub.add_parser("pack", help="an ImageFolder (folder or s3:// prefix) as WebDataset shards with a manifest")
    pack.add_argument("src", help="train/<class>/* and test/<class>/* (or val/): a folder or s3://bucket/prefix")
    pack.add_argument("dst", help="a folder or s3://bucket/prefix for the shards and thaw-shards.json")
    pack.add_argument("--shard-mib", type=float, default=64, help="about this many MiB per shard (default 64)")
    pack.add_argument("--seed", type=int, default=0, help="the shuffle that mixes classes within shards")
    pack.add_argument("--endpoint", help="S3 endpoint URL; default AWS_ENDPOINT_URL")
    export = sub.add_parser("export", help="write the model artifact (safetensors + config.json) from the checkpoints")
    export.add_argument("job")
    predict = sub.add_parser("predict", help="top classes of image files with a model artifact, one JSON line each")
    predict.add_argument("model", help="the artifact's URI (file:// or s3://, as export prints it)")
    predict.add_argument("images", nargs="+", help="image files, folders or s3:// prefixes")
    predict.add_argument("--endpoint", help="S3 endpoint URL for s3:// images; default AWS_ENDPOINT_URL")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--batch", type=int, default=64)
    predict.add_argument("--output", help="write the answers here (CSV when it ends in .csv, else JSON lines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "launch":
        from trainer.launch import launch as launch_stage

        return launch_stage(args.job, args.stage)
    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "pack":
            from trainer.pack import pack as pack_shards

            pack_shards(args.src, args.dst, int(args.shard_mib * 2**20), args.seed, args.endpoint)
            return 0
        if args.command == "export":
            from trainer.artifact import export as export_model

            print(f"model: {export_model(load_job(args.job))}")
            return 0
        if args.command == "predict":
            from trainer.artifact import predict as run_predict

            run_predict(args.model, args.images, args.top_k, args.batch, args.endpoint, output=args.output)
            return 0
        if args.command == "report":
            _report(load_job(args.job))
            return 0
        return _run(args)
    except SpecError as err:
        from trainer.launch import config_error

        return config_error(str(err))  # stderr and the termination message; exit 2
    except Terminated:
        print(
            "terminated (SIGTERM): pending checkpoints were committed; a rerun resumes from the last one",
            file=sys.stderr,
        )
        return 143
    except (CheckpointError, OSError) as err:  # store failures are OSErrors (StoreError) with one line
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
