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

Part 2, time to a 1e-6 relative optimality gap on PCA (maximize tr(XᵀAX), i.e. F = −½tr(XᵀAX), over St(n, p);
A = Q diag(10·logspace(−3, 0, n)) Qᵀ, the problem of the RSDM paper's script: n = 2000, p = 1500, r = 700; with
--quick n = 120, p = 60, r = 40 and the spectrum 10·logspace(−1, 0, n)). The gap (F(X̄) − F*)/|F*| is measured at the projected point X̄ = polar(X)
with F* from ``torch.linalg.eigh``, outside the timed region. RGD-QR computes G = −AX (O(n²p)); the RSDM variants
draw I first and compute only G_I = −A_I X (O(rnp)), which is the method's point. A PNG of gap vs time is written
when matplotlib is present.
"""

from __future__ import annotations

import math
import os
import time

import torch

import optim
from optim.stiefel import orthogonal_, project_to_manifold

from ._timing import device_name, synchronize, time_interleaved_ms

SIZES = [("4096x4096", (4096, 4096)), ("8192x512", (8192, 512)), ("16384x2048", (16384, 2048)),
         ("64x512x512", (64, 512, 512))]
# --quick: a CPU smoke run of a minute or so (full retractions of a 1024² matrix alone take seconds per step there).
QUICK_SIZES = [("512x512", (512, 512)), ("1024x128", (1024, 128)), ("8x128x128", (8, 128, 128))]
GAP_TARGET = 1e-6


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


def step_time_rows(device: torch.device, quick: bool) -> tuple[list[dict], str | None]:
    geoopt, geoopt_error = _geoopt()
    rank = 64 if quick else 128
    repeats, warmup = (5, 2) if quick else (20, 5)
    rows = []
    for label, shape in (QUICK_SIZES if quick else SIZES):
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
        ours = timings["ours: rsdm_step_ op"].median_ms
        geo = timings.get("geoopt Stiefel (cayley)")
        for name, timing in timings.items():
            rows.append({"size": label, "shape": list(shape), "rank": rank, "impl": name,
                         "median_ms": timing.median_ms, "repeat_ms": timing.repeat_ms,
                         "this_over_ours_op": timing.median_ms / ours,
                         "geoopt_cayley_over_this": None if geo is None else geo.median_ms / timing.median_ms})
        del fns, params
    return rows, geoopt_error


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


def time_to_gap(device: torch.device, quick: bool) -> list[dict]:
    # --quick: a smaller, better-conditioned spectrum (10·logspace(−1, 0, n)) so that a CPU run ends in seconds.
    n, p, r, low = (120, 60, 40, -1.0) if quick else (2000, 1500, 700, -3.0)
    budget_s = 8.0 if quick else 120.0
    a, best, x0 = pca_problem(n, p, device, low=low)
    lr = 2.0 / 10.0  # 2/λ_max: the largest step at which RGD-QR is still stable here, used by every method
    methods = {}

    x_rgd = x0.clone().requires_grad_()
    rgd = optim.RiemannianSGD([x_rgd], lr=lr, retraction="qr")

    def rgd_step():
        x_rgd.grad = -(a @ x_rgd.detach())
        rgd.step()

    methods["RGD-QR (optim.RiemannianSGD)"] = (rgd_step, x_rgd, 10)

    x_ours, g_ours = x0.clone(), torch.zeros_like(x0)
    rows_buffer = torch.empty(r, dtype=torch.int64, device=device)
    offset = [0]

    def rsdm_step():
        optim.stiefel._ops.rsdm_sample_rows_(rows_buffer, n, 1, offset[0])
        offset[0] += r
        g_ours[rows_buffer] = -(a[rows_buffer] @ x_ours)
        optim.stiefel._ops.rsdm_step_(x_ours, g_ours, rows_buffer, rank=r, seed=0, offset=0, lr=lr,
                                      core="qr", transport=False)

    methods["RSDM-P (optim, fused op)"] = (rsdm_step, x_ours, 10 * max(1, n // r))

    x_naive = x0.clone()

    def naive_step():
        idx = torch.randperm(n, device=device)[:r]
        x_rows = x_naive[idx]
        g_rows = -(a[idx] @ x_naive)
        m = g_rows @ x_rows.T
        q, rr = torch.linalg.qr(torch.eye(r, device=device) - (0.5 * lr) * (m - m.T))
        x_naive[idx] = (q * torch.sign(torch.diagonal(rr)).unsqueeze(0)) @ x_rows

    methods["RSDM-P (naive PyTorch)"] = (naive_step, x_naive, 10 * max(1, n // r))

    results = []
    for name, (step, x, check_every) in methods.items():
        elapsed, steps, trace = 0.0, 0, [(0.0, relative_gap(a, x.detach(), best))]
        reached = None
        while elapsed < budget_s:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(check_every):
                step()
            synchronize(device)
            elapsed += time.perf_counter() - start
            steps += check_every
            gap = relative_gap(a, x.detach(), best)
            trace.append((elapsed, gap))
            if gap <= GAP_TARGET:
                reached = elapsed
                break
        results.append({"impl": name, "n": n, "p": p, "rank": r, "spectrum": f"10*logspace({low:g}, 0, n)", "steps": steps, "seconds_to_gap": reached,
                        "final_gap": trace[-1][1], "budget_s": budget_s, "trace": trace})
    rgd_time = results[0]["seconds_to_gap"]
    for row in results:
        row["rgd_qr_over_this"] = (rgd_time / row["seconds_to_gap"]) if rgd_time and row["seconds_to_gap"] else None
    return results


def _plot(results: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:
        return f"no plot (matplotlib unavailable: {error})"
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in results:
        times, gaps = zip(*row["trace"])
        axis.semilogy(times, [max(g, 1e-16) for g in gaps], label=row["impl"])
    axis.axhline(GAP_TARGET, color="grey", linestyle=":")
    axis.set_xlabel("seconds (steps only)")
    axis.set_ylabel("relative gap at the projected point")
    axis.set_title(f"PCA n={results[0]['n']}, p={results[0]['p']}, r={results[0]['rank']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def format_tables(result: dict) -> str:
    lines = [f"Stiefel steps on {result['device']} ({result['device_name']}), torch {torch.__version__}"
             f"{', --quick sizes' if result['quick'] else ''}; fp32"]
    if result["geoopt_missing"]:
        lines.append(f"geoopt: not available ({result['geoopt_missing']}); its rows are missing")
    lines.append("")
    lines.append(f"{'size':<12} {'impl':<30} {'ms/step':>10} {'x op':>8} {'geoopt/this':>12}")
    for row in result["step_rows"]:
        geo = "-" if row["geoopt_cayley_over_this"] is None else f"{row['geoopt_cayley_over_this']:.1f}x"
        lines.append(f"{row['size']:<12} {row['impl']:<30} {row['median_ms']:>10.3f} "
                     f"{row['this_over_ours_op']:>7.1f}x {geo:>12}")
    lines.append("x op: this time / the fused op's time; geoopt/this: geoopt Stiefel (cayley) time / this time.")
    lines.append("")
    first = result["gap_rows"][0]
    lines.append(f"time to {GAP_TARGET:g} relative gap, PCA n={first['n']} p={first['p']} r={first['rank']} "
                 f"(budget {first['budget_s']:.0f} s each):")
    for row in result["gap_rows"]:
        reached = "not reached" if row["seconds_to_gap"] is None else f"{row['seconds_to_gap']:.2f} s"
        speedup = "-" if row["rgd_qr_over_this"] is None else f"{row['rgd_qr_over_this']:.1f}x"
        lines.append(f"  {row['impl']:<30} {reached:>12}  steps {row['steps']:>6}  final gap "
                     f"{row['final_gap']:.1e}  RGD-QR/this {speedup}")
    lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out") -> dict:
    device = torch.device(device)
    step_rows, geoopt_error = step_time_rows(device, quick)
    gap_rows = time_to_gap(device, quick)
    os.makedirs(out_dir, exist_ok=True)
    plot = _plot(gap_rows, os.path.join(out_dir, "stiefel_pca_gap.png"))
    result = {
        "device": str(device),
        "device_name": device_name(device),
        "quick": quick,
        "compiled_kernel": optim.has_kernel("rsdm_step_", device),
        "geoopt_missing": geoopt_error,
        "step_rows": step_rows,
        "gap_rows": gap_rows,
        "plot": plot,
    }
    print(format_tables(result))
    return result
