r"""The Stiefel manifold St(n, p) = {X ∈ R^{n×p}: XᵀX = I_p} and its Grassmann quotient Gr(n, p) = St(n, p)/O(p).

Shapes and orientation. A tensor of shape (..., n, p) is a batch of matrices. For n >= p the columns are
orthonormal (XᵀX = I_p); for n < p the *rows* are orthonormal (X Xᵀ = I_n), which is how ``nn.Linear`` stores a
weight with fewer outputs than inputs. Every function here works on the *oriented* matrix X̃ = X (n >= p) or Xᵀ
(n < p), of shape (..., N, P) with N = max(n, p) >= P = min(n, p), and returns results in the caller's orientation.

Metric. The Euclidean (embedded) metric ⟨ξ, ζ⟩ = tr(ξᵀζ) unless ``metric="canonical"`` is asked for:

* Stiefel tangent space at X: {ξ: Xᵀξ + ξᵀX = 0}; projection P_X(Z) = Z − X sym(XᵀZ), sym(A) = (A + Aᵀ)/2.
* Riemannian gradient (Euclidean metric): grad F = P_X(G) = G − X sym(XᵀG), G the Euclidean gradient.
  Canonical metric ⟨ξ, ζ⟩_c = tr(ξᵀ(I − ½XXᵀ)ζ): grad_c F = G − X GᵀX.
* Grassmann (horizontal space {ξ: Xᵀξ = 0}, the quotient metric): grad F = G − X XᵀG.

Retractions R_X(ξ) for a tangent ξ (``retract``): ``"qr"`` = Q factor of X + ξ with sign fix (diag(R) > 0),
``"polar"`` = the polar factor (X + ξ)(I + ξᵀξ)^{-1/2} by a coupled Newton–Schulz iteration, ``"cayley"`` = the
Cayley transform (I − W/2)⁻¹(I + W/2)X with W = P ξXᵀ − XξᵀP, P = I − ½XXᵀ (Wen & Yin 2013), evaluated through
the Sherman–Morrison–Woodbury identity in O(Np²) instead of an N×N solve.

Precision. Each function computes in its inputs' dtype, also inside a ``torch.autocast`` region (a retraction
called from a training step): autocast would round the products to bfloat16 and leave the points orthonormal to
bfloat16's 4e-3 only.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from .._library import without_autocast

__all__ = [
    "MANIFOLDS",
    "RETRACTIONS",
    "check_on_manifold",
    "distance_to_manifold",
    "grassmann_distance",
    "orient",
    "orthogonal_",
    "project_tangent",
    "project_to_manifold",
    "qr_retraction",
    "retract",
    "riemannian_gradient",
    "riemannian_gradient_norm",
    "polar_newton_schulz",
]

MANIFOLDS = ("stiefel", "grassmann")
RETRACTIONS = ("qr", "cayley", "polar")
MANIFOLD_DTYPES = (torch.float32, torch.float64)

# Newton–Schulz polar retraction: at most this many coupled iterations, stopping once ‖I − Z_k Y_k‖_F is below the
# dtype's tolerance (checked every few iterations). Inside the iteration the eigenvalues of the scaled Gram matrix lie
# in [1/κ, 1] with κ <= 1 + ‖ξ‖², so a step with ‖ξ‖ <= 1 (κ <= 2) converges in about 6 iterations.
NEWTON_SCHULZ_MAX_ITERS = 30
NEWTON_SCHULZ_TOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def orient(x: torch.Tensor) -> torch.Tensor:
    """The view of ``x`` (..., n, p) with at least as many rows as columns: ``x`` for n >= p, ``x.mT`` for n < p."""
    return x if x.shape[-2] >= x.shape[-1] else x.mT


def _check_matrix(x: torch.Tensor, caller: str, name: str = "X") -> None:
    if x.dim() < 2:
        raise ValueError(f"{caller}: {name} has shape {tuple(x.shape)}; a point of the Stiefel manifold is a matrix "
                         "(..., n, p) with at least 2 dimensions. Put 1-D tensors (biases, norms) in a param group "
                         "with manifold=None")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{caller}: {name} must be floating point, got {x.dtype}")


def _check_like_point(x: torch.Tensor, z: torch.Tensor, caller: str, name: str) -> None:
    """``z`` (a gradient or tangent vector at ``x``) must be a tensor of exactly ``x``'s shape: a transposed or an
    (n, 1) matrix would broadcast into a wrong result without an error."""
    _check_matrix(x, caller)
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a tensor of X's shape {tuple(x.shape)}, got {type(z).__name__}")
    if z.shape != x.shape:
        hint = " (it is X's transpose: pass it in X's layout)" if z.shape == x.mT.shape else ""
        raise ValueError(f"{caller}: {name} has shape {tuple(z.shape)} but X has shape {tuple(x.shape)}; it must "
                         f"have X's shape{hint}")


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mT)


def _qr_sign_fixed(z: torch.Tensor) -> torch.Tensor:
    """Q of the thin QR of z (..., N, P), N >= P, with signs chosen so that diag(R) > 0 (a unique, smooth choice)."""
    q, r = torch.linalg.qr(z)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


# Below this ‖ZᵀZ − I‖_F in every matrix, cond(Z)² <= 1.1/0.9, so CholeskyQR (Q = Z·R⁻¹, R the Cholesky factor of
# ZᵀZ, diag(R) > 0) gives the same sign-fixed Q as Householder, orthonormal to ~eps·cond(Z)², with BLAS-3 products.
_CHOLESKY_QR_MAX_DEFECT = 0.1


def qr_sign_fixed_near_orthonormal(z: torch.Tensor) -> torch.Tensor:
    """``_qr_sign_fixed(z)`` for z (..., N, P), N >= P, that is close to orthonormal (a drifted iterate): by
    CholeskyQR when every matrix has ‖ZᵀZ − I‖_F <= 0.1 and a positive definite Gram, by Householder otherwise.
    Float64, one host sync (two on the CholeskyQR path). Measured on one CPU thread, float64: 512×512 19.8 against
    24.5 ms, 1024×128 1.9 against 4.4 ms, 2048×512 61 against 126 ms; the float32 roundings of both Q agree."""
    if z.numel() == 0:
        return _qr_sign_fixed(z)
    gram = z.mT @ z
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    if float(torch.linalg.matrix_norm(gram - eye).max()) <= _CHOLESKY_QR_MAX_DEFECT:
        r, info = torch.linalg.cholesky_ex(gram, upper=True)
        if not bool(info.any()):
            return torch.linalg.solve_triangular(r, z, upper=True, left=False)
    return _qr_sign_fixed(z)


@torch.no_grad()
def orthogonal_(tensor: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` (..., n, p) in place with Haar-random points of St(n, p) and return it.

    Each matrix is the sign-fixed Q factor of an N×P Gaussian (N = max(n, p)): orthonormal columns for n >= p,
    orthonormal rows for n < p. Computed in float64 and rounded once into the tensor's dtype.
    """
    _check_matrix(tensor, "optim.stiefel.orthogonal_", "tensor")
    target = orient(tensor)
    gaussian = torch.randn(target.shape, dtype=torch.float64, device="cpu" if generator is None else
                           generator.device, generator=generator).to(tensor.device)
    target.copy_(_qr_sign_fixed(gaussian))
    return tensor


@without_autocast
def distance_to_manifold(x: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """‖X̃ᵀX̃ − I‖_F per matrix (shape ``x.shape[:-2]``), X̃ the oriented matrix; computed in ``dtype`` (float64).

    This is the orthogonality defect. It is 0 exactly on the manifold, and for a point close to it equals about
    2·‖X − proj(X)‖_F (the distance to the nearest point).
    """
    _check_matrix(x, "optim.stiefel.distance_to_manifold")
    xo = orient(x.detach()).to(dtype)
    eye = torch.eye(xo.shape[-1], dtype=dtype, device=x.device)
    return torch.linalg.matrix_norm(xo.mT @ xo - eye)


def default_atol(dtype: torch.dtype) -> float:
    """The largest orthogonality defect accepted as "on the manifold" for a start point of ``dtype``."""
    return 1e-4 if dtype != torch.float64 else 1e-8


def check_on_manifold(x: torch.Tensor, *, caller: str, name: str = "parameter", atol: float | None = None) -> None:
    """Raise ``ValueError`` if ``x`` is not (to ``atol``) a batch of points of St(n, p), saying how to fix it."""
    _check_matrix(x, caller, name)
    if x.dtype not in MANIFOLD_DTYPES:
        raise ValueError(
            f"{caller}: {name} is {x.dtype}; points of the Stiefel manifold must be float32 or float64 (in "
            f"{x.dtype} the orthogonality defect cannot go below ~1e-2). Keep this parameter in float32 (e.g. "
            "exclude it from .to(bfloat16) or autocast handles the matmuls) ")
    if x.numel() == 0:
        return
    atol = default_atol(x.dtype) if atol is None else atol
    defect = distance_to_manifold(x)
    worst = defect.max().item()
    if not math.isfinite(worst) or worst > atol:
        n, p = x.shape[-2:]
        what = "columns" if n >= p else "rows"
        raise ValueError(
            f"{caller}: {name} of shape {tuple(x.shape)} is not on the Stiefel manifold: ‖X̃ᵀX̃ − I‖_F = {worst:.3g} "
            f"> {atol:g} (its {what} must be orthonormal, n={n}, p={p}). Initialize it with "
            "optim.stiefel.orthogonal_(param) (random point) or project it with "
            "param.data.copy_(optim.stiefel.project_to_manifold(param)) (nearest point, polar) before building the "
            "optimizer; or put it in a param group with manifold=None if it is unconstrained")


def check_manifold_name(manifold, caller: str) -> None:
    if manifold is not None and manifold not in MANIFOLDS:
        raise ValueError(f"{caller}: manifold must be 'stiefel', 'grassmann' or None (unconstrained), got "
                         f"{manifold!r}")


@without_autocast
def project_tangent(x: torch.Tensor, z: torch.Tensor, *, manifold: str = "stiefel") -> torch.Tensor:
    """Orthogonal projection of an ambient matrix ``z`` onto the tangent (Stiefel) or horizontal (Grassmann) space
    at ``x``: Z − X sym(X̃ᵀZ̃) resp. Z − X X̃ᵀZ̃ (oriented matrices), for the Euclidean metric."""
    check_manifold_name(manifold, "project_tangent")
    _check_like_point(x, z, "project_tangent", "z")
    xo, zo = orient(x), orient(z)
    inner = xo.mT @ zo
    if manifold == "stiefel":
        inner = _sym(inner)
    out = zo - xo @ inner
    return out if x.shape[-2] >= x.shape[-1] else out.mT


@without_autocast
def riemannian_gradient(x: torch.Tensor, grad: torch.Tensor, *, manifold: str = "stiefel",
                        metric: str = "euclidean") -> torch.Tensor:
    """Riemannian gradient at ``x`` of a function whose Euclidean gradient is ``grad`` (same shape as ``x``).

    Stiefel, Euclidean metric: G − X sym(XᵀG); Stiefel, canonical metric: G − X GᵀX; Grassmann: G − X XᵀG.
    """
    check_manifold_name(manifold, "riemannian_gradient")
    if metric not in ("euclidean", "canonical"):
        raise ValueError(f"riemannian_gradient: metric must be 'euclidean' or 'canonical', got {metric!r}")
    _check_like_point(x, grad, "riemannian_gradient", "grad")
    if manifold == "stiefel" and metric == "canonical":
        xo, go = orient(x), orient(grad)
        out = go - xo @ (go.mT @ xo)
        return out if x.shape[-2] >= x.shape[-1] else out.mT
    return project_tangent(x, grad, manifold=manifold)


@without_autocast
def project_to_manifold(x: torch.Tensor, *, method: str = "polar") -> torch.Tensor:
    """The nearest point of St(n, p) (``"polar"``: U Vᵀ from the SVD, in float64) or the sign-fixed QR factor."""
    _check_matrix(x, "project_to_manifold")
    xo = orient(x).to(torch.float64)
    if method == "polar":
        u, _, vh = torch.linalg.svd(xo, full_matrices=False)
        out = u @ vh
    elif method == "qr":
        out = _qr_sign_fixed(xo)
    else:
        raise ValueError(f"project_to_manifold: method must be 'polar' or 'qr', got {method!r}")
    out = out.to(x.dtype)
    return out if x.shape[-2] >= x.shape[-1] else out.mT


def riemannian_gradient_norm(x: torch.Tensor, grad: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], *,
                             manifold: str = "stiefel") -> torch.Tensor:
    """‖grad F(X̄)‖_F at the projected point X̄ = project_to_manifold(x) (per matrix), in float64.

    ``grad`` is the Euclidean gradient, or better a function returning it at a given point: then it is evaluated at
    X̄, so the value is a true stationarity measure even when ``x`` has drifted slightly off the manifold.
    """
    x_bar = project_to_manifold(x.detach()).to(torch.float64)
    g = grad(x_bar) if callable(grad) else grad.detach().to(torch.float64)
    return torch.linalg.matrix_norm(riemannian_gradient(x_bar, g.to(torch.float64), manifold=manifold))


@without_autocast
def grassmann_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Geodesic distance on Gr(n, p) between span(X̃) and span(Ỹ): ‖θ‖₂, θ the principal angles (float64)."""
    xo, yo = orient(x).to(torch.float64), orient(y).to(torch.float64)
    cosines = torch.linalg.svdvals(xo.mT @ yo).clamp(-1.0, 1.0)
    return torch.linalg.vector_norm(torch.arccos(cosines), dim=-1)


# --- retractions --------------------------------------------------------------------------------------------------

@without_autocast
def qr_retraction(x: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """Q factor (diag(R) > 0) of X̃ + ξ̃; oriented inputs (..., N, P)."""
    return _qr_sign_fixed(x + xi)


@without_autocast
def polar_newton_schulz(z: torch.Tensor, *, max_iters: int = NEWTON_SCHULZ_MAX_ITERS,
                        tol: float | None = None) -> torch.Tensor:
    r"""Polar factor Z (ZᵀZ)^{-1/2} of full-column-rank z (..., N, P), N >= P, by coupled Newton–Schulz.

    With S = ZᵀZ / c (c = ‖ZᵀZ‖_∞ >= λ_max, so S's eigenvalues lie in (0, 1]) the iteration
    T = (3I − Z_k Y_k)/2, Y_{k+1} = Y_k T, Z_{k+1} = T Z_k from Y_0 = S, Z_0 = I converges quadratically to
    Y → S^{1/2}, Z → S^{-1/2} (Higham, Functions of Matrices, §6.7). It runs in z's dtype (fp32 for fp32 points),
    at most ``max_iters`` iterations, stopping when ‖I − Z_kY_k‖_F <= ``tol`` (1e-6 fp32, 1e-13 fp64; checked every
    third iteration, one host sync each). If it has not converged (very long steps, κ(ZᵀZ) large), the matrices that
    failed are recomputed exactly with an eigendecomposition in float64 and a ``RuntimeWarning`` says so.

    A wide z (N < P, full row rank) gets (ZZᵀ)^{-1/2} Z, computed on the oriented matrix as everywhere in this
    module (its Gram matrix ZᵀZ would be singular).
    """
    if z.shape[-2] < z.shape[-1]:
        return polar_newton_schulz(z.mT, max_iters=max_iters, tol=tol).mT
    tol = NEWTON_SCHULZ_TOL.get(z.dtype, 1e-6) if tol is None else tol
    gram = z.mT @ z
    scale = gram.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)  # ‖·‖_∞ >= λ_max for a symmetric matrix
    y = gram / scale
    eye = torch.eye(gram.shape[-1], dtype=z.dtype, device=z.device)
    w = eye.expand_as(gram)
    residual = None
    for iteration in range(max_iters):
        zy = w @ y
        t = 1.5 * eye - 0.5 * zy
        y, w = y @ t, t @ w
        if iteration % 3 == 2 or iteration == max_iters - 1:
            residual = torch.linalg.matrix_norm(eye - w @ y)
            if residual.max().item() <= tol:
                break
    inverse_sqrt = w / scale.sqrt()
    failed = residual is None or not (residual.max().item() <= tol)
    if failed:
        bad = (residual > tol) | ~torch.isfinite(residual) if residual is not None else torch.ones(
            gram.shape[:-2], dtype=torch.bool, device=z.device)
        warnings.warn(f"polar retraction: Newton–Schulz did not reach {tol:g} in {max_iters} iterations for "
                      f"{int(bad.sum())} matrices (step too long for the iteration); those use an exact float64 "
                      "eigendecomposition instead. A smaller lr avoids this.", RuntimeWarning, stacklevel=3)
        evals, evecs = torch.linalg.eigh(gram.to(torch.float64))
        exact = (evecs * evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt().unsqueeze(-2)) @ evecs.mT
        inverse_sqrt = torch.where(bad.unsqueeze(-1).unsqueeze(-1), exact.to(z.dtype), inverse_sqrt)
    return z @ inverse_sqrt


@without_autocast
def cayley_retraction(x: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """(I − W/2)⁻¹(I + W/2) X with W = U Vᵀ, U = [Pξ, X], V = [X, −Pξ], P = I − ½XXᵀ; oriented inputs (..., N, P).

    Woodbury: (I − ½UVᵀ)⁻¹ = I + ½U(I − ½VᵀU)⁻¹Vᵀ, so only a 2P×2P system is solved.
    """
    p_xi = xi - 0.5 * x @ (x.mT @ xi)
    u = torch.cat([p_xi, x], dim=-1)
    v = torch.cat([x, -p_xi], dim=-1)
    b = x + 0.5 * u @ (v.mT @ x)
    eye = torch.eye(u.shape[-1], dtype=x.dtype, device=x.device)
    core = eye - 0.5 * v.mT @ u
    return b + 0.5 * u @ torch.linalg.solve(core, v.mT @ b)


@without_autocast
def retract(x: torch.Tensor, xi: torch.Tensor, *, method: str = "qr") -> torch.Tensor:
    """R_X(ξ) for a point ``x`` and a tangent vector ``xi`` (both (..., n, p), caller's orientation)."""
    if method not in RETRACTIONS:
        raise ValueError(f"retract: method must be one of {RETRACTIONS}, got {method!r}")
    flip = x.shape[-2] < x.shape[-1]
    xo, xio = orient(x), orient(xi)
    if method == "qr":
        out = qr_retraction(xo, xio)
    elif method == "polar":
        out = polar_newton_schulz(xo + xio)
    else:
        out = cayley_retraction(xo, xio)
    return out.mT if flip else out
