"""hvp(mode="fd") compares its estimate with the half-step one and warns (strict=True: raises) when f is not smooth
at the scale of the step. Issue 16: a ReLU/MaxPool CNN in float32 was 130% off without a word."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from optim.hessian import hvp


def kinked_problem():
    """f = ½Σ relu(x)², whose gradient relu(x) has a kink at 0; x[0] sits 0.75 steps from it, so the central
    difference over ±h (0.875) and over ±h/2 (1.0) disagree on that coordinate."""
    x = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    v = torch.ones(3, dtype=torch.float64)
    h = torch.finfo(torch.float64).eps ** (1 / 3) * max(1.0, float(x.norm())) / float(v.norm())
    x[0] = 0.75 * h
    return (lambda t: 0.5 * torch.relu(t).square().sum()), x, v


def test_fd_warns_with_the_measured_discrepancy_on_a_kink():
    f, x, v = kinked_problem()
    with pytest.warns(RuntimeWarning, match=r"half step differs from the full-step one by 0\.09"):
        (estimate,) = hvp(f, [x], [v], mode="fd")
    assert estimate[0].item() == pytest.approx(0.875)  # the estimate itself is unchanged: 0.875 against 1
    with pytest.raises(ValueError, match="not smooth at the scale of the step"):
        hvp(f, [x], [v], mode="fd", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hvp(f, [x], [v], mode="fd", strict=False)  # the check (and its two gradients per probe) skipped


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fd_stays_silent_on_smooth_functions(dtype):
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=dtype)
    data = torch.randn(16, 4, dtype=dtype)
    v = torch.randn(2, 5, 4, dtype=dtype)  # two probes

    def f(weight):
        return torch.tanh(data @ weight.T).square().mean() + 0.1 * weight.pow(4).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (estimate,) = hvp(f, [w], [v], mode="fd", strict=True)
    exact = hvp(f, [w], [v], mode="rr")[0]
    assert math.isfinite(float(estimate.norm())) and torch.allclose(estimate, exact, rtol=1e-2, atol=1e-3)


def test_relu_network_in_float32_is_flagged():
    """The issue's case in small: a ReLU + max-pool conv net in float32."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3)
    head = torch.nn.Linear(4 * 3 * 3, 2)
    images = torch.randn(8, 1, 8, 8)
    labels = torch.randint(0, 2, (8,))
    params = [conv.weight.detach(), head.weight.detach()]

    def f(kernel, weight):
        hidden = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(images, kernel)), 2)
        return torch.nn.functional.cross_entropy(hidden.flatten(1) @ weight.T, labels)

    v = [torch.randn(4, *p.shape) for p in params]
    with pytest.warns(RuntimeWarning, match="not smooth"):
        hvp(f, params, v, mode="fd")
