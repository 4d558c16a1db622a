"""Thaw's recipe beside the implementations users know, on the same model, data and budget.

    make peers-env     # fastai and Lightning in .venv-peers (the project's torch, seen through a .pth)
    .venv-peers/bin/python benchmarks/peers.py --budgets 10 --seeds 10 11 12 13 14 --out docs/results.md

Every method starts from the bundled ImageNet EfficientNet-Lite0 with a new 10-class head, sees
exactly the quality table's subset for a seed (benchmarks/quality_table.py `base`: training images
drawn by the seed, 30 per class held out for validation, the first 2,000 test images), at 64 px,
normalized as the bundled model expects, in batches of 50, for 12 epochs in all, one process with
2 threads. Each runs at its documented defaults: nothing here was tuned, on any seed.

- Thaw: `gradual: {stages: 3, epochs: 12}` (the README's recipe: head 2 epochs, top 3 groups 2,
  all 8; sgd 0.01, lrDecay 1.5, frozen BatchNorm statistics in the unfrozen stages, the paired gate)
  and full fine-tuning at one rate (the quality table's `full`), both through `python -m trainer run`.
- fastai `Learner.fine_tune(11, freeze_epochs=1)`: its defaults: Adam (wd 0.01, decoupled), one
  cycle; 1 epoch with only the head group trainable at base_lr 2e-3 (BatchNorm layers stay
  trainable: `train_bn=True`), then everything for 11 epochs at `slice(base_lr/100, base_lr)`
  over fastai's two groups (body, head; the split `vision_learner` makes). `fastai-lr-find`
  replaces base_lr by `lr_find()`'s suggestion (valley), found on the training images.
- Lightning `BackboneFinetuning()`: its defaults: the backbone frozen (BatchNorm trainable) until
  epoch 10, then added to the optimizer at 0.1x the head's rate, that rate multiplied by 1.5 each
  epoch after (aligned to the head's at most); the optimizer of its documentation, Adam at 1e-3.

Reported: test accuracy mean ± std and per seed, validation accuracy of the final model, wall time,
trainable-parameter-epochs (trainable parameters summed over the epochs that trained them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_table  # noqa: E402
from report import write_section  # noqa: E402

from thaw_contract.spec import parse_job  # noqa: E402
from trainer.data import build_datasets  # noqa: E402
from trainer.models import build_model  # noqa: E402

EPOCHS = quality_table.EPOCHS
METHODS = {
    "thaw": "Thaw `gradual: {stages: 3, epochs: 12}` (head 2, top 3 2, all 8; sgd 0.01, lrDecay 1.5)",
    "thaw-full": "Thaw full fine-tuning, one lr (sgd 0.01)",
    "fastai": "fastai `fine_tune(11, freeze_epochs=1)`, defaults (Adam, base_lr 2e-3)",
    "fastai-lr-find": "fastai `fine_tune(11, freeze_epochs=1)`, base_lr from `lr_find()`",
    "lightning": "Lightning `BackboneFinetuning()`, defaults (unfreeze at epoch 10; Adam 1e-3)",
}

# (test accuracy, validation accuracy, wall s, trainable-param-epochs, note)
Result = tuple[float, float, float, int, str]


def job(budget: int, seed: int, store: str) -> dict:
    doc = quality_table.base(budget, seed, store)
    doc["spec"].pop("schedule", None)
    doc["spec"]["gradual"] = {"stages": 3, "epochs": EPOCHS}
    return doc


def tensors(doc: dict):
    """The job's train, validation and test images as normalized float tensors, and the model."""
    spec = parse_job(doc).spec
    data = build_datasets(spec.data, spec.model.num_classes, spec.seed)
    built = build_model(spec.model)
    mean = torch.tensor(built.mean).view(1, 3, 1, 1)
    std = torch.tensor(built.std).view(1, 3, 1, 1)

    def split(ds) -> TensorDataset:
        x = torch.stack([ds[i][0].expand(3, -1, -1) for i in range(len(ds))]).float() / 255
        return TensorDataset((x - mean) / std, ds.labels.clone().long())

    return split(data.train), split(data.val), split(data.test), built.model, spec.data.batch_size


@torch.no_grad()
def accuracy(model: torch.nn.Module, ds: TensorDataset) -> float:
    model.eval()
    x, y = ds.tensors
    right = sum(int((model(x[i : i + 250]).argmax(1) == y[i : i + 250]).sum()) for i in range(0, len(y), 250))
    return right / len(y)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fastai_run(doc: dict, find_lr: bool) -> Result:
    from fastai.callback.schedule import fine_tune, lr_find  # noqa: F401 - patches Learner
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import params, set_seed

    set_seed(doc["spec"]["seed"], reproducible=True)
    train, val, test, model, bs = tensors(doc)
    t0 = time.perf_counter()
    dls = DataLoaders.from_dsets(train, val, bs=bs, device=torch.device("cpu"))
    splitter = lambda m: [params(m.net), params(m.classifier)]  # noqa: E731 - body, head: as vision_learner
    # path: lr_find saves and restores the weights there (default: ./models in the working tree)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), splitter=splitter, path=tempfile.mkdtemp())
    counted = []
    learn.add_cb(_EpochCounter(counted))
    note = ""
    with learn.no_bar(), learn.no_logging():
        base_lr = 2e-3
        if find_lr:
            base_lr = float(learn.lr_find(show_plot=False).valley)
            note = f"base_lr {base_lr:.2g}"
        learn.fine_tune(EPOCHS - 1, base_lr=base_lr, freeze_epochs=1)
    wall = time.perf_counter() - t0
    return accuracy(learn.model, test), accuracy(learn.model, val), wall, sum(counted), note


def _EpochCounter(counted: list):
    from fastai.callback.core import Callback

    class EpochCounter(Callback):
        """Trainable parameters at the start of every training epoch (lr_find runs no epoch)."""

        def before_epoch(self):
            if not getattr(self.learn, "lr_finder", None):
                counted.append(trainable(self.learn.model))

    return EpochCounter()


def lightning_run(doc: dict) -> Result:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import BackboneFinetuning

    pl.seed_everything(doc["spec"]["seed"], verbose=False)
    train, val, test, model, bs = tensors(doc)
    counted: list[int] = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.backbone = model, model.net  # BackboneFinetuning freezes `backbone`

        def forward(self, x):
            return self.model(x)

        def on_train_epoch_start(self):
            counted.append(trainable(self.model))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):  # as BackboneFinetuning's documentation writes it
            return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-3)

    generator = torch.Generator().manual_seed(doc["spec"]["seed"])
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[BackboneFinetuning()],
    )
    t0 = time.perf_counter()
    trainer.fit(Module(), DataLoader(train, batch_size=bs, shuffle=True, generator=generator))
    wall = time.perf_counter() - t0
    return accuracy(model, test), accuracy(model, val), wall, sum(counted), ""


def thaw_run(doc: dict, tmp: Path, method: str) -> Result:
    if method == "thaw-full":
        doc["spec"].pop("gradual")
        doc["spec"]["schedule"] = {"name": "cosine"}
        doc["spec"]["stages"] = quality_table.stages("full")
    name = f"{method}-{doc['spec']['data']['trainPerClass']}-{doc['spec']['seed']}"
    test, wall, pe, _ = quality_table.neural(doc, tmp, name)
    store = Path(doc["spec"]["checkpoint"]["uri"].removeprefix("file://")) / name
    finals = [json.loads(p.read_text())["metrics"] for p in sorted(store.glob("stage-*/final.json"))]
    rolled = [f["name"] for f in finals if f["gate"]["decision"] in ("rolled_back", "stopped")]
    val = finals[-1]["gate"]["carried"].get("val_accuracy") or finals[-1]["best_val_accuracy"]
    return test, val, wall, pe, f"rolled back: {', '.join(rolled)}" if rolled else ""


def run_one(budget: int, seed: int, method: str, tmp: Path) -> Result:
    doc = job(budget, seed, f"file://{tmp}/store")
    torch.set_num_threads(2)
    if method.startswith("thaw"):
        r = thaw_run(doc, tmp, method)
    elif method.startswith("fastai"):
        r = fastai_run(doc, find_lr=method == "fastai-lr-find")
    else:
        r = lightning_run(doc)
    print(f"budget {budget} seed {seed} {method}: test {r[0]:.4f} val {r[1]:.4f} wall {r[2]:.0f}s {r[4]}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--section", default="peers")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results: dict[tuple[int, str], list[Result]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            for seed in args.seeds:
                for method in args.methods:
                    results.setdefault((budget, method), []).append(run_one(budget, seed, method, Path(tmp)))
    import fastai
    import lightning

    lines = [
        f"## Peers: Thaw, fastai and Lightning ({', '.join(map(str, args.budgets))} images/class)",
        "",
        f"Command: `make peers-env && .venv-peers/bin/python benchmarks/peers.py --budgets "
        f"{' '.join(map(str, args.budgets))} --seeds {' '.join(map(str, args.seeds))}"
        + (f" --section {args.section}" if args.section != "peers" else "")
        + " --out docs/results.md`",
        "",
        f"Fashion-MNIST, bundled ImageNet EfficientNet-Lite0 at 64 px, {EPOCHS} epochs for every method, "
        f"test accuracy on the first 2,000 test images, mean ± std over seeds {args.seeds} (seeds no "
        f"choice of any method's settings saw); fastai {fastai.__version__}, Lightning {lightning.__version__}, "
        f"torch {torch.__version__}; {quality_table.hardware(1)}.",
        "",
        "| images/class | method | test accuracy | per seed | val accuracy (mean) | wall s (mean) "
        "| trainable-param-epochs | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for budget in args.budgets:
        for method in args.methods:
            rs = results[(budget, method)]
            notes = "; ".join(f"seed {s}: {r[4]}" for s, r in zip(args.seeds, rs) if r[4])
            lines.append(
                f"| {budget} | {METHODS[method]} | {quality_table.accuracy_cells([r[0] for r in rs])} | "
                f"{statistics.mean(r[1] for r in rs):.4f} | "
                f"{statistics.mean(r[2] for r in rs):.0f} | {statistics.mean(r[3] for r in rs) / 1e6:.1f} M | {notes} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_section(args.out, args.section, table)


if __name__ == "__main__":
    main()
