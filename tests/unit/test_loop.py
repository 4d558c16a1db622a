"""The training loop: gradient accumulation is equivalent to a bigger batch; bf16 autocast runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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
    out = evaluate(model, DataLoader(data, batch_size=4), StepContext(ENV, lambda x: x, torch.bfloat16, None), 3)
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
    from thaw_contract.spec import SpecError, parse_job
    from trainer.setup import _autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _autocast_dtype(parse_job(job_doc()), cpu) is None
    assert _autocast_dtype(parse_job(job_doc()), cuda) == torch.bfloat16
    assert _autocast_dtype(parse_job(job_doc(speed={"amp": "fp16"})), cuda) == torch.float16
    assert _autocast_dtype(parse_job(job_doc(speed={"amp": "bf16"})), cpu) == torch.bfloat16
    with pytest.raises(SpecError, match="spec.speed.amp: fp16 needs a CUDA device"):
        _autocast_dtype(parse_job(job_doc(speed={"amp": "fp16"})), cpu)


def test_a_padded_last_batch_gives_the_exact_metrics_and_one_batch_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(10, 6), torch.randint(0, 3, (10,)))
    ctx = StepContext(ENV, lambda x: x, None, None)
    shapes = []
    model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    exact = evaluate(model, DataLoader(data, batch_size=10), ctx, 3)
    shapes.clear()
    padded = evaluate(model, DataLoader(data, batch_size=4), ctx, 3, pad_to=4)
    assert shapes == [(4, 6)] * 3  # 4 + 4 + (2 padded to 4)
    assert padded["count"] == 10
    assert padded["accuracy"] == exact["accuracy"]
    assert padded["loss"] == pytest.approx(exact["loss"], rel=1e-6)
    assert padded["predicted"] == exact["predicted"] and sum(exact["predicted"]) == 10  # padding not counted
    assert padded["labels"] == torch.bincount(data.tensors[1], minlength=3).tolist()


def test_metrics_read_from_the_device_match_a_direct_computation():
    """lr 0: the model does not move, so the epoch's loss and accuracy are those of one pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    steps, losses = [], []

    class Count(Progress):
        def step(self, loss=None):
            losses.append(loss)

    loader = DataLoader(TensorDataset(x, y), batch_size=2)  # 30 steps: one read at 25, one at 30
    out = train_epoch(
        model,
        loader,
        opt,
        sched,
        StepContext(ENV, lambda t: t, None, None),
        Count(False),
        None,
        lambda t, w, n: steps.append(n),
    )
    with torch.no_grad():
        logits = model(x)
    assert out["train_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert out["train_accuracy"] == (logits.argmax(1) == y).sum().item() / 60
    assert steps == [2] * 30 and len(losses) == 30
    read = [(i, v) for i, v in enumerate(losses) if v is not None]  # the bar moves every step
    assert [i for i, _ in read] == [24, 29] and read[0][1] != read[1][1]  # the loss read every SYNC_EVERY steps


def test_the_training_loader_drops_a_ragged_batch_but_keeps_a_lone_short_one():
    from tests.builders import job_doc
    from thaw_contract.spec import parse_job
    from trainer.loaders import train_loader

    job = parse_job(job_doc())
    ds = lambda n: TensorDataset(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long))  # noqa: E731
    assert [len(b[1]) for b in train_loader(ds(10), 4, ENV, True, 0, job)] == [4, 4]
    assert [len(b[1]) for b in train_loader(ds(3), 4, ENV, True, 0, job)] == [3]
    two = DistEnv(1, 2, 1, 2, torch.device("cpu"))  # rank 1 of 2: a shard of 5
    assert [len(b[1]) for b in train_loader(ds(10), 2, two, True, 0, job)] == [2, 2]


def test_the_epochs_rate_is_the_one_its_last_step_trained_at_not_the_schedules_next():
    """A schedule that reaches 0 after the last step: the epoch reports the last step's rate."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    loader = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,))), batch_size=4)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.4, "name": "head"}], lr=0.4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 4)  # 1, 0.75, 0.5, 0.25, then 0
    out = train_epoch(model, loader, opt, sched, StepContext(ENV, lambda x: x, None, None), Progress(False))
    assert out["lr"] == {"head": pytest.approx(0.1)} and opt.param_groups[0]["lr"] == 0
