"""Why one-rate gradual unfreezing collapses: the first steps of its `all` stage, measured.

    python benchmarks/collapse_probe.py --out docs/results.md

Trains the quality table's one-rate `gradual` recipe up to its `top3` stage (Fashion-MNIST,
100 images per class, seed 0: `python -m trainer run`), then takes SGD steps over every group at
one rate (the `all` stage's first-epoch rate, momentum 0.9, BatchNorm statistics frozen) from two
starts: the `top3` stage's weights (what the `all` stage starts from) and ImageNet weights with
a fresh head (what full fine-tuning starts from), on the same batches. Per step: the loss and
the gradient norm of a few layer groups. Written as one section of --out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality_table import base, stages  # noqa: E402
from report import write_section  # noqa: E402

GROUPS = ("stem", "stage1", "stage2", "stage6", "head")


def train_to_top3(tmp: Path, per_class: int, seed: int) -> dict:
    doc = base(per_class, seed, f"file://{tmp}/store")
    doc["metadata"]["name"] = "probe"
    doc["spec"]["stages"] = stages("gradual")[:2]  # head, top3: the weights the `all` stage starts from
    path = tmp / "probe.yaml"
    path.write_text(yaml.safe_dump(doc))
    subprocess.run(
        [sys.executable, "-m", "trainer", "run", str(path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    return doc


def probe(doc: dict, from_top3: bool, lr: float, steps: int) -> list[tuple[float, dict[str, float]]]:
    from thaw_contract.spec import parse_job
    from trainer import checkpoint as ckpt
    from trainer.data import build_datasets
    from trainer.layers import layer_groups
    from trainer.loop import image_preparer
    from trainer.models import build_model
    from trainer.storage import open_store

    torch.manual_seed(0)
    job = parse_job(doc)
    spec = job.spec
    built = build_model(spec.model)
    model = built.model
    if from_top3:
        store = open_store(spec.checkpoint, job.metadata.name, write=False)
        final = ckpt.read_final(store, 1, "top3")
        assert final is not None, "the top3 stage did not commit"
        model.load_state_dict(ckpt.load_object(store, final[0], "model.pt"))
    groups = {g.name: g for g in layer_groups(model, spec.model.architecture)}
    model.train()
    for m in model.modules():  # freezeBnStats: every BatchNorm in eval mode
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=spec.optimizer.weight_decay)
    prepare = image_preparer(built.mean, built.std, torch.device("cpu"), False, False)
    train = build_datasets(spec.data, spec.model.num_classes, spec.seed).train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    batch = spec.data.batch_size
    out = []
    for step in range(steps):
        idx = order[(step * batch) % len(train) :][:batch]
        xs, ys = zip(*(train[int(i)] for i in idx))
        loss = torch.nn.functional.cross_entropy(model(prepare(torch.stack(xs))), torch.tensor(ys))
        opt.zero_grad()
        loss.backward()
        norms = {}
        for name in GROUPS:
            grads = [
                p.grad.norm()
                for n, p in model.named_parameters()
                if p.grad is not None and any(n == q or n.startswith(q + ".") for q in groups[name].prefixes)
            ]
            norms[name] = float(torch.stack(grads).norm())
        opt.step()
        out.append((float(loss.detach()), norms))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.0085, help="the all stage's first-epoch rate (cosine from 0.01)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        doc = train_to_top3(Path(tmp), args.per_class, args.seed)
        runs = {
            "after head + top3 stages (the `all` stage's start)": probe(doc, True, args.lr, args.steps),
            "ImageNet + fresh head (full fine-tuning's start)": probe(doc, False, args.lr, args.steps),
        }
    lines = [
        "### The first steps of the one-rate `all` stage",
        "",
        f"Command: `python benchmarks/collapse_probe.py --out docs/results.md` (Fashion-MNIST, {args.per_class} "
        f"images per class, seed {args.seed}; SGD at {args.lr} for every group, momentum 0.9, BatchNorm "
        "statistics frozen, the same batches for both starts).",
        "",
        "| start | step | loss | " + " | ".join(f"grad norm {g}" for g in GROUPS) + " |",
        "|---|---|---|" + "---|" * len(GROUPS),
    ]
    for label, rows in runs.items():
        for step, (loss, norms) in enumerate(rows):
            if step < 6 or step % 5 == 0 or step == len(rows) - 1:
                cells = " | ".join(f"{norms[g]:.3f}" for g in GROUPS)
                lines.append(f"| {label} | {step} | {loss:.3f} | {cells} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_section(args.out, "collapse-probe", table)


if __name__ == "__main__":
    main()
