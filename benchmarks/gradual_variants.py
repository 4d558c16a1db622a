"""Which `gradual:` defaults? The same 12 epochs, one field changed at a time (docs/results.md).

    python benchmarks/gradual_variants.py --budgets 100 --seeds 0 1 2 --out docs/results.md

Each variant is `gradual: {stages: 3, epochsPerStage: 4}` plus the fields it names, on the
quality table's job (benchmarks/quality_table.py: Fashion-MNIST, bundled EfficientNet-Lite0,
64 px, the default stage gate). Reported per variant: test accuracy per seed and mean ± std,
and how many runs' last stage the gate rolled back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_table import EPOCHS, base, gradual_defaults, neural  # noqa: E402
from report import write_section  # noqa: E402

# name -> (gradual fields beyond stages and epochsPerStage, what it is)
VARIANTS: dict[str, tuple[dict, str]] = {
    "defaults": ({}, "the defaults: head, top 3, all; lrDecay 1.5; no warm-up"),
    "top2": ({"groupsPerStage": 1}, "middle stage top 2 groups"),
    "top2-warmup": ({"groupsPerStage": 1, "warmupEpochs": 1}, "top 2, 1-epoch warm-up (the previous defaults)"),
    "warmup": ({"warmupEpochs": 1}, "1-epoch warm-up after each unfreeze"),
    "short-warmup": ({"warmupEpochs": 0.25}, "0.25-epoch warm-up after each unfreeze"),
    "long-last": ({"epochsPerStage": 2, "lastStageEpochs": 8}, "head 2, top 3 2, all 8 epochs"),
    "longest-last": ({"epochsPerStage": 1, "lastStageEpochs": 10}, "head 1, top 3 1, all 10 epochs"),
    "total-12": ({"epochsPerStage": None, "epochs": 12}, "`epochs: 12` instead: the earlier stages a third (2, 2, 8)"),
    "long-last-slow-decay": (
        {"epochsPerStage": 2, "lastStageEpochs": 8, "lrDecay": 1.2},
        "head 2, top 3 2, all 8 epochs; lrDecay 1.2 (the stem at 0.01/1.2^9, not 1.5^9)",
    ),
    "total-12-hot": ({"epochsPerStage": None, "epochs": 12, "lr": 0.02}, "`epochs: 12` at twice the rate (lr 0.02)"),
    "one-rate": ({"lrDecay": 1}, "one rate (lrDecay 1), so the default 1-epoch warm-up"),
    "one-rate-short-warmup": ({"lrDecay": 1, "warmupEpochs": 0.25}, "one rate, 0.25-epoch warm-up"),
}


def job(budget: int, seed: int, variant: str, store: str) -> dict:
    """The variant's FineTuneJob, named as its checkpoints are (so a DNS-1035 label)."""
    doc = base(budget, seed, store)
    gradual_defaults(doc)
    doc["spec"]["gradual"].update(VARIANTS[variant][0])
    doc["metadata"]["name"] = f"{variant}-{budget}-{seed}"
    return doc


def run(budget: int, seed: int, variant: str, tmp: Path) -> tuple[float, bool]:
    """Test accuracy after the last stage, and whether the gate rolled that stage back."""
    doc = job(budget, seed, variant, f"file://{tmp}/store")
    name = doc["metadata"]["name"]
    acc, wall, _, per_stage = neural(doc, tmp, name)
    last = sorted((tmp / "store" / name).glob("stage-*/final.json"))[-1]
    rolled = json.loads(last.read_text())["metrics"]["gate"]["decision"] == "rolled_back"
    stages = " -> ".join(f"{a:.4f}" for a in per_stage)
    print(f"budget {budget} seed {seed} {variant}: {acc:.4f} ({stages}){' rolled back' if rolled else ''}", flush=True)
    return acc, rolled


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--section", default="gradual-variants", help="the section of --out to replace")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            for variant in args.variants:
                rs = [run(budget, seed, variant, Path(tmp)) for seed in args.seeds]
                accs = [a for a, _ in rs]
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                fields = json.dumps(VARIANTS[variant][0]).replace('"', "") or "{}"
                rows.append(
                    f"| {budget} | {VARIANTS[variant][1]} | `{fields}` | {' '.join(f'{a:.4f}' for a in accs)} | "
                    f"{statistics.mean(accs):.4f} ± {std:.4f} | {sum(r for _, r in rs)} of {len(rs)} |"
                )
    table = "\n".join(
        [
            f"#### `gradual:` variants at {', '.join(map(str, args.budgets))} images per class",
            "",
            f"Command: `python benchmarks/gradual_variants.py --budgets {' '.join(map(str, args.budgets))} "
            f"--seeds {' '.join(map(str, args.seeds))}"
            + (f" --variants {' '.join(args.variants)}" if args.variants != list(VARIANTS) else "")
            + (f" --section {args.section}" if args.section != "gradual-variants" else "")
            + " --out docs/results.md`",
            "",
            f"`gradual: {{stages: 3, epochsPerStage: {EPOCHS // 3}}}` plus the fields named, the quality table's job "
            "and gate; test accuracy after the last stage.",
            "",
            "| images/class | variant | fields | per seed | mean ± std | last stage rolled back |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        write_section(args.out, args.section, table)


if __name__ == "__main__":
    main()
