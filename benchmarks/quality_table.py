"""The quality table: is staged unfreezing worth it, and when? (docs/results.md)

    python benchmarks/quality_table.py --budgets 10 100 --seeds 0 1 2 --out docs/results.md
    python benchmarks/quality_table.py --budgets 1000 --seeds 0 --parallel 6 \
        --section quality-1000 --out docs/results.md

Fashion-MNIST with the bundled ImageNet EfficientNet-Lite0 at 64 px, at several label
budgets (training images per class, drawn by the seed; every method sees the same subset
for a seed), the first 2,000 official test images. Methods, each neural one with the same
total epoch budget: logistic regression on raw pixels; the network from scratch; head only
(linear probe); full fine-tuning; gradual unfreezing (head -> top 3 groups -> all, one lr);
gradual unfreezing with discriminative rates (lrDecay 1.5, the quickstart's recipe); and
`gradual: {stages: 3, epochsPerStage: 4}` with every other field at its default (what a user
who trusts the defaults writes). Every run has the spec's default stage gate (rollback).
Reported: test accuracy mean and standard deviation over seeds and per seed, the worst fall of
test accuracy from one stage to the next (staged methods), wall time, and
trainable-parameter-epochs (sum over stages of trainable parameters x epochs run).
Each run is one process (`python -m trainer run`) with 2 threads; `--parallel N` runs N at
once (a GPU machine's many cores), which the table says, since wall times then share the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_section  # noqa: E402

EPOCHS = 12  # every neural method's total


SOURCE = {"source": "fashion-mnist", "classes": 10, "name": "Fashion-MNIST"}  # --source/--num-classes change it


def base(per_class: int, seed: int, store: str) -> dict:
    return {
        "apiVersion": "thaw.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "q"},
        "spec": {
            "model": {"architecture": "efficientnet_lite0", "weights": "BUNDLED", "numClasses": SOURCE["classes"]},
            "data": {
                "source": SOURCE["source"],
                "imageSize": 64,
                "trainPerClass": per_class,
                "valPerClass": 30,
                "testLimit": 2000,
                "batchSize": min(50, per_class * 5),
            },
            "optimizer": {"name": "sgd", "momentum": 0.9, "weightDecay": 1.0e-4},
            "schedule": {"name": "cosine"},
            "seed": seed,
            "speed": {"threads": 2},
            "metrics": {"enabled": False},
            "checkpoint": {"uri": store, "keepLast": 1},
        },
    }


def stages(method: str) -> list[dict]:
    third = EPOCHS // 3
    if method == "scratch":
        return [
            {
                "name": "all",
                "trainable": "all",
                "epochs": EPOCHS,
                "lr": 0.02,
                "schedule": {"name": "cosine", "warmupEpochs": 1},
            }
        ]
    if method == "head":
        return [{"name": "head", "trainable": {"top": 1}, "epochs": EPOCHS, "lr": 0.01}]
    if method == "full":
        return [{"name": "all", "trainable": "all", "epochs": EPOCHS, "lr": 0.01, "freezeBnStats": True}]
    if method == "gradual-defaults":
        return []  # `gradual:` instead, see gradual_defaults
    decay = 1.5 if method == "gradual-discriminative" else 1.0
    return [
        {"name": "head", "trainable": {"top": 1}, "epochs": third, "lr": 0.01},
        {"name": "top3", "trainable": {"top": 3}, "epochs": third, "lr": 0.01, "lrDecay": decay, "freezeBnStats": True},
        {
            "name": "all",
            "trainable": "all",
            "epochs": EPOCHS - 2 * third,
            "lr": 0.01,
            "lrDecay": decay,
            "freezeBnStats": True,
        },
    ]


METHODS = {
    "logreg": "logistic regression, raw pixels",
    "scratch": "from scratch (random init), all layers",
    "head": "head only (linear probe)",
    "full": "full fine-tuning, one lr",
    "gradual": "gradual unfreezing (head, top 3, all), one lr",
    "gradual-discriminative": "gradual unfreezing + discriminative lr (decay 1.5)",
    "gradual-defaults": "`gradual: {stages: 3, epochsPerStage: 4}`, every other field at its default",
}
STAGED = {"gradual", "gradual-discriminative", "gradual-defaults"}


def gradual_defaults(doc: dict) -> None:
    """What a user writes who trusts the defaults: the stage count and the epochs, nothing else."""
    doc["spec"].pop("stages", None)
    doc["spec"].pop("schedule", None)
    doc["spec"]["gradual"] = {"stages": 3, "epochsPerStage": EPOCHS // 3}


def logreg(doc: dict) -> Result:
    from sklearn.linear_model import LogisticRegression

    from tests.baselines import raw_pixels

    t0 = time.perf_counter()
    x, y, xt, yt = raw_pixels(doc)
    acc = float((LogisticRegression(max_iter=2000).fit(x, y).predict(xt) == yt).mean())
    return acc, time.perf_counter() - t0, (x.shape[1] + 1) * SOURCE["classes"], [acc]


Result = tuple[float, float, int, list[float]]  # test accuracy, wall s, param-epochs, per-stage test accuracy


def neural(doc: dict, tmp: Path, name: str) -> Result:
    doc["metadata"]["name"] = name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "run", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
    store = Path(doc["spec"]["checkpoint"]["uri"].removeprefix("file://")) / name
    finals = [json.loads(p.read_text())["metrics"] for p in sorted(store.glob("stage-*/final.json"))]
    pe = sum(f["trainable_params"] * f["epochs_run"] for f in finals)
    return finals[-1]["test_accuracy"], wall, pe, [f["test_accuracy"] for f in finals]


def run_one(budget: int, seed: int, method: str, tmp: Path) -> Result:
    doc = base(budget, seed, f"file://{tmp}/store")
    doc["spec"]["stages"] = stages("head" if method == "logreg" else method)
    if method == "gradual-defaults":
        gradual_defaults(doc)
    if method == "logreg":
        r = logreg(doc)
    else:
        if method == "scratch":
            doc["spec"]["model"]["weights"] = None
        r = neural(doc, tmp, f"{method}-{budget}-{seed}")
    per_stage = " -> ".join(f"{a:.4f}" for a in r[3]) if len(r[3]) > 1 else ""
    print(f"budget {budget} seed {seed} {method}: acc {r[0]:.4f} wall {r[1]:.0f}s {per_stage}".rstrip(), flush=True)
    return r


def accuracy_cells(accs: list[float]) -> str:
    """The table's "mean ± std | per seed" cells."""
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.4f} ± {std:.4f} | {' '.join(f'{a:.4f}' for a in accs)}"


def worst_drop(runs: list[Result]) -> float:
    """The largest fall of test accuracy from one stage to the next over the runs (0: never fell)."""
    return max([0.0, *(a - b for r in runs for a, b in zip(r[3], r[3][1:]))])


def hardware(parallel: int) -> str:
    import torch

    where = f"{os.cpu_count()} CPU cores"
    if torch.cuda.is_available():
        where = f"one {torch.cuda.get_device_name()} GPU (bf16 autocast), {where}"
    return where + (", one process per run" if parallel == 1 else f", {parallel} runs at a time sharing it")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (wall times then share the machine)")
    ap.add_argument("--section", default="quality", help="the section of --out to replace")
    ap.add_argument("--source", default="fashion-mnist", help="fashion-mnist, digits or file:///ImageFolder")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    name = {"fashion-mnist": "Fashion-MNIST", "digits": "scikit-learn digits"}.get(args.source, args.source)
    SOURCE.update(source=args.source, classes=args.num_classes, name=name)
    tasks = [(b, s, m) for b in args.budgets for s in args.seeds for m in args.methods]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, args.parallel)) as pool:
        done = list(pool.map(lambda t: run_one(*t, Path(tmp)), tasks))
    results: dict[tuple[int, str], list[Result]] = {}
    for (budget, _seed, method), r in zip(tasks, done):
        results.setdefault((budget, method), []).append(r)
    lines = [
        f"## Quality table: methods x label budgets ({', '.join(map(str, args.budgets))} images/class)",
        "",
        f"Command: `python benchmarks/quality_table.py --budgets {' '.join(map(str, args.budgets))} "
        f"--seeds {' '.join(map(str, args.seeds))}"
        + (f" --methods {' '.join(args.methods)}" if args.methods != list(METHODS) else "")
        + (f" --parallel {args.parallel}" if args.parallel != 1 else "")
        + (f" --section {args.section}" if args.section != "quality" else "")
        + (f" --source {args.source} --num-classes {args.num_classes}" if args.source != "fashion-mnist" else "")
        + " --out docs/results.md`",
        "",
        f"{SOURCE['name']}, bundled ImageNet EfficientNet-Lite0, 64 px, {EPOCHS} epochs for every neural method, "
        f"test accuracy on the first 2,000 test images, mean ± std over seeds {args.seeds}; "
        f"{hardware(args.parallel)}.",
        "",
        "| images/class | method | test accuracy | per seed | worst stage-to-stage test drop "
        "| wall s (mean) | trainable-param-epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget in args.budgets:
        for method in args.methods:
            rs = results[(budget, method)]
            pe = "n/a (no epochs)" if method == "logreg" else f"{statistics.mean(r[2] for r in rs) / 1e6:.1f} M"
            drop = f"{worst_drop(rs):.4f}" if method in STAGED else "n/a (one stage)"
            lines.append(
                f"| {budget} | {METHODS[method]} | {accuracy_cells([r[0] for r in rs])} | {drop} | "
                f"{statistics.mean(r[1] for r in rs):.0f} | {pe} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_section(args.out, args.section, table)


if __name__ == "__main__":
    main()
