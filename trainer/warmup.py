"""Warm-up: pay a process's first-pass costs while the stage's inputs load.

The first pass over a batch shape costs a GPU its kernel plans (cuDNN builds one per
convolution shape, direction, precision and layout), and every stage is a fresh process.
Weights do not matter to those plans, so a copy of the model, frozen as the stage will be,
runs a forward and backward pass on the stage's batch shape in a background thread while the
main thread reads the predecessor checkpoint and the data. The first real step then runs at
steady-state speed. The copy is discarded: the model that trains is never touched.

With `channelsLast: auto` on CUDA, depthwise-heavy families time both memory layouts here
and keep the faster: cuDNN handles channels_last depthwise convolutions, PyTorch's own kernel
contiguous ones, and which wins depends on the GPU and the shapes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass
class WarmupResult:
    seconds: float = 0.0
    channels_last: bool | None = None  # the layout measured faster; None when not measured
    step_seconds: dict[str, float] = field(default_factory=dict)  # layout -> seconds per step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def passes(
    model: nn.Module, x: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager], train: bool
) -> None:
    """What a step does to the kernels: a forward (and backward where something trains), and
    the evaluation forward on the same shape."""
    if train:
        with autocast():
            out = model(x)
        if out.requires_grad:  # a warm-up never fails a stage that would train
            out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast():
        model.eval()
        model(x)
    model.train()


def time_layouts(
    model: nn.Module, x: torch.Tensor, autocast, train: bool, repeats: int = 3
) -> tuple[bool, dict[str, float]]:
    """(channels_last is faster, seconds per step by layout), each layout timed after one
    untimed pass that builds its plans."""
    timings = {}
    for name, fmt in LAYOUTS.items():
        model.to(memory_format=fmt)
        xf = x.contiguous(memory_format=fmt)
        passes(model, xf, autocast, train)
        _sync(x.device)
        t = time.perf_counter()
        for _ in range(repeats):
            passes(model, xf, autocast, train)
        _sync(x.device)
        timings[name] = (time.perf_counter() - t) / repeats
    return timings["channels_last"] <= timings["contiguous"], timings


def warm_up(twin: nn.Module, batch: torch.Tensor, autocast, train: bool, measure_layout: bool) -> WarmupResult:
    """Run the stage's passes on `twin`, a frozen copy of the model; `batch` is a prepared input
    of the stage's shape. Dropout in the copy draws from the global random streams: the caller
    joins before the stage reseeds them (stage.run_stage), so training sees the same streams."""
    t0 = time.perf_counter()
    twin.train()
    result = WarmupResult()
    if measure_layout:
        result.channels_last, result.step_seconds = time_layouts(twin, batch, autocast, train)
    else:
        passes(twin, batch, autocast, train)
    _sync(batch.device)
    result.seconds = time.perf_counter() - t0
    return result


class Background:
    """One function in a thread; `result()` joins and re-raises what it raised."""

    def __init__(self, fn: Callable[[], WarmupResult]):
        self._out: WarmupResult | None = None
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="thaw-warmup", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._out = fn()
        except BaseException as err:  # surfaced in result(), on the main thread
            self._err = err

    def join(self) -> None:
        self._thread.join()

    def result(self) -> WarmupResult:
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._out
