"""Early stopping: pure state that decides, epoch by epoch, whether to go on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass
class EarlyStopping:
    mode: str  # "max" or "min"
    patience: int
    min_delta: float = 0.0
    best: float = math.nan
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's metric; True when it is a new best."""
        if math.isnan(self.best):
            improved = True
        elif self.mode == "max":
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """What state_dict returned, as a checkpoint carried it."""
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
