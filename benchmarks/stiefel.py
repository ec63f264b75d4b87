"""Orthogonality-constrained steps: ``optim.RSDM`` (fused permutation step) vs Riemannian SGD vs geoopt vs naive RSDM.

Part 1, step time: one ``.step()`` on a single (or batched) Stiefel matrix with a fixed random gradient, for
  * ours: ``optim::rsdm_step_`` alone (the fused op, row sampling included), ``optim.RSDM`` permutation
    (``.step()``: op + finite-gradient check), ``optim.RSDM`` orthogonal sampling, ``optim.RiemannianSGD`` with
    each retraction (qr, cayley, polar);
  * peers: geoopt's ``RiemannianSGD`` on ``geoopt.Stiefel`` (canonical metric, Cayley retraction: its default) and
    on ``geoopt.EuclideanStiefel`` (QR-type retraction), when geoopt is installed (a missing geoopt is reported);
    a naive plain-PyTorch RSDM-P step (randperm, gather, r×r QR with sign fix, scatter: what one writes without
    the op).
  The rank is r = 128 (64 with --quick). "vs geoopt" divides geoopt's Cayley time by ours, in the same run.
  Medians of interleaved single steps; then ``optim.RSDM`` permutation and the naive step again as the mean of
  LOOP_STEPS steps back to back ("loop mean"): what a training loop pays, RSDM's default re-orthonormalization (a
  float64 QR whenever the defect estimate passes its limit) included, which the medians leave out.

Part 2, time to a 1e-6 relative optimality gap (F(X̄) − F*)/|F*|, measured at the projected point X̄ = polar(X)
outside the timed region, on two problems (``make_pca``, ``make_procrustes``):
  * PCA, F = −½tr(XᵀAX) over St(n, p), A = Q diag(10·logspace(−3, 0, n)) Qᵀ, the RSDM paper's script: n = 2000,
    p = 1500, r = 700 (--quick: n = 120, p = 60, r = 40, spectrum 10·logspace(−1, 0, n)); F* from the eigenvalues;
  * orthogonal Procrustes, F = ‖AX − B‖² over St(n, n) = O(n) (n = 1500, r = 700; --quick 120, 40), optimum the
    polar factor of AᵀB, F* = ‖A‖² + ‖B‖² − 2‖AᵀB‖_* (see ``make_procrustes``).
  Methods, all from the same X0 and with the same lr (Adam: lr/100), taking turns so that machine load hits them
  alike: RGD-QR and RiemannianAdam (ours), our fused RSDM-P op fed the gradient rows G_I only (O(rnp) per step:
  the method's point), the naive plain-PyTorch RSDM-P on the same rows, ``optim.RSDM`` (permutation and orthogonal
  sampling) fed the full gradient (the optimizer API), and geoopt's RiemannianSGD (EuclideanStiefel) when
  installed. The RSDM-P variants draw the same row sets, so they take the same number of steps.
  One PNG, one panel per problem, gap vs time.
  ``--full``: only the PCA race at the paper's size (n = 2000, p = 1500, r = 700, lr = 2/λ_max), for RGD-QR, the
  two row-wise RSDM-P loops and ``optim.RSDM`` fed the full gradient, each capped at FULL_BUDGET_S = 60 s of
  steps (a CPU does not reach 1e-6 there in minutes: see RESULTS.md), with the gap at the re-projected point.

Part 3, a deep-learning case: a 64-128-128-10 tanh MLP whose two hidden weights are on the Stiefel manifold, on a
seeded synthetic 10-class dataset shaped like sklearn's digits (``synthetic_digits``: sklearn is not a dependency),
trained for the same epochs, init and batch order with RSDM (+ AdamW for the unconstrained parameters), our
RiemannianAdam and geoopt's RiemannianAdam: test accuracy, training time and the final ‖WᵀW − I‖.

On a shared CPU run it with ``OMP_NUM_THREADS=1``: with two threads on a busy 2-core machine the per-step times
of the small problems swung 5–10× (thread oversubscription), which is what made an earlier quick run report
5.7 s for our RSDM-P loop against 0.30 s for the naive one.
"""

from __future__ import annotations

import math
import os
import time

import torch

import optim
from optim.stiefel import distance_to_manifold, orthogonal_, project_to_manifold

from ._plots import pyplot, save
from ._timing import device_name, synchronize, time_interleaved_ms

SIZES = [("4096x4096", (4096, 4096)), ("8192x512", (8192, 512)), ("16384x2048", (16384, 2048)),
         ("64x512x512", (64, 512, 512))]
# --quick: a CPU smoke run of a minute or so (full retractions of a 1024² matrix alone take seconds per step there).
QUICK_SIZES = [("512x512", (512, 512)), ("1024x128", (1024, 128)), ("8x128x128", (8, 128, 128))]
GAP_TARGET = 1e-6
# --gpu-headline: one step at the first sizes only (4096x4096 and 8192x512 at r = 128) against geoopt and RGD-QR
HEADLINE_SIZES = 2


def _geoopt():
    try:
        import geoopt  # noqa: F401
        return geoopt, None
    except Exception as error:  # ImportError, or a geoopt incompatible with this torch
        return None, f"{type(error).__name__}: {error}"


def naive_rsdm_step_(x: torch.Tensor, g: torch.Tensor, rank: int, lr: float) -> None:
    """RSDM with permutation sampling in plain PyTorch, one (unbatched or batched) matrix, n >= p."""
    n = x.shape[-2]
    idx = torch.randperm(n, device=x.device)[:rank]
    x_rows, g_rows = x[..., idx, :], g[..., idx, :]
    a = g_rows @ x_rows.mT
    eye = torch.eye(rank, dtype=x.dtype, device=x.device)
    q, r = torch.linalg.qr(eye - lr * 0.5 * (a - a.mT))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    x[..., idx, :] = q @ x_rows


LOOP_STEPS = 100


def _loop_mean_ms(step, device: torch.device) -> float:
    """The mean time of LOOP_STEPS calls of ``step`` back to back (after 3 untimed ones), in ms."""
    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(LOOP_STEPS):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / LOOP_STEPS * 1e3


def step_time_rows(device: torch.device, quick: bool, headline: bool = False) -> tuple[list[dict], str | None]:
    """One step of every method at SIZES (``quick``: QUICK_SIZES; ``headline``: the first two, fewer repeats)."""
    geoopt, geoopt_error = _geoopt()
    rank = 64 if quick else 128
    repeats, warmup = (5, 2) if quick else ((10, 3) if headline else (20, 5))
    sizes = QUICK_SIZES if quick else SIZES
    rows = []
    for label, shape in (sizes[:HEADLINE_SIZES] if headline else sizes):
        x0 = orthogonal_(torch.empty(shape, dtype=torch.float64)).float().to(device)
        grad = torch.randn(shape, device=device) / math.sqrt(shape[-2])
        lr = 0.1
        fns, params = {}, {}

        def param():
            p = x0.clone().requires_grad_()
            p.grad = grad.clone()
            return p

        x_op, g_op = x0.clone(), grad.clone()
        counter = [0]

        def op_step():
            counter[0] += 1
            optim.stiefel._ops.rsdm_step_(x_op, g_op, None, rank=rank, seed=0, offset=counter[0] * rank * 64,
                                          lr=lr, core="qr", transport=False)

        fns["ours: rsdm_step_ op"] = op_step
        for name, make in {
            "ours: RSDM-P step": lambda p: optim.RSDM([p], lr=lr, rank=rank, seed=0),
            "ours: RSDM-O step": lambda p: optim.RSDM([p], lr=lr, rank=rank, sampling="orthogonal", seed=0),
            "ours: RGD qr": lambda p: optim.RiemannianSGD([p], lr=lr, retraction="qr"),
            "ours: RGD cayley": lambda p: optim.RiemannianSGD([p], lr=lr, retraction="cayley"),
            "ours: RGD polar": lambda p: optim.RiemannianSGD([p], lr=lr, retraction="polar"),
        }.items():
            p = param()
            params[name] = p
            fns[name] = make(p).step
        x_naive = x0.clone()
        fns["naive RSDM-P (PyTorch)"] = lambda: naive_rsdm_step_(x_naive, grad, rank, lr)
        if geoopt is not None:
            for name, manifold in (("geoopt Stiefel (cayley)", geoopt.Stiefel()),
                                   ("geoopt EuclideanStiefel (qr)", geoopt.EuclideanStiefel())):
                p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
                p.grad = grad.clone()
                params[name] = p
                fns[name] = geoopt.optim.RiemannianSGD([p], lr=lr, stabilize=None).step
        timings = time_interleaved_ms(fns, device, warmup=warmup, repeats=repeats)
        # What a training loop pays: LOOP_STEPS steps back to back, the default re-orthonormalization included
        # (the interleaved medians above leave out its periodic QR).
        p = param()
        looped = {"ours: RSDM-P step, loop mean": optim.RSDM([p], lr=lr, rank=rank, seed=0).step,
                  "naive RSDM-P (PyTorch), loop mean": lambda: naive_rsdm_step_(x_naive, grad, rank, lr)}
        loop_rows = {name: _loop_mean_ms(fn, device) for name, fn in looped.items()}
        ours = timings["ours: rsdm_step_ op"].median_ms
        geo = timings.get("geoopt Stiefel (cayley)")
        for name, timing in timings.items():
            rows.append({"size": label, "shape": list(shape), "rank": rank, "impl": name,
                         "median_ms": timing.median_ms, "repeat_ms": timing.repeat_ms,
                         "this_over_ours_op": timing.median_ms / ours,
                         "geoopt_cayley_over_this": None if geo is None else geo.median_ms / timing.median_ms})
        for name, mean_ms in loop_rows.items():
            rows.append({"size": label, "shape": list(shape), "rank": rank, "impl": name, "median_ms": mean_ms,
                         "repeat_ms": [mean_ms], "this_over_ours_op": mean_ms / ours,
                         "geoopt_cayley_over_this": None if geo is None else geo.median_ms / mean_ms})
        del fns, params
    return rows, geoopt_error


class GapProblem:
    """A problem min F(X) over St(n, p) with a known optimum F*, for the time-to-gap races.

    ``full_grad(x)`` is the Euclidean gradient (what RGD, Adam, geoopt and the optimizer API consume);
    ``rows_grad(x, rows)`` its rows I only, which is all the fused RSDM-P step reads (O(rnp) instead of O(n²p) on
    both problems: the method's point); ``value(x)`` is F in float64.
    """

    def __init__(self, name, n, p, rank, lr, x0, best, full_grad, rows_grad, value, description, spectrum):
        self.name, self.n, self.p, self.rank, self.lr, self.spectrum = name, n, p, rank, lr, spectrum
        self.x0, self.best, self.description = x0, best, description
        self.full_grad, self.rows_grad, self.value = full_grad, rows_grad, value


def pca_problem(n: int, p: int, device: torch.device, dtype=torch.float32, seed: int = 0, low: float = -3.0):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    eigenvalues = 10.0 * torch.logspace(low, 0, n, dtype=torch.float64)
    a = (q * eigenvalues) @ q.T
    best = -0.5 * eigenvalues[-p:].sum().item()
    x0 = orthogonal_(torch.empty(n, p, dtype=torch.float64), generator=generator)
    return a.to(device, dtype), best, x0.to(device, dtype)


def relative_gap(a: torch.Tensor, x: torch.Tensor, best: float) -> float:
    x_bar = project_to_manifold(x).to(torch.float64)
    value = -0.5 * torch.trace(x_bar.T @ a.to(torch.float64) @ x_bar).item()
    return (value - best) / abs(best)


def make_pca(device: torch.device, quick: bool) -> GapProblem:
    """F = −½ tr(XᵀAX) with A = Q diag(10·logspace(low, 0, n)) Qᵀ; F* = −½ (sum of the p largest eigenvalues)."""
    # --quick: a smaller, better-conditioned spectrum (10·logspace(−1, 0, n)) so that a CPU run ends in seconds.
    n, p, r, low = (120, 60, 40, -1.0) if quick else (2000, 1500, 700, -3.0)
    a, best, x0 = pca_problem(n, p, device, low=low)
    a64, neg_a = a.to(torch.float64), -a

    def rows_grad(x, rows):
        return torch.mm(neg_a.index_select(0, rows), x)

    def value(x):
        return -0.5 * torch.trace(x.T @ a64 @ x).item()

    # lr = 2/λ_max: the largest step at which RGD-QR is still stable here, used by every method but Adam.
    return GapProblem("pca", n, p, r, 2.0 / 10.0, x0, best, lambda x: torch.mm(neg_a, x), rows_grad, value,
                      f"PCA: F = -tr(X^T A X)/2, A = Q diag(10*logspace({low:g}, 0, n)) Q^T",
                      f"10*logspace({low:g}, 0, n)")


def make_procrustes(device: torch.device, quick: bool, seed: int = 1) -> GapProblem:
    """Orthogonal Procrustes F = ‖AX − B‖_F² over St(n, n) = O(n), with known optimum.

    A = U diag(√s) Vᵀ (s = 10·logspace(low, 0, n), U, V Haar), B = A X_true + 0.1·N (X_true ∈ SO(n), N Gaussian).
    On O(n), ‖AX‖² = ‖A‖² is constant, so F = ‖A‖² + ‖B‖² − 2 tr(XᵀC) with C = AᵀB, minimized by the polar factor
    X* = polar(C): F* = ‖A‖² + ‖B‖² − 2‖C‖_* (nuclear norm), from an SVD in float64. Every method here moves X
    continuously, so it stays in the connected component (sign of det X) it starts in: X0 is drawn in the
    component of X* (one column flipped if needed). Gradients use the precomputed H = AᵀA and C (a setup cost
    shared by all methods): G = 2(HX − C), its rows G_I = 2(H_I X − C_I).
    """
    n, r, low = (120, 40, -1.0) if quick else (1500, 700, -2.0)
    generator = torch.Generator().manual_seed(seed)

    def haar(size):
        q, rr = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))
        return q * torch.sign(torch.diagonal(rr)).unsqueeze(0)

    s = 10.0 * torch.logspace(low, 0, n, dtype=torch.float64)
    a = (haar(n) * s.sqrt()) @ haar(n).T
    x_true = haar(n)
    if torch.linalg.det(x_true) < 0:
        x_true[:, 0].neg_()
    b = a @ x_true + 0.1 * torch.randn(n, n, dtype=torch.float64, generator=generator)
    c = a.T @ b
    u, sigma, vh = torch.linalg.svd(c)
    best = ((a * a).sum() + (b * b).sum() - 2.0 * sigma.sum()).item()
    x0 = haar(n)
    if torch.linalg.det(x0) * torch.linalg.det(u @ vh) < 0:
        x0[:, 0].neg_()
    h_f, c_f = (a.T @ a).to(device, torch.float32), c.to(device, torch.float32)
    a64, b64 = a.to(device), b.to(device)

    def value(x):
        return (a64 @ x - b64).square().sum().item()

    # The Riemannian Hessian of −2tr(XᵀC) at X* has eigenvalues (σ_i + σ_j), up to 2σ_max: lr = 1/σ_max.
    return GapProblem("procrustes", n, n, r, 1.0 / sigma[0].item(), x0.to(device, torch.float32), best,
                      lambda x: torch.addmm(c_f, h_f, x, beta=-2.0, alpha=2.0),
                      lambda x, rows: torch.addmm(c_f.index_select(0, rows), h_f.index_select(0, rows), x, beta=-2.0,
                                                  alpha=2.0), value,
                      f"Procrustes on O(n): F = ||AX - B||^2, singular values of A^T A = 10*logspace({low:g}, 0, n), "
                      "B = A X_true + 0.1 N", f"10*logspace({low:g}, 0, n)")


def problem_gap(problem: GapProblem, x: torch.Tensor) -> float:
    """(F(X̄) − F*)/|F*| at the projected point X̄ = polar(X), float64."""
    x_bar = project_to_manifold(x.detach()).to(torch.float64)
    return (problem.value(x_bar) - problem.best) / abs(problem.best)


def gap_methods(problem: GapProblem, device: torch.device, geoopt) -> dict:
    """name -> (step, X, steps between gap checks, lr). Every method starts at X0 with the same lr (Adam: its own)."""
    n, r, lr = problem.n, problem.rank, problem.lr
    rsdm_check = 10 * max(1, n // r)  # ~10 full-gradient-equivalents of work between checks, as for RGD
    methods = {}

    def with_full_grad(x, optimizer):
        def step():
            x.grad = problem.full_grad(x.detach())
            optimizer.step()
        return step

    x = problem.x0.clone().requires_grad_()
    methods["RGD-QR (optim.RiemannianSGD)"] = (with_full_grad(x, optim.RiemannianSGD([x], lr=lr, retraction="qr")),
                                               x, 10, lr)
    x = problem.x0.clone().requires_grad_()
    adam_lr = 0.01 * lr  # Adam's step is ~lr per entry whatever the gradient's scale: a tuned-down lr, see docs
    methods["RiemannianAdam (optim, qr)"] = (with_full_grad(x, optim.RiemannianAdam([x], lr=adam_lr)), x, 10,
                                             adam_lr)

    # Every RSDM-P variant draws the same index sets: the row loops call rsdm_sample_rows_ with the seed and
    # counters that optim.RSDM(seed=0) uses for its first parameter, so all of them follow one trajectory up to
    # rounding and take the same number of steps; the time difference is the implementation alone. The row loops
    # read only G_I and re-orthonormalize X every 100 steps as optim.RSDM does by default (without it the fp32
    # defect ‖XᵀX − I‖ reached 6e-4 after 3,720 steps of the quick PCA problem).
    stream_seed = 0x9E3779B97F4A7C15 % (1 << 63)  # optim.RSDM's per-parameter seed for seed=0, first parameter

    def row_loop(update_rows):
        x_rows_loop = problem.x0.clone()
        rows = torch.empty(r, dtype=torch.int64, device=device)
        steps = [0]

        def step():
            optim.stiefel._ops.rsdm_sample_rows_(rows, n, stream_seed, steps[0] * r)
            steps[0] += 1
            update_rows(x_rows_loop, rows)
            if steps[0] % 100 == 0:
                x_rows_loop.copy_(project_to_manifold(x_rows_loop, method="qr"))
        return step, x_rows_loop

    g_ours = torch.zeros_like(problem.x0)

    def fused_update(x, rows):
        g_ours.index_copy_(0, rows, problem.rows_grad(x, rows))
        optim.stiefel._ops.rsdm_step_(x, g_ours, rows, rank=r, seed=0, offset=0, lr=lr, core="qr", transport=False)

    step, x = row_loop(fused_update)
    methods["RSDM-P (optim, fused op)"] = (step, x, rsdm_check, lr)

    eye = torch.eye(r, device=device)

    def naive_update(x, rows):
        x_rows = x.index_select(0, rows)
        g_rows = problem.rows_grad(x, rows)
        m = g_rows @ x_rows.T
        q, rr = torch.linalg.qr(eye - (0.5 * lr) * (m - m.T))
        x.index_copy_(0, rows, (q * torch.sign(torch.diagonal(rr)).unsqueeze(0)) @ x_rows)

    step, x = row_loop(naive_update)
    methods["RSDM-P (naive PyTorch)"] = (step, x, rsdm_check, lr)

    # The optimizer API: it draws I itself, so the caller computes the full gradient (O(n²p) per step here).
    for label, sampling in (("RSDM-P (optim.RSDM, full grad)", "permutation"),
                            ("RSDM-O (optim.RSDM, full grad)", "orthogonal")):
        x = problem.x0.clone().requires_grad_()
        optimizer = optim.RSDM([x], lr=lr, rank=r, sampling=sampling, seed=0)
        methods[label] = (with_full_grad(x, optimizer), x, rsdm_check, lr)

    if geoopt is not None:
        # EuclideanStiefel: the Euclidean metric and a QR-type retraction, as RGD-QR, so the same lr is stable
        # (geoopt.Stiefel's canonical metric doubles the gradient on O(n): at this lr it diverged on Procrustes).
        x = geoopt.ManifoldParameter(problem.x0.clone(), manifold=geoopt.EuclideanStiefel())
        methods["geoopt RiemannianSGD (EuclideanStiefel)"] = (
            with_full_grad(x, geoopt.optim.RiemannianSGD([x], lr=lr, stabilize=None)), x, 10, lr)
    return methods


def race_to_gap(problem: GapProblem, device: torch.device, budget_s: float, geoopt,
                names: tuple[str, ...] | None = None) -> list[dict]:
    """Time every method to a GAP_TARGET relative gap, interleaved: the methods take turns (one chunk of steps
    each, timed alone, then its gap is measured untimed), so that the load of other processes, which varies over
    seconds on a shared machine, falls on all of them alike. A method stops at the target or at ``budget_s``.
    ``names``: only these methods (in this order; the first is the RGD-QR baseline of the ratios)."""
    methods = gap_methods(problem, device, geoopt)
    if names is not None:
        methods = {name: methods[name] for name in names}
    state = {name: {"elapsed": 0.0, "steps": 0, "reached": None, "trace": [(0.0, problem_gap(problem, x))]}
             for name, (_, x, _, _) in methods.items()}
    running = list(methods)
    while running:
        for name in list(running):
            step, x, check_every, _ = methods[name]
            record = state[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(check_every):
                step()
            synchronize(device)
            record["elapsed"] += time.perf_counter() - start
            record["steps"] += check_every
            gap = problem_gap(problem, x)
            record["trace"].append((record["elapsed"], gap))
            if gap <= GAP_TARGET:
                record["reached"] = record["elapsed"]
            if record["reached"] is not None or record["elapsed"] >= budget_s or not math.isfinite(gap):
                running.remove(name)
    results = []
    for name, (_, x, _, lr) in methods.items():
        record = state[name]
        results.append({"problem": problem.name, "impl": name, "n": problem.n, "p": problem.p, "rank": problem.rank,
                        "lr": lr, "description": problem.description, "f_star": problem.best,
                        "spectrum": problem.spectrum,
                        "steps": record["steps"], "seconds_to_gap": record["reached"],
                        "ms_per_step": 1e3 * record["elapsed"] / max(record["steps"], 1),
                        "final_gap": record["trace"][-1][1], "budget_s": budget_s,
                        "distance_to_manifold": float(distance_to_manifold(x.detach())),
                        "trace": record["trace"]})
    rgd_time = results[0]["seconds_to_gap"]
    for row in results:
        row["rgd_qr_over_this"] = (rgd_time / row["seconds_to_gap"]) if rgd_time and row["seconds_to_gap"] else None
    return results


def time_to_gap(device: torch.device, quick: bool, problem: str = "pca") -> list[dict]:
    geoopt, _ = _geoopt()
    budget_s = 4.0 if quick else 120.0
    make = make_pca if problem == "pca" else make_procrustes
    return race_to_gap(make(device, quick), device, budget_s, geoopt)


# --full: the RSDM paper's PCA size (n = 2000, p = 1500, r = 700, A's spectrum 10·logspace(−3, 0, n), lr = 2/λ_max
# as in make_pca), the row-wise RSDM-P loops against RGD-QR, each method capped at FULL_BUDGET_S seconds of steps.
FULL_METHODS = ("RGD-QR (optim.RiemannianSGD)", "RSDM-P (optim, fused op)", "RSDM-P (naive PyTorch)",
                "RSDM-P (optim.RSDM, full grad)")
FULL_BUDGET_S = 60.0


def full_pca_rows(device: torch.device, budget_s: float = FULL_BUDGET_S) -> list[dict]:
    """The paper-size PCA race (``make_pca`` at its default size) for FULL_METHODS, with a time cap per method."""
    return race_to_gap(make_pca(device, quick=False), device, budget_s, None, names=FULL_METHODS)


def synthetic_digits(seed: int = 0, n_train: int = 1500, n_test: int = 500, dim: int = 64, classes: int = 10,
                     noise: float = 0.5):
    """A seeded stand-in for sklearn's digits (1,797 8×8 images, 10 classes; sklearn is not a dependency here).

    Each class has 4 prototype "styles" in [0, 2]^64; a sample is its class style mixed with a random other style
    (weight U(0, 0.4)) plus N(0, noise²) per feature, standardized with the training mean and std. With noise 0.5
    an MLP reaches 85–90% test accuracy: hard enough for the optimizers to differ.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = 2.0 * torch.rand(classes, 4, dim, generator=generator)
    n = n_train + n_test
    labels = torch.randint(classes, (n,), generator=generator)
    styles = torch.randint(4, (n,), generator=generator)
    distractors = prototypes[torch.randint(classes, (n,), generator=generator),
                             torch.randint(4, (n,), generator=generator)]
    mix = 0.4 * torch.rand(n, 1, generator=generator)
    x = (1 - mix) * prototypes[labels, styles] + mix * distractors + noise * torch.randn(n, dim, generator=generator)
    x = (x - x[:n_train].mean(0)) / x[:n_train].std(0)
    return x[:n_train], labels[:n_train], x[n_train:], labels[n_train:]


class OrthogonalMLP(torch.nn.Module):
    """64 → 128 → 128 → 10 with tanh; fc1.weight (128×64, orthonormal columns) and fc2.weight (128×128, orthogonal)
    are constrained, the biases and the head are not."""

    def __init__(self, dim: int = 64, hidden: int = 128, classes: int = 10, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, classes)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                orthogonal_(layer.weight, generator=generator)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


DL_ADAM_LR = 3e-3  # every unconstrained parameter, and the constrained ones for the two Riemannian Adams
DL_RSDM = dict(lr=0.2, rank=64, momentum=0.9)  # rank: half of N = 128


def train_orthogonal_mlp(kind: str, device: torch.device, epochs: int, data, geoopt=None) -> dict:
    """Train OrthogonalMLP (same init, same batch order: seeds 0 and 1) with one optimizer setup; batch 64."""
    x_train, y_train, x_test, y_test = (t.to(device) for t in data)
    torch.manual_seed(0)
    model = OrthogonalMLP().to(device)
    constrained = [model.fc1.weight, model.fc2.weight]
    rest = [model.fc1.bias, model.fc2.bias, model.head.weight, model.head.bias]
    if kind == "rsdm":
        optimizers = [optim.RSDM(constrained, seed=0, **DL_RSDM), optim.AdamW(rest, lr=DL_ADAM_LR, weight_decay=0.0)]
    elif kind == "riemannian_adam":
        optimizers = [optim.RiemannianAdam([{"params": constrained}, {"params": rest, "manifold": None}],
                                           lr=DL_ADAM_LR)]
    else:  # geoopt: its Stiefel (canonical metric, Cayley retraction: the default) on ManifoldParameters
        model.fc1.weight = geoopt.ManifoldParameter(model.fc1.weight.data, manifold=geoopt.Stiefel())
        model.fc2.weight = geoopt.ManifoldParameter(model.fc2.weight.data, manifold=geoopt.Stiefel())
        constrained = [model.fc1.weight, model.fc2.weight]
        optimizers = [geoopt.optim.RiemannianAdam([{"params": constrained}, {"params": rest}], lr=DL_ADAM_LR)]
    order_generator = torch.Generator().manual_seed(1)
    loss = torch.zeros(())
    synchronize(device)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=order_generator).to(device)
        for i in range(0, len(x_train), 64):
            batch = order[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
    synchronize(device)
    wall = time.perf_counter() - start
    with torch.no_grad():
        test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        train_accuracy = (model(x_train).argmax(1) == y_train).float().mean().item()
    return {"train_s": wall, "test_accuracy": test_accuracy, "train_accuracy": train_accuracy,
            "final_batch_loss": loss.item(), "epochs": epochs,
            "distance_to_manifold": max(float(distance_to_manifold(w.detach())) for w in constrained)}


def deep_learning_rows(device: torch.device, quick: bool) -> list[dict]:
    geoopt, _ = _geoopt()
    epochs = 5 if quick else 30
    data = synthetic_digits()
    setups = {"RSDM (optim) + AdamW for the rest": ("rsdm", f"RSDM lr={DL_RSDM['lr']}, rank={DL_RSDM['rank']}, "
                                                            f"momentum={DL_RSDM['momentum']}; AdamW lr={DL_ADAM_LR}"),
              "RiemannianAdam (optim, qr)": ("riemannian_adam", f"lr={DL_ADAM_LR}"),
              "geoopt RiemannianAdam (Stiefel)": ("geoopt", f"lr={DL_ADAM_LR}")}
    rows = []
    for name, (kind, settings) in setups.items():
        if kind == "geoopt" and geoopt is None:
            continue
        row = {"impl": name, "settings": settings, "dataset": "synthetic digits (seeded, 1500 train / 500 test, 64 "
               "features, 10 classes)", "model": "64-128-128-10 tanh MLP, fc1/fc2 weights on Stiefel",
               **train_orthogonal_mlp(kind, device, epochs, data, geoopt)}
        rows.append(row)
    return rows


def _plot(panels: list[tuple[str, list[dict]]], path: str) -> str | None:
    plt = pyplot("stiefel_gap.png")
    if plt is None:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (title, results) in zip(axes[0], panels):
        for row in results:
            times, gaps = zip(*row["trace"])
            axis.semilogy(times, [max(g, 1e-16) for g in gaps], label=row["impl"])
        axis.axhline(GAP_TARGET, color="grey", linestyle=":")
        axis.set_xlabel("seconds (steps only)")
        axis.set_ylabel("relative gap at the projected point")
        axis.set_title(f"{title} n={results[0]['n']}, p={results[0]['p']}, r={results[0]['rank']}")
        axis.legend(fontsize=7)
    return save(figure, path)


def _format_gap_rows(title: str, rows: list[dict]) -> list[str]:
    first = rows[0]
    lines = [f"time to {GAP_TARGET:g} relative gap, {title} n={first['n']} p={first['p']} r={first['rank']} "
             f"(budget {first['budget_s']:.0f} s each, methods interleaved):",
             f"  {first['description']}"]
    for row in rows:
        reached = "not reached" if row["seconds_to_gap"] is None else f"{row['seconds_to_gap']:.2f} s"
        speedup = "-" if row["rgd_qr_over_this"] is None else f"{row['rgd_qr_over_this']:.1f}x"
        lines.append(f"  {row['impl']:<40} {reached:>12}  steps {row['steps']:>6}  {row['ms_per_step']:8.3f} ms/step"
                     f"  final gap {row['final_gap']:.1e}  |XtX-I| {row['distance_to_manifold']:.0e}"
                     f"  RGD-QR/this {speedup}")
    return lines


def format_step_table(result: dict) -> str:
    lines = [f"Stiefel steps on {result['device']} ({result['device_name']}), torch {torch.__version__}"
             f"{', --quick sizes' if result['quick'] else ''}; fp32"]
    if result["geoopt_missing"]:
        lines.append(f"geoopt: not available ({result['geoopt_missing']}); its rows are missing")
    lines.append("")
    lines.append(f"{'size':<12} {'impl':<36} {'ms/step':>10} {'x op':>8} {'geoopt/this':>12}")
    for row in result["step_rows"]:
        geo = "-" if row["geoopt_cayley_over_this"] is None else f"{row['geoopt_cayley_over_this']:.1f}x"
        lines.append(f"{row['size']:<12} {row['impl']:<36} {row['median_ms']:>10.3f} "
                     f"{row['this_over_ours_op']:>7.1f}x {geo:>12}")
    lines.append("x op: this time / the fused op's time; geoopt/this: geoopt Stiefel (cayley) time / this time. "
                 "ms/step: the median of interleaved single steps, or for 'loop mean' the mean of "
                 f"{LOOP_STEPS} steps back to back (RSDM's default re-orthonormalization included).")
    return "\n".join(lines)


def format_tables(result: dict) -> str:
    lines = [format_step_table(result), ""]
    lines += _format_gap_rows("PCA", result["gap_rows"])
    lines.append("")
    lines += _format_gap_rows("Procrustes", result["procrustes_gap_rows"])
    lines.append("lr: every method but Adam uses the same lr (PCA 2/lambda_max, Procrustes 1/sigma_max(A^T B)); "
                 "Adam lr/100. The RSDM-P variants draw the same rows.")
    lines.append("")
    lines.append(f"orthogonal MLP on {result['dl_rows'][0]['dataset'] if result['dl_rows'] else '-'}, "
                 f"{result['dl_rows'][0]['epochs'] if result['dl_rows'] else 0} epochs, batch 64:")
    for row in result["dl_rows"]:
        lines.append(f"  {row['impl']:<36} test acc {100 * row['test_accuracy']:5.1f}%  train acc "
                     f"{100 * row['train_accuracy']:5.1f}%  {row['train_s']:6.2f} s  |WtW-I| "
                     f"{row['distance_to_manifold']:.0e}  ({row['settings']})")
    if result["plot"]:
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)


def format_full(result: dict) -> str:
    rows = result["gap_rows"]
    lines = [f"Stiefel --full on {result['device']} ({result['device_name']}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s); fp32, gap in float64 at the re-projected point polar(X)"]
    lines += _format_gap_rows("PCA (RSDM paper size)", rows)
    lines.append(f"lr = 2/lambda_max = {rows[0]['lr']:g} for every method; 'not reached': the {GAP_TARGET:g} gap "
                 f"was not reached within {rows[0]['budget_s']:.0f} s of steps (final gap shown).")
    return "\n".join(lines)


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out", headline: bool = False,
        full: bool = False) -> dict:
    device = torch.device(device)
    if full:
        result = {"device": str(device), "device_name": device_name(device), "quick": quick, "full": True,
                  "compiled_kernel": optim.has_kernel("rsdm_step_", device), "gap_rows": full_pca_rows(device)}
        print(format_full(result))
        return result
    step_rows, geoopt_error = step_time_rows(device, quick, headline)
    if headline:
        result = {"device": str(device), "device_name": device_name(device), "quick": quick,
                  "compiled_kernel": optim.has_kernel("rsdm_step_", device), "geoopt_missing": geoopt_error,
                  "step_rows": step_rows}
        print(format_step_table(result))
        return result
    gap_rows = time_to_gap(device, quick, "pca")
    procrustes_gap_rows = time_to_gap(device, quick, "procrustes")
    dl_rows = deep_learning_rows(device, quick)
    os.makedirs(out_dir, exist_ok=True)
    plot = _plot([("PCA", gap_rows), ("Procrustes", procrustes_gap_rows)], os.path.join(out_dir, "stiefel_gap.png"))
    result = {
        "device": str(device),
        "device_name": device_name(device),
        "quick": quick,
        "compiled_kernel": optim.has_kernel("rsdm_step_", device),
        "geoopt_missing": geoopt_error,
        "step_rows": step_rows,
        "gap_rows": gap_rows,
        "procrustes_gap_rows": procrustes_gap_rows,
        "dl_rows": dl_rows,
        "plot": plot,
    }
    print(format_tables(result))
    return result
