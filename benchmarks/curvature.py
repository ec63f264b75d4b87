"""Curvature products against what a user runs without the package: per-probe cost in gradients, one run.

For the MLP and the GPT of :mod:`benchmarks._models` (on a CPU without ``--quick``: 4.2M and 7.4M parameters), one
batch, eval mode, interleaved repeats; ``x grad`` is the median time per probe over the median time of one
gradient (forward + backward) in the same run:

* ``torch double backward k=1``: ``autograd.grad`` with ``create_graph``, then a vector-Jacobian product of the
  gradient (what ``torch.autograd.functional.hvp``-style code does) — the baseline of one product;
* ``plain loop k=8``: one forward and first backward, then 8 second backwards on the retained graph — the baseline
  of a block of probes;
* ``optim.hvp k=1`` / ``k=8``: the default mode; for k = 8 the second backwards run vmapped or looped, as measured
  on the first block (``batching`` column);
* ``HessianOperator kept k=8``: the operator keeping the gradient's graph between products (each block is the
  second backwards only);
* ``GGNOperator kept k=1`` / ``k=8``: ``Jᵀ H_loss J v`` on a kept forward;
* ``optim.hvp compile=True k=1``: the compiled forward-over-reverse product (its first call, compilation included,
  is untimed and reported as ``compile s``).

The targets these answer (issue 14): per probe at k = 8 <= 2.2x a gradient and never above the plain loop;
compiled k = 1 <= 0.8x torch's double backward; the GGN on a kept forward <= 1.5x a gradient.
"""

from __future__ import annotations

import time

import torch

import optim
from optim.hessian.hvp import batching_choice

from ._models import Case, gpt_case, mlp_case, sequence_cross_entropy
from ._timing import device_name, synchronize, time_interleaved_ms

PROBES = 8


def run_case(case: Case, device: torch.device, quick: bool, compile: bool) -> dict:
    case.model.eval()
    params = [p.detach() for p in case.params]
    f = case.loss_of_params(sequence_cross_entropy)
    generator = torch.Generator().manual_seed(0)
    v1 = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    vk = [torch.randn((PROBES, *p.shape), generator=generator).to(p) for p in params]
    batch = (case.inputs, case.targets)
    hessian = optim.HessianOperator(case.model, sequence_cross_entropy, batch)
    ggn = optim.GGNOperator(case.model, optim.hessian.cross_entropy, batch)
    flat1, flatk = hessian.flatten(v1), hessian.flatten(vk)

    def leaves():
        return [p.detach().requires_grad_() for p in params]

    def gradient():
        x = leaves()
        return torch.autograd.grad(f(*x), x)

    def double_backward():
        x = leaves()
        g = torch.autograd.grad(f(*x), x, create_graph=True)
        return torch.autograd.grad(g, x, v1)

    def plain_loop():
        x = leaves()
        g = torch.autograd.grad(f(*x), x, create_graph=True)
        return [torch.autograd.grad(g, x, [t[j] for t in vk], retain_graph=j < PROBES - 1) for j in range(PROBES)]

    methods = {  # name: (function, probes per call)
        "gradient": (gradient, 1),
        "torch double backward k=1": (double_backward, 1),
        f"plain loop k={PROBES}": (plain_loop, PROBES),
        "optim.hvp k=1": (lambda: optim.hvp(f, params, v1), 1),
        f"optim.hvp k={PROBES}": (lambda: optim.hvp(f, params, vk), PROBES),
        f"HessianOperator kept k={PROBES}": (lambda: hessian @ flatk, PROBES),
        "GGNOperator kept k=1": (lambda: ggn @ flat1, 1),
        f"GGNOperator kept k={PROBES}": (lambda: ggn @ flatk, PROBES),
    }
    compile_s = None
    if compile:
        synchronize(device)
        start = time.perf_counter()
        optim.hvp(f, params, v1, compile=True)
        synchronize(device)
        compile_s = time.perf_counter() - start
        methods["optim.hvp compile=True k=1"] = (lambda: optim.hvp(f, params, v1, compile=True), 1)
    for fn, _ in methods.values():
        fn()  # warm; the k-probe blocks measure vmap against the loop on this call
    timings = time_interleaved_ms({name: fn for name, (fn, _) in methods.items()}, device, warmup=1,
                                  repeats=3 if quick else 5)
    base = timings["gradient"].median_ms
    rows = [{"model": case.name, "method": name, "probes": k, "ms": timings[name].median_ms,
             "x_gradient_per_probe": timings[name].median_ms / k / base, "repeat_ms": timings[name].repeat_ms}
            for name, (_, k) in methods.items()]
    return {"name": case.name, "description": case.description, "numel": case.numel, "rows": rows,
            "compile_seconds": compile_s,
            "batching": {"optim.hvp": batching_choice(f, PROBES),
                         "HessianOperator": batching_choice(case.model, PROBES)}}


def format_table(result: dict) -> str:
    lines = [f"Curvature products on {result['device']} ({result['device_name']}), {result['threads']} threads, "
             f"torch {torch.__version__}{', --quick sizes' if result['quick'] else ''}"]
    for case in result["cases"]:
        lines += ["", f"{case['description']} ({case['numel'] / 1e6:.1f}M params); k={PROBES} blocks run: "
                  f"{case['batching']}" + (f"; compile {case['compile_seconds']:.0f} s" if case["compile_seconds"]
                                           else ""),
                  f"{'method':<32}{'ms':>11}{'x grad per probe':>18}"]
        for row in case["rows"]:
            lines.append(f"{row['method']:<32}{row['ms']:>11.1f}{row['x_gradient_per_probe']:>18.2f}")
    lines.append("\nx grad per probe: median ms of the call / probes / median ms of one gradient, same run.")
    return "\n".join(lines)


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out", headline: bool = False) -> dict:
    """``headline``: the table without the compiled row (compiling takes longer than a headline's 45 s)."""
    device = torch.device(device)
    compile = not quick and not headline  # compiling takes a minute on a CPU: not in a smoke run
    cases = [run_case(make(device, quick), device, quick, compile) for make in (mlp_case, gpt_case)]
    result = {"device": str(device), "device_name": device_name(device), "quick": quick,
              "threads": torch.get_num_threads(), "cases": cases}
    print(format_table(result), flush=True)
    return result
