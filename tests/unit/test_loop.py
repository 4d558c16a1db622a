"""The training loop: gradient accumulation is equivalent to a bigger batch; bf16 autocast runs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer.distributed import DistEnv
from trainer.loop import StepContext, evaluate, train_epoch
from trainer.progress import Progress

ENV = DistEnv(0, 1, 0, 1, torch.device("cpu"))


def _fit(accumulation: int, batch: int, autocast=None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = DataLoader(data, batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ctx = StepContext(ENV, lambda x: x, autocast, None, accumulation)
    metrics = train_epoch(model, loader, opt, sched, ctx, Progress(False))
    assert metrics["train_loss"] > 0 and 0 <= metrics["train_accuracy"] <= 1
    return model


def test_accumulating_two_half_batches_equals_one_full_batch():
    a = _fit(accumulation=2, batch=8)
    b = _fit(accumulation=1, batch=16)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_trains_and_evaluates():
    model = _fit(accumulation=1, batch=16, autocast=torch.bfloat16)
    data = TensorDataset(torch.randn(10, 6), torch.randint(0, 3, (10,)))
    out = evaluate(model, DataLoader(data, batch_size=4), StepContext(ENV, lambda x: x, torch.bfloat16, None))
    assert out["count"] == 10 and 0 <= out["accuracy"] <= 1


def test_missing_gradients_are_reported_not_silently_skipped():
    import pytest

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    unused = nn.Parameter(torch.zeros(3))
    loader = DataLoader(TensorDataset(torch.randn(4, 4), torch.tensor([0, 1, 0, 1])), batch_size=4)
    opt = torch.optim.SGD([*model.parameters(), unused], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ctx = StepContext(ENV, lambda x: x, None, None)
    with pytest.raises(RuntimeError, match="1 trainable parameters got no gradient"):
        train_epoch(model, loader, opt, sched, ctx, Progress(False), check_grads=[*model.parameters(), unused])


def test_precision_choice_and_fp16_on_cpu_is_a_clear_error():
    import pytest

    from tests.builders import job_doc
    from trainer.runner import _autocast_dtype
    from trainer.spec import SpecError, parse_job

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _autocast_dtype(parse_job(job_doc()), cpu) is None
    assert _autocast_dtype(parse_job(job_doc()), cuda) == torch.bfloat16
    assert _autocast_dtype(parse_job(job_doc(speed={"amp": "fp16"})), cuda) == torch.float16
    assert _autocast_dtype(parse_job(job_doc(speed={"amp": "bf16"})), cpu) == torch.bfloat16
    with pytest.raises(SpecError, match="spec.speed.amp: fp16 needs a CUDA device"):
        _autocast_dtype(parse_job(job_doc(speed={"amp": "fp16"})), cpu)
