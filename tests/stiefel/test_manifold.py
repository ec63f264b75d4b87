"""optim.stiefel manifold utilities: initialization, defect, projections, gradients, retractions, Grassmann."""

from __future__ import annotations

import pytest
import torch

import optim.stiefel as st
from optim.stiefel.manifold import cayley_retraction

from ._problems import PCA

SHAPES = [(12, 4), (4, 12), (3, 9, 9), (2, 3, 10, 2)]
F64 = torch.float64


def _tangent(x, manifold="stiefel"):
    return st.project_tangent(x, torch.randn_like(x), manifold=manifold)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_orthogonal_init_is_on_the_manifold_in_the_right_orientation(shape, dtype):
    x = st.orthogonal_(torch.full(shape, float("nan"), dtype=dtype))
    assert x.dtype == dtype and x.shape == shape
    assert st.distance_to_manifold(x).max() < (1e-6 if dtype == torch.float32 else 1e-13)
    n, p = shape[-2:]
    gram = x.mT @ x if n >= p else x @ x.mT
    torch.testing.assert_close(gram.double(), torch.eye(min(n, p), dtype=F64).expand_as(gram), atol=1e-6, rtol=0)
    # matrices of a batch are different draws
    if len(shape) > 2:
        flat = x.reshape(-1, n, p)
        assert not torch.allclose(flat[0], flat[1])


def test_orthogonal_init_is_reproducible_with_a_generator():
    a = st.orthogonal_(torch.empty(6, 3), generator=torch.Generator().manual_seed(3))
    b = st.orthogonal_(torch.empty(6, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_distance_to_manifold_known_values():
    x = st.orthogonal_(torch.empty(7, 3, dtype=F64))
    assert st.distance_to_manifold(x) < 1e-14
    # (2X)ᵀ(2X) − I = 3I: ‖·‖_F = 3·√p
    torch.testing.assert_close(st.distance_to_manifold(2 * x), torch.tensor(3 * 3**0.5, dtype=F64))
    torch.testing.assert_close(st.distance_to_manifold((2 * x).mT), torch.tensor(3 * 3**0.5, dtype=F64))
    assert st.distance_to_manifold(torch.zeros(2, 5, 4, 2)).shape == (2, 5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("manifold", ["stiefel", "grassmann"])
def test_projection_is_idempotent_and_tangent(shape, manifold):
    x = st.orthogonal_(torch.empty(shape, dtype=F64))
    xi = _tangent(x, manifold)
    torch.testing.assert_close(st.project_tangent(x, xi, manifold=manifold), xi)
    xo, xio = st.orient(x), st.orient(xi)
    inner = xo.mT @ xio
    if manifold == "stiefel":
        torch.testing.assert_close(inner + inner.mT, torch.zeros_like(inner), atol=1e-12, rtol=0)
    else:
        torch.testing.assert_close(inner, torch.zeros_like(inner), atol=1e-12, rtol=0)
    # orthogonal projection: the residual is normal to every tangent vector
    z = torch.randn_like(x)
    residual = z - st.project_tangent(x, z, manifold=manifold)
    assert abs((residual * _tangent(x, manifold)).sum().item()) < 1e-10


def test_riemannian_gradient_represents_the_differential_in_each_metric():
    """⟨grad F, ξ⟩_metric = ⟨G, ξ⟩ for every tangent ξ: Euclidean metric and canonical metric tr(ξᵀ(I − ½XXᵀ)ζ)."""
    x = st.orthogonal_(torch.empty(9, 4, dtype=F64))
    g = torch.randn(9, 4, dtype=F64)
    xi = _tangent(x)
    euclidean = st.riemannian_gradient(x, g)
    canonical = st.riemannian_gradient(x, g, metric="canonical")
    assert abs((euclidean * xi).sum() - (g * xi).sum()) < 1e-12
    canonical_inner = (canonical * ((torch.eye(9, dtype=F64) - 0.5 * x @ x.T) @ xi)).sum()
    assert abs(canonical_inner - (g * xi).sum()) < 1e-12
    with pytest.raises(ValueError, match="metric"):
        st.riemannian_gradient(x, g, metric="affine")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", ["qr", "cayley", "polar"])
def test_retractions_land_on_the_manifold_and_agree_to_first_order(shape, method):
    x = st.orthogonal_(torch.empty(shape, dtype=F64))
    xi = _tangent(x)
    assert st.distance_to_manifold(st.retract(x, 0.7 * xi, method=method)).max() < 1e-12
    torch.testing.assert_close(st.retract(x, 0 * xi, method=method), x, atol=1e-12, rtol=0)
    errors = [(st.retract(x, t * xi, method=method) - x - t * xi).norm().item() for t in (1e-2, 1e-3)]
    assert errors[1] < errors[0] / 50, errors  # R(tξ) = X + tξ + O(t²)


def test_float32_retractions_are_accurate():
    x = st.orthogonal_(torch.empty(300, 40))
    xi = 0.5 * _tangent(x)
    for method in ("qr", "cayley", "polar"):
        assert st.distance_to_manifold(st.retract(x, xi, method=method)) < 1e-5, method


def test_cayley_retraction_equals_the_explicit_n_by_n_formula():
    x = st.orthogonal_(torch.empty(8, 3, dtype=F64))
    xi = _tangent(x)
    projector = torch.eye(8, dtype=F64) - 0.5 * x @ x.T
    w = projector @ xi @ x.T - x @ xi.T @ projector
    eye = torch.eye(8, dtype=F64)
    want = torch.linalg.solve(eye - 0.5 * w, (eye + 0.5 * w) @ x)
    torch.testing.assert_close(cayley_retraction(x, xi), want, atol=1e-13, rtol=0)


def test_polar_newton_schulz_matches_svd_and_falls_back_when_it_cannot_converge():
    z = torch.randn(50, 6, dtype=F64)
    z = z / torch.linalg.matrix_norm(z, ord=2) + st.orthogonal_(torch.empty(50, 6, dtype=F64))
    torch.testing.assert_close(st.polar_newton_schulz(z), st.project_to_manifold(z), atol=1e-11, rtol=0)
    # a wide matrix (and a batch of them) in the caller's orientation: its ZᵀZ is singular (NaN before)
    wide = z.mT.reshape(2, 3, 50)
    polar = st.polar_newton_schulz(wide)
    assert polar.shape == wide.shape
    torch.testing.assert_close(polar, st.project_to_manifold(wide), atol=1e-11, rtol=0)
    # a Gram matrix with condition number 1e12 needs more iterations than allowed: exact fallback, with a warning
    ill = st.orthogonal_(torch.empty(20, 3, dtype=F64)) * torch.tensor([1.0, 1e-3, 1e-6], dtype=F64)
    with pytest.warns(RuntimeWarning, match="Newton"):
        polar = st.polar_newton_schulz(ill, max_iters=6)
    torch.testing.assert_close(polar, st.project_to_manifold(ill), atol=1e-8, rtol=0)


def test_check_on_manifold_says_how_to_fix_it():
    x = st.orthogonal_(torch.empty(10, 3))
    st.check_on_manifold(x, caller="test")
    with pytest.raises(ValueError, match=r"orthogonal_.*project_to_manifold"):
        st.check_on_manifold(torch.randn(10, 3), caller="test")
    with pytest.raises(ValueError, match="rows"):
        st.check_on_manifold(torch.randn(3, 10), caller="test")
    with pytest.raises(ValueError, match="manifold=None"):
        st.check_on_manifold(torch.randn(10), caller="test")
    with pytest.raises(ValueError, match="float32 or float64"):
        st.check_on_manifold(x.bfloat16(), caller="test")


def test_project_to_manifold_is_the_nearest_point():
    z = torch.randn(9, 4, dtype=F64)
    polar = st.project_to_manifold(z)
    assert st.distance_to_manifold(polar) < 1e-13
    for _ in range(5):
        other = st.orthogonal_(torch.empty(9, 4, dtype=F64))
        assert (z - polar).norm() <= (z - other).norm()
    assert st.distance_to_manifold(st.project_to_manifold(z.T, method="qr")) < 1e-13


def test_riemannian_gradient_norm_vanishes_at_the_pca_solution_and_uses_the_projected_point():
    problem = PCA.make(12, 3)
    solution = problem.top_eigenvectors()
    assert st.riemannian_gradient_norm(solution, problem.grad) < 1e-10
    assert st.riemannian_gradient_norm(solution, problem.grad, manifold="grassmann") < 1e-10
    # off the manifold by 1e-3, still ~0 when the gradient is evaluated at the projected point
    drifted = solution * (1 + 1e-3)
    assert st.riemannian_gradient_norm(drifted, problem.grad) < 1e-10
    assert st.riemannian_gradient_norm(st.orthogonal_(torch.empty(12, 3, dtype=F64)), problem.grad) > 1e-2


def test_grassmann_quotient_invariance():
    """PCA's F is O(p)-invariant: F(XQ) = F(X), and the Grassmann gradient is equivariant: grad(XQ) = grad(X)·Q."""
    problem = PCA.make(15, 4)
    x = st.orthogonal_(torch.empty(15, 4, dtype=F64))
    q = st.orthogonal_(torch.empty(4, 4, dtype=F64))
    xq = x @ q
    torch.testing.assert_close(problem.loss(xq), problem.loss(x))
    grad_x = st.riemannian_gradient(x, problem.grad(x), manifold="grassmann")
    grad_xq = st.riemannian_gradient(xq, problem.grad(xq), manifold="grassmann")
    torch.testing.assert_close(grad_xq, grad_x @ q, atol=1e-12, rtol=0)
    # for an invariant F the Stiefel and Grassmann gradients coincide (XᵀG is symmetric)
    torch.testing.assert_close(st.riemannian_gradient(x, problem.grad(x)), grad_x, atol=1e-12, rtol=0)
    assert st.grassmann_distance(x, xq) < 1e-6
    assert st.grassmann_distance(x, st.orthogonal_(torch.empty(15, 4, dtype=F64))) > 0.1


def test_bad_manifold_names_and_methods():
    x = st.orthogonal_(torch.empty(6, 2))
    with pytest.raises(ValueError, match="manifold must be"):
        st.project_tangent(x, x, manifold="sphere")
    with pytest.raises(ValueError, match="method must be"):
        st.retract(x, x, method="svd")
    with pytest.raises(ValueError, match="method must be"):
        st.project_to_manifold(x, method="svd")


@pytest.mark.parametrize("shape", [(40, 12), (3, 30, 30), (0, 5, 3)], ids=str)
def test_near_orthonormal_q_factor_is_the_householder_q_factor(shape):
    """The re-orthonormalization's CholeskyQR of a drifted iterate gives the sign-fixed Householder Q, to float64
    rounding; a batch with a matrix far from orthonormal (where CholeskyQR would lose orthogonality) takes
    Householder itself."""
    from optim.stiefel.manifold import _qr_sign_fixed, qr_sign_fixed_near_orthonormal

    generator = torch.Generator().manual_seed(5)
    x = st.orthogonal_(torch.empty(shape, dtype=F64), generator=generator)
    drifted = x + 1e-3 * torch.randn(shape, dtype=F64, generator=generator)
    q = qr_sign_fixed_near_orthonormal(drifted)
    torch.testing.assert_close(q, _qr_sign_fixed(drifted), atol=1e-13, rtol=0)
    if q.numel():
        assert st.distance_to_manifold(q).max() < 1e-13
        far = drifted.clone()
        far[(0,) * (far.dim() - 2)] *= 1.5  # ‖ZᵀZ − I‖ of that matrix ≈ 1.25·√P
        assert torch.equal(qr_sign_fixed_near_orthonormal(far), _qr_sign_fixed(far))


@pytest.mark.parametrize("dtype, scale, atol", [(torch.float32, 1e-6, 1.2e-7), (F64, 3e-11, 1e-14)])
@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (3, 40, 40)], ids=str)
def test_re_orthonormalization_of_a_slightly_drifted_parameter_lands_on_its_polar_factor(dtype, scale, atol, shape):
    """Below a defect of 0.3·√ε (float32 1e-4, float64 4.5e-9) the periodic re-orthonormalization is one
    Newton–Schulz step: the polar factor U·Vᵀ of the drifted matrix (from its float64 SVD) to (3/4)·defect², i.e.
    to the parameter's rounding."""
    import optim.stiefel.optimizers as stiefel_optimizers

    generator = torch.Generator().manual_seed(7)
    x = st.orthogonal_(torch.empty(shape, dtype=F64), generator=generator)
    drifted = (x + scale * torch.randn(shape, dtype=F64, generator=generator)).to(dtype)
    defect = float(st.distance_to_manifold(drifted).max())
    assert 1e-3 * scale < defect <= stiefel_optimizers.polar_step_max_defect(dtype)
    u, _, vh = torch.linalg.svd(drifted.double(), full_matrices=False)
    p = drifted.clone()
    stiefel_optimizers._reorthonormalize_(p)
    torch.testing.assert_close(p.double(), u @ vh, atol=atol, rtol=0)
    assert float(st.distance_to_manifold(p).max()) < (1e-6 if dtype == torch.float32 else 1e-14)


def test_float32_re_orthonormalization_lands_on_the_float32_rounding_of_the_q_factor():
    """What RSDM's periodic re-orthonormalization writes into a float32 parameter drifted past a defect of 1e-4
    (here ~2e-4): the Q factor."""
    import optim.stiefel.optimizers as stiefel_optimizers
    from optim.stiefel.manifold import _qr_sign_fixed

    generator = torch.Generator().manual_seed(6)
    x = st.orthogonal_(torch.empty(16, 64, dtype=F64), generator=generator)  # n < p: orthonormal rows
    drifted = (x + 1e-5 * torch.randn(16, 64, dtype=F64, generator=generator)).float()
    expected = _qr_sign_fixed(drifted.double().mT).mT
    p = drifted.clone()
    stiefel_optimizers._reorthonormalize_(p)
    torch.testing.assert_close(p.double(), expected, atol=1.2e-7, rtol=0)
    assert float(st.distance_to_manifold(p)) < 1e-6
