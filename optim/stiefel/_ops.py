r"""Ops of the Stiefel family: the fused RSDM step with permutation sampling, and its row sampler.

``optim::rsdm_step_(X, G, indices, *, rank, seed, offset, lr, core, transport)`` performs one step of the
randomized Riemannian submanifold method (Han, Poirion & Takeda, ICML 2025) with permutation sampling on every
matrix of a batch, in place. For one oriented matrix X (N×P, N >= P, X̃ᵀX̃ = I; see ``manifold.orient``: for a tensor
(..., n, p) with n < p the roles of rows and columns swap, i.e. the op samples *columns* of the stored matrix),
its gradient G and an index set I of r distinct rows::

    A = G_I X_Iᵀ                    (r×r)
    Ω = (A − Aᵀ)/2                  ∈ so(r)
    M = −lr·Ω
    Y = core(M) ∈ SO(r):  "cayley": (I − M/2)⁻¹(I + M/2)
                          "exp":    the matrix exponential e^M
                          "qr":     Q of the QR factorization of I + M, with diag(R) > 0
    X_I ← Y X_I                     (rows outside I are untouched)
    G_I ← Y G_I                     (only with transport=True: moves a momentum buffer with X, see optim.RSDM)

Only the rows I of G are read, so a caller that can compute the gradient row by row (e.g. G_I = −A_I X for PCA)
may fill just those rows, after drawing I with ``rsdm_sample_rows_`` and passing it as ``indices``.
Since ⟨G_I, −MX_I⟩ = −lr‖Ω‖², a small step decreases F; a negative ``lr`` ascends. The cost is O(r²P + r³) and
only the r rows of X (and G) are touched.

Shapes and dtypes: X and G (..., n, p) of one dtype (float32 or float64) and device, X̃ᵀX̃ = I expected (not
checked: the optimizer checks it once). ``indices``: None, or int64 (..., r) with the batch shape of X, distinct
values in [0, N) per matrix (checked before anything is written, on CUDA with one host read per call that passes
indices; an index outside would be an illegal address, a repeated one breaks orthogonality).
With ``indices=None`` each matrix b (row-major over the batch dims) gets the index set drawn by
``rsdm_sample_rows_`` from counters ``offset + b·rank + k``, k < rank; then ``rank`` is r. When ``indices`` is
given, ``rank`` must equal its last size and seed/offset are unused.

Kernels compute in X's dtype, except for float32 X at r > 128, and on the CPU float32 X with 2·P >= N or at r >= 24
(``rotates_in_float64``): there Y and Y·X_I are computed in float64 and rounded once, from A = G_I X_Iᵀ in float32 (M is
skew whatever A's rounding, which only moves the direction); on the CPU a step with ‖M‖_F <= 2 moves the rows by their
increment instead, X_I ← X_I + D·X_I, a float32 product with D = Y − I in float32 whose rounding is ‖D‖ times the rows'
own (the drift within ~40% of the float64 product's): for QR D comes from CholeskyQR carried out in increments in
float32 (``qr_increment_reference``), for Cayley and exp it is fl32 of the float64 Y − I. In float32 throughout, the
rounding of the r-term products accumulates into a drift off the manifold ~15× faster: ‖XᵀX − I‖_F = 6e-5 after 100 PCA
steps at n = 1000, p = 600, r = 300, against 4e-6. The CPU and CUDA kernels use Gauss–Jordan inversion for Cayley (Y =
2(I − M/2)⁻¹ − I; I − M/2 has identity symmetric part, so no pivoting is needed), scaling-and-squaring with a Taylor
polynomial for exp, and Gram–Schmidt with one re-orthogonalization pass for QR (which equals the sign-fixed Householder
Q in exact arithmetic) for small cores; the CPU kernel factors the QR core by CholeskyQR at 24 <= r <= 128 (the same Q;
``rsdm_cpu.cpp``), and larger cores (CPU: r > 128 for QR, r >= 48 for Cayley, where LAPACK's blocked factorizations win;
CUDA: r > 128) use ``torch.linalg`` as the reference does.

``optim::rsdm_sample_rows_(out, n, seed, offset)`` fills int64 ``out`` (..., r) with, per matrix b (row-major over
the batch dims), r distinct indices of [0, n) in increasing order: Floyd's algorithm (Bentley & Floyd 1987) run on
the counter-based generator of ``optim::rademacher_`` (SplitMix64)::

    S = {}
    for k in 0..r-1:  j = n − r + k
                      t = (hash(seed, offset + b·r + k) >> 11) mod (j + 1)
                      S ← S ∪ {j if t ∈ S else t}

which draws every r-subset with probability 1/C(n, r) (up to the 2⁻⁵³ bias of the modulo). Sorted output makes the
set canonical, so CPU, CUDA and the reference return the same tensor bit for bit. As in ``rademacher_``, a seed is
any int64, its 64 bits the generator's seed (−1 is the seed 2⁶⁴ − 1); the optimizers' own ``seed`` settings are
checked >= 0 where they are given.
"""

from __future__ import annotations

import math

import torch

from .._library import define_op
from .._overlap import check_no_overlap
from .._counter_hash import check_counter_range, counter_hash_tensor, logical_shift_right

CORES = ("qr", "cayley", "exp")
# float32 X with r at least this: the core and the rotated rows in float64, rounded once (kFloat64RotationMinRank
# in csrc/stiefel/rsdm.h): float32 throughout drifts off the manifold ~15× faster at large r.
FLOAT64_ROTATION_MIN_RANK = 129
# On the CPU a float64-rotated step with ‖M‖_F at most this moves the rows by X_I + D·X_I, a float32 product with
# D = Y − I in float32 (QR: ``qr_increment_reference``; Cayley, exp: fl32 of the float64 Y − I), whose rounding is
# ‖D‖ times the rows' own (kIncrementMaxNorm in csrc/stiefel/rsdm.h).
INCREMENT_MAX_NORM = 2.0
# On the CPU float32 X rotates as above from this rank on, whatever its shape (cores qr and cayley): a small step's
# increment costs no more than the float32 core, and the optimizers then skip the float32 defect estimate
# (kCpuAccurateRotationMinRank).
CPU_ACCURATE_ROTATION_MIN_RANK = 24


def rotates_in_float64(dtype: torch.dtype, rank: int, n_rows: int, n_cols: int, device: torch.device, *,
                       core: str) -> bool:
    """Whether ``rsdm_step_`` computes the rotation of an oriented N×P (``n_rows`` × ``n_cols``) matrix in
    float64 (or, on the CPU for a small step, by its float32 increment; module docstring): float32 at
    r >= FLOAT64_ROTATION_MIN_RANK, and on the CPU also float32 at r >= CPU_ACCURATE_ROTATION_MIN_RANK (cores qr and
    cayley) and float32 matrices with 2·P >= N, whose float32 rotation drifts fast enough (~6e-6 in 10 steps at
    r = 64) to make the default policy run a float64 QR every 10 steps (``cpu_rotates_in_float64`` in
    csrc/stiefel/rsdm.h; the CUDA kernel keeps the rank rule)."""
    if dtype != torch.float32:
        return False
    if rank >= FLOAT64_ROTATION_MIN_RANK:
        return True
    if torch.device(device).type != "cpu":
        return False
    return 2 * n_cols >= n_rows or (rank >= CPU_ACCURATE_ROTATION_MIN_RANK and core != "exp")


STEP_DTYPES = (torch.float32, torch.float64)


# --- row sampling -------------------------------------------------------------------------------------------------

def check_sample_rows_args(out: torch.Tensor, n: int, seed: int, offset: int) -> None:
    if out.dtype != torch.int64:
        raise ValueError(f"rsdm_sample_rows_: out must be int64, got {out.dtype}")
    if out.dim() < 1:
        raise ValueError("rsdm_sample_rows_: out must have at least one dimension (..., r)")
    r = out.shape[-1]
    if not 0 < r <= n:
        raise ValueError(f"rsdm_sample_rows_: the rank r = out.shape[-1] = {r} must be in [1, n = {n}]")
    if offset < 0:
        raise ValueError(f"rsdm_sample_rows_: offset must be >= 0, got {offset}")
    check_counter_range("rsdm_sample_rows_", offset, out.numel())


def rsdm_sample_rows_reference(out: torch.Tensor, n: int, seed: int, offset: int) -> None:
    check_sample_rows_args(out, n, seed, offset)
    check_no_overlap("rsdm_sample_rows_", [("out", out, True)])
    r = out.shape[-1]
    batch = out.numel() // r
    if batch == 0:
        return
    device = out.device
    base = torch.arange(batch, dtype=torch.int64, device=device) * r + offset
    if floyd_uses_list(n, r):  # the kernels' rule: no (batch, n) table for a huge n
        picks = torch.empty(batch, r, dtype=torch.int64, device=device)
        for k in range(r):
            t = logical_shift_right(counter_hash_tensor(seed, base + k), 11) % (n - r + k + 1)
            taken = (picks[:, :k] == t[:, None]).any(dim=1)
            picks[:, k] = torch.where(taken, torch.full_like(t, n - r + k), t)
        out.copy_(picks.sort(dim=1).values.view(out.shape))
        return
    chosen = torch.zeros(batch, n, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    for k in range(r):
        j = n - r + k
        hashed = counter_hash_tensor(seed, base + k)
        t = logical_shift_right(hashed, 11) % (j + 1)
        taken = chosen[rows, t]
        pick = torch.where(taken, torch.full_like(t, j), t)
        chosen[rows, pick] = True
    indices = chosen.nonzero()[:, 1].view(out.shape)
    out.copy_(indices)


def floyd_uses_list(n: int, r: int) -> bool:
    """Whether the sampler keeps the r picks as a list instead of an n-entry table (``floyd_uses_list`` in
    ``csrc/stiefel/rsdm.h``): when the table would dwarf the picks. Both give the same sorted set."""
    return n > 64 * r and r <= 4096


def _sample_rows_fake(out, n, seed, offset) -> None:
    check_sample_rows_args(out, n, seed, offset)


rsdm_sample_rows_ = define_op(
    "rsdm_sample_rows_(Tensor(a!) out, int n, int seed, int offset) -> ()",
    reference=rsdm_sample_rows_reference,
    fake=_sample_rows_fake,
)


# --- the RSDM step ------------------------------------------------------------------------------------------------

def check_rsdm_step_args(x: torch.Tensor, g: torch.Tensor, indices: torch.Tensor | None, rank: int, offset: int,
                         lr: float, core: str) -> None:
    """Raise ``ValueError`` naming the first argument that does not fit the schema."""
    if x.dim() < 2:
        raise ValueError(f"rsdm_step_: X has shape {tuple(x.shape)}; it must be a (batch of) matrix (..., n, p)")
    if x.dtype not in STEP_DTYPES:
        raise ValueError(f"rsdm_step_: X is {x.dtype}; the step (and its r×r core) runs in float32 or float64 only "
                         "(bfloat16/float16 cannot keep X on the manifold); keep the parameter in float32")
    if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
        raise ValueError(f"rsdm_step_: G is {g.dtype} {tuple(g.shape)} on {g.device} but X is {x.dtype} "
                           f"{tuple(x.shape)} on {x.device}; they must match")
    if core not in CORES:
        raise ValueError(f"rsdm_step_: core must be one of {CORES}, got {core!r}")
    if not math.isfinite(lr):
        raise ValueError(f"rsdm_step_: lr must be finite, got {lr}")
    n_rows = max(x.shape[-2], x.shape[-1])
    if indices is None:
        if not 0 < rank <= n_rows:
            raise ValueError(f"rsdm_step_: rank must be in [1, {n_rows}] (max(n, p) of X {tuple(x.shape)}), got "
                             f"{rank}")
        if offset < 0:
            raise ValueError(f"rsdm_step_: offset must be >= 0, got {offset}")
        return
    if indices.dtype != torch.int64 or indices.device != x.device:
        raise ValueError(f"rsdm_step_: indices must be int64 on {x.device}, got {indices.dtype} on "
                           f"{indices.device}")
    if tuple(indices.shape[:-1]) != tuple(x.shape[:-2]) or indices.dim() != x.dim() - 1:
        raise ValueError(f"rsdm_step_: indices has shape {tuple(indices.shape)}; for X {tuple(x.shape)} it must "
                         "be X.shape[:-2] + (r,)")
    r = indices.shape[-1]
    if not 0 < r <= n_rows or rank != r:
        raise ValueError(f"rsdm_step_: indices.shape[-1] = {r} must be in [1, {n_rows}] and equal rank = {rank}")


def check_rsdm_index_values(indices: torch.Tensor, n_rows: int) -> None:
    """Raise ``ValueError`` at the first entry (row-major) of ``indices`` (..., r) outside [0, n_rows) or repeating a
    row of its matrix, with the kernels' messages. Reads the values (a host sync on CUDA), so the fake skips it."""
    r = indices.shape[-1]
    flat = indices.reshape(-1, r)
    bad = (flat < 0) | (flat >= n_rows)
    # A stable sort puts the later copies of a value right after its first one; those later positions repeat it.
    ordered, order = flat.sort(dim=-1, stable=True)
    bad.scatter_(-1, order[:, 1:], bad.gather(-1, order[:, 1:]) | (ordered[:, 1:] == ordered[:, :-1]))
    if not bad.any():
        return
    first = int(bad.flatten().nonzero()[0])
    b, row = first // r, int(flat.flatten()[first])
    if not 0 <= row < n_rows:
        raise ValueError(f"rsdm_step_: indices[{b}] holds {row}, outside [0, {n_rows})")
    raise ValueError(f"rsdm_step_: indices[{b}] holds row {row} twice; the r indices of a matrix must be distinct")


def _core_reference(m: torch.Tensor, core: str) -> torch.Tensor:
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    if core == "cayley":
        return torch.linalg.solve(eye - 0.5 * m, eye + 0.5 * m)
    if core == "exp":
        return torch.linalg.matrix_exp(m)
    q, r = torch.linalg.qr(eye + m)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(-2)


def qr_increment_reference(m: torch.Tensor) -> torch.Tensor:
    """D = Q − I for the QR core, Q of I + M with diag(R) > 0, M (..., r, r) skew, computed in m's dtype without
    forming I + M or its Gram matrix I + MᵀM: with R = I + S the Cholesky factor of I + H, H = MᵀM,

        t_k = H_kk − Σ_{i<k} S_ik²,   S_kk = t_k / (1 + √(1 + t_k)),   S_kj = (H_kj − Σ_{i<k} S_ik S_ij) / √(1 + t_k),
        D = (M − S)·R⁻¹                                                  (Q − I = (I + M − R)·R⁻¹)

    so that every rounding is relative to ‖D‖ instead of ‖Q‖ = √r (the CPU kernel's increment core)."""
    r = m.shape[-1]
    h = (m.mT @ m).clone()
    s = torch.zeros_like(h)
    for k in range(r):
        t = h[..., k, k]
        root = torch.sqrt(1 + t)
        s[..., k, k] = t / (1 + root)
        row = h[..., k, k + 1:] / root.unsqueeze(-1)
        s[..., k, k + 1:] = row
        h[..., k + 1:, k + 1:] -= row.unsqueeze(-1) * row.unsqueeze(-2)
    rfactor = s + torch.eye(r, dtype=m.dtype, device=m.device)
    return torch.linalg.solve_triangular(rfactor, m - s, upper=True, left=False)


def rsdm_step_reference(x: torch.Tensor, g: torch.Tensor, indices: torch.Tensor | None, *, rank: int, seed: int,
                        offset: int, lr: float, core: str, transport: bool) -> None:
    check_rsdm_step_args(x, g, indices, rank, offset, lr, core)
    check_no_overlap("rsdm_step_", [("X", x, True), ("G", g, transport), ("indices", indices, False)])
    flip = x.shape[-2] < x.shape[-1]
    xo, go = (x.mT, g.mT) if flip else (x, g)
    n_rows, n_cols = xo.shape[-2:]
    batch_shape = x.shape[:-2]
    given = indices is not None
    if not given:
        indices = torch.empty(*batch_shape, rank, dtype=torch.int64, device=x.device)
        rsdm_sample_rows_reference(indices, n_rows, seed, offset)
    if indices.numel() == 0 or xo.numel() == 0:
        return
    if given:
        check_rsdm_index_values(indices, n_rows)
    gather = indices.unsqueeze(-1).expand(*batch_shape, indices.shape[-1], n_cols)
    x_rows = torch.gather(xo, -2, gather)
    g_rows = torch.gather(go, -2, gather)
    a = g_rows @ x_rows.mT
    if rotates_in_float64(x.dtype, indices.shape[-1], n_rows, n_cols, x.device, core=core):
        # M in float64 (A's float32 rounding only moves the direction: M is skew), and per matrix the rows moved by
        # Y·X_I in float64 rounded once, or on the CPU for a small step by their float32 increment D·X_I
        a = a.double()
        m = -lr * 0.5 * (a - a.mT)
        y = _core_reference(m, core)
        small = torch.linalg.matrix_norm(m) <= INCREMENT_MAX_NORM
        by_increment = small[..., None, None] & (x.device.type == "cpu")
        increment = (y - torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)).to(x.dtype)
        if core == "qr" and bool(by_increment.any()):
            increment = torch.where(by_increment, qr_increment_reference(m.to(x.dtype)), increment)
        for target, rows in [(xo, x_rows)] + ([(go, g_rows)] if transport else []):
            target.scatter_(-2, gather, torch.where(by_increment, rows + increment @ rows,
                                                    (y @ rows.double()).to(x.dtype)))
        return
    m = -lr * 0.5 * (a - a.mT)
    y = _core_reference(m, core)
    xo.scatter_(-2, gather, y @ x_rows)
    if transport:
        go.scatter_(-2, gather, y @ g_rows)


def _rsdm_step_fake(x, g, indices, *, rank, seed, offset, lr, core, transport) -> None:
    check_rsdm_step_args(x, g, indices, rank, offset, lr, core)


rsdm_step_ = define_op(
    "rsdm_step_(Tensor(a!) X, Tensor(b!) G, Tensor? indices, *, int rank, int seed, int offset, float lr, str core, "
    "bool transport) -> ()",
    reference=rsdm_step_reference,
    fake=_rsdm_step_fake,
)
