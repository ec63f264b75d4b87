"""Hessian-vector products: time and peak memory relative to one gradient, per mode, one probe and k probes.

For each model (an MLP and a GPT-2-shaped transformer with math attention, :mod:`benchmarks._models`) and one batch,
in one process:

* ``gradient``: ``torch.autograd.grad`` of the loss (forward + backward), the unit of every ratio;
* ``rr`` / ``fr`` / ``fd``: ``optim.hvp(f, params, v, mode=...)`` with PyTorch's ``F.cross_entropy``. ``rr`` with one
  probe is what ``torch.autograd.functional.hvp``-style double backward costs; ``fr`` is ``torch.func``'s
  forward-over-reverse; ``fd`` is the central difference of two gradients;
* ``fused``: ``mode="rr"`` with ``optim.hessian.cross_entropy``, whose second derivative is the fused kernel
  ``optim::cross_entropy_hvp`` instead of the autograd graph of softmax + log + gather.

* ``cl-hvp`` / ``cl-ggn`` (curvlinops-for-pytorch 3, optional): ``HessianLinearOperator(...) @ V`` and
  ``GGNLinearOperator(...) @ V`` on a flat ``(n, k)`` block, the peer that vmaps forward-over-reverse over the probes
  (compare ``cl-ggn`` with ``ggn-fresh``: both rebuild the forward at each call). On the GPT its HVP is 1e-3 off
  the Hessian's, in the LayerNorm weights' rows (float64 check against finite differences: RESULTS.md);
* ``ggn``: ``optim.GGNOperator(model, optim.hessian.cross_entropy, batch, reuse_graph=True) @ v``, the
  Gauss-Newton product ``Jᵀ H_loss J v`` on the kept forward (built in the untimed first call, as Lanczos or
  Hutchinson reuse it: every further product is the double-backward JVP, the fused ``cross_entropy_hvp`` and one
  VJP, plus the operator's freshness check of the parameters and batch); ``ggn-fresh`` rebuilds the forward every
  call (``reuse_graph=False``; left out of the headline set). Target: ``ggn`` ≤ 1.5 x a gradient per probe. Its ``rel err`` column is empty: it
  is another matrix than the Hessian.

Then the loss's own second derivative alone, ``optim::cross_entropy_hvp`` (the fused kernel: the product of the
softmax cross-entropy Hessian ``scale·(diag(p) − p pᵀ)`` with a tangent, row by row, for logits (N, V)) against what
eager PyTorch users run for it: the double backward through ``F.cross_entropy`` (``grad`` with ``create_graph`` then
a vector-Jacobian product of the gradient), and the formula ``p ⊙ (u − ⟨p, u⟩)`` in eager ops. Time and peak memory
(CUDA) at N = 16384, V = 50304 (GPT-2's vocabulary), float32.

Headline set (``--gpu-headline``): the GPT case alone at GPT-2-small shapes with batch 4 (2048 tokens; a k = 8 call
is about half a second on an H200, so every mode fits in 45 s with 5 repeats; the two ``ggn`` rows, added since, are
about one k-probe call each more and not yet timed on a GPU) and the cross-entropy kernel at N = 16384, V = 50304; the
MLP case and the ``ggn-fresh`` rows are left out.

k = 1 and k = 8 probes per call (the k probes share one forward and first backward). ``x grad`` is the time per
probe divided by the gradient's time. Peak memory (CUDA only) is the largest allocation above what was allocated
before the call (model, batch and probes already there), divided by the gradient's. ``rel err`` is
``‖Hv − Hv_rr‖ / ‖Hv_rr‖`` against ``rr`` with PyTorch's loss on the same probes (the fused kernel agrees to
float32 rounding; ``fd`` to its documented tolerance).
"""

from __future__ import annotations

import gc

import torch

import optim
from optim.hessian.hvp import compile_seconds

from ._models import Case, fused_sequence_cross_entropy, gpt_case, run_cases, sequence_cross_entropy
from ._timing import device_name, synchronize, time_interleaved_ms

PROBE_COUNTS = (1, 8)


def peak_extra_bytes(fn, device: torch.device):
    """Run ``fn`` once; on CUDA also return the peak bytes allocated above the level before the call."""
    if device.type != "cuda":
        return fn(), None
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def _relative_error(result, reference) -> float:
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(result, reference))
    den = sum(float(b.double().pow(2).sum()) for b in reference)
    return (num / max(den, 1e-300)) ** 0.5


class SequenceCrossEntropy(torch.nn.Module):
    """:func:`sequence_cross_entropy` as the loss module curvlinops takes (it reads ``reduction``)."""

    reduction = "mean"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sequence_cross_entropy(logits, targets)


def curvlinops_operators(case: Case):
    """curvlinops 3's ``HessianLinearOperator`` and ``GGNLinearOperator`` of the case's loss on its one batch (the
    determinism check off: it runs the batch twice at construction), or None when curvlinops is not installed."""
    try:
        import curvlinops
    except ImportError:
        return None
    args = (case.model, SequenceCrossEntropy(), list(case.model.parameters()), [(case.inputs, case.targets)])
    return (curvlinops.HessianLinearOperator(*args, check_deterministic=False),
            curvlinops.GGNLinearOperator(*args, check_deterministic=False))


def _curvlinops_methods(case: Case, params, probes) -> dict:
    """curvlinops' products on the same probes: ``cl-hvp`` (its vmapped forward-over-reverse HVP, the forward rebuilt
    at every call) and ``cl-ggn`` (its vmapped JVP, loss Hessian and VJP, also at a fresh point). A (n, k) block
    in, a (n, k) block out; returned as our param-shaped lists for the error column."""
    operators = curvlinops_operators(case)
    if operators is None:
        return {}
    numels = [p.numel() for p in params]

    def as_block(v, k):
        return torch.cat([t.reshape(k, -1) for t in v], dim=1).T.contiguous() if k > 1 else \
            torch.cat([t.reshape(-1) for t in v])

    def as_list(out, k):
        if k == 1:
            return [piece.reshape(p.shape) for piece, p in zip(out.split(numels), params)]
        return [piece.T.reshape((k, *p.shape)) for piece, p in zip(out.split(numels, dim=0), params)]

    methods = {}
    for k in PROBE_COUNTS:
        block = as_block(probes[k], k)
        for name, operator in zip(("cl-hvp", "cl-ggn"), operators):
            methods[f"{name} k={k}"] = (lambda operator=operator, block=block, k=k: as_list(operator @ block, k), k)
    return methods


def _probes(params, k: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lead = () if k == 1 else (k,)
    return [torch.randn(lead + tuple(p.shape), generator=generator).to(p) for p in params]


def run_case(case: Case, device: torch.device, quick: bool, repeats: int | None = None,
             compiled_probe_counts: tuple[int, ...] = (), ggn_fresh: bool = True) -> list[dict]:
    params = [p.detach() for p in case.params]
    f_torch = case.loss_of_params(sequence_cross_entropy)
    f_fused = case.loss_of_params(fused_sequence_cross_entropy)

    def gradient():
        leaves = [p.requires_grad_() for p in (q.detach() for q in params)]
        return torch.autograd.grad(f_torch(*leaves), leaves)

    methods = {"gradient": (gradient, 1)}
    probes = {k: _probes(params, k, seed=k) for k in PROBE_COUNTS}
    for k in PROBE_COUNTS:
        v = probes[k]
        for mode in ("rr", "fr", "fd"):
            methods[f"{mode} k={k}"] = (lambda mode=mode, v=v: optim.hvp(f_torch, params, v, mode=mode), k)
        methods[f"fused k={k}"] = (lambda v=v: optim.hvp(f_fused, params, v, mode="rr"), k)
        if k in compiled_probe_counts:
            methods[f"compiled k={k}"] = (lambda v=v: optim.hvp(f_torch, params, v, compile=True), k)
    batch = (case.inputs, case.targets)
    ggn = optim.GGNOperator(case.model, optim.hessian.cross_entropy, batch, reuse_graph=True)
    ggn @ probes[1]  # builds the kept forward now: its memory is part of the level every peak is measured above
    fresh = optim.GGNOperator(case.model, optim.hessian.cross_entropy, batch, reuse_graph=False)
    for k in PROBE_COUNTS:
        v = probes[k]
        methods[f"ggn k={k}"] = (lambda v=v: ggn @ v, k)
        if ggn_fresh:
            methods[f"ggn-fresh k={k}"] = (lambda v=v: fresh @ v, k)

    methods.update(_curvlinops_methods(case, params, probes))

    # One untimed run each: the result (for the error column), the peak memory, and whether the method works here.
    outputs, peaks, failures = {}, {}, {}
    for name, (fn, _) in methods.items():
        try:
            outputs[name], peaks[name] = peak_extra_bytes(fn, device)
        except (RuntimeError, NotImplementedError) as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for name in list(outputs):
        if name != "gradient":
            outputs[name] = [t.detach() for t in outputs[name]]
    working = {name: fn for name, (fn, _) in methods.items() if name not in failures}
    if repeats is None:
        repeats = 3 if quick else 7
    timings = time_interleaved_ms(working, device, warmup=1 if quick else 2, repeats=repeats)

    grad_ms = timings["gradient"].median_ms
    grad_peak = peaks.get("gradient")
    rows = []
    for name, (_, k) in methods.items():
        method, _, probe_part = name.partition(" k=")
        row = {"model": case.name, "method": method, "probes": k}
        if name in failures:
            row["error"] = failures[name]
            rows.append(row)
            continue
        timing = timings[name]
        row.update(
            ms=timing.median_ms,
            ms_per_probe=timing.median_ms / k,
            x_gradient_per_probe=timing.median_ms / k / grad_ms,
            repeat_ms=timing.repeat_ms,
            peak_bytes=peaks[name],
            peak_x_gradient=(peaks[name] / grad_peak) if (peaks[name] is not None and grad_peak) else None,
        )
        reference = outputs.get(f"rr k={k}")
        if method not in ("gradient", "ggn", "ggn-fresh", "cl-ggn") and reference is not None:
            row["relative_error_vs_rr"] = _relative_error(outputs[name], reference)
        if method == "compiled":  # the untimed first call compiled it; the timed ones reuse it
            row["compile_seconds"] = compile_seconds(f_torch)
        rows.append(row)
    return rows


def cross_entropy_kernel_rows(device: torch.device, quick: bool) -> dict:
    rows_count, vocab = (1024, 8192) if quick else (16384, 50304)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows_count, vocab, generator=generator).to(device)
    tangent = torch.randn(rows_count, vocab, generator=generator).to(device)
    targets = torch.randint(0, vocab, (rows_count,), generator=generator).to(device)
    scale = 1.0 / rows_count

    def fused():
        return torch.ops.optim.cross_entropy_hvp(logits, tangent, scale)

    def double_backward():
        z = logits.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, targets), z, create_graph=True)
        (product,) = torch.autograd.grad(gradient, z, tangent)
        return product

    def eager_formula():
        p = torch.softmax(logits, dim=-1)
        return scale * p * (tangent - (p * tangent).sum(dim=-1, keepdim=True))

    methods = {"fused kernel": fused, "eager double backward": double_backward, "eager formula": eager_formula}
    outputs, peaks = {}, {}
    for name, fn in methods.items():
        outputs[name], peaks[name] = peak_extra_bytes(fn, device)
    reference = outputs["eager double backward"].double()
    timings = time_interleaved_ms(methods, device, warmup=1 if quick else 3, repeats=5 if quick else 15)
    base = timings["eager double backward"].median_ms
    rows = []
    for name in methods:
        error = float((outputs[name].double() - reference).norm() / reference.norm())
        rows.append({"method": name, "ms": timings[name].median_ms, "speedup_vs_double_backward": base / timings[name].median_ms,
                     "peak_bytes": peaks[name], "relative_error_vs_double_backward": error,
                     "repeat_ms": timings[name].repeat_ms})
    del logits, tangent, outputs
    return {"rows": rows_count, "vocab": vocab, "dtype": "float32", "methods": rows,
            "extension_kernel": optim.has_kernel("cross_entropy_hvp", device)}


def format_table(result: dict) -> str:
    lines = []
    for case in result["cases"]:
        lines.append(f"\n{case['description']}  ({case['numel'] / 1e6:.2f}M parameters)")
        lines.append(f"{'method':<11}{'k':>3}{'ms':>11}{'ms/probe':>11}{'x grad':>9}{'peak mem':>12}{'mem x grad':>12}"
                     f"{'rel err':>10}")
        for row in case["rows"]:
            if "error" in row:
                lines.append(f"{row['method']:<11}{row['probes']:>3}  failed: {row['error']}")
                continue
            peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f} MiB"
            ratio = "-" if row["peak_x_gradient"] is None else f"{row['peak_x_gradient']:.2f}"
            err = f"{row['relative_error_vs_rr']:.1e}" if "relative_error_vs_rr" in row else "-"
            lines.append(f"{row['method']:<11}{row['probes']:>3}{row['ms']:>11.2f}{row['ms_per_probe']:>11.2f}"
                         f"{row['x_gradient_per_probe']:>9.2f}{peak:>12}{ratio:>12}{err:>10}")
    kernel = result["cross_entropy_kernel"]
    lines.append(f"\ncross-entropy Hessian times a tangent, logits {kernel['rows']} x {kernel['vocab']} float32"
                 f" (compiled kernel: {kernel['extension_kernel']})")
    lines.append(f"{'method':<24}{'ms':>10}{'speedup':>10}{'peak mem':>12}{'rel err':>10}")
    for row in kernel["methods"]:
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f} MiB"
        lines.append(f"{row['method']:<24}{row['ms']:>10.3f}{row['speedup_vs_double_backward']:>9.2f}x{peak:>12}"
                     f"{row['relative_error_vs_double_backward']:>10.1e}")
    return "\n".join(lines)


HEADLINE_GPT_BATCH = 4


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out", headline: bool = False) -> dict:
    # compile=True: compiling takes a minute on a CPU and more than the headline set's 45 s anywhere, so --quick and
    # --gpu-headline leave it out; k probes run the one-probe product k times, so k = 1 is the row
    compiled = () if quick or headline else (1,)

    def one(case: Case, repeats: int | None = None) -> dict:
        return {"name": case.name, "description": case.description, "numel": case.numel,
                "rows": run_case(case, device, quick, repeats, compiled, ggn_fresh=not headline)}

    if headline:
        cases = [one(gpt_case(device, quick, batch=None if quick else HEADLINE_GPT_BATCH), repeats=3 if quick else 5)]
    else:
        cases = run_cases(device, quick, one)
    result = {
        "device_name": device_name(device),
        "extension_kernel": optim.has_kernel("cross_entropy_hvp", device),
        "conventions": {
            "x_gradient_per_probe": "median time of the call / k / median time of one gradient (forward + backward)",
            "peak_x_gradient": "CUDA peak bytes allocated above the level before the call, over the gradient's",
            "relative_error_vs_rr": "||Hv - Hv_rr|| / ||Hv_rr|| on the same probes, rr with F.cross_entropy",
        },
        "cases": cases,
        "cross_entropy_kernel": cross_entropy_kernel_rows(device, quick),
    }
    print(format_table(result))
    return result
