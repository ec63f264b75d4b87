"""Top Hessian eigenvalue, trace and spectral density of a model: ``optim`` vs PyHessian, hessian-eigenthings and
curvlinops, same model, same batch.

For each model of :mod:`benchmarks._models` (an MLP and a GPT-2-shaped transformer), one batch, in one process:

* **top eigenvalue** to a 1e-3 relative tolerance: ``optim.top_eigenvalues(H, k=1, tol=1e-3)`` (Lanczos with full
  reorthogonalization on ``optim.HessianOperator``) vs PyHessian's ``hessian(...).eigenvalues(tol=1e-3)`` (power
  iteration, stopping when two successive estimates differ by less than tol relative). Both are compared with a
  tight reference (Lanczos at tol=1e-8): ``rel err`` is what each actually achieved.
  hessian-eigenthings 1.0 (optional): its ``lanczos(HessianOperator(...), k=1, tol=1e-3, max_iter=100)`` (its
  default of 2k iterations is no race; not with ``--quick``, where the race below compares it) and its
  ``hutchinson`` trace with the same number of probes.
* **top eigenvalue to 1e-4** relative error (the race at matched accuracy): each method runs a ladder of
  settings from loose to tight until its error is at most 1e-4 — ours tol 1e-2 ... 1e-4; PyHessian tol 1e-3 ...
  1e-6 (maxIter 300); hessian-eigenthings max_iter 20 ... 300 (tol 1e-5): ``OURS_LADDER``, ``PYHESSIAN_LADDER``,
  ``EIGENTHINGS_LADDER``, five rungs each — and its row is the first rung
  that got there, or its last, marked ``reached: False`` (the peer's time is then a lower bound of its time to
  1e-4). curvlinops 3 (optional) has no eigensolver: its ``HessianLinearOperator(...).to_scipy()`` goes to SciPy's
  ``eigsh`` (ARPACK, tol 1e-2 ... 1e-6, ``CURVLINOPS_LADDER``). ``optim faster`` is the peer's time over ours.
* **trace** with the same number of Rademacher probes: ``optim.trace(H, num_probes=P)`` (probes in blocks of 32
  sharing one forward/backward) vs PyHessian's ``trace(maxIter=P, tol=-inf)`` (one probe per second backward, its
  stopping test disabled so both use P probes: with tol=0 it still stops at once when the running mean is
  negative, since it divides by the signed mean), and curvlinops' ``hutchinson_trace`` in chunks of
  ``CURVLINOPS_TRACE_CHUNK`` probes (one vmapped block each). ``std err`` is the estimate's standard error relative to it.
* **density** by stochastic Lanczos quadrature with one start vector and m steps: ``optim.spectral_density``
  vs PyHessian's ``density(iter=m, n_v=1)`` (which calls ``torch.eig``, removed in PyTorch 1.13: its row then
  reports the error).

Then a training run with ``optim.SharpnessMonitor`` (full-batch SGD on a small MLP, λ_max and the trace every few
steps against the stability limit 2/lr) and what the monitor costs as a share of the run. Plots in the output
folder: ``spectrum_density.png`` (our SLQ densities, one panel per model) and ``spectrum_sharpness.png``.

Times include building the operator (PyHessian's first backward with ``create_graph``). ``speedup`` is PyHessian's
time over ours in the same run. PyHessian (``pip install pyhessian``, optional) missing: its rows say so. Both run
in eval mode (PyHessian sets it; the models have no dropout or BatchNorm, so it is also their training function),
where ``optim.HessianOperator`` keeps the gradient's graph between products, as PyHessian does.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time

import torch

import optim

from ._models import Case, run_cases, sequence_cross_entropy
from ._plots import pyplot, save
from ._timing import device_name, synchronize

# The matched-accuracy race of the top eigenvalue: relative error to reach, and the iteration cap of the peers' rungs.
RACE_TARGET = 1e-4
RACE_MAX_ITER = 300
# The rungs of the race, loose to tight, about as fine for each method (a coarse ladder would hand its method the
# cost of the next rung up): our Lanczos's residual tolerance, PyHessian's change-of-estimate tolerance, and
# hessian-eigenthings' iteration count (its tolerance set below the target, so the count is what stops it).
OURS_LADDER = (1e-2, 5e-3, 2e-3, 1e-3, 1e-4)
PYHESSIAN_LADDER = (1e-3, 3e-4, 1e-4, 1e-5, 1e-6)
EIGENTHINGS_LADDER = (20, 30, 50, 100, RACE_MAX_ITER)
# curvlinops has no eigensolver of its own: its users hand ``H.to_scipy()`` to SciPy's ARPACK ``eigsh``, whose
# tolerance is relative to the eigenvalue.
CURVLINOPS_LADDER = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
# curvlinops' ``hutchinson_trace`` multiplies all its probes as one vmapped (n, P) block; at millions of
# parameters that is tens of GB, so the probes go in chunks of this many, averaged (what a user would do).
CURVLINOPS_TRACE_CHUNK = 10


def _eigenthings():
    try:
        import hessian_eigenthings
    except ImportError as error:  # reported, not faked
        return None, f"hessian-eigenthings is not installed ({error}); pip install hessian-eigenthings"
    return hessian_eigenthings, None


def _curvlinops_hessian(case: Case):
    """A maker of curvlinops 3's ``HessianLinearOperator`` on the case's batch (its vmapped forward-over-reverse
    product), or None when curvlinops is not installed (or does not import: installed with ``--no-deps`` and
    without the packages it imports, which the README lists)."""
    from .hvp import curvlinops_operators

    try:
        import curvlinops  # noqa: F401
    except ImportError:
        return None
    return lambda: curvlinops_operators(case)[0]


def _pyhessian():
    try:
        from pyhessian import hessian
    except ImportError as error:  # reported, not faked
        return None, f"pyhessian is not installed ({error}); pip install pyhessian"
    return hessian, None


@contextlib.contextmanager
def _counting_pyhessian_products():
    """Count PyHessian's Hessian-vector products (its module-level ``hessian_vector_product``) while in scope."""
    import importlib

    # importlib, not `import pyhessian.hessian`: the package re-exports its class under the submodule's name
    module = importlib.import_module("pyhessian.hessian")

    original, count = module.hessian_vector_product, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = counted
    try:
        yield count
    finally:
        module.hessian_vector_product = original


def _timed(fn, device: torch.device, repeats: int) -> tuple[object, float, list[float]]:
    """Run ``fn`` ``repeats`` times; the result of the last run and the median and all wall-clock seconds."""
    times, result = [], None
    for _ in range(repeats):
        gc.collect()
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return result, sorted(times)[len(times) // 2], times


def run_case(case: Case, device: torch.device, quick: bool, headline: bool = False) -> dict:
    model, batch = case.model, (case.inputs, case.targets)
    # PyHessian switches the model to eval mode; so do we (same function, and our operator then keeps the
    # gradient's graph between products, as PyHessian does).
    model.eval()
    probes = 32 if quick else 100
    steps = 30 if quick else 80
    repeats = 1 if quick or headline else 3  # headline: one timed run per method, to fit its budget
    pyhessian, missing = _pyhessian()

    def operator():
        return optim.HessianOperator(model, sequence_cross_entropy, batch)

    reference = optim.top_eigenvalues(operator(), k=1, tol=1e-8, max_iter=300).eigenvalues[0].item()
    rows = []

    def add(task, method, result_time, value, extra):
        rows.append({"task": task, "method": method, "seconds": result_time[1], "repeat_seconds": result_time[2],
                     "value": value, **extra})

    # Top eigenvalue. Our tol bounds the Ritz residual (the eigenvalue error is about its square over the gap),
    # PyHessian's the change of the estimate, so the same tol is not the same accuracy: ours also runs at the
    # looser tol=0.01, and the summary compares the fastest of ours that is at least as accurate as PyHessian.
    for tol, label in ((1e-3, "optim (Lanczos)"), (1e-2, "optim (Lanczos, tol=0.01)")):
        def ours_eig(tol=tol):
            H = operator()
            pair = optim.top_eigenvalues(H, k=1, tol=tol, seed=0)
            return pair.eigenvalues[0].item(), H.num_matvecs

        timed = _timed(ours_eig, device, repeats)
        (value, matvecs) = timed[0]
        add("top eigenvalue", label, timed, value,
            {"tol": tol, "hvps": matvecs, "relative_error": abs(value - reference) / abs(reference)})
    if pyhessian is not None:
        def theirs_eig():
            torch.manual_seed(0)
            # counted as it runs: a Python call per product, against milliseconds per product
            with _counting_pyhessian_products() as count:
                values, _ = pyhessian(model, sequence_cross_entropy, data=batch,
                                      cuda=device.type == "cuda").eigenvalues(maxIter=100, tol=1e-3, top_n=1)
            model.zero_grad(set_to_none=True)  # PyHessian leaves create_graph gradients in .grad
            return values[0], count[0]

        timed = _timed(theirs_eig, device, repeats)
        value, hvps = timed[0]
        add("top eigenvalue", "PyHessian (power)", timed, value,
            {"tol": 1e-3, "hvps": hvps, "relative_error": abs(value - reference) / abs(reference)})

    eigenthings, eigenthings_missing = _eigenthings()

    def eigenthings_operator():
        # a fresh operator per call, as ours, so the operator's set-up is timed on both sides
        return eigenthings.HessianOperator(model, [batch], eigenthings.supervised_loss(sequence_cross_entropy))

    if eigenthings is not None and not quick:
        # Its Lanczos at tol=1e-3 and a max_iter set for the race (its default, 2k iterations, is no race); --quick
        # leaves it to the matched-accuracy race below (it ran all 100 iterations here, a sixth of the demo's
        # spectrum time).
        def eigenthings_eig():
            result = eigenthings.lanczos(eigenthings_operator(), k=1, tol=1e-3, max_iter=100, seed=0)
            return float(result.eigenvalues[0]), int(result.iterations)

        timed = _timed(eigenthings_eig, device, repeats)
        value, iterations = timed[0]
        add("top eigenvalue", "hessian-eigenthings (Lanczos)", timed, value,
            {"tol": 1e-3, "max_iter": 100, "hvps": iterations,
             "relative_error": abs(value - reference) / abs(reference)})

    # Top eigenvalue to TARGET relative error, the race at matched accuracy: each method runs a ladder of
    # tolerances from loose to tight and its row is the first rung that got there (timed as it ran), or its
    # tightest rung, marked as not reaching TARGET, whose time then bounds the peer's from below.
    def ours_at(tol):
        H = operator()
        value = optim.top_eigenvalues(H, k=1, tol=tol, seed=0).eigenvalues[0].item()
        return value, H.num_matvecs

    ladders = [("optim (Lanczos)", ours_at, OURS_LADDER, "tol")]
    if pyhessian is not None:
        def pyhessian_at(tol):
            torch.manual_seed(0)
            with _counting_pyhessian_products() as count:
                values, _ = pyhessian(model, sequence_cross_entropy, data=batch,
                                      cuda=device.type == "cuda").eigenvalues(maxIter=RACE_MAX_ITER, tol=tol, top_n=1)
            model.zero_grad(set_to_none=True)
            return values[0], count[0]

        ladders.append(("PyHessian (power)", pyhessian_at, PYHESSIAN_LADDER, "tol"))
    if eigenthings is not None:
        def eigenthings_at(max_iter):
            result = eigenthings.lanczos(eigenthings_operator(), k=1, tol=RACE_TARGET / 10, max_iter=max_iter,
                                         seed=0)
            return float(result.eigenvalues[0]), int(result.iterations)

        ladders.append(("hessian-eigenthings (Lanczos)", eigenthings_at, EIGENTHINGS_LADDER, "max_iter"))
    curvlinops_hessian = _curvlinops_hessian(case)
    if curvlinops_hessian is not None:
        def curvlinops_at(tol):
            import numpy
            from scipy.sparse.linalg import eigsh

            H = curvlinops_hessian()
            scipy_operator, count = H.to_scipy(), [0]
            matvec = scipy_operator.matvec

            def counted(x):
                count[0] += 1 if x.ndim == 1 or x.shape[-1] == 1 else x.shape[-1]
                return matvec(x)

            scipy_operator.matvec = counted
            start = numpy.random.default_rng(0).standard_normal(scipy_operator.shape[0]).astype(scipy_operator.dtype)
            values = eigsh(scipy_operator, k=1, which="LA", tol=tol, v0=start, maxiter=RACE_MAX_ITER,
                           return_eigenvectors=False)
            return float(values[0]), count[0]

        ladders.append(("curvlinops (SciPy eigsh)", curvlinops_at, CURVLINOPS_LADDER, "tol"))
    race_task = f"top eigenvalue to {RACE_TARGET:g}"
    for label, run_at, ladder, knob in ladders:
        for setting in ladder:
            timed = _timed(lambda: run_at(setting), device, 1)
            value, hvps = timed[0]
            error = abs(value - reference) / abs(reference)
            if error <= RACE_TARGET or setting == ladder[-1]:
                add(race_task, f"{label}, {knob} {setting:g}", timed, value,
                    {knob: setting, "hvps": hvps, "relative_error": error, "reached": error <= RACE_TARGET})
                break

    # Trace.
    def ours_trace():
        estimate = optim.trace(operator(), num_probes=probes, seed=0)
        return estimate.estimate, estimate.std_error

    timed = _timed(ours_trace, device, repeats)
    value, std_error = timed[0]
    add("trace", f"optim (Hutchinson, {probes} probes)", timed, value,
        {"hvps": probes, "relative_std_error": std_error / abs(value)})
    if pyhessian is not None:
        def theirs_trace():
            torch.manual_seed(0)
            samples = pyhessian(model, sequence_cross_entropy, data=batch, cuda=device.type == "cuda").trace(
                maxIter=probes, tol=float("-inf"))
            model.zero_grad(set_to_none=True)
            return sum(samples) / len(samples), len(samples)

        timed = _timed(theirs_trace, device, repeats)
        value, count = timed[0]
        add("trace", f"PyHessian (Hutchinson, {count} probes)", timed, value, {"hvps": count})

    if eigenthings is not None:
        def eigenthings_trace():
            result = eigenthings.hutchinson(eigenthings_operator(), num_samples=probes, seed=0)
            return float(result.estimate)

        timed = _timed(eigenthings_trace, device, repeats)
        add("trace", f"hessian-eigenthings (Hutchinson, {probes} probes)", timed, timed[0], {"hvps": probes})

    if curvlinops_hessian is not None:
        def curvlinops_trace():
            import curvlinops

            torch.manual_seed(0)
            H, total, done = curvlinops_hessian(), 0.0, 0
            while done < probes:
                chunk = min(CURVLINOPS_TRACE_CHUNK, probes - done)
                total += float(curvlinops.hutchinson_trace(H, num_matvecs=chunk)) * chunk
                done += chunk
            return total / probes

        timed = _timed(curvlinops_trace, device, repeats)
        add("trace", f"curvlinops (Hutchinson, {probes} probes)", timed, timed[0], {"hvps": probes})

    # Spectral density, one start vector.
    def ours_density():
        return optim.spectral_density(operator(), num_runs=1, lanczos_steps=steps, seed=0)

    timed = _timed(ours_density, device, repeats)
    density = timed[0]
    add("density", f"optim (SLQ, {steps} steps)", timed, density.mean,
        {"hvps": steps, "value_is": "mean of the density"})
    if pyhessian is not None:
        def theirs_density():
            torch.manual_seed(0)
            eigen_list, weight_list = pyhessian(model, sequence_cross_entropy, data=batch,
                                                cuda=device.type == "cuda").density(iter=steps, n_v=1)
            model.zero_grad(set_to_none=True)
            return sum(e * w for e, w in zip(eigen_list[0], weight_list[0]))

        try:
            # PyHessian's density ends with torch.eig, removed from PyTorch in 1.13 (a stub that raises): asked
            # first, so that its Lanczos products are not run only to fail at the end
            torch.eig(torch.eye(1), eigenvectors=True)
            timed = _timed(theirs_density, device, repeats)
        except (RuntimeError, AttributeError) as error:
            model.zero_grad(set_to_none=True)
            rows.append({"task": "density", "method": f"PyHessian (SLQ, {steps} steps)",
                         "error": f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"})
        else:
            add("density", f"PyHessian (SLQ, {steps} steps)", timed, timed[0],
                {"hvps": steps, "value_is": "mean of the density"})

    # Ratios: each peer's time over ours, per task; for the top eigenvalue, over the fastest of ours that is at
    # least as accurate as that peer (the first of ours when none is).
    for task in ("top eigenvalue", race_task, "trace", "density"):
        task_rows = [row for row in rows if row["task"] == task and "error" not in row]
        ours_rows = [row for row in task_rows if row["method"].startswith("optim")]
        for row in task_rows:
            if row["method"].startswith("optim"):
                continue
            candidates = [ours for ours in ours_rows
                          if ours.get("relative_error", 0.0) <= row.get("relative_error", math.inf)
                          or (task == race_task and ours["reached"])]
            ours = min(candidates, key=lambda ours: ours["seconds"]) if candidates else ours_rows[0]
            row["speedup_of_optim"] = row["seconds"] / ours["seconds"]
            row["compared_with"] = ours["method"]
    return {"name": case.name, "description": case.description, "numel": case.numel,
            "reference_top_eigenvalue": reference, "pyhessian_missing": missing,
            "eigenthings_missing": eigenthings_missing, "rows": rows,
            "density": {"grid": density.grid.tolist(), "density": density.density.tolist()}}


def format_table(result: dict) -> str:
    lines = []
    for case in result["cases"]:
        lines.append(f"\n{case['description']}  ({case['numel'] / 1e6:.2f}M parameters); "
                     f"reference lambda_max = {case['reference_top_eigenvalue']:.6g}")
        for peer, key in (("PyHessian", "pyhessian_missing"), ("hessian-eigenthings", "eigenthings_missing")):
            if case.get(key):
                lines.append(f"  {peer} rows missing: {case[key]}")
        lines.append(f"{'task':<26}{'method':<44}{'seconds':>9}{'HVPs':>6}{'value':>13}{'accuracy':>16}"
                     f"{'optim faster':>14}")
        for row in case["rows"]:
            if "error" in row:
                lines.append(f"{row['task']:<26}{row['method']:<44} failed: {row['error']}")
                continue
            if "relative_error" in row:
                accuracy = f"err {row['relative_error']:.1e}" + ("" if row.get("reached", True) else " (not)")
            elif "relative_std_error" in row:
                accuracy = f"s.e. {100 * row['relative_std_error']:.2f}%"
            else:
                accuracy = "-"
            hvps = row.get("hvps", "-")
            speedup = f"{row['speedup_of_optim']:.2f}x" if "speedup_of_optim" in row else "-"
            lines.append(f"{row['task']:<26}{row['method']:<44}{row['seconds']:>9.3f}{hvps!s:>6}"
                         f"{row['value']:>13.5g}{accuracy:>16}{speedup:>14}")
    lines.append(f"\n(not): the method's tightest setting did not reach {RACE_TARGET:g}; its time is a lower bound.")
    return "\n".join(lines)


def sharpness_run(device: torch.device, quick: bool, out_dir: str) -> dict:
    """Full-batch gradient descent on a small MLP with ``optim.SharpnessMonitor``: λ_max and trace against 2/lr.

    Full-batch GD at a fixed lr typically sharpens until λ_max reaches the stability limit 2/lr, then hovers around
    or oscillates across it while the loss keeps falling non-monotonically (the edge of stability, Cohen et al.
    2021); the curves show what the monitor records in a training loop, and what it costs.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    width, samples, classes = (32, 256, 4) if quick else (256, 2048, 10)
    steps, every = (60, 5) if quick else (2000, 50)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh(), torch.nn.Linear(width, classes)).to(device)
    inputs = torch.randn(samples, width, generator=generator).to(device)
    targets = torch.randint(0, classes, (samples,), generator=generator).to(device)
    lr = 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = optim.SharpnessMonitor(model, torch.nn.functional.cross_entropy, every=every, lr_from=optimizer,
                                     probes=8 if quick else 32, lanczos_iters=30)
    losses, monitor_seconds = [], 0.0
    start = time.perf_counter()
    for step in range(steps + 1):
        synchronize(device)
        before = time.perf_counter()
        monitor.step(step, (inputs, targets))
        synchronize(device)
        monitor_seconds += time.perf_counter() - before
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):  # diverged (lr far above 2/λ_max): stop, and say so in the result
            break
        loss.backward()
        optimizer.step()
    total_seconds = time.perf_counter() - start
    png = os.path.join(out_dir, "spectrum_sharpness.png")
    try:
        monitor.plot(png)
    except ImportError as error:
        print(f"spectrum: no sharpness plot ({error})")
        png = None
    return {"model": f"MLP 3 layers, width {width}, tanh, {samples} samples, {classes} classes, full-batch SGD",
            "lr": lr, "stability_limit": 2 / lr, "steps": steps, "every": every, "records": monitor.records,
            "losses": losses, "diverged": not math.isfinite(losses[-1]),
            "monitor_share_of_time": monitor_seconds / total_seconds, "png": png}


def plot_densities(cases: list[dict], path: str) -> str | None:
    plt = pyplot("spectrum_density.png")
    if plt is None:
        return None
    figure, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 3.8), squeeze=False)
    for axis, case in zip(axes[0], cases):
        grid = torch.tensor(case["density"]["grid"], dtype=torch.float64)
        density = torch.tensor(case["density"]["density"], dtype=torch.float64)
        floor = max(density.max().item(), 1e-300) * 1e-12
        axis.semilogy(grid.numpy(), density.clamp(min=floor).numpy())
        axis.set_title(f"{case['description']}", fontsize=8)
        axis.set_xlabel("eigenvalue")
        axis.set_ylabel("density (SLQ, log scale)")
    return save(figure, path)


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out", headline: bool = False) -> dict:
    """``headline``: the estimator races against the peers only, one timed run each (no repeats, no density plot,
    no sharpness training run)."""
    cases = run_cases(device, quick, lambda case: run_case(case, device, quick, headline))
    result = {"device_name": device_name(device), "cases": cases,
              "conventions": {"seconds": "median wall-clock seconds of the whole call, operator construction included",
                              "optim faster": "PyHessian seconds / optim seconds, same run"}}
    print(format_table(result))
    if headline:
        return result
    result["density_png"] = plot_densities(cases, os.path.join(out_dir, "spectrum_density.png"))
    sharpness = sharpness_run(device, quick, out_dir)
    result["sharpness"] = sharpness
    last = sharpness["records"][-1]
    print(f"\nsharpness monitor, {sharpness['model']}, lr {sharpness['lr']}: lambda_max "
          f"{sharpness['records'][0]['lambda_max']:.3g} -> {last['lambda_max']:.3g} (limit 2/lr = "
          f"{sharpness['stability_limit']:.3g}), trace {last['trace']:.3g}; the monitor took "
          f"{100 * sharpness['monitor_share_of_time']:.0f}% of the run (every {sharpness['every']} steps)")
    for key in ("density_png",):
        if result[key]:
            print(f"plot: {result[key]}")
    if sharpness["png"]:
        print(f"plot: {sharpness['png']}")
    return result
