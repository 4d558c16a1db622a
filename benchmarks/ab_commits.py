"""Thaw's trainer at two commits, side by side in one run: did a change make it slower?

The plain-loop ratio in the trainer section moves with the machine's noise on *both* sides;
this compares Thaw against itself. Each case runs the Thaw side of bench_trainer.py from a
worktree of the base commit and from this tree, alternating, best of --repeats.

    python benchmarks/ab_commits.py --base 205717b --repeats 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from bench_trainer import measure  # benchmarks/ is the script's own directory
from report import write_section

ROOT = Path(__file__).resolve().parents[1]
CASES = {"top block": {"top": 3}, "full": "all"}


def doc(trainable, store: str) -> dict:
    """The trainer section's CPU job (bench_trainer.py defaults), in fields every commit parses."""
    return {
        "apiVersion": "thaw.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"architecture": "efficientnet_lite0", "weights": "BUNDLED", "numClasses": 10},
            "data": {
                "source": "fashion-mnist",
                "imageSize": 64,
                "trainPerClass": 50,
                "valPerClass": 5,
                "testLimit": 50,
                "batchSize": 50,
            },
            "stages": [{"name": "bench", "trainable": trainable, "epochs": 2, "lr": 0.01}],
            "speed": {"threads": 2},
            "checkpoint": {"uri": f"file://{store}"},
        },
    }


def thaw_images_per_second(tree: Path, trainable) -> float:
    with tempfile.TemporaryDirectory() as store:
        return measure("thaw", doc(trainable, store), tree)["images_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the commit to compare this tree against")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), args.base], cwd=ROOT, check=True)
        try:
            best = {}
            for _ in range(args.repeats):
                for case, trainable in CASES.items():
                    for side, tree in (("base", base), ("this", ROOT)):
                        ips = thaw_images_per_second(tree, trainable)
                        best[case, side] = max(best.get((case, side), 0.0), ips)
                        print(case, side, round(ips), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    lines = [
        "## Thaw against itself: this tree and a base commit",
        "",
        f"Command: `python benchmarks/ab_commits.py --base {args.base} --repeats {args.repeats} "
        "--out docs/benchmarks.md`",
        "",
        f"The trainer section's CPU job (Thaw side only), base {args.base} and this tree ({head.strip()}, with "
        f"uncommitted changes if any), alternating, best of {args.repeats}; training images per second.",
        "",
        "| stage | base img/s | this img/s | this / base |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        b, t = best[case, "base"], best[case, "this"]
        lines.append(f"| {case} | {b:.0f} | {t:.0f} | **{t / b:.2f}x** |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        write_section(args.out, "trainer-ab", table)


if __name__ == "__main__":
    main()
