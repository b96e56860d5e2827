"""The optimizer step: clipping, the learning-rate schedule, and the refusal to step on NaN."""
import math

import pytest
import torch

from afrl_fast.optim import NonFiniteError, lr_at, make_optimizer, optimizer_step


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    mid = 10 + 45
    assert lr_at(mid, 100, 1.0, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(500, 100, 1.0, 10) == pytest.approx(0.1)


def test_step_clips_to_the_global_norm_and_returns_the_norm_before():
    w = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        w.weight.fill_(1.0)
    opt = torch.optim.SGD(w.parameters(), lr=1.0)
    w.weight.grad = torch.full((2, 3), 2.0)             # norm sqrt(6·4)
    norm = optimizer_step(w, opt, grad_clip=1.0)
    assert norm == pytest.approx(math.sqrt(24))
    # SGD moved by the clipped gradient: each entry 2/sqrt(24)
    torch.testing.assert_close(w.weight, torch.full((2, 3), 1.0 - 2.0 / math.sqrt(24)))
    assert w.weight.grad is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_refuses_to_step(bad):
    w = torch.nn.Linear(3, 2, bias=False)
    before = w.weight.detach().clone()
    opt = make_optimizer(w, lr=0.1, weight_decay=0.1)
    w.weight.grad = torch.ones(2, 3)
    w.weight.grad[0, 1] = bad
    with pytest.raises(NonFiniteError, match="non-finite"):
        optimizer_step(w, opt, grad_clip=1.0)
    torch.testing.assert_close(w.weight.detach(), before)   # not even weight decay moved it
    assert w.weight.grad is None and not opt.state


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_refuses_to_step_even_with_a_finite_gradient(bad):
    w = torch.nn.Linear(3, 2, bias=False)
    before = w.weight.detach().clone()
    opt = make_optimizer(w, lr=0.1, weight_decay=0.1)
    w.weight.grad = torch.ones(2, 3)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        optimizer_step(w, opt, grad_clip=1.0, loss=bad)
    torch.testing.assert_close(w.weight.detach(), before)
    assert w.weight.grad is None and not opt.state
    w.weight.grad = torch.ones(2, 3)                       # the refusal dropped it; a finite loss steps
    assert optimizer_step(w, opt, grad_clip=0.0, loss=1.5) == pytest.approx(math.sqrt(6))
