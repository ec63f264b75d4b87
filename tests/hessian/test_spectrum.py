"""optim.hessian.spectrum: top eigenpairs, trace, diagonal and SLQ density against dense linear algebra.

The operators are explicit symmetric matrices Q diag(λ) Qᵀ with a known spectrum: a few outliers, a bulk near 0
and negative eigenvalues, as a network's Hessian has. Statistical checks use tolerances derived from each
estimator's variance (stated where used); every random quantity has a fixed seed, so the tests are deterministic.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import optim
from optim.hessian.spectrum import (
    DiagonalEstimate,
    Eigenpairs,
    LinearOperator,
    MatrixOperator,
    SpectralDensity,
    TraceEstimate,
    diagonal,
    plot_density,
    spectral_density,
    top_eigenvalues,
    trace,
)

from ..conftest import DEVICES

F64 = torch.float64


def symmetric(eigenvalues, *, seed: int = 0, dtype=F64, device="cpu") -> torch.Tensor:
    """Q diag(λ) Qᵀ with a Haar-random orthogonal Q (QR of a Gaussian matrix), exactly symmetrized."""
    eigenvalues = torch.as_tensor(eigenvalues, dtype=F64)
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = Q @ torch.diag(eigenvalues) @ Q.T
    return ((A + A.T) / 2).to(device=device, dtype=dtype)


def bulk(count: int, width: float, *, seed: int = 1) -> list[float]:
    """``count`` eigenvalues uniform in [−width/2, width/2]: the bulk near 0, half of it negative."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(count, generator=g, dtype=F64) - 0.5) * width).tolist()


# Well-separated top eigenvalues (ratios 0.4, 0.5, then 0.05 to the bulk), a negative outlier and a bulk at 0.
SPECTRUM = [50.0, 20.0, 10.0, -5.0] + bulk(146, 1.0)
# The most negative eigenvalue dominates in magnitude: power iteration must shift to find the top ones.
NEGATIVE_DOMINANT = [50.0, 20.0, 10.0, -80.0] + bulk(146, 1.0)
# Low-rank-dominated: 10 large eigenvalues and a tiny bulk, where Hutch++ should beat Hutchinson by far.
LOW_RANK = [100.0 - 9.0 * i for i in range(10)] + [abs(x) for x in bulk(190, 0.02)]


@pytest.fixture(scope="module")
def A() -> torch.Tensor:
    return symmetric(SPECTRUM)


class CountingOperator:
    """A LinearOperator that is not a tensor: records the shape of every block it is given."""

    def __init__(self, A: torch.Tensor, *, poison_after: int | None = None):
        self.A = A
        self.calls: list[tuple[int, ...]] = []
        self.poison_after = poison_after

    shape = property(lambda self: tuple(self.A.shape))
    dtype = property(lambda self: self.A.dtype)
    device = property(lambda self: self.A.device)

    def __matmul__(self, v):
        self.calls.append(tuple(v.shape))
        out = v @ self.A  # A symmetric: row i of the result is A v_i
        if self.poison_after is not None and len(self.calls) > self.poison_after:
            out = out.clone()
            out.view(-1)[0] = float("nan")
        return out


# ------------------------------------------------------------------------------------------------------------------
# MatrixOperator
# ------------------------------------------------------------------------------------------------------------------


def test_matrix_operator_multiplies_vectors_and_row_blocks(A):
    op = MatrixOperator(A)
    assert isinstance(op, LinearOperator)
    assert op.shape == (150, 150) and op.dtype == F64 and op.device == A.device
    v = torch.randn(150, dtype=F64)
    V = torch.randn(7, 150, dtype=F64)
    torch.testing.assert_close(op @ v, A @ v)
    torch.testing.assert_close(op @ V, torch.stack([A @ row for row in V]))
    assert isinstance(CountingOperator(A), LinearOperator)


# ------------------------------------------------------------------------------------------------------------------
# top_eigenvalues
# ------------------------------------------------------------------------------------------------------------------


def check_eigenpairs(A, result, k, *, rtol, residual_rtol):
    exact = torch.linalg.eigvalsh(A).flip(0)[:k]
    values, vectors = result
    assert isinstance(result, Eigenpairs)
    assert values.shape == (k,) and vectors.shape == (k, A.shape[0])
    assert values.dtype == A.dtype and vectors.dtype == A.dtype
    assert bool((values[:-1] >= values[1:]).all()), "eigenvalues must be in descending order"
    torch.testing.assert_close(values, exact, rtol=rtol, atol=0)
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(k, dtype=A.dtype), rtol=0, atol=1e-6)
    for value, vector in zip(values, vectors):
        residual = torch.linalg.vector_norm(A @ vector - value * vector)
        assert residual <= residual_rtol * abs(value), f"‖Hv − λv‖ = {residual:.3g} for λ = {value:.6g}"
        assert vector[vector.abs().argmax()] > 0  # the sign convention


def test_lanczos_top3(A):
    # Convergence is declared at residual ≤ tol·|θ| = 1e-6·|θ|; the eigenvalue error is ~residual²/gap.
    check_eigenpairs(A, top_eigenvalues(A, 3), 3, rtol=1e-6, residual_rtol=1e-6)


def test_power_top3(A):
    # Power iteration stops when the Rayleigh quotient moves by ≤ tol relative; its eigenvector error is about
    # √(eigenvalue error), hence the looser residual bound.
    result = top_eigenvalues(A, 3, method="power", tol=1e-12, max_iter=2000)
    check_eigenpairs(A, result, 3, rtol=1e-6, residual_rtol=1e-4)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_largest_algebraic_not_largest_magnitude(method):
    A = symmetric(NEGATIVE_DOMINANT)
    result = top_eigenvalues(A, 3, method=method, tol=1e-6 if method == "lanczos" else 1e-12, max_iter=3000)
    check_eigenpairs(A, result, 3, rtol=1e-6, residual_rtol=1e-4)


@pytest.mark.parametrize("which, method", [("smallest", "lanczos"), ("smallest", "power"),
                                           ("magnitude", "lanczos")])
def test_smallest_and_largest_in_magnitude(which, method):
    # The negative curvature of a saddle: the smallest λ (of the mirrored spectrum: -50, -20, -10 well separated, as
    # power iteration needs), and the largest |λ| (-80, 50, 20)
    A = symmetric([-x for x in SPECTRUM] if which == "smallest" else NEGATIVE_DOMINANT)
    exact = torch.linalg.eigvalsh(A)
    expected = exact[:3] if which == "smallest" else exact[torch.argsort(exact.abs(), descending=True)[:3]]
    tol = 1e-8 if method == "lanczos" else 1e-13
    values, vectors = top_eigenvalues(A, 3, which=which, method=method, tol=tol, max_iter=4000)
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=0)  # in that order
    for value, vector in zip(values, vectors):
        residual = torch.linalg.vector_norm(A @ vector - value * vector)
        assert residual <= 1e-4 * abs(value), f"‖Hv − λv‖ = {residual:.3g} for λ = {value:.6g}"
        assert vector[vector.abs().argmax()] > 0


def test_smallest_eigenvalues_of_a_model_hessian_match_the_explicit_matrix():
    import optim

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=F64), torch.randint(0, 3, (20,))
    H = optim.HessianOperator(model, torch.nn.functional.cross_entropy, (x, y))
    explicit = torch.stack([H @ row for row in torch.eye(H.n, dtype=F64)])
    exact = torch.linalg.eigvalsh((explicit + explicit.T) / 2)
    assert exact[0] < 0  # away from a minimum: negative curvature to find
    torch.testing.assert_close(top_eigenvalues(H, 2, which="smallest", tol=1e-10, max_iter=H.n).eigenvalues,
                               exact[:2], rtol=1e-7, atol=1e-12)


def test_power_does_not_stop_on_an_oscillating_iterate():
    # λ_max = −λ_min: the power iterate alternates between the two eigenvectors and its Rayleigh quotient is
    # constant, which a quotient-only test would accept as converged to a wrong value.
    A = symmetric([50.0, -50.0] + bulk(48, 1.0))
    with pytest.warns(RuntimeWarning, match="power iteration did not converge"):
        top_eigenvalues(A, 1, method="power", max_iter=200)
    values, _ = top_eigenvalues(A, 1)  # Lanczos has no such problem
    assert values.item() == pytest.approx(50.0, rel=1e-10)


def test_methods_agree_on_eigenvectors(A):
    lanczos = top_eigenvalues(A, 3)
    power = top_eigenvalues(A, 3, method="power", tol=1e-12, max_iter=2000)
    torch.testing.assert_close(lanczos.eigenvectors, power.eigenvectors, rtol=0, atol=1e-5)


def test_lanczos_restarts_on_an_invariant_krylov_space():
    # Rank 2: the Krylov space of any start vector is 3-dimensional, so k = 4 needs a restart.
    A = symmetric([5.0, 3.0] + [0.0] * 48)
    values, vectors = top_eigenvalues(A, 4)
    torch.testing.assert_close(values, torch.tensor([5.0, 3.0, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(4, dtype=F64), rtol=0, atol=1e-10)


def test_k_equal_n_gives_the_whole_spectrum():
    A = symmetric([3.0, 1.0, -0.5, -2.0, 0.25], seed=3)
    values, _ = top_eigenvalues(A, 5)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(A).flip(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block_size", [2, 3, 5])
def test_block_lanczos_top3(A, block_size):
    op = CountingOperator(A)
    check_eigenpairs(A, top_eigenvalues(op, 3, block_size=block_size), 3, rtol=1e-6, residual_rtol=1e-6)
    assert set(op.calls) == {(block_size, 150)}  # one (b, n) product per step
    assert sum(rows for rows, _ in op.calls) <= 100  # max_iter counts vectors


@pytest.mark.parametrize("which", ["smallest", "magnitude"])
def test_block_lanczos_smallest_and_largest_in_magnitude(which):
    A = symmetric([-x for x in SPECTRUM] if which == "smallest" else NEGATIVE_DOMINANT)
    exact = torch.linalg.eigvalsh(A)
    expected = exact[:3] if which == "smallest" else exact[torch.argsort(exact.abs(), descending=True)[:3]]
    values, vectors = top_eigenvalues(A, 3, which=which, tol=1e-8, max_iter=600, block_size=2)
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=0)
    for value, vector in zip(values, vectors):
        assert torch.linalg.vector_norm(A @ vector - value * vector) <= 1e-4 * abs(value)


def test_block_lanczos_finds_every_copy_of_a_zero_eigenvalue_of_a_model_hessian():
    # The Hessian of a linear softmax classifier is singular (adding one vector to every row of the weights, or one
    # number to every bias, leaves the softmax as it is): 0 is a repeated eigenvalue, and a single vector's Krylov
    # space, which holds one copy of it, gives the next positive eigenvalue as the second smallest.
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2).double()
    x, y = torch.randn(16, 2, dtype=F64), torch.randint(0, 2, (16,))
    H = optim.HessianOperator(model, torch.nn.functional.cross_entropy, (x, y))
    explicit = torch.stack([H @ row for row in torch.eye(H.n, dtype=F64)])
    exact = torch.linalg.eigvalsh((explicit + explicit.T) / 2)
    assert exact[1].abs() < 1e-12 < exact[3]  # 0 three times, then positive eigenvalues
    single = top_eigenvalues(H, 2, which="smallest").eigenvalues
    assert single[1] > 0.1  # the documented limit of one vector, which block_size lifts
    values, vectors = top_eigenvalues(H, 2, which="smallest", block_size=2)
    torch.testing.assert_close(values, exact[:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(2, dtype=F64), rtol=0, atol=1e-10)


def test_block_lanczos_restarts_on_a_rank_deficient_block():
    # Rank 2 with a block of 3: H Q₀ has rank 2, so a row of every block is rebuilt from a fresh direction.
    A = symmetric([5.0, 3.0] + [0.0] * 48)
    for block_size in (2, 3):
        values, vectors = top_eigenvalues(A, 4, block_size=block_size)
        torch.testing.assert_close(values, torch.tensor([5.0, 3.0, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(vectors @ vectors.T, torch.eye(4, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("block_size", [2, 3, 4, 5])
def test_block_lanczos_k_equal_n_gives_the_whole_spectrum(block_size):
    # n = 5 is no multiple of 2, 3 or 4: the last block is cut to the rows left in Rⁿ
    A = symmetric([3.0, 1.0, -0.5, -2.0, 0.25], seed=3)
    values, _ = top_eigenvalues(A, 5, block_size=block_size)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(A).flip(0), rtol=1e-10, atol=1e-12)


def test_block_lanczos_float32_and_warns_without_convergence(A):
    A32 = symmetric(SPECTRUM, dtype=torch.float32)
    values, vectors = top_eigenvalues(A32, 3, block_size=3)
    assert values.dtype == vectors.dtype == torch.float32
    torch.testing.assert_close(values, torch.linalg.eigvalsh(A).flip(0)[:3].float(), rtol=1e-5, atol=0)
    op = CountingOperator(A)
    with pytest.warns(RuntimeWarning, match="block Lanczos did not converge within max_iter=7"):
        values, _ = top_eigenvalues(op, 3, max_iter=7, block_size=3)
    assert values.shape == (3,) and sum(rows for rows, _ in op.calls) == 6


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_not_converging_warns(A, method):
    with pytest.warns(RuntimeWarning, match="did not converge within max_iter=4"):
        values, _ = top_eigenvalues(A, 3, method=method, max_iter=4)
    assert values.shape == (3,)


def test_float32_operator():
    A = symmetric(SPECTRUM, dtype=torch.float32)
    exact = torch.linalg.eigvalsh(A.double()).flip(0)[:3].float()
    values, vectors = top_eigenvalues(A, 3)
    assert values.dtype == vectors.dtype == torch.float32
    torch.testing.assert_close(values, exact, rtol=1e-5, atol=0)
    estimate = trace(A, num_probes=60)
    assert abs(estimate.estimate - torch.trace(A.double()).item()) <= 4 * estimate.std_error


# ------------------------------------------------------------------------------------------------------------------
# trace
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_four_standard_errors(A, method):
    result = trace(A, num_probes=99, method=method)
    assert isinstance(result, TraceEstimate) and result.num_matvecs == 99
    exact = torch.trace(A).item()
    assert abs(result.estimate - exact) <= 4 * result.std_error, (result, exact)


def test_hutchinson_standard_error_matches_its_variance(A):
    # Var(zᵀHz) = 2 Σ_{i≠j} H_ij² for Rademacher z; the sample estimate over 200 probes is within ~20% of it.
    result = trace(A, num_probes=200)
    theory = math.sqrt(2 * ((A**2).sum() - (torch.diagonal(A) ** 2).sum()).item() / 200)
    assert 0.75 * theory <= result.std_error <= 1.25 * theory


def test_hutchpp_beats_hutchinson_on_a_low_rank_dominated_matrix():
    A = symmetric(LOW_RANK, seed=5)
    exact = torch.trace(A).item()
    plain = trace(A, num_probes=99, seed=7)
    sketched = trace(A, num_probes=99, method="hutch++", seed=7)
    # Measured: Hutchinson error ≈ 9 (std error ≈ 30), Hutch++ error ≈ 4e-3 (std error ≈ 9e-3): the sketch of 33
    # vectors captures the 10 large eigenvalues, leaving a residual of Frobenius norm ~0.1. Assert a 100× margin.
    assert abs(sketched.estimate - exact) <= 4 * sketched.std_error
    assert sketched.std_error * 100 < plain.std_error
    assert abs(sketched.estimate - exact) * 100 < max(abs(plain.estimate - exact), plain.std_error)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_batches_probes_and_does_not_depend_on_batch_size(A, method):
    op = CountingOperator(A)
    default = trace(op, num_probes=100, method=method, seed=3)
    if method == "hutchinson":
        assert op.calls == [(32, 150)] * 3 + [(4, 150)]
    else:  # 33 sketch products, 33 basis products, 34 residual probes
        assert op.calls == [(32, 150), (1, 150)] * 2 + [(32, 150), (2, 150)]
    small = trace(A, num_probes=100, method=method, seed=3, batch_size=7)
    assert small.estimate == pytest.approx(default.estimate, rel=1e-12)
    assert small.std_error == pytest.approx(default.std_error, rel=1e-9)


def test_one_probe_has_no_standard_error(A):
    result = trace(A, num_probes=1)
    assert math.isfinite(result.estimate) and math.isnan(result.std_error)


# ------------------------------------------------------------------------------------------------------------------
# diagonal
# ------------------------------------------------------------------------------------------------------------------


def test_diagonal_within_four_standard_errors(A):
    result = diagonal(A, num_probes=200)
    assert isinstance(result, DiagonalEstimate)
    assert result.estimate.shape == result.std_error.shape == (150,)
    exact = torch.diagonal(A)
    # Entry j of a sample has variance Σ_{l≠j} H_jl²; with 200 probes the estimate is near-Gaussian, so 4 sample
    # standard errors cover all but a tiny fraction of entries. Require 95% (all 150 pass, measured).
    inside = (result.estimate - exact).abs() <= 4 * result.std_error
    assert inside.double().mean() >= 0.95
    theory = torch.sqrt(((A**2).sum(dim=1) - exact**2) / 200)
    ratio = result.std_error / theory  # measured within [0.93, 1.06]
    assert bool(((ratio > 0.75) & (ratio < 1.25)).all())


def test_diagonal_does_not_depend_on_batch_size(A):
    a = diagonal(A, num_probes=50, seed=4)
    b = diagonal(A, num_probes=50, seed=4, batch_size=3)
    torch.testing.assert_close(a.estimate, b.estimate, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.std_error, b.std_error, rtol=1e-9, atol=1e-12)


def test_diagonal_is_exact_for_a_diagonal_matrix():
    D = torch.diag(torch.linspace(-2, 3, 40, dtype=F64))
    result = diagonal(D, num_probes=5)
    torch.testing.assert_close(result.estimate, torch.diagonal(D), rtol=0, atol=1e-14)
    assert bool((result.std_error == 0).all())


# ------------------------------------------------------------------------------------------------------------------
# spectral_density
# ------------------------------------------------------------------------------------------------------------------


def test_slq_density_integrates_to_one_and_has_the_right_mean(A):
    runs = 50
    result = spectral_density(A, num_runs=runs, lanczos_steps=60)
    assert isinstance(result, SpectralDensity)
    grid, density = result  # unpacks as a pair, and indexes as one
    assert len(result) == 2 and result[0] is grid and result[1] is density and result[-1] is density
    assert grid.shape == density.shape == (1000,) and bool((density >= 0).all())
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)
    assert result.nodes.shape == result.weights.shape == (runs, 60)
    torch.testing.assert_close(result.weights.sum(dim=1), torch.ones(runs, dtype=F64))
    # Σ_j τ_j θ_j = zᵀHz/n for each run: the mean is Hutchinson's estimate of tr(H)/n with the same probes ...
    n = A.shape[0]
    assert result.mean == pytest.approx(trace(A, num_probes=runs).estimate / n, rel=1e-10)
    # ... so it is within 4 standard deviations √(2 Σ_{i≠j} H_ij² / runs) / n of tr(H)/n (here 4σ ≈ 0.3 around
    # a mean of 0.52: a relative tolerance would be meaningless for a spectrum centred near 0).
    sigma = math.sqrt(2 * ((A**2).sum() - (torch.diagonal(A) ** 2).sum()).item() / runs) / n
    assert abs(result.mean - torch.trace(A).item() / n) <= 4 * sigma
    # 60 Lanczos steps resolve the extreme eigenvalues: they are the extreme nodes.
    exact = torch.linalg.eigvalsh(A)
    assert result.nodes.max().item() == pytest.approx(exact[-1].item(), rel=1e-8)
    assert result.nodes.min().item() == pytest.approx(exact[0].item(), rel=1e-8)


def test_slq_mean_within_five_percent_on_a_positive_spectrum():
    # Away from 0 a relative statement makes sense. The mean's standard deviation is √(2 Σ_{i≠j} H_ij² / runs) / n;
    # for this spectrum and 40 runs it is ≈ 1% of tr(H)/n (the assert below checks it), so 5% is a ≥ 4σ bound.
    A = symmetric([5.0, 3.0] + [1.0 + x for x in bulk(98, 1.0)], seed=8)
    n, runs = 100, 40
    exact = torch.trace(A).item() / n
    sigma = math.sqrt(2 * ((A**2).sum() - (torch.diagonal(A) ** 2).sum()).item() / runs) / n
    assert 4 * sigma <= 0.05 * exact
    result = spectral_density(A, num_runs=runs, lanczos_steps=30)
    assert result.mean == pytest.approx(exact, rel=0.05)


def test_slq_user_grid_and_sigma(A):
    exact = torch.linalg.eigvalsh(A)
    grid = torch.linspace(exact[0].item() - 3, exact[-1].item() + 3, 4001)
    result = spectral_density(A, num_runs=5, lanczos_steps=40, grid=grid, sigma=0.2)
    assert result.sigma == 0.2
    torch.testing.assert_close(result.grid, grid.double())
    assert torch.trapezoid(result.density, result.grid).item() == pytest.approx(1.0, abs=1e-3)


def test_slq_stops_runs_on_an_invariant_krylov_space():
    # Three distinct eigenvalues: every Krylov space has dimension 3, so each run stops after 3 steps and is
    # padded with zero weights; the quadrature is then exact: nodes = the eigenvalues, weights = their mass.
    A = symmetric([2.0] * 5 + [-1.0] * 10 + [0.5] * 25, seed=2)
    result = spectral_density(A, num_runs=4, lanczos_steps=10)
    assert result.nodes.shape == (4, 10)
    assert bool((result.weights[:, 3:] == 0).all())
    nodes = result.nodes[:, :3].sort(dim=1).values
    torch.testing.assert_close(nodes, torch.tensor([[-1.0, 0.5, 2.0]] * 4, dtype=F64), rtol=0, atol=1e-10)
    assert torch.trapezoid(result.density, result.grid).item() == pytest.approx(1.0, abs=1e-3)


def test_slq_batches_runs(A):
    op = CountingOperator(A)
    result = spectral_density(op, num_runs=6, lanczos_steps=12, batch_size=4)
    assert op.calls == [(4, 150)] * 12 + [(2, 150)] * 12 and result.num_matvecs == 72
    unbatched = spectral_density(A, num_runs=6, lanczos_steps=12, batch_size=1)
    torch.testing.assert_close(result.nodes, unbatched.nodes, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------------------------
# plot_density
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log", [True, False])
def test_plot_density_writes_a_png(A, tmp_path, log):
    pytest.importorskip("matplotlib")
    path = tmp_path / "density.png"
    assert plot_density(spectral_density(A, num_runs=2, lanczos_steps=20), path, log=log, title="H") == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_density_without_matplotlib_names_the_install_command(A, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_density((torch.zeros(3), torch.zeros(3)), tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------------------------
# Reproducibility
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator",
    [
        lambda A, seed: top_eigenvalues(A, 2, seed=seed, tol=1e-3).eigenvectors,
        lambda A, seed: top_eigenvalues(A, 2, method="power", seed=seed, tol=1e-3).eigenvectors,
        lambda A, seed: torch.tensor(trace(A, num_probes=10, seed=seed)[:2]),
        lambda A, seed: torch.tensor(trace(A, num_probes=9, method="hutch++", seed=seed)[:2]),
        lambda A, seed: diagonal(A, num_probes=5, seed=seed).estimate,
        lambda A, seed: spectral_density(A, num_runs=2, lanczos_steps=10, seed=seed).density,
    ],
    ids=["lanczos", "power", "hutchinson", "hutch++", "diagonal", "slq"],
)
def test_same_seed_same_result_other_seed_other_result(A, estimator):
    torch.manual_seed(0)  # the global generator must play no part
    first = estimator(A, 11)
    torch.manual_seed(1)
    assert torch.equal(first, estimator(A, 11))
    assert not torch.equal(first, estimator(A, 12))


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "matrix, error, match",
    [
        (torch.zeros(3, 4, dtype=F64), ValueError, "square"),
        (torch.zeros(3, dtype=F64), ValueError, "square"),
        (torch.zeros(0, 0, dtype=F64), ValueError, "empty"),
        (torch.eye(3, dtype=torch.int64), ValueError, "floating-point"),
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64), ValueError, "symmetric"),
        (torch.tensor([[float("nan"), 0.0], [0.0, 1.0]], dtype=F64), ValueError, "NaN"),
        ([[1.0, 0.0], [0.0, 1.0]], TypeError, "torch.Tensor"),
    ],
    ids=["rectangular", "vector", "empty", "integer", "asymmetric", "nan", "list"],
)
def test_matrix_operator_rejects(matrix, error, match):
    with pytest.raises(error, match=match):
        MatrixOperator(matrix)


def test_matrix_operator_accepts_rounding_asymmetry():
    A = symmetric(SPECTRUM, dtype=torch.float32)
    A[0, 1] += 1e-6  # far below √eps32 · max|A|
    MatrixOperator(A)


def test_matrix_operator_rejects_a_wrong_vector_shape(A):
    with pytest.raises(ValueError, match=r"\(150,\) or \(k, 150\)"):
        MatrixOperator(A) @ torch.zeros(3, 149, dtype=F64)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda A: top_eigenvalues("H"), TypeError, "LinearOperator"),
        (lambda A: top_eigenvalues(A, 0), ValueError, "k must be >= 1"),
        (lambda A: top_eigenvalues(A, 151), ValueError, "k must be <= n = 150"),
        (lambda A: top_eigenvalues(A, 1.5), TypeError, "k must be an int"),
        (lambda A: top_eigenvalues(A, method="arnoldi"), ValueError, "method must be 'lanczos' or 'power'"),
        (lambda A: top_eigenvalues(A, tol=0.0), ValueError, "tol must be"),
        (lambda A: top_eigenvalues(A, tol=float("nan")), ValueError, "tol must be"),
        (lambda A: top_eigenvalues(A, 3, max_iter=2), ValueError, "max_iter must be >= k = 3"),
        (lambda A: top_eigenvalues(A, seed=-1), ValueError, "seed must be in"),
        (lambda A: top_eigenvalues(A, which="LA"), ValueError, "which must be one of 'largest', 'smallest'"),
        (lambda A: top_eigenvalues(A, which="magnitude", method="power"), ValueError, "needs method='lanczos'"),
        (lambda A: top_eigenvalues(A, block_size=0), ValueError, "block_size must be >= 1"),
        (lambda A: top_eigenvalues(A, block_size=2.0), TypeError, "block_size must be an int"),
        (lambda A: top_eigenvalues(A, block_size=151), ValueError, "block_size must be <= n = 150"),
        (lambda A: top_eigenvalues(A, block_size=2, method="power"), ValueError, "block_size=2 needs method="),
        (lambda A: top_eigenvalues(A, 3, block_size=2, max_iter=3), ValueError,
         "in blocks of block_size=2 reach 2 vectors, fewer than k=3"),
        (lambda A: trace(A, num_probes=0), ValueError, "num_probes must be >= 1"),
        (lambda A: trace(A, num_probes=2, method="hutch++"), ValueError, "num_probes must be >= 3"),
        (lambda A: trace(A, method="xtrace"), ValueError, "method must be 'hutchinson' or 'hutch\\+\\+'"),
        (lambda A: trace(A, batch_size=0), ValueError, "batch_size must be >= 1"),
        (lambda A: trace(A, seed=1.0), TypeError, "seed must be an int"),
        (lambda A: diagonal(A, num_probes=0), ValueError, "num_probes must be >= 1"),
        (lambda A: diagonal(A, batch_size=0), ValueError, "batch_size must be >= 1"),
        (lambda A: spectral_density(A, num_runs=0), ValueError, "num_runs must be >= 1"),
        (lambda A: spectral_density(A, lanczos_steps=0), ValueError, "lanczos_steps must be >= 1"),
        (lambda A: spectral_density(A, sigma=-1.0), ValueError, "sigma must be"),
        (lambda A: spectral_density(A, grid=[0.0]), ValueError, "grid must be a 1-D"),
        (lambda A: spectral_density(A, grid=[1.0, 0.0]), ValueError, "strictly increasing"),
        (lambda A: plot_density((torch.zeros(3), torch.zeros(4)), "x.png"), ValueError, "same shape"),
    ],
)
def test_bad_arguments(A, call, error, match):
    with pytest.raises(error, match=match):
        call(A)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda op: trace(op, num_probes=64), r"Hutchinson probes 32\.\.63"),
        (lambda op: trace(op, num_probes=64, method="hutch++"), r"Hutch\+\+ basis vectors 0\.\.20"),
        (lambda op: diagonal(op, num_probes=64), r"diagonal probes 32\.\.63"),
        (lambda op: top_eigenvalues(op, 3), r"Lanczos iteration 1\b"),
        (lambda op: top_eigenvalues(op, 3, block_size=2), r"block Lanczos iteration 1\b"),
        (lambda op: top_eigenvalues(op, 3, method="power"), r"power iteration 1 of eigenpair 0"),
        (lambda op: spectral_density(op, num_runs=2), r"spectral_density Lanczos iteration 1 of runs 0\.\.1"),
    ],
    ids=["hutchinson", "hutch++", "diagonal", "lanczos", "block-lanczos", "power", "slq"],
)
def test_non_finite_products_name_the_probe(A, call, match):
    with pytest.raises(RuntimeError, match=match) as info:
        call(CountingOperator(A, poison_after=1))
    assert "smaller lr" in str(info.value) and "eval" in str(info.value)


def test_operator_returning_the_wrong_shape(A):
    class Flat(CountingOperator):
        def __matmul__(self, v):
            return super().__matmul__(v).reshape(-1)

    with pytest.raises(RuntimeError, match=r"\(k, n\)"):
        trace(Flat(A), num_probes=4)


# ------------------------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_estimators_on_device(device):
    A = symmetric(SPECTRUM, device=device)
    values, vectors = top_eigenvalues(A, 3)
    assert values.device.type == vectors.device.type == device
    torch.testing.assert_close(values.cpu(), torch.linalg.eigvalsh(A.cpu()).flip(0)[:3], rtol=1e-6, atol=0)
    block = top_eigenvalues(A, 3, block_size=2)  # krylov_dots over a basis broadcast along the block's rows
    assert block.eigenvalues.device.type == device
    torch.testing.assert_close(block.eigenvalues.cpu(), values.cpu(), rtol=1e-6, atol=0)
    # Probes are device-independent, so the estimates equal the CPU ones up to rounding.
    cpu = symmetric(SPECTRUM)
    assert trace(A, num_probes=20).estimate == pytest.approx(trace(cpu, num_probes=20).estimate, rel=1e-10)
    torch.testing.assert_close(diagonal(A, num_probes=4).estimate.cpu(), diagonal(cpu, num_probes=4).estimate)
    torch.testing.assert_close(
        spectral_density(A, num_runs=2, lanczos_steps=20).density,
        spectral_density(cpu, num_runs=2, lanczos_steps=20).density,
        rtol=1e-8,
        atol=1e-10,
    )


class _RecordingOperator:
    """A float32 matrix whose products record whether the caller's autocast was on while they ran."""

    def __init__(self, matrix):
        self.matrix, self.shape, self.dtype, self.device = matrix, tuple(matrix.shape), matrix.dtype, matrix.device
        self.autocast = []

    def __matmul__(self, v):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        with torch.autocast("cpu", enabled=False):
            return v @ self.matrix


@pytest.mark.parametrize("estimate", ["top", "power", "smallest", "trace", "hutch++", "diagonal", "density"])
def test_estimators_in_an_autocast_region_compute_as_outside_it_with_the_products_inside_it(estimate):
    # Under bfloat16 autocast the estimators' own products of the float32 basis came out bfloat16 and met it in
    # krylov_dots ("w is torch.bfloat16 but basis is torch.float32"). Their arithmetic now runs outside the
    # region; H's products inside it, as the caller asked (a model's forward under autocast).
    torch.manual_seed(0)
    A = torch.randn(40, 40)
    A = A @ A.T / 40 - 0.3 * torch.eye(40)
    run = {
        "top": lambda H: optim.top_eigenvalues(H, k=2, tol=1e-6, max_iter=40).eigenvalues,
        "power": lambda H: optim.top_eigenvalues(H, k=1, method="power", tol=1e-6, max_iter=300).eigenvalues,
        "smallest": lambda H: optim.top_eigenvalues(H, k=1, which="smallest", tol=1e-6, max_iter=40).eigenvalues,
        "trace": lambda H: torch.tensor(optim.trace(H, num_probes=12, seed=0).estimate),
        "hutch++": lambda H: torch.tensor(optim.trace(H, num_probes=12, method="hutch++", seed=0).estimate),
        "diagonal": lambda H: optim.diagonal(H, num_probes=12, seed=0).estimate,
        "density": lambda H: optim.spectral_density(H, num_runs=2, lanczos_steps=12, seed=0).density,
    }[estimate]
    expected = run(optim.hessian.MatrixOperator(A))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(optim.hessian.MatrixOperator(A))
        recording = _RecordingOperator(A)
        recorded = run(recording)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-5)
    assert recording.autocast and all(recording.autocast)
