"""The per-stage table and the PNG of curves, read back from committed stage pointers."""

from __future__ import annotations

from pathlib import Path

from trainer import checkpoint as ckpt
from trainer.storage import Store


def stage_summaries(store: Store, stages) -> list[dict]:
    pointers = (ckpt.read_pointer(store, s.index, s.name) for s in stages)
    return [p["metrics"] for p in pointers if p is not None]


GATE_WORDS = {
    "first": "",
    "advanced": "advanced",
    "rolled_back": "rolled back",
    "kept": "worse, kept",
    "stopped": "rolled back; job stopped",
}


def format_table(rows: list[dict]) -> str:
    head = f"{'stage':<14}{'trainable':>12}{'epochs':>8}{'val acc':>10}{'test acc':>10}{'wall s':>9}  gate"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r["name"] + (" (cached)" if r.get("feature_cache") else "")
        best = r["best_val_accuracy"]
        gate = GATE_WORDS.get((r.get("gate") or {}).get("decision", "first"), "")
        if r.get("diverged"):
            gate = f"{gate} (diverged)".strip()
        if r.get("collapsed"):
            gate = f"{gate} (collapsed: predicts one class)".strip()
        lines.append(
            f"{name:<14}{r['trainable_params']:>12,}{r['epochs_run']:>8}"
            f"{'-' if best is None else f'{best:.4f}':>10}{r['test_accuracy']:>10.4f}{r['seconds']:>9.1f}  {gate}"
        )
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    x = 0
    for r in rows:
        xs = list(range(x + 1, x + 1 + len(r["history"])))
        ax_loss.plot(xs, [h["train_loss"] for h in r["history"]], "o-", color="C0", label="train" if x == 0 else None)
        ax_loss.plot(xs, [h["val_loss"] for h in r["history"]], "s--", color="C1", label="val" if x == 0 else None)
        ax_acc.plot(
            xs, [h["train_accuracy"] for h in r["history"]], "o-", color="C0", label="train" if x == 0 else None
        )
        ax_acc.plot(xs, [h["val_accuracy"] for h in r["history"]], "s--", color="C1", label="val" if x == 0 else None)
        for ax in (ax_loss, ax_acc):
            ax.axvline(x + 0.5, color="grey", lw=0.8, ls=":")
            ax.text(x + 0.6, 1.0, r["name"], transform=ax.get_xaxis_transform(), fontsize=8, va="top")
        x += len(r["history"])
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_loss.legend()
    ax_acc.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
