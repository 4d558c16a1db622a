"""What an epoch checkpoint holds besides the weights (train_state.pt): enough to resume a
stage after that epoch as if it had never stopped.

Stored as a plain dict of containers, numbers and tensors, so torch's weights_only unpickler
reads it (no code runs on load). TrainState names the fields in one place; the dict's keys are
the checkpoint format, so checkpoints written before this class load unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class TrainState:
    epoch: int  # the last epoch finished
    optimizer: dict
    scheduler: dict
    scaler: dict | None  # fp16's GradScaler
    tracker: dict  # EarlyStopping.state_dict() of the best-epoch tracker
    history: list[dict]  # one row per epoch finished (losses, accuracies, rates)
    best_dir: str | None  # the best epoch's checkpoint prefix
    divergence_reference: float | None  # the divergence guard's stage-start loss
    train_seconds: float
    rng: list[dict]  # every rank's random streams (rng_state), by rank
    spec_hash: str  # spec.training_hash: a checkpoint under other training fields is refused

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it deep-copies the optimizer's tensors.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict) -> TrainState:
        optional = {"scaler": None, "divergence_reference": None}
        return cls(**{f.name: state.get(f.name, optional.get(f.name)) for f in fields(cls)})


def rng_state() -> dict:
    """Plain containers and tensors only, so checkpoints load with torch's weights_only unpickler."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
