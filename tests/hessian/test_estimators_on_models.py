"""The estimators on HessianOperators of small float64 models, against their exact dense Hessians.

Models (from test_hvp.py): an MLP, a tiny conv net and a transformer block with math attention; the exact Hessian is
``torch.autograd.functional.hessian``. Tolerances: top-3 eigenvalues to 1e-6 relative (``torch.linalg.eigvalsh``);
stochastic estimates within 4 of their own standard errors of the exact value; the SLQ density integrates to 1 and
its mean is the Hutchinson estimate of tr(H)/n with the same probes.
"""

from __future__ import annotations

import pytest
import torch

from optim.hessian.operator import HessianOperator
from optim.hessian.spectrum import diagonal, spectral_density, top_eigenvalues, trace

from ..conftest import DEVICES
from .test_hvp import MODEL_NAMES, cached_case


def operator_and_exact(model_name: str, device: str = "cpu"):
    case, hessian = cached_case(model_name, device)
    H = HessianOperator(case.model, case.loss_fn, (case.inputs, case.targets))
    return H, hessian


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_top_three_eigenvalues_lanczos(device, model_name):
    H, hessian = operator_and_exact(model_name, device)
    exact = torch.linalg.eigvalsh(hessian.cpu()).flip(0)[:3]
    values, vectors = top_eigenvalues(H, k=3, tol=1e-9, max_iter=H.n, seed=0)
    assert values.shape == (3,) and vectors.shape == (3, H.n)
    torch.testing.assert_close(values.cpu(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())
    residual = (hessian @ vectors.T - vectors.T * values).norm(dim=0)  # H u = λ u
    assert bool((residual <= 1e-5 * exact.abs().max()).all())


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_top_eigenvalue_power(model_name):
    """Power iteration converges linearly in λ₂/λ₁, so it is held to the top eigenvalue only (Lanczos does k)."""
    H, hessian = operator_and_exact(model_name)
    exact = torch.linalg.eigvalsh(hessian).flip(0)[0]
    values, _ = top_eigenvalues(H, k=1, method="power", tol=1e-9, max_iter=3000, seed=0)
    torch.testing.assert_close(values[0], exact, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_four_standard_errors(model_name, method):
    H, hessian = operator_and_exact(model_name)
    exact = torch.trace(hessian).item()
    result = trace(H, num_probes=90, method=method, seed=1)
    assert result.num_matvecs == 90
    assert result.std_error > 0
    assert abs(result.estimate - exact) <= 4 * result.std_error


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_diagonal_is_param_shaped_and_within_four_standard_errors(model_name):
    H, hessian = operator_and_exact(model_name)
    result = diagonal(H, num_probes=100, seed=2)
    assert [t.shape for t in result.estimate] == [p.shape for p in H.params]
    assert [t.shape for t in result.std_error] == [p.shape for p in H.params]
    estimate, std_error = H.flatten(result.estimate), H.flatten(result.std_error)
    exact = torch.diagonal(hessian)
    # Entries whose off-diagonal row is zero are exact (std error 0); the rest are near-Gaussian after 100 probes.
    inside = (estimate - exact).abs() <= 4 * std_error + 1e-12
    assert inside.double().mean() >= 0.95


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_density_integrates_to_one_and_its_mean_is_the_trace_estimate(model_name):
    H, hessian = operator_and_exact(model_name)
    runs = 12
    result = spectral_density(H, num_runs=runs, lanczos_steps=min(H.n, 40), seed=3)
    grid, density = result
    assert abs(torch.trapezoid(density, grid).item() - 1.0) <= 1e-4
    same_probes = trace(H, num_probes=runs, seed=3)
    assert result.mean == pytest.approx(same_probes.estimate / H.n, rel=1e-8, abs=1e-12)
    exact = torch.trace(hessian).item() / H.n
    assert abs(result.mean - exact) <= 4 * same_probes.std_error / H.n
