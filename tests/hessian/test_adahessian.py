"""optim.AdaHessian specifics: spatial averaging over convolution kernels, the bias-corrected second moment of
the diagonal, hessian_power. (The protocol, paths, state dicts, memory and bad input of both second-order
optimizers are tested in test_sophia.py, on both classes.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optim


def _conv_quadratic():
    """L = ½·Σ a ⊙ w² + (Σ w)² / 20 over a (2, 3, 3, 3) kernel: H = diag(a) + 1/10·11ᵀ."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 3, 3, generator=g, dtype=torch.float64) * 4 + 0.5
    w = nn.Parameter(torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64))
    return a, w, lambda: 0.5 * (a * w * w).sum() + w.sum() ** 2 / 20


@pytest.mark.parametrize("spatial_average", [True, False])
def test_spatial_average_of_the_diagonal(spatial_average):
    """With β2 = 0, v after the first step is D²: the spatial mean of |z⊙Hz| per (out, in) pair, or (z⊙Hz)²."""
    a, w, loss = _conv_quadratic()
    opt = optim.AdaHessian([w], lr=0.0, betas=(0.9, 0.0), spatial_average=spatial_average, seed=5)
    hz_expected = None
    z = optim.hessian.rademacher_like([w], seed=optim.hessian.second_order.probe_seed(5, 0))[0]
    hz_expected = a * z + z.sum() / 10  # H z for H = diag(a) + 11ᵀ/10
    opt.step(loss)
    v = opt.state[w]["exp_hessian_diag_sq"]
    if spatial_average:
        d = hz_expected.abs().mean(dim=(2, 3), keepdim=True).expand_as(w)
        assert torch.equal(v[:, :, :1, :1].expand_as(v), v)  # constant over each kernel's spatial positions
    else:
        d = hz_expected
    torch.testing.assert_close(v, d * d, rtol=1e-12, atol=0)


def test_exact_on_a_diagonal_quadratic():
    """For a diagonal Hessian z⊙Hz = diag(H) exactly, so the bias-corrected √v is |diag(H)| after any number of
    refreshes, and the first step is −lr·g/(|a| + eps) (m/(1 − β1) = g)."""
    a = torch.tensor([0.5, 2.0, -3.0, 10.0], dtype=torch.float64)
    x0 = torch.tensor([1.0, -1.0, 0.5, 0.25], dtype=torch.float64)
    x = nn.Parameter(x0.clone())
    opt = optim.AdaHessian([x], lr=0.1, eps=1e-8, seed=0)
    opt.step(lambda: 0.5 * (a * x * x).sum())
    torch.testing.assert_close(x.detach(), x0 - 0.1 * (a * x0) / (a.abs() + 1e-8), rtol=1e-12, atol=1e-15)
    for _ in range(4):
        opt.step(lambda: 0.5 * (a * x * x).sum())
    state = opt.state[x]
    assert int(state["hessian_step"]) == 5 and int(state["step"]) == 5
    v_hat = state["exp_hessian_diag_sq"] / (1 - 0.999**5)
    torch.testing.assert_close(v_hat.sqrt(), a.abs(), rtol=1e-12, atol=0)


def test_update_period_counts_refreshes():
    """update_period=3 over 7 steps: refreshes at steps 1, 4, 7; step counts 7, refresh counts 3."""
    x = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = optim.AdaHessian([x], update_period=3, seed=0)
    for _ in range(7):
        opt.step(lambda: (x**4).sum())
    assert int(opt.state[x]["step"]) == 7 and int(opt.state[x]["hessian_step"]) == 3


def test_no_closure_between_refreshes():
    x = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = optim.AdaHessian([x], update_period=2, seed=0)
    opt.step(lambda: (x**4).sum())
    opt.zero_grad()
    (x**4).sum().backward()
    opt.step()  # step 2: no refresh, the plain gradient suffices
    opt.zero_grad()
    (x**4).sum().backward()
    with pytest.raises(ValueError, match="no closure was given"):
        opt.step()  # step 3 refreshes


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_bad_hessian_power(value):
    with pytest.raises(ValueError, match="hessian_power"):
        optim.AdaHessian([nn.Parameter(torch.zeros(2))], hessian_power=value)
