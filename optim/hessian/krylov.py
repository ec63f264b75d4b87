"""Krylov methods for a symmetric H known only through block products: one batched Lanczos, and power iteration.

H enters as ``apply(V, what)``, a function returning ``H V`` for a block V of shape (B, n) (row b is ``H V[b]``)
whose shape and finiteness the caller has checked (``spectrum._apply``); ``what`` names the iteration for its error
message. Random vectors enter as ``draw()``, returning a fresh (1, n) Gaussian vector; this module draws nothing
itself, so a result depends only on the start vectors and on H.

Lanczos (:func:`lanczos`): from B unit start vectors q₀ (the rows of a (B, n) block, run side by side, one H
product per step for the whole block), the recurrence

    β_j q_{j+1} = H q_j − α_j q_j − β_{j−1} q_{j−1},   α_j = q_jᵀ H q_j,   β_j = ‖·‖,

builds for each run an orthonormal basis Q_m (m, n) of the Krylov space span{q₀, H q₀, …, H^{m−1} q₀} and the
symmetric tridiagonal T_m = Q_m H Q_mᵀ (m, m) with diagonal α and off-diagonal β. Every new vector is
reorthogonalized against the whole basis of its run (classical Gram-Schmidt with the DGKS second pass, dots in
float64 through ``optim::krylov_dots``), which keeps Q_m orthonormal to rounding and prevents the spurious copies of
converged eigenvalues plain Lanczos produces. A run whose Krylov space becomes invariant (β_j below the rounding
level ~eps·‖T‖) either ends there (its later basis rows are zeros and its T keeps j + 1 steps) or, given ``draw``,
continues from a fresh direction orthogonal to its basis (T gets β_j = 0: the direct sum of two Krylov spaces).
Shapes: basis (B, ≥ m, n) in the start block's dtype and device; α, β (B, m) float64 on the CPU.

Its two users:

* top-k eigenpairs (:func:`lanczos_top`, B = 1): with T_m = S Θ Sᵀ, the Ritz pairs (θ_i, Q_mᵀ s_i) have residual
  ‖H Q_mᵀ s_i − θ_i Q_mᵀ s_i‖ = |β_m · s_i[m−1]|; the run is extended until it is ≤ tol·|θ_i| for the top k;
* stochastic Lanczos quadrature (:func:`lanczos_quadrature`, B = runs): per run, T = U Θ Uᵀ gives the Gauss nodes
  θ_j and weights τ_j = U[0, j]² of the spectral measure of H at q₀, i.e. q₀ᵀ f(H) q₀ ≈ Σ_j τ_j f(θ_j).

Block Lanczos (:func:`block_lanczos_top`) is the same recurrence on a block of b orthonormal vectors (one (b, n)
product per step, T block tridiagonal), for top-k pairs of an H whose wanted eigenvalues may be repeated: a
single vector's Krylov space holds one copy of each.

Power iteration (:func:`power_top`): v ← P(H + sI)P v / ‖·‖ per eigenpair, P deflating the pairs already found.

Numerics: vectors stay in the start block's dtype; dot products and norms (sums over n) are accumulated in float64;
T and its eigen-decomposition are float64 on the CPU.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ._ops import krylov_dots

# apply(V, what) -> H V for a (B, n) block, checked by the caller; what names the iteration for its error message.
Product = Callable[[Tensor, str], Tensor]
# draw() -> a fresh (1, n) Gaussian vector in H's dtype and on H's device.
Draw = Callable[[], Tensor]


# ------------------------------------------------------------------------------------------------------------------
# Float64-accumulated reductions and Gram-Schmidt
# ------------------------------------------------------------------------------------------------------------------


def _dot64(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products ``Σ_j a[..., j] b[..., j]`` with float64 products and sums (``optim::krylov_dots``)."""
    n = a.shape[-1]
    rows = a.reshape(-1, 1, n)
    return krylov_dots(rows, b.reshape(-1, n)).reshape(a.shape[:-1])


def _norm64(a: Tensor) -> Tensor:
    return _dot64(a, a).sqrt()


def _normalize(a: Tensor) -> Tensor:
    """Each row of ``a`` divided by its float64-accumulated norm."""
    return a / _norm64(a).to(a.dtype).unsqueeze(-1)


def _basis_dots64(basis: Tensor, w: Tensor) -> Tensor:
    """``c[b, i] = basis[b, i] · w[b]`` in float64 for basis (B, m, n) and w (B, n): one ``optim::krylov_dots``."""
    return krylov_dots(basis, w)


def _orthogonalize(basis: Tensor, w: Tensor) -> Tensor:
    """w minus its projection on the orthonormal rows of ``basis`` (B, m, n), for w (B, n).

    Classical Gram-Schmidt with the DGKS test (Daniel, Gragg, Kaufman & Stewart 1976, as in ARPACK): one pass leaves
    an error proportional to the loss of orthogonality, which matters only when the pass removed most of w; a
    second pass ("twice is enough", Giraud et al. 2005) runs when ‖w‖ fell below 1/√2 of its value in some row.
    """
    return _orthogonalize_with_coefficients(basis, w)[0]


def _orthogonalize_with_coefficients(basis: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_orthogonalize`, and the float64 coefficients (B, m) of w on the basis rows it removed (both passes
    summed): block Lanczos reads T's entries from them."""
    if basis.shape[1] == 0:
        return w, torch.zeros(w.shape[0], 0, dtype=torch.float64, device=w.device)
    before = _norm64(w)
    w, c = _project_out(basis, w)
    if not bool((_norm64(w) >= _DGKS_ETA * before).all()):
        w, again = _project_out(basis, w)
        c = c + again
    return w, c


def _project_out(basis: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """One classical Gram-Schmidt pass: w − cᵀ·basis with c = basis·w in float64 (also returned), the update as one
    baddbmm."""
    c = _basis_dots64(basis, w)
    return torch.baddbmm(w.unsqueeze(1), c.to(w.dtype).unsqueeze(1), basis, alpha=-1).squeeze(1), c


# DGKS threshold: reorthogonalize again when one pass kept less than 1/√2 of ‖w‖.
_DGKS_ETA = 2 ** -0.5


def _tridiagonal(alphas: Tensor | Sequence[float], betas: Tensor | Sequence[float]) -> Tensor:
    """The symmetric tridiagonal T (float64, CPU) with diagonal ``alphas`` and off-diagonal ``betas``."""
    T = torch.diag(torch.as_tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.as_tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _breakdown_tol(dtype: torch.dtype, n: int, alphas: Sequence[float], betas: Sequence[float]) -> float:
    """β below this means the Krylov space is (numerically) invariant: ‖T‖ estimate × eps × a dimension factor."""
    scale = max([abs(a) for a in alphas] + [abs(b) for b in betas] + [0.0])
    return max(10.0, math.sqrt(n)) * torch.finfo(dtype).eps * scale


# ------------------------------------------------------------------------------------------------------------------
# Batched Lanczos
# ------------------------------------------------------------------------------------------------------------------


class Lanczos(NamedTuple):
    """B Lanczos runs of ``steps`` = m steps each (fewer kept by a run that ended on an invariant Krylov space).

    ``basis`` (B, ≥ m, n): rows ``basis[b, :lengths[b]]`` are run b's orthonormal basis, its rows from lengths[b] to
    m − 1 are zeros, rows from m on are unset;
    ``alphas``, ``betas`` (B, m) float64 CPU: T of run b has diagonal ``alphas[b, :lengths[b]]`` and off-diagonal
    ``betas[b, :lengths[b] − 1]``; ``betas[b, m − 1]`` is the last residual norm, which bounds the Ritz residuals.
    ``lengths`` (B,) int64: the steps each run keeps.
    """

    basis: Tensor
    alphas: Tensor
    betas: Tensor
    lengths: Tensor

    @property
    def steps(self) -> int:
        return self.alphas.shape[1]


def lanczos(
    apply: Product,
    start: Tensor,
    max_steps: int,
    *,
    capacity: int | None = None,
    stop: Callable[[Tensor, Tensor], bool] | None = None,
    restart: Draw | None = None,
) -> Lanczos:
    """Lanczos with full reorthogonalization from each unit row of ``start`` (B, n) at once, at most ``max_steps``.

    After step m (1 ≤ m < max_steps) the block stops when ``stop(alphas, betas)`` (the (B, m) coefficients so far)
    returns True. A run whose β falls to the breakdown level ends there (it then feeds zeros to H, so the block keeps
    its shape), or, given ``restart``, continues from ``restart()`` orthogonalized against its basis, unless that
    vector is ≈ 0 too (norm ≤ √eps: the basis spans Rⁿ). The block ends when every run has ended.

    The basis starts with ``capacity`` rows (default ``max_steps``) and doubles as needed, so an early stop does not
    pay for max_steps vectors of length n.
    """
    B, n = start.shape
    dtype, device = start.dtype, start.device
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(torch.float64).tiny
    # empty, not zeros: only the rows written so far (basis[:, :m]) are ever read.
    basis = torch.empty(B, min(max_steps, capacity or max_steps), n, dtype=dtype, device=device)
    basis[:, 0] = start
    alphas = torch.zeros(B, max_steps, dtype=torch.float64)
    betas = torch.zeros(B, max_steps, dtype=torch.float64)
    lengths = torch.full((B,), max_steps, dtype=torch.int64)  # steps each run keeps; shorter after a breakdown
    active = torch.ones(B, dtype=torch.bool)
    m = 0
    for j in range(max_steps):
        v = basis[:, j]
        w = apply(v, f"Lanczos iteration {j}")
        alpha = _dot64(v, w)
        w = w - alpha.to(dtype).unsqueeze(-1) * v
        if j > 0:
            w = w - betas[:, j - 1].to(device=device, dtype=dtype).unsqueeze(-1) * basis[:, j - 1]
        w = _orthogonalize(basis[:, : j + 1], w)
        beta = _norm64(w).cpu()
        alphas[:, j] = alpha.cpu()
        betas[:, j] = beta
        m = j + 1
        if m == max_steps:
            break
        if stop is not None and stop(alphas[:, :m], betas[:, :m]):
            break
        for b in range(B):
            if active[b] and beta[b] <= _breakdown_tol(dtype, n, alphas[b, :m].tolist(), betas[b, :m].tolist()):
                # Invariant Krylov space (T's eigenvalues are eigenvalues of H; a quadrature on it is exact with m
                # nodes): restart from a fresh direction orthogonal to everything found so far, or end the run.
                fresh = None if restart is None else _orthogonalize(basis[b : b + 1, :m], restart())
                norm = None if fresh is None else _norm64(fresh).item()
                if norm is not None and norm > math.sqrt(eps):
                    w[b] = fresh[0]
                    beta[b] = norm
                    betas[b, j] = 0.0
                else:
                    active[b] = False
                    lengths[b] = m
        if not active.any():
            break
        if m == basis.shape[1]:
            grown = torch.empty(B, min(max_steps, 2 * m), n, dtype=dtype, device=device)
            grown[:, :m] = basis
            basis = grown
        scale = torch.where(active, beta, 1.0).clamp(min=tiny).to(device=device, dtype=dtype).unsqueeze(-1)
        basis[:, m] = torch.where(active.to(device).unsqueeze(-1), w / scale, 0.0)  # ended runs feed zeros
    lengths = torch.where(active, m, lengths)
    return Lanczos(basis, alphas[:, :m], betas[:, :m], lengths)


# ------------------------------------------------------------------------------------------------------------------
# Top eigenpairs: Ritz pairs of one run (B = 1)
# ------------------------------------------------------------------------------------------------------------------


WHICH = ("largest", "smallest", "magnitude")


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted Ritz values of ascending ``theta``: the largest (descending), the smallest
    (ascending, the most negative first) or those of largest magnitude (by |θ|, descending)."""
    m = theta.numel()
    if which == "largest":
        return torch.arange(m - 1, m - 1 - k, -1)
    if which == "smallest":
        return torch.arange(k)
    return torch.argsort(theta.abs(), descending=True, stable=True)[:k]


def _ritz(
    alphas: Tensor, betas: Tensor, k: int, tol: float, eps: float, which: str = "largest"
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """Eigen-decomposition of T_m, the indices of its k wanted Ritz values, their residuals / bounds and
    convergence."""
    theta, S = torch.linalg.eigh(_tridiagonal(alphas, betas))
    top = _wanted(theta, k, which)
    residuals = (betas[-1] * S[-1, top]).abs()
    bounds = _residual_bounds(theta, top, tol, eps)
    return theta, S, top, residuals / bounds, bool((residuals <= bounds).all())


def _residual_bounds(theta: Tensor, top: Tensor, tol: float, eps: float) -> Tensor:
    """The residual each wanted Ritz value θ must reach: tol·|θ|, which cannot be met below the rounding level of
    H@v (~eps·‖H‖), e.g. for an eigenvalue at 0."""
    return torch.clamp(tol * theta[top].abs(), min=10 * eps * theta.abs().max().item())


def lanczos_top(
    apply: Product, draw: Draw, k: int, tol: float, max_iter: int, which: str = "largest"
) -> tuple[Tensor, Tensor]:
    """The k wanted Ritz pairs (values (k,) float64 CPU in ``_wanted``'s order; unit vectors (k, n)) of one Lanczos
    run from draw(): the largest, the smallest or the largest in magnitude (``which``).

    The run restarts from draw() on an invariant Krylov space and stops once every wanted residual |β_m s_i[m−1]|
    is ≤ tol·|θ_i| (or the rounding level), at m = n or after min(max_iter, n) products (with a RuntimeWarning).
    """
    q = draw()
    n = q.shape[-1]
    max_steps = min(max_iter, n)
    eps = torch.finfo(q.dtype).eps

    def converged(alphas: Tensor, betas: Tensor) -> bool:
        m = alphas.shape[1]
        # eigh of the m×m tridiagonal costs O(m³): checking every step is free for m < 100; beyond, every m/20
        # steps keeps the checks small next to the H@v products.
        return m >= k and (m < 100 or m % max(1, m // 20) == 0) and _ritz(alphas[0], betas[0], k, tol, eps,
                                                                              which)[-1]

    run = lanczos(
        apply,
        _normalize(q),
        max_steps,
        capacity=max(2 * k + 20, 32),
        stop=converged,
        restart=draw,
    )
    m = run.steps
    theta, S, top, ratio, ok = _ritz(run.alphas[0], run.betas[0], k, tol, eps, which)
    if not ok and m < n:
        warnings.warn(
            f"top_eigenvalues: Lanczos did not converge within max_iter={max_iter} H@v products (largest residual "
            f"is {ratio.max().item():.3g} x tol*|eigenvalue| with tol={tol:g}); increase max_iter or tol",
            RuntimeWarning,
            stacklevel=3,
        )
    coefficients = S[:, top].T.to(device=q.device, dtype=q.dtype)  # (k, m)
    vectors = coefficients @ run.basis[0, :m]
    vectors = _normalize(vectors)
    return theta[top], vectors


def _orthonormal_block(basis: Tensor, M: int, W: Tensor, draw: Draw, floor: float) -> tuple[int, Tensor, Tensor]:
    """The next block of a block Lanczos from W (b, n): b' rows orthonormal to ``basis[:M]`` and to each other,
    written to ``basis[M : M + b']`` (which must have room for b rows, or for all of Rⁿ), the float64 coefficients
    C (b, M) of W on ``basis[:M]`` and L (b, b') with ``W = C·basis[:M] + L·basis[M : M + b']``.

    Row by row, classical Gram-Schmidt (with the DGKS second pass) against every row written so far, as one
    contiguous slice of ``basis``. A row whose remainder is at most ``floor`` (W rank-deficient: an invariant
    subspace, or a repeated direction) is replaced by a fresh direction draw() orthogonal to everything, its L
    column then having a zero diagonal. No row once the basis spans Rⁿ (M + b' = n, or a fresh direction ≈ 0),
    so b' ≤ b."""
    b, n = W.shape
    written = M
    C = torch.zeros(b, M, dtype=torch.float64)
    L = torch.zeros(b, b, dtype=torch.float64)
    for r in range(b):
        w, c = _orthogonalize_with_coefficients(basis[:written].unsqueeze(0), W[r : r + 1])
        C[r], L[r, : written - M] = c[0, :M].cpu(), c[0, M:].cpu()
        if written == n:
            continue  # the basis is all of Rⁿ: the remainder is rounding
        norm = _norm64(w).item()
        if norm > floor:
            L[r, written - M] = norm
        else:
            w = _orthogonalize(basis[:written].unsqueeze(0), draw())
            norm = _norm64(w).item()
            if norm <= math.sqrt(torch.finfo(W.dtype).eps):
                continue
        basis[written] = w[0] / norm
        written += 1
    return written - M, C, L[:, : written - M]


def _room(basis: Tensor, T: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``basis`` (and T, padded with zeros) grown by doubling to at least ``rows`` rows."""
    if rows <= basis.shape[0]:
        return basis, T
    size = max(2 * basis.shape[0], rows)
    grown = torch.empty(size, basis.shape[1], dtype=basis.dtype, device=basis.device)
    grown[: basis.shape[0]] = basis
    return grown, torch.nn.functional.pad(T, (0, size - T.shape[0], 0, size - T.shape[0]))


def block_lanczos_top(
    apply: Product, draw: Draw, k: int, tol: float, max_iter: int, which: str, block_size: int
) -> tuple[Tensor, Tensor]:
    """:func:`lanczos_top` with a block of ``block_size`` = b vectors: each step applies H to b orthonormal rows at
    once (one (b, n) product), so an eigenvalue repeated up to b times is found with all its copies (a single
    vector's Krylov space holds one copy of each, and rounding reveals the others only slowly, if the run lasts;
    the k wanted values are right whatever the multiplicities when b ≥ k).

    The recurrence: Q₀ (b, n) orthonormal Gaussian rows; W = H Q_j is orthogonalized against the whole basis
    (full reorthogonalization, float64 dots): its coefficients on Q_j are A_j = Q_j H Q_jᵀ, and its remainder is
    L Q_{j+1} (Gram-Schmidt; a rank-deficient row restarts from a fresh Gaussian direction). T = Q H Qᵀ is block
    tridiagonal with diagonal blocks A_j and sub-diagonal blocks Lᵀ; a Ritz pair (θ, Qᵀs) of T has residual
    ‖Lᵀ s_last‖, s_last the entries of s on the last block. Stops when the k wanted residuals are ≤ tol·|θ| (or
    the rounding level), when the basis spans Rⁿ, or when the next block would pass ``max_iter`` products (with
    a RuntimeWarning).
    """
    first = draw()
    n = first.shape[-1]
    dtype, device = first.dtype, first.device
    eps = torch.finfo(dtype).eps
    start = torch.cat([first] + [draw() for _ in range(block_size - 1)])
    # rows written so far: basis[:count + b]; basis and T grow by doubling, so an early stop does not pay for
    # max_iter rows
    basis = torch.empty(min(n, max(2 * k + 20, 32) + block_size), n, dtype=dtype, device=device)
    T = torch.zeros(basis.shape[0], basis.shape[0], dtype=torch.float64)
    b, _, _ = _orthonormal_block(basis, 0, start, draw, math.sqrt(eps))
    count, products, scale = 0, 0, 0.0
    ok, theta, S, top, ratio = False, None, None, None, None
    while b and products + b <= max_iter:
        lo = count
        count += b
        W = apply(basis[lo:count], f"block Lanczos iteration {products // block_size}")
        products += b
        # the rounding level of a remainder: eps × ‖H‖, estimated by the largest ‖H q‖ so far
        scale = max(scale, _norm64(W).max().item())
        basis, T = _room(basis, T, min(n, count + b))
        b, C, L = _orthonormal_block(basis, count, W, draw, max(10.0, math.sqrt(n)) * eps * scale)
        A = C[:, lo:count]
        T[lo:count, lo:count] = (A + A.T) / 2
        T[count : count + b, lo:count] = L.T
        T[lo:count, count : count + b] = L
        if count >= k:
            theta, S = torch.linalg.eigh(T[:count, :count])
            top = _wanted(theta, k, which)
            residuals = torch.linalg.vector_norm(L.T @ S[lo:count, top], dim=0)
            bounds = _residual_bounds(theta, top, tol, eps)
            ratio = residuals / bounds
            ok = bool((residuals <= bounds).all())
            if ok or count == n:
                break
    if not ok and count < n:
        warnings.warn(
            f"top_eigenvalues: block Lanczos did not converge within max_iter={max_iter} H@v products (largest "
            f"residual is {ratio.max().item():.3g} x tol*|eigenvalue| with tol={tol:g}); increase max_iter or tol",
            RuntimeWarning,
            stacklevel=3,
        )
    coefficients = S[:, top].T.to(device=device, dtype=dtype)  # (k, count)
    return theta[top], _normalize(coefficients @ basis[:count])


# ------------------------------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature: Gauss nodes and weights of every run (B = runs)
# ------------------------------------------------------------------------------------------------------------------


def lanczos_quadrature(apply: Product, start: Tensor, steps: int) -> list[tuple[Tensor, Tensor]]:
    """``steps``-step Lanczos from each unit row of ``start`` (B, n) at once; per run the Gauss nodes θ (ascending)
    and weights τ = U[0]² (float64, CPU), of length ``steps``, or fewer for a run that ended on an invariant space
    (its quadrature is then exact)."""
    run = lanczos(apply, start, steps)
    out = []
    for b in range(start.shape[0]):
        length = int(run.lengths[b])
        theta, U = torch.linalg.eigh(_tridiagonal(run.alphas[b, :length], run.betas[b, :length]))
        out.append((theta, U[0] ** 2))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Power iteration with deflation
# ------------------------------------------------------------------------------------------------------------------


def power_top(
    apply: Product, draw: Draw, k: int, tol: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    """The top k eigenpairs by power iteration with deflation (values (k,) float64 CPU, descending; vectors (k, n)).

    See ``top_eigenvalues(method="power")`` for the shift, the stopping rule and the shared budget.
    """
    found: Tensor | None = None  # (1, i, n): deflation basis, allocated at the first draw (its n, dtype, device)
    values: list[float] = []
    used = 0
    shift = 0.0  # s ≥ 0: iterate with H + sI once a negative eigenvalue is seen to dominate
    scale = 0.0  # the largest |λ| seen: sets the absolute floor of the convergence test for λ ≈ 0
    unconverged: list[int] = []
    i = 0
    while i < k:
        budget = (max_iter - used) // (k - i)
        v = draw()
        if found is None:
            found = v.new_zeros(1, 0, v.shape[-1])
            eps = torch.finfo(v.dtype).eps
        v = _normalize(_orthogonalize(found, v))
        lam_prev = None
        converged = False
        restart = False
        for it in range(budget):
            w = apply(v, f"power iteration {it} of eigenpair {i}")
            used += 1
            if shift:
                w = w + shift * v
            w = _orthogonalize(found, w)
            rq = _dot64(v, w).item()  # Rayleigh quotient of P(H + sI)P at v (v ⟂ found, so Pv = v)
            lam = rq - shift
            scale = max(scale, abs(lam))
            norm = _norm64(w).item()
            if lam_prev is not None and abs(lam - lam_prev) <= max(tol * abs(lam), 10 * eps * scale):
                # A settled Rayleigh quotient alone can mislead: with λ_max = −λ_min the iterate oscillates between
                # the two eigenvectors at a constant quotient. Also require a residual ‖P(H + sI)Pv − (λ + s)v‖
                # (= ‖PHPv − λv‖) consistent with the tolerance: about √tol·|λ| when the quotient has converged.
                residual = _norm64(w - rq * v).item()
                converged = residual <= max(10 * math.sqrt(tol) * abs(lam), 100 * eps * max(scale, shift))
            if norm <= eps * max(scale, shift):
                converged = True  # v is (numerically) in the null space of the shifted, deflated operator
            if converged:
                break
            lam_prev = lam
            v = w / norm
        if converged and lam < 0 and shift == 0.0:
            # The dominant eigenvalue of the remaining space is negative, i.e. it is λ_min: shift by it so the
            # largest algebraic eigenvalue becomes the dominant one, and recompute this pair.
            shift = -lam
            restart = True
        if restart:
            if max_iter - used >= k - i:
                continue
            converged = False  # no budget left to recompute the pair with the shift: λ is not the top one
        if not converged:
            unconverged.append(i)
        values.append(lam)
        found = torch.cat([found, v.unsqueeze(1)], dim=1)
        i += 1
    if unconverged:
        warnings.warn(
            f"top_eigenvalues: power iteration did not converge within max_iter={max_iter} H@v products for "
            f"eigenpair(s) {unconverged}; increase max_iter or tol, or use method='lanczos'",
            RuntimeWarning,
            stacklevel=3,
        )
    lams = torch.tensor(values, dtype=torch.float64)
    order = torch.argsort(lams, descending=True)
    return lams[order], found[0, order.to(found.device)]
