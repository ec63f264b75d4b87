"""Hessian-vector products through attention: SDPA routed to optim's attention ops against eager attention.

A Hugging Face ``GPT2LMHeadModel`` at GPT-2-small shapes (d 768, 12 heads of 64) with L layers, one sequence of T
tokens, float32, eval mode; the vocabulary is cut to 1024 so that the LM head does not hide the attention (GPT-2's
50257 would add a (T, 50257) logit matrix and its products to both methods alike). One Hessian-vector product is
``optim.HessianOperator(model, causal_lm_loss, (ids, labels), reuse_graph=False) @ v``: a forward, a backward with
``create_graph=True`` and a second backward, every call rebuilt (no kept graph), for

* ``sdpa``: ``attn_implementation="sdpa"``; the operator's product runs inside ``optim.hessian.sdpa_curvature()``, so
  ``F.scaled_dot_product_attention`` is ``optim.hessian.scaled_dot_product_attention`` (O(T) memory: no T×T tensor
  kept, the double backward is the ``sdpa_backward_jvp`` / ``sdpa_forward_jvp`` ops);
* ``eager``: ``attn_implementation="eager"`` (the same weights): softmax attention in eager ops, whose
  double-backward graph keeps several (12, T, T) tensors per layer — what users had to switch to before.

Sizes: T = 1024, 2048, 4096 with 2 layers, and 1024 and 4096 with all 12 (``OPTIM_BENCH_ATTENTION_SIZES``, e.g.
``1024x2,4096x12``, picks others). Each (method, T, L) runs in its own child process under an address-space limit
(``OPTIM_BENCH_MEMORY_GB``, default 20: a 24 GB CPU machine), so that its peak memory is its own: the peak resident
set size during the products minus the resident size just before the first one (model, batch and probe built, and
one product on the first 32 tokens run, which loads every op's code). A child that runs out of memory is reported
as such. Time: the median of ``repeats`` products after one warm-up (none for 12 layers at T = 4096: minutes per
product), the children of the two methods alternating (sdpa, eager, sdpa, eager, ...) over ``rounds``. On CUDA the
peak is ``torch.cuda.max_memory_allocated`` above the level before the first product. ``OPTIM_BENCH_ATTENTION_ROUNDS``
sets ``rounds`` (default 1).

The products of the two methods agree (``rel err`` = ‖Hv_sdpa − Hv_eager‖ / ‖Hv_eager‖, on the same probe; float32
rounding) wherever both ran.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

HEADLINE = [(1024, 2), (2048, 2), (4096, 2), (1024, 12), (4096, 12)]
QUICK = [(256, 2)]  # one size: each child pays ~10 s of imports and model build (the demo's 3 minutes)
VOCAB = 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(method: str, tokens: int, layers: int, repeats: int, device: str, save: str | None) -> dict:
    """One (method, T, L) measurement in this process (run as ``python -m benchmarks.attention --child ...``)."""
    import transformers

    import optim
    from optim.hessian import causal_lm_loss

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=tokens, n_embd=768, n_layer=layers, n_head=12,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation=method)
    model = transformers.GPT2LMHeadModel(config).to(device).eval()
    ids = torch.randint(0, VOCAB, (1, tokens), device=device)
    operator = optim.HessianOperator(model, causal_lm_loss, (ids, ids.clone()), reuse_graph=False, mode="rr")
    v = torch.randn(operator.n, generator=torch.Generator().manual_seed(1)).to(device)
    dev = torch.device(device)
    # One product on 32 tokens first: it loads the code of every op (hundreds of MB of resident library pages that
    # would otherwise count as the first product's memory) at a negligible peak of its own.
    short = ids[:, :32]
    optim.HessianOperator(model, causal_lm_loss, (short, short.clone()), reuse_graph=False, mode="rr") @ v
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = _rss_bytes()
    times = []
    warmup = 0 if tokens * layers >= 4096 * 12 else 1  # minutes per product there: the short product warmed up
    try:
        for index in range(warmup + repeats):
            start = time.perf_counter()
            hv = operator @ v
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    except (RuntimeError, MemoryError) as error:
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        return {"error": f"out of memory ({type(error).__name__})"}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if save:
        torch.save(hv.cpu(), save)
    return {"ms": statistics.median(times), "repeat_ms": times, "peak_bytes": peak,
            "extension_kernel": optim.has_kernel("sdpa_forward", device)}


def _spawn(method, tokens, layers, repeats, device, limit_gb, save) -> dict:
    command = [sys.executable, "-m", "benchmarks.attention", "--child", method, str(tokens), str(layers), str(repeats),
               device, save or "-", str(limit_gb)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if done.returncode < 0 or "memory" in tail.lower():
            return {"error": f"out of memory (exit {done.returncode}: {tail[:120]})"}
        return {"error": f"failed (exit {done.returncode}): {tail[:200]}"}
    return json.loads(lines[-1])


def format_table(result: dict) -> str:
    lines = [f"\nHVP of a GPT-2-small-shaped model (d 768, 12 heads of 64, vocab {VOCAB}), one sequence, float32, "
             f"{result['device_name']}; memory limit {result['memory_limit_gb']} GB",
             f"{'T':>6}{'layers':>7}{'method':>8}{'ms':>12}{'peak MiB':>11}{'time ratio':>12}{'mem ratio':>11}"
             f"{'rel err':>10}"]
    for row in result["rows"]:
        for method in ("sdpa", "eager"):
            cell = row[method]
            if "error" in cell:
                lines.append(f"{row['tokens']:>6}{row['layers']:>7}{method:>8}  {cell['error']}")
                continue
            ratio = row.get("time_ratio") if method == "sdpa" else None
            mem = row.get("memory_ratio") if method == "sdpa" else None
            err = row.get("relative_error") if method == "sdpa" else None
            lines.append(f"{row['tokens']:>6}{row['layers']:>7}{method:>8}{cell['ms']:>12.0f}"
                         f"{cell['peak_bytes'] / 2**20:>11.0f}"
                         f"{'' if ratio is None else f'{ratio:.2f}x':>12}{'' if mem is None else f'{mem:.2f}x':>11}"
                         f"{'' if err is None else f'{err:.1e}':>10}")
    lines.append("time ratio, mem ratio: sdpa over eager (lower is better)")
    return "\n".join(lines)


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out", headline: bool = False,
        sizes=None, repeats: int | None = None, rounds: int = 1, limit_gb: float | None = None) -> dict:
    from ._timing import device_name

    if sizes is None and os.environ.get("OPTIM_BENCH_ATTENTION_SIZES"):  # e.g. "1024x2,4096x12": T x layers
        sizes = [tuple(int(n) for n in item.split("x"))
                 for item in os.environ["OPTIM_BENCH_ATTENTION_SIZES"].split(",")]
    sizes = sizes or (QUICK if quick else HEADLINE)
    rounds = int(os.environ.get("OPTIM_BENCH_ATTENTION_ROUNDS", rounds))
    repeats = repeats or (2 if quick else 1)
    limit_gb = limit_gb or float(os.environ.get("OPTIM_BENCH_MEMORY_GB", "20"))
    rows = []
    for tokens, layers in sizes:
        cells = {"sdpa": [], "eager": []}
        saves = {m: os.path.join(out_dir, f"attention_hv_{m}_{tokens}_{layers}.pt") for m in cells}
        for _ in range(rounds):
            for method in ("sdpa", "eager"):
                cell = _spawn(method, tokens, layers, repeats, str(device), limit_gb, saves[method])
                cells[method].append(cell)
                print(f"  T={tokens} layers={layers} {method}: {cell}", file=sys.stderr, flush=True)
        row = {"tokens": tokens, "layers": layers}
        for method, runs in cells.items():
            good = [c for c in runs if "error" not in c]
            row[method] = ({"ms": statistics.median(c["ms"] for c in good),
                            "repeat_ms": [t for c in good for t in c["repeat_ms"]],
                            "peak_bytes": max(c["peak_bytes"] for c in good),
                            "extension_kernel": good[0]["extension_kernel"]} if good else runs[-1])
        if "error" not in row["sdpa"] and "error" not in row["eager"]:
            row["time_ratio"] = row["sdpa"]["ms"] / row["eager"]["ms"]
            row["memory_ratio"] = row["sdpa"]["peak_bytes"] / max(1, row["eager"]["peak_bytes"])
            ours, theirs = torch.load(saves["sdpa"]), torch.load(saves["eager"])
            row["relative_error"] = float((ours - theirs).norm() / theirs.norm())
        for path in saves.values():
            if os.path.exists(path):
                os.remove(path)
        rows.append(row)
    result = {"device_name": device_name(device), "memory_limit_gb": limit_gb, "vocab": VOCAB, "repeats": repeats,
              "rounds": rounds, "rows": rows,
              "conventions": {"peak_bytes": "CPU: peak RSS during the products minus RSS before them (own process); "
                                            "CUDA: max_memory_allocated above the level before",
                              "time_ratio": "sdpa median ms / eager median ms",
                              "memory_ratio": "sdpa peak / eager peak"}}
    print(format_table(result))
    return result


def saved_graph(method: str, tokens: int, layers: int) -> dict:
    """The tensors the double-backward graph of one HVP keeps, by autograd node type (MiB, each storage counted
    once): the graph of ``∇L`` with ``create_graph=True`` on the benchmark's model, which the second backward
    walks. Node types of a Python ``autograd.Function`` (optim's attention ops, the routed cross-entropy) count
    their ``saved_tensors``. Run as ``python -m benchmarks.attention --graph T L`` (both methods, CPU)."""
    import collections

    import transformers

    import optim
    from optim.hessian import causal_lm_loss

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=tokens, n_embd=768, n_layer=layers, n_head=12,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation=method)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, VOCAB, (1, tokens))
    params = list(model.parameters())
    with optim.hessian.sdpa_curvature():
        grads = torch.autograd.grad(causal_lm_loss(model(ids), ids), params, create_graph=True)
    sizes, by_node, seen = {}, collections.Counter(), set()
    stack = [g.grad_fn for g in grads if g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        names = [n for n in dir(node) if n.startswith("_saved_")] + (["saved_tensors"] if hasattr(node, "saved_tensors") else [])
        for name in names:
            try:
                value = getattr(node, name)
            except RuntimeError:  # released, or not a tensor
                continue
            for tensor in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in sizes:
                        sizes[storage.data_ptr()] = storage.nbytes()
                        by_node[type(node).__name__] += storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return {"method": method, "tokens": tokens, "layers": layers, "total_mib": sum(sizes.values()) / 2**20,
            "by_node_mib": {name: size / 2**20 for name, size in by_node.most_common()}}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--graph":
        for method in ("sdpa", "eager"):
            graph = saved_graph(method, int(sys.argv[2]), int(sys.argv[3]))
            print(json.dumps(graph))
            print(f"{method}: {graph['total_mib']:.0f} MiB kept by the graph of the gradient", file=sys.stderr)
    elif len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, tokens, layers, repeats, device, save, limit_gb = sys.argv[2:9]
        limit = int(float(limit_gb) * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(_child(method, int(tokens), int(layers), int(repeats), device,
                                None if save == "-" else save)))
    else:
        print("run it as: python -m benchmarks attention", file=sys.stderr)
        sys.exit(2)
