"""Spectral estimators of a symmetric linear operator H: top eigenpairs, trace, diagonal and spectral density.

This module holds the operator protocol and its checks, the argument checks, the probes and the estimators; the
Krylov iterations they run (one batched Lanczos for top-k and SLQ, power iteration) are in :mod:`.krylov`, the
density plot in :mod:`.plotting` (re-exported here as ``plot_density``).

Everything here touches H only through products ``H @ V``, so it works for an explicit matrix (wrapped in
:class:`MatrixOperator`) and for a model's Hessian (``optim.hessian.HessianOperator``) alike. The contract is the
:class:`LinearOperator` protocol:

* ``H.shape == (n, n)``, ``H.dtype``, ``H.device``;
* ``H @ v`` for a flat vector ``v`` of shape ``(n,)`` returns ``H v`` of shape ``(n,)``;
* ``H @ V`` for a block ``V`` of shape ``(k, n)`` (k row vectors) returns ``(k, n)``, row i being ``H V[i]``.

A block product is assumed to be cheaper than k single products (a Hessian shares its forward and first backward
pass between the k probes), so the stochastic estimators hand H blocks of up to ``batch_size`` probes at once.

Numerics: vectors live in the operator's dtype and device; every scalar that is a sum over n entries (dot
products, norms, Rayleigh quotients, probe values zᵀHz) is accumulated in float64, and the small dense problems
(the Lanczos tridiagonal, the statistics over probes) are solved in float64 on the CPU.

Probes: Rademacher vectors (±1) come from :func:`optim.hessian.probes.rademacher`, probe i of length n drawn from
counters ``[i·n, (i+1)·n)`` of ``seed``, so an estimate does not depend on ``batch_size``, nor on the device or
rank it runs on. Gaussian vectors (Lanczos and power-iteration start vectors) are drawn on the CPU in float64 from
``torch.Generator().manual_seed(seed)`` and then moved to H's device and dtype, for the same reason.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .._finite import all_finite
from .._library import autocast_state, outside_autocast
from .krylov import WHICH, _dot64, block_lanczos_top, lanczos_quadrature, lanczos_top, power_top
from .plotting import plot_density
from .probes import rademacher

__all__ = [
    "LinearOperator",
    "MatrixOperator",
    "Eigenpairs",
    "TraceEstimate",
    "DiagonalEstimate",
    "SpectralDensity",
    "top_eigenvalues",
    "trace",
    "diagonal",
    "spectral_density",
    "plot_density",
]

# Default number of probes (rows) handed to H in one block: enough to amortize a Hessian's shared forward and
# backward passes, small enough that a (batch, n) block of a large model's parameters stays a few GiB at most.
DEFAULT_BATCH_SIZE = 32
# spectral_density runs this many Lanczos processes side by side only while their bases fit in this many elements.
_SLQ_BASIS_ELEMENTS = 1 << 28

_NONFINITE_HINT = (
    "the operator is not finite there (for a model's Hessian: check the loss and the parameters for NaN/inf, try "
    "a smaller lr, or call model.eval() so that dropout and BatchNorm statistics do not change between products)"
)


# ------------------------------------------------------------------------------------------------------------------
# The operator protocol and the dense-matrix operator
# ------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on Rⁿ, known through its products.

    ``shape == (n, n)``; ``dtype`` and ``device`` are those of the vectors it accepts and returns.
    ``H @ v`` maps a flat ``(n,)`` vector to ``(n,)``; ``H @ V`` maps a ``(k, n)`` block of k row vectors to
    ``(k, n)``, row i being ``H V[i]`` (one call for k vectors should cost less than k calls).
    The estimators assume H is symmetric; they do not (cannot cheaply) check it.
    """

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def __matmul__(self, v: Tensor) -> Tensor: ...


class MatrixOperator:
    """A dense symmetric matrix ``A`` (n, n) as a :class:`LinearOperator`.

    ``A @ V`` on a raw tensor would multiply a (k, n) block from the wrong side (and fail for k ≠ n); this wrapper
    computes ``(A Vᵀ)ᵀ``, i.e. each row of V multiplied by A, and ``A v`` for a flat vector.

    The constructor checks that A is a 2-D, square, real floating-point, finite tensor and symmetric to
    ``max|A − Aᵀ| ≤ rtol · max|A|``; ``rtol`` defaults to √eps of A's dtype (1.5e-8 in float64, 3.5e-4 in float32),
    loose enough for a Hessian assembled by autograd, tight enough to catch a non-symmetric matrix.
    """

    def __init__(self, A: Tensor, *, rtol: float | None = None) -> None:
        if not isinstance(A, Tensor):
            raise TypeError(f"MatrixOperator: A must be a torch.Tensor, got {type(A).__name__}")
        _check_shape_and_dtype("MatrixOperator: A", tuple(A.shape), A.dtype)
        if not all_finite([A]):
            raise ValueError("MatrixOperator: A contains NaN or inf")
        if rtol is None:
            rtol = math.sqrt(torch.finfo(A.dtype).eps)
        if not rtol >= 0:
            raise ValueError(f"MatrixOperator: rtol must be >= 0, got {rtol}")
        scale = A.abs().max().item()
        asymmetry = (A - A.mT).abs().max().item()
        if asymmetry > rtol * scale:
            raise ValueError(
                f"MatrixOperator: A must be symmetric, but max|A - A^T| = {asymmetry:.3g} exceeds "
                f"rtol * max|A| = {rtol:.3g} * {scale:.3g}; symmetrize it with (A + A.T) / 2 if that is intended"
            )
        self.matrix = A

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def __matmul__(self, v: Tensor) -> Tensor:
        n = self.matrix.shape[0]
        if not isinstance(v, Tensor) or v.ndim not in (1, 2) or v.shape[-1] != n:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"MatrixOperator @ v: v must have shape ({n},) or (k, {n}), got {shape}")
        with outside_autocast():  # an explicit matrix, not a model: its products in its own dtype
            if v.ndim == 1:
                return self.matrix @ v
            return (self.matrix @ v.mT).mT

    def __repr__(self) -> str:
        n = self.matrix.shape[0]
        return f"MatrixOperator(n={n}, dtype={self.dtype}, device={self.device})"


def _as_operator(H) -> LinearOperator:
    """H itself if it follows the protocol, a :class:`MatrixOperator` if it is a tensor; else a clear error."""
    if isinstance(H, Tensor):
        return MatrixOperator(H)
    missing = [name for name in ("shape", "dtype", "device", "__matmul__") if not hasattr(H, name)]
    if missing:
        raise TypeError(
            f"H must be a square symmetric torch.Tensor or a LinearOperator (shape, dtype, device, H @ v); "
            f"{type(H).__name__} lacks {', '.join(missing)}"
        )
    _check_shape_and_dtype("H", tuple(H.shape), H.dtype)
    return H


def _check_shape_and_dtype(name: str, shape: tuple, dtype: torch.dtype) -> None:
    """The protocol's shape and dtype: (n, n) with n ≥ 1, a real floating-point dtype."""
    if len(shape) != 2 or shape[0] != shape[1] or not all(isinstance(s, int) for s in shape):
        raise ValueError(f"{name} must be a square matrix, of shape (n, n), got {shape}")
    if shape[0] < 1:
        raise ValueError(f"{name} must not be empty (n = 0)")
    if not dtype.is_floating_point:
        raise ValueError(f"{name} must have a real floating-point dtype, got {dtype}")


_callers = threading.local()


def _own_precision(estimator):
    """``estimator`` with its own arithmetic (Krylov bases, sketches, quadratures) outside the caller's autocast
    region and the products of H inside it: a model's forward runs as the caller asked, the estimate is computed
    in H's dtype (under bfloat16 autocast a product and the float32 basis met in one op, which refused them)."""

    @functools.wraps(estimator)
    def run(*args, **kwargs):
        settings = autocast_state()
        if not any(enabled for _, enabled, _ in settings):
            return estimator(*args, **kwargs)
        stack = getattr(_callers, "stack", None)
        if stack is None:
            stack = _callers.stack = []
        stack.append(settings)
        try:
            with contextlib.ExitStack() as off:
                for device, _, _ in settings:
                    off.enter_context(torch.autocast(device, enabled=False))
                return estimator(*args, **kwargs)
        finally:
            stack.pop()

    return run


def _callers_autocast() -> contextlib.AbstractContextManager:
    """The autocast settings of the estimator's caller (:func:`_own_precision`), for a product of H."""
    stack = getattr(_callers, "stack", None)
    if not stack:
        return contextlib.nullcontext()
    context = contextlib.ExitStack()
    for device, enabled, dtype in stack[-1]:
        context.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
    return context


def _apply(H: LinearOperator, V: Tensor, what: str, *, one_matrix: bool = False) -> Tensor:
    """``H @ V`` with its shape and finiteness checked; ``what`` names the probe or iteration for the error.
    ``one_matrix``: the estimator needs every product to apply the same matrix (Lanczos, power iteration)."""
    with _callers_autocast():
        out = H @ V
    if one_matrix:
        _check_one_matrix(H)
    if not isinstance(out, Tensor) or out.shape != V.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RuntimeError(
            f"H @ v returned {got} for an input of shape {tuple(V.shape)} ({what}); a LinearOperator must map "
            "(n,) to (n,) and (k, n) to (k, n)"
        )
    if not all_finite([out]):
        raise RuntimeError(f"H @ v produced NaN or inf at {what}: {_NONFINITE_HINT}")
    return out


def _check_one_matrix(H: LinearOperator) -> None:
    """Refuse an operator whose last product drew random numbers afresh (a curvature operator of a model with
    dropout in training mode): a Krylov method on another matrix at every product returns no eigenvalue of any."""
    draws = getattr(H, "random_draws", ())
    if draws:
        raise ValueError(
            f"H applies another matrix at every product: the model's forward calls {', '.join(draws)}, which draw "
            "random numbers in training mode (dropout), so Lanczos and power iteration would return no eigenvalue "
            "of any one Hessian. Call model.eval() (or build the operator with reuse_graph=True to keep one draw "
            "for every product; SharpnessMonitor: eval_mode=True). trace and diagonal accept it (they average over "
            "the draws)")


def _quadratic_forms(H: LinearOperator, V: Tensor, what: str) -> Tensor:
    """``(k,)`` float64 ``v_iᵀ H v_i`` for the rows of ``V``: the operator's own ``quadratic_forms`` where it has one
    (a :class:`~optim.HessianOperator` then holds no ``(k, n)`` product), else from :func:`_apply`."""
    forms = getattr(H, "quadratic_forms", None)
    if forms is None:
        return _dot64(V, _apply(H, V, what))
    with _callers_autocast():
        values = forms(V)
    if not isinstance(values, Tensor) or values.shape != V.shape[:1]:
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise RuntimeError(f"H.quadratic_forms returned {got} for a block of shape {tuple(V.shape)} ({what}); "
                           f"it must return ({V.shape[0]},)")
    if not all_finite([values]):
        raise RuntimeError(f"H @ v produced NaN or inf at {what}: {_NONFINITE_HINT}")
    return values


# ------------------------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_seed(seed) -> int:
    if not 0 <= _check_int("seed", seed) < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_batch_size(batch_size, default: int) -> int:
    if batch_size is None:
        return default
    return _check_int("batch_size", batch_size, 1)


# ------------------------------------------------------------------------------------------------------------------
# Random vectors
# ------------------------------------------------------------------------------------------------------------------


def _gaussian(generator: torch.Generator, shape: tuple[int, ...], H: LinearOperator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=H.device, dtype=H.dtype)


def _probe_blocks(
    H: LinearOperator, first: int, count: int, batch_size: int, seed: int
) -> Iterator[tuple[int, Tensor]]:
    """Rademacher probes ``first .. first+count−1`` as (start, (b, n) block) pairs; probe i uses counters i·n..."""
    n = H.shape[0]
    for start in range(first, first + count, batch_size):
        b = min(batch_size, first + count - start)
        yield start, rademacher((b, n), seed=seed, offset=start * n, dtype=H.dtype, device=H.device)


def _rows(start: int, block: Tensor) -> str:
    """``"first..last"``: the probe (or run) numbers of a block starting at ``start``, for error messages."""
    return f"{start}..{start + block.shape[0] - 1}"


# ------------------------------------------------------------------------------------------------------------------
# Top eigenpairs
# ------------------------------------------------------------------------------------------------------------------


class Eigenpairs(NamedTuple):
    """``eigenvalues`` (k,) in descending order and ``eigenvectors`` (k, n), row i the unit vector of eigenvalue i.

    Both in H's dtype and on H's device. Each eigenvector's sign is fixed so that its largest-magnitude entry is
    positive, which makes results comparable between methods and runs.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor


@_own_precision
def top_eigenvalues(
    H, k: int = 1, *, method: str = "lanczos", tol: float = 1e-6, max_iter: int = 100, seed: int = 0,
    which: str = "largest", block_size: int = 1,
) -> Eigenpairs:
    """The k largest (algebraic) eigenvalues of a symmetric H and their eigenvectors, or with ``which`` the k
    smallest or the k largest in magnitude.

    Args:
        H: a :class:`LinearOperator` (shape (n, n)) or a symmetric (n, n) tensor.
        k: how many eigenpairs, 1 ≤ k ≤ n.
        method: ``"lanczos"`` or ``"power"``.
        which: ``"largest"`` (λ₁ ≥ λ₂ ≥ …, returned in that order), ``"smallest"`` (the most negative first:
            the negative curvature of a saddle) or ``"magnitude"`` (largest |λ| first; Lanczos only). Power
            iteration finds the smallest as the largest of −H.
        tol: convergence tolerance, > 0 (see below).
        max_iter: the most H@v products either method may use, ≥ k.
        seed: seeds the Gaussian start vectors.
        block_size: Lanczos vectors per step, applied to H as one (b, n) block (a ``HessianOperator`` shares its
            forward and first backward between them). 1 (default): the single-vector recurrence below, fewest
            products. b > 1: block Lanczos, which finds up to b copies of a repeated eigenvalue (``block_size=k``:
            the k values are right whatever the multiplicities, e.g. the zero eigenvalues of a softmax
            classifier's Hessian for ``which="smallest"``), for about 1.2–2.6× the products (and as much more
            time on a kept graph, where each vector costs one backward either way). Lanczos only.

    ``"lanczos"``: from a Gaussian unit vector q₀, the Lanczos recurrence β_j q_{j+1} = H q_j − α_j q_j −
    β_{j−1} q_{j−1} builds an orthonormal basis Q_m of the Krylov space and the tridiagonal T_m = Q_mᵀ H Q_m;
    every basis vector is reorthogonalized against all previous ones (classical Gram-Schmidt, twice, dots in
    float64), which keeps Q_m orthonormal and prevents the spurious copies of converged eigenvalues that plain
    Lanczos produces. With T_m = S Θ Sᵀ, the Ritz pairs (θ_i, Q_m s_i) satisfy ‖H Q_m s_i − θ_i Q_m s_i‖ =
    |β_m · s_i[m−1]|; the iteration is extended one product at a time until this residual is ≤ tol·|θ_i| for each
    of the top k Ritz values (or ≤ the rounding level ~eps·‖H‖, for eigenvalues at 0), until m = n, or until
    max_iter products. If the Krylov space becomes invariant before k pairs are found (β ≈ 0, e.g. a low-rank H),
    the process restarts from a new Gaussian vector orthogonal to the basis (T gets a zero off-diagonal entry).
    Eigenvalue error is about residual²/gap, far below tol. Like every single-vector Krylov method it finds one
    copy of an exactly repeated eigenvalue per invariant block; rounding reveals the others only if the run lasts
    long enough, so a small or fast-converging H can return the next distinct eigenvalue in place of a copy: use
    ``block_size`` ≥ the multiplicity. With b > 1 each step orthogonalizes H Q_j (b rows) against the basis, the
    remainder giving the next block (a rank-deficient row restarts from a fresh Gaussian direction), T is block
    tridiagonal, and a Ritz residual is ‖Lᵀ s_last‖ over the last block (``krylov.block_lanczos_top``).
    Memory: up to min(max_iter, n) basis vectors of length n.

    ``"power"``: for i = 1..k, power iteration v ← P(H + sI)P v / ‖·‖ with P the projector orthogonal to the
    eigenvectors already found (deflation by projection), until the Rayleigh quotient λ = vᵀHv changes by
    ≤ tol·|λ| between iterations. Power iteration finds the eigenvalue of largest magnitude; when that turns out to
    be negative, the shift s = −λ_min (making H + sI positive semidefinite, its largest eigenvalue the largest of H)
    is applied and the eigenpair is recomputed. To be declared converged the residual ‖PHPv − λv‖ must also be
    ≤ 10·√tol·|λ| (the quotient alone stalls when λ_max ≈ −λ_min, the iterate oscillating). The budget max_iter is shared: eigenpair i may use the unspent
    budget divided by the pairs still to find. Convergence is linear with ratio (λ_{i+1} + s)/(λ_i + s), so use it
    for well-separated top eigenvalues; the eigenvalue error is about tol/(1 − ratio²).

    If the tolerance is not reached within max_iter products a RuntimeWarning says so and the current estimates are
    returned.

    Returns:
        :class:`Eigenpairs` ``(eigenvalues (k,), eigenvectors (k, n))``, unpacking as a pair.
    """
    H = _as_operator(H)
    n = H.shape[0]
    k = _check_int("k", k, 1)
    if k > n:
        raise ValueError(f"k must be <= n = {n} (the operator's size), got {k}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    tol = _check_positive("tol", tol)
    max_iter = _check_int("max_iter", max_iter, 1)
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k = {k} (each eigenpair needs at least one H@v product), got {max_iter}")
    seed = _check_seed(seed)
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(repr(w) for w in WHICH)}, got {which!r}")
    if which == "magnitude" and method == "power":
        raise ValueError("which='magnitude' needs method='lanczos' (power iteration's shift and deflation find "
                         "the largest algebraic eigenvalues); use which='largest' and 'smallest' and compare")
    block_size = _check_int("block_size", block_size, 1)
    if block_size > 1 and method == "power":
        raise ValueError(f"block_size={block_size} needs method='lanczos' (power iteration runs one vector)")
    if block_size > n:
        raise ValueError(f"block_size must be <= n = {n} (the operator's size), got {block_size}")
    if block_size * (max_iter // block_size) < k:
        raise ValueError(f"max_iter={max_iter} H@v products in blocks of block_size={block_size} reach "
                         f"{block_size * (max_iter // block_size)} vectors, fewer than k={k}: raise max_iter or lower "
                         "block_size")
    generator = torch.Generator().manual_seed(seed)
    apply = functools.partial(_apply, H, one_matrix=True)
    draw = lambda: _gaussian(generator, (1, n), H)  # noqa: E731
    if method == "lanczos" and block_size > 1:
        values, vectors = block_lanczos_top(apply, draw, k, tol, max_iter, which, block_size)
    elif method == "lanczos":
        values, vectors = lanczos_top(apply, draw, k, tol, max_iter, which)
    elif which == "smallest":  # the largest of −H, negated back
        values, vectors = power_top(lambda *args: -apply(*args), draw, k, tol, max_iter)
        values = -values
    else:
        values, vectors = power_top(apply, draw, k, tol, max_iter)
    # Sign convention: the largest-magnitude entry of each eigenvector is positive.
    index = vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.where(vectors.gather(1, index) < 0, -1.0, 1.0).to(vectors.dtype)
    vectors = vectors * signs
    return Eigenpairs(values.to(device=H.device, dtype=H.dtype), vectors)


# ------------------------------------------------------------------------------------------------------------------
# Trace
# ------------------------------------------------------------------------------------------------------------------


class TraceEstimate(NamedTuple):
    """``estimate`` of tr(H), its ``std_error`` (NaN when it cannot be estimated from one sample) and
    ``num_matvecs``, the number of H@v products spent."""

    estimate: float
    std_error: float
    num_matvecs: int


def _mean_and_std_error(values: Tensor) -> tuple[float, float]:
    mean = values.mean().item()
    if values.numel() < 2:
        return mean, float("nan")
    return mean, (values.std(correction=1) / math.sqrt(values.numel())).item()


@_own_precision
def trace(
    H, *, num_probes: int = 100, method: str = "hutchinson", seed: int = 0, batch_size: int | None = None
) -> TraceEstimate:
    """A stochastic estimate of tr(H) from ``num_probes`` H@v products.

    ``"hutchinson"`` (Hutchinson 1989): tr(H) = E[zᵀHz] for Rademacher z (i.i.d. ±1); the estimate is the mean of
    zᵢᵀHzᵢ over the probes, the standard error the sample standard deviation / √num_probes. Its variance per
    probe is 2 Σ_{i≠j} H_ij² = 2(‖H‖_F² − Σ H_ii²).

    ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): spends the products in thirds. With s = ⌊num_probes/3⌋
    Rademacher probes S (n × s): Q = orth(H S) (n × s, thin QR), then tr(H) = tr(QᵀHQ) + tr(P H P) with
    P = I − QQᵀ; the first term is computed exactly with s products, the second by Hutchinson on the remaining
    num_probes − 2s probes projected by P. When H is dominated by a few large eigenvalues Q captures them and the
    residual variance 2‖PHP‖_F² (roughly) is far below Hutchinson's. The reported standard error is that of the
    residual Hutchinson part (the deflated part is exact given Q). Needs num_probes ≥ 3.

    Probes go to H in blocks of ``batch_size`` rows (default min(num_probes, 32)); the result does not depend on
    it. Sums are accumulated in float64.
    """
    H = _as_operator(H)
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    num_probes = _check_int("num_probes", num_probes, 3 if method == "hutch++" else 1)
    seed = _check_seed(seed)
    batch_size = _check_batch_size(batch_size, DEFAULT_BATCH_SIZE)

    if method == "hutchinson":
        values = []
        for start, Z in _probe_blocks(H, 0, num_probes, batch_size, seed):
            values.append(_quadratic_forms(H, Z, f"Hutchinson probes {_rows(start, Z)}").cpu())
        mean, se = _mean_and_std_error(torch.cat(values))
        return TraceEstimate(mean, se, num_probes)

    s = num_probes // 3
    blocks = []
    for start, S in _probe_blocks(H, 0, s, batch_size, seed):
        blocks.append(_apply(H, S, f"Hutch++ sketch probes {_rows(start, S)}"))
    Y = torch.cat(blocks)  # (s, n): rows H S_i
    # QR needs float32 at least; any orthonormal Q keeps the estimator unbiased, so its precision only affects
    # how much of H's top range is deflated.
    qr_dtype = torch.promote_types(H.dtype, torch.float32)
    Q = torch.linalg.qr(Y.to(qr_dtype).mT, mode="reduced").Q.mT.to(H.dtype).contiguous()  # (s, n), orthonormal rows
    exact = 0.0
    for start in range(0, s, batch_size):
        block = Q[start : start + batch_size]
        exact += _quadratic_forms(H, block, f"Hutch++ basis vectors {_rows(start, block)}").sum().item()
    values = []
    for start, G in _probe_blocks(H, s, num_probes - 2 * s, batch_size, seed):
        G = G - (G @ Q.mT) @ Q  # P G: the probes with the sketched range removed
        values.append(_quadratic_forms(H, G, f"Hutch++ residual probes {_rows(start, G)}").cpu())
    mean, se = _mean_and_std_error(torch.cat(values))
    return TraceEstimate(exact + mean, se, num_probes)


# ------------------------------------------------------------------------------------------------------------------
# Diagonal
# ------------------------------------------------------------------------------------------------------------------


class DiagonalEstimate(NamedTuple):
    """``estimate`` of diag(H) and its per-entry ``std_error`` (NaN with one probe), in H's dtype and on H's device:
    lists shaped like ``H.params`` for a :class:`~optim.hessian.operator.HessianOperator` (``H.flatten`` makes them
    flat), flat (n,) tensors for any other operator."""

    estimate: Tensor | list[Tensor]
    std_error: Tensor | list[Tensor]


@_own_precision
def diagonal(H, *, num_probes: int = 100, seed: int = 0, batch_size: int | None = None) -> DiagonalEstimate:
    """Hutchinson's estimate of diag(H) (Bekas, Kokiopoulou & Saad 2007): diag(H) = E[z ⊙ Hz] for Rademacher z.

    Entry j of one sample is z_j (Hz)_j = H_jj + Σ_{l≠j} z_j z_l H_jl, so the estimator is unbiased (z_j² = 1) with
    per-entry variance Σ_{l≠j} H_jl² per probe. The estimate is the mean over ``num_probes`` probes and the
    standard error the per-entry sample standard deviation / √num_probes (running mean and sum of squared
    deviations in float64, updated probe by probe with Welford's recurrence, so memory stays O(n)).

    Probes go to H in blocks of ``batch_size`` rows (default min(num_probes, 32)).

    Returns:
        :class:`DiagonalEstimate` ``(estimate, std_error)``: param-shaped lists for a ``HessianOperator`` (entry i
        is the diagonal of the Hessian block of ``H.params[i]``, shaped like it), flat (n,) tensors otherwise.
    """
    H = _as_operator(H)
    num_probes = _check_int("num_probes", num_probes, 1)
    seed = _check_seed(seed)
    batch_size = _check_batch_size(batch_size, DEFAULT_BATCH_SIZE)
    n = H.shape[0]
    mean = torch.zeros(n, dtype=torch.float64, device=H.device)
    m2 = torch.zeros(n, dtype=torch.float64, device=H.device)
    count = 0
    for start, Z in _probe_blocks(H, 0, num_probes, batch_size, seed):
        HZ = _apply(H, Z, f"diagonal probes {_rows(start, Z)}")
        for x in (Z * HZ).unbind(0):
            x = x.to(torch.float64)  # one row at a time: O(n) float64 memory whatever the batch size
            count += 1
            delta = x - mean
            mean += delta / count
            m2 += delta * (x - mean)
    if count > 1:
        std_error = torch.sqrt(m2 / (count - 1) / count)
    else:
        std_error = torch.full_like(mean, float("nan"))
    estimate, std_error = mean.to(H.dtype), std_error.to(H.dtype)
    unflatten = getattr(H, "unflatten", None)  # a HessianOperator: give the diagonal the parameters' shapes
    if callable(unflatten):
        return DiagonalEstimate(unflatten(estimate), unflatten(std_error))
    return DiagonalEstimate(estimate, std_error)


# ------------------------------------------------------------------------------------------------------------------
# Spectral density (stochastic Lanczos quadrature)
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralDensity:
    """The result of :func:`spectral_density`; unpacks as ``grid, density = spectral_density(H)`` (and indexes as
    that pair).

    Attributes:
        grid: (G,) float64 CPU tensor, increasing.
        density: (G,) float64 CPU tensor, the smoothed spectral density on the grid (integrates to ≈ 1).
        nodes: (num_runs, m) float64 CPU tensor, the Ritz values θ_j of each run (m = the Lanczos steps actually
            taken, at most min(lanczos_steps, n)); a run that stopped early on an invariant Krylov space is padded
            with copies of its first node carrying weight 0.
        weights: (num_runs, m) float64 CPU tensor, the quadrature weights τ_j = U[0, j]²; each row sums to 1.
        sigma: the Gaussian smoothing width used.
        num_matvecs: the H@v products spent.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.grid, self.density))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        """``result[0]`` is the grid and ``result[1]`` the density, as the pair it unpacks to."""
        return (self.grid, self.density)[index]

    @property
    def mean(self) -> float:
        """Σ_j τ_j θ_j averaged over runs: an estimate of tr(H)/n (each run's term is zᵀHz/n, a Hutchinson sample)."""
        return (self.weights * self.nodes).sum(dim=1).mean().item()


@_own_precision
def spectral_density(
    H,
    *,
    num_runs: int = 10,
    lanczos_steps: int = 80,
    grid: Tensor | Sequence[float] | None = None,
    sigma: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> SpectralDensity:
    """The eigenvalue density φ(t) = (1/n) Σ_i δ(t − λ_i) of H by stochastic Lanczos quadrature, smoothed.

    (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019.) For a unit vector v, vᵀ f(H) v = Σ_i (vᵀu_i)² f(λ_i)
    is an integral against a spectral measure whose expectation over v = z/√n (z Rademacher) is φ. m steps of
    Lanczos from v (with full reorthogonalization) give T = U Θ Uᵀ, and the Gauss quadrature
    vᵀ f(H) v ≈ Σ_j τ_j f(θ_j) with nodes θ_j and weights τ_j = U[0, j]² (exact for polynomials of degree < 2m).
    Averaging over ``num_runs`` start vectors and taking f = the Gaussian kernel of width σ gives
    φ_σ(t) = (1/num_runs) Σ_runs Σ_j τ_j exp(−(t − θ_j)²/2σ²) / (σ√(2π)).
    Since Σ_j τ_j = 1 the density integrates to 1 (on a grid that covers the nodes by a few σ), and
    Σ_j τ_j θ_j = T_00 = vᵀHv = zᵀHz/n, so the mean of the density is a Hutchinson estimate of tr(H)/n (with the
    same probes as :func:`trace` with ``num_probes=num_runs``).

    Args:
        num_runs: start vectors (≥ 1).
        lanczos_steps: Lanczos steps per run (≥ 1; capped at n); each costs one H@v product per run.
        grid: where to evaluate the density (1-D, increasing, ≥ 2 points). Default: 1000 points over
            [min θ − 5σ, max θ + 5σ], so the trapezoid rule over the grid integrates it to 1 within ~1e-6.
        sigma: smoothing width (> 0). Default: 1% of the node span max θ − min θ (of max|θ| if the span is 0,
            1 if H = 0). Smaller σ resolves the bulk better; keep σ ≳ the grid spacing.
        seed: seeds the Rademacher start vectors (run i uses probe i, as :func:`trace` does).
        batch_size: Lanczos runs advanced side by side, their products sent to H as one block. Default: as many
            as keep their bases within 2²⁸ elements (1 GiB in float32), at least 1.

    Returns:
        :class:`SpectralDensity`, unpacking as ``(grid, density)``; ``nodes``, ``weights``, ``sigma``,
        ``num_matvecs`` and ``mean`` are attributes.
    """
    H = _as_operator(H)
    n = H.shape[0]
    num_runs = _check_int("num_runs", num_runs, 1)
    lanczos_steps = _check_int("lanczos_steps", lanczos_steps, 1)
    if sigma is not None:
        sigma = _check_positive("sigma", sigma)
    if grid is not None:
        grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
        if grid.ndim != 1 or grid.numel() < 2:
            raise ValueError(f"grid must be a 1-D sequence of at least 2 points, got shape {tuple(grid.shape)}")
        if not all_finite([grid]) or not bool((grid[1:] > grid[:-1]).all()):
            raise ValueError("grid must be finite and strictly increasing")
    seed = _check_seed(seed)
    m = min(lanczos_steps, n)
    batch_size = _check_batch_size(batch_size, max(1, min(num_runs, _SLQ_BASIS_ELEMENTS // (m * n))))

    all_nodes: list[Tensor] = []
    all_weights: list[Tensor] = []
    for start, Z in _probe_blocks(H, 0, num_runs, batch_size, seed):
        runs = _rows(start, Z)

        def apply(V: Tensor, what: str) -> Tensor:
            return _apply(H, V, f"spectral_density {what} of runs {runs}", one_matrix=True)

        for theta, tau in lanczos_quadrature(apply, Z / math.sqrt(n), m):  # a Rademacher vector has norm √n
            pad = m - theta.numel()
            all_nodes.append(torch.cat([theta, theta[:1].expand(pad)]))
            all_weights.append(torch.cat([tau, tau.new_zeros(pad)]))
    nodes = torch.stack(all_nodes)
    weights = torch.stack(all_weights)

    lo, hi = nodes.min().item(), nodes.max().item()
    if sigma is None:
        span = hi - lo
        if span <= 0:
            span = max(abs(lo), abs(hi)) or 1.0
        sigma = 0.01 * span
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 1000, dtype=torch.float64)
    density = _gaussian_mixture(grid, nodes, weights, sigma)
    return SpectralDensity(grid, density, nodes, weights, sigma, num_runs * m)


def _gaussian_mixture(grid: Tensor, nodes: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """(1/R) Σ_r Σ_j w_rj N(t; θ_rj, σ²) on the grid, a chunk of grid points at a time."""
    theta = nodes.reshape(-1)
    tau = weights.reshape(-1) / nodes.shape[0]
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    chunk = max(1, (1 << 22) // max(1, theta.numel()))
    parts = []
    for i in range(0, grid.numel(), chunk):
        t = grid[i : i + chunk, None]
        parts.append((torch.exp(-0.5 * ((t - theta) / sigma) ** 2) * tau).sum(dim=1) * norm)
    return torch.cat(parts)
