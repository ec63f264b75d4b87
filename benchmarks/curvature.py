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
* ``EmpiricalFisherOperator kept k=1``: on its kept state, ``Gᵀ(G v) / N`` from the kept per-sample gradients G
  (N × n) or two backwards on the kept forward in the outputs, as the operator measured at its build (``Fisher
  ways``); ``unkept k=1``: each product anew (``reuse_graph=False``), the faster of one forward in the outputs
  and the per-sample gradients as the operator measured on its first product; ``curvlinops EF k=1``:
  curvlinops 3's ``EFLinearOperator`` where it takes the criterion (``nn.CrossEntropyLoss`` on (N, C) logits: the
  MLP) and is installed;
* ``optim.hvp compile=True k=1``, ``GGNOperator compile=True k=1``, ``EmpiricalFisherOperator compile=True k=1``:
  the compiled products (their first calls, compilation included, are untimed and reported as ``compile s``).

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
    fisher = optim.EmpiricalFisherOperator(case.model, sequence_cross_entropy, batch)
    unkept_fisher = optim.EmpiricalFisherOperator(case.model, sequence_cross_entropy, batch, reuse_graph=False)
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
        "EmpiricalFisherOperator kept k=1": (lambda: fisher @ flat1, 1),
        "EmpiricalFisherOperator unkept k=1": (lambda: unkept_fisher @ flat1, 1),
    }
    peer_fisher = _curvlinops_fisher(case)
    if peer_fisher is not None:
        methods["curvlinops EF k=1"] = (lambda: peer_fisher @ flat1, 1)
    compile_s = {}
    if compile:
        compiled = {"optim.hvp compile=True k=1": lambda: optim.hvp(f, params, v1, compile=True)}
        for name, cls, criterion in (("GGNOperator", optim.GGNOperator, optim.hessian.cross_entropy),
                                     ("EmpiricalFisherOperator", optim.EmpiricalFisherOperator,
                                      sequence_cross_entropy)):
            operator = cls(case.model, criterion, batch, compile=True)
            compiled[f"{name} compile=True k=1"] = lambda operator=operator: operator @ flat1
        for name, fn in compiled.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            compile_s[name] = time.perf_counter() - start
            methods[name] = (fn, 1)
    for fn, _ in methods.values():
        fn()  # warm; the k-probe blocks measure vmap against the loop, the unkept Fisher its way, on this call
    if peer_fisher is not None:
        ours = fisher @ flat1
        peer_error = float((peer_fisher @ flat1 - ours).norm() / ours.norm())
    timings = time_interleaved_ms({name: fn for name, (fn, _) in methods.items()}, device, warmup=1,
                                  repeats=3 if quick else 5)
    base = timings["gradient"].median_ms
    rows = [{"model": case.name, "method": name, "probes": k, "ms": timings[name].median_ms,
             "x_gradient_per_probe": timings[name].median_ms / k / base, "repeat_ms": timings[name].repeat_ms}
            for name, (_, k) in methods.items()]
    return {"name": case.name, "description": case.description, "numel": case.numel, "rows": rows,
            "compile_seconds": compile_s.get("optim.hvp compile=True k=1"), "compile_seconds_by_method": compile_s,
            "batching": {"optim.hvp": batching_choice(f, PROBES),
                         "HessianOperator": batching_choice(case.model, PROBES)},
            "kept_fisher_way": fisher.last_path, "unkept_fisher_way": unkept_fisher.last_path,
            "curvlinops_ef_relative_error": peer_error if peer_fisher is not None else None}


def _curvlinops_fisher(case: Case):
    """curvlinops 3's ``EFLinearOperator`` of the case's batch, where its criterion is one curvlinops takes
    (``nn.CrossEntropyLoss`` on (N, C) logits), else None (also when curvlinops is not installed)."""
    try:
        import curvlinops
    except ImportError:
        return None
    if case.targets.dim() != 1:  # sequence targets: curvlinops' EF reads each token as a sample, not each row
        return None
    return curvlinops.EFLinearOperator(case.model, torch.nn.CrossEntropyLoss(), list(case.model.parameters()),
                                       [(case.inputs, case.targets)], check_deterministic=False)


def format_table(result: dict) -> str:
    lines = [f"Curvature products on {result['device']} ({result['device_name']}), {result['threads']} threads, "
             f"torch {torch.__version__}{', --quick sizes' if result['quick'] else ''}"]
    for case in result["cases"]:
        compile_s = case.get("compile_seconds_by_method") or {}
        peer_error = case.get("curvlinops_ef_relative_error")
        lines += ["", f"{case['description']} ({case['numel'] / 1e6:.1f}M params); k={PROBES} blocks run: "
                  f"{case['batching']}; Fisher ways: {case['kept_fisher_way']}, unkept {case['unkept_fisher_way']}"
                  + (f"; curvlinops EF vs ours: relative error {peer_error:.1e}" if peer_error is not None else ""),
                  f"{'method':<40}{'ms':>11}{'x grad per probe':>18}{'compile s':>11}"]
        for row in case["rows"]:
            compiled = f"{compile_s[row['method']]:>11.1f}" if row["method"] in compile_s else ""
            lines.append(f"{row['method']:<40}{row['ms']:>11.1f}{row['x_gradient_per_probe']:>18.2f}{compiled}")
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
