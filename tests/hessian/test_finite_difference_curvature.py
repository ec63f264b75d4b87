"""SophiaH / AdaHessian with hessian="fd": Hz by central differences of backward passes (what FSDP2 can run)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optim


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    return model, (torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,)))


@pytest.mark.parametrize("cls, key", [(optim.SophiaH, "hessian"), (optim.AdaHessian, "exp_hessian_diag_sq")])
def test_finite_differences_match_the_exact_curvature_and_restore_the_parameters(cls, key):
    states, params = {}, {}
    for mode in ("exact", "fd"):
        model, (x, y) = _model_and_batch()
        optimizer = cls(model.parameters(), lr=1e-2, seed=3, hessian=mode)
        before = [p.detach().clone() for p in model.parameters()]
        calls = []

        def closure():
            calls.append(1)
            return F.cross_entropy(model(x), y)

        optimizer.step(closure)
        # exact: one evaluation; fd: the gradient and the two sides of the difference
        assert len(calls) == (3 if mode == "fd" else 1)
        states[mode] = [optimizer.state[p][key].clone() for p in model.parameters()]
        params[mode] = [p.detach().clone() for p in model.parameters()]
        assert not any(torch.equal(a, b) for a, b in zip(before, params[mode]))
    for exact, fd in zip(states["exact"], states["fd"]):
        assert exact.abs().max() > 0
        torch.testing.assert_close(fd, exact, rtol=1e-6, atol=1e-9)
    for exact, fd in zip(params["exact"], params["fd"]):
        torch.testing.assert_close(fd, exact, rtol=1e-6, atol=1e-9)


def test_finite_differences_need_a_closure_and_a_known_mode():
    model, (x, y) = _model_and_batch()
    with pytest.raises(ValueError, match="hessian must be one of"):
        optim.SophiaH(model.parameters(), hessian="gauss-newton")
    optimizer = optim.SophiaH(model.parameters(), hessian="fd", seed=0)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="pass step\\(closure\\)"):
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not optimizer.state
