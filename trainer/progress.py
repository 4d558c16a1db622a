"""Progress: a bar per epoch on a terminal, one JSON line per epoch otherwise (rank 0)."""

from __future__ import annotations

import json
import sys
import time


class Progress:
    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = enabled and sys.stderr.isatty()
        self._bar = None

    def start_epoch(self, stage: str, epoch: int, epochs: int, steps: int) -> None:
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, desc=f"{stage} {epoch + 1}/{epochs}", leave=False, file=sys.stderr)

    def step(self, loss: float | None = None) -> None:
        """One step done; `loss` when the loop has read one (every few steps on a GPU)."""
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.3f}")

    def end_epoch(self, row: dict) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.tty:
            print(
                f"{row['stage']} epoch {row['epoch'] + 1}: loss {row['train_loss']:.4f} "
                f"val_acc {row['val_accuracy']:.4f} {row['images_per_second']:.0f} img/s "
                f"eta {row['eta_seconds']:.0f}s",
                file=self.stream,
                flush=True,
            )
        elif self.enabled:
            print(json.dumps({"event": "epoch", "time": round(time.time(), 3), **row}), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)
