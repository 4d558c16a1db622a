"""The frozen prefix runs without autograd; gradients of what trains are unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.builders import job_doc
from thaw_contract.spec import parse_job
from trainer.freezing import apply_stage
from trainer.setup import plan_job


def _grads(no_grad_prefix: bool):
    job = parse_job(job_doc())
    torch.manual_seed(0)
    built, groups, _, stages = plan_job(job, device="cpu")
    model = built.model
    state = apply_stage(model, groups, stages[1], no_grad_prefix=no_grad_prefix)
    seen = {}
    hook = model.net._blocks[14].register_forward_hook(lambda m, a, out: seen.setdefault("frozen_out", out))
    x = torch.randn(4, 3, 32, 32, requires_grad=True)  # even an input that wants grad
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    hook.remove()
    state.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, seen["frozen_out"], x.grad


def test_prefix_records_no_graph_and_trainable_grads_match():
    with_prefix, frozen_out, x_grad = _grads(True)
    assert frozen_out.grad_fn is None and not frozen_out.requires_grad
    assert x_grad is None
    without, frozen_out2, x_grad2 = _grads(False)
    assert frozen_out2.grad_fn is not None, "without the feature autograd tracks the input through the prefix"
    assert with_prefix.keys() == without.keys()
    for n in with_prefix:
        assert torch.allclose(with_prefix[n], without[n], atol=1e-6), n


def test_grad_mode_is_restored_after_forward_and_on_error():
    job = parse_job(job_doc())
    built, groups, _, stages = plan_job(job, device="cpu")
    model = built.model
    apply_stage(model, groups, stages[1])
    model.eval()
    model(torch.zeros(1, 3, 32, 32))
    assert torch.is_grad_enabled()
    try:
        model(torch.zeros(1, 5, 32, 32))  # wrong channel count: raises inside the prefix
    except RuntimeError:
        pass
    assert torch.is_grad_enabled()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
        assert not torch.is_grad_enabled()
