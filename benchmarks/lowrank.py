"""Low-rank pre-training: the refactorization op vs the dense SVD route, and a LLaMA-style model trained with
full-rank AdamW, low-rank (plain), low-rank + refactorization/momentum reset/LR recovery, and GaLore.

Part 1 (``refactorize``): for the layer shapes of a LLaMA model, all layers of one shape in one call, times
``optim::lowrank_refactorize_`` (QR of both factors, r×r SVD, fused rescale-and-store), the same math through its
plain-PyTorch reference (unfused), and the dense route (form W = B·A, SVD of the m×n matrix, keep r triplets). Each
row also gives the relative error of the product after the call, ‖B'A' − BA‖/‖BA‖.

Part 2 (``train``): one LLaMA-style decoder (RMSNorm, rotary attention, SwiGLU; GaLore's 60M configuration: hidden
512, FFN 1376, 8 heads, 8 layers, vocab 32000, seq 256, rank 128; with --quick a tiny one: hidden 128, FFN 344,
4 heads, 2 layers, vocab 4096, seq 128, rank 32) trained for a few steps by each
method on the same token batches from the same initial weights (seed 0). Data: the English text of the Python
standard library's ``pydoc_data.topics`` (the help pages of the Python documentation, shipped with every Python),
byte-level tokens (ids < 256 of the 32000-token vocabulary), 90%/10% train/validation split, prepared once and cached
(``$OPTIM_CACHE`` or ~/.cache/optim). Reported: tokens/s of the median step (the first step, which allocates the
optimizer state, is not timed; the mean over all timed steps is in the JSON), validation perplexity after training
(a few steps: a smoke figure, not a converged result), ``optim.lowrank.memory_report`` (weights / gradients /
optimizer state) and, on CUDA, peak allocated memory; for the refactorizing run, the share of the training time
spent refactorizing. A loss-curve PNG goes to the
output folder (``--out``). GaLore (``galore_torch``) imports ``transformers`` and ``bitsandbytes`` at import time;
when they are missing, empty stand-ins are put in ``sys.modules`` for that import only; if it still fails the peer
is reported missing.
"""

from __future__ import annotations

import gc
import importlib
import math
import os
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import optim
from optim.lowrank import memory_report

from ._text import (  # noqa: F401 - re-exported: the model and the data live in _text.py (shared with sophia.py)
    MLP, Attention, Block, Llama, LlamaConfig, RMSNorm, cache_dir, corpus, make_batches, rotate)
from ._plots import pyplot, save
from ._timing import device_name, synchronize, time_interleaved_ms

MIB = 1 << 20


# ------------------------------------------------------------------------------------------------------ model

# LLaMA shapes; the model itself is benchmarks/_text.py's Llama (SDPA attention here: no double backward needed).
CONFIGS = {
    "60M": LlamaConfig("60M", hidden=512, ffn=1376, heads=8, layers=8, rank=128),
    "1B": LlamaConfig("1B", hidden=2048, ffn=5461, heads=32, layers=24, rank=512),
    # --quick: a 4096-token vocabulary so that the factored projections, not the head, dominate a step
    "tiny": LlamaConfig("tiny", hidden=128, ffn=344, heads=4, layers=2, vocab=4096, seq=128, rank=32),
}


# ------------------------------------------------------------------------------------------------ peers / ours


def import_galore():
    """galore_torch.GaLoreAdamW, with empty stand-ins for transformers/bitsandbytes if they are not installed."""
    stubs = {}
    if importlib.util.find_spec("transformers") is None:
        versions = types.ModuleType("transformers.utils.versions")
        versions.require_version = lambda *args, **kwargs: None
        utils = types.ModuleType("transformers.utils")
        utils.versions = versions
        root = types.ModuleType("transformers")
        root.utils = utils
        stubs.update({"transformers": root, "transformers.utils": utils, "transformers.utils.versions": versions})
    if importlib.util.find_spec("bitsandbytes") is None:
        optimizer = types.ModuleType("bitsandbytes.optim.optimizer")
        optimizer.Optimizer2State = type("Optimizer2State", (torch.optim.Optimizer,), {})
        optim_module = types.ModuleType("bitsandbytes.optim")
        optim_module.optimizer = optimizer
        root = types.ModuleType("bitsandbytes")
        root.optim = optim_module
        stubs.update({"bitsandbytes": root, "bitsandbytes.optim": optim_module,
                      "bitsandbytes.optim.optimizer": optimizer})
    sys.modules.update(stubs)
    try:
        return importlib.import_module("galore_torch").GaLoreAdamW, None
    except Exception as error:  # noqa: BLE001 - any import failure means the peer is missing
        return None, f"{type(error).__name__}: {error}"
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int
    every: int
    recovery_steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    galore_lr: float = 1e-2  # GaLore's published setting for LLaMA 60M (with scale 0.25)
    galore_scale: float = 0.25
    eval_batches: int = 4


def build(method: str, model: Llama, c: LlamaConfig, s: Schedule, galore_class):
    """(model, optimizer, refactorizer) for one method; the model is converted in place where needed."""
    if method == "full-rank AdamW":
        return model, optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay), None
    if method == "low-rank":
        optim.to_low_rank(model, c.rank)
        return model, optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay), None
    if method == "low-rank + refactor/reset":
        optimizer = optim.LowRankAdamW(model, lr=s.lr, weight_decay=s.weight_decay, rank=c.rank, every=s.every,
                                       reset="factors", recovery_steps=s.recovery_steps)
        return model, optimizer, optimizer.refactorizer
    if method == "GaLore":
        targets = {id(m.weight) for _, m in optim.lowrank.find_targets(model)}
        galore = [p for p in model.parameters() if id(p) in targets]
        rest = [p for p in model.parameters() if id(p) not in targets]
        groups = [{"params": rest},
                  {"params": galore, "rank": c.rank, "update_proj_gap": s.every, "scale": s.galore_scale,
                   "proj_type": "std"}]
        return model, galore_class(groups, lr=s.galore_lr, weight_decay=s.weight_decay), None
    raise ValueError(method)


METHODS = ("full-rank AdamW", "low-rank", "low-rank + refactor/reset", "GaLore")


def train_one(method, c: LlamaConfig, s: Schedule, train_batches, eval_batches, device, galore_class) -> dict:
    torch.manual_seed(0)
    model = Llama(c).to(device)
    model, optimizer, refactorizer = build(method, model, c, s, galore_class)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, report, step_seconds = [], None, []
    refactor_seconds_before = 0.0
    for step, batch in enumerate(train_batches):
        batch = batch.to(device)
        synchronize(device)
        start = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, c.vocab), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        if step == len(train_batches) - 1:
            report = memory_report(model, optimizer)  # with gradients still allocated
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step == 0:  # the first step allocates the optimizer state: not timed
            refactor_seconds_before = refactorizer.seconds if refactorizer else 0.0
        else:
            step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed_seconds = sum(step_seconds)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.eval()
    with torch.no_grad():
        eval_losses = [F.cross_entropy(model(b[:, :-1].to(device)).reshape(-1, c.vocab),
                                       b[:, 1:].to(device).reshape(-1)).item() for b in eval_batches]
    refactor_seconds = (refactorizer.seconds - refactor_seconds_before) if refactorizer else None
    row = {
        "config": c.name, "method": method, "steps": len(train_batches), "tokens_per_step": s.batch * c.seq,
        # the median step (robust to a busy machine); refactorization steps are a minority and priced separately
        "tokens_per_s": s.batch * c.seq / statistics.median(step_seconds) if step_seconds else None,
        "mean_tokens_per_s": s.batch * c.seq * len(step_seconds) / timed_seconds if timed_seconds else None,
        "final_train_loss": losses[-1], "val_perplexity": math.exp(sum(eval_losses) / len(eval_losses)),
        "losses": losses, "params": sum(p.numel() for p in model.parameters()),
        "memory": report.as_dict(), "peak_allocated_bytes": peak,
        "refactorizations": refactorizer.refactorizations if refactorizer else None,
        "refactor_share_of_time": refactor_seconds / timed_seconds if refactorizer and timed_seconds else None,
    }
    del model, optimizer, refactorizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------ refactorization op


def layer_shapes(c: LlamaConfig) -> list[tuple[int, int, int, int]]:
    """(layers, m, r, n) per distinct shape of a config's projections: q/k/v/o (4 per block), gate/up, down."""
    return [(4 * c.layers, c.hidden, c.rank, c.hidden), (2 * c.layers, c.ffn, c.rank, c.hidden),
            (c.layers, c.hidden, c.rank, c.ffn)]


@torch.no_grad()
def dense_route(B: list[torch.Tensor], A: list[torch.Tensor]) -> None:
    """The dense alternative: W = B·A (m×n), batched SVD of W, keep the top r triplets, split √Σ between them."""
    r = B[0].shape[1]
    W = torch.stack(B) @ torch.stack(A)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[:, :r].sqrt()
    for l in range(len(B)):
        B[l].copy_(U[l, :, :r] * root[l])
        A[l].copy_(root[l, :, None] * Vh[l, :r])


def time_refactorization(c: LlamaConfig, device: torch.device, quick: bool, repeats: int | None = None) -> list[dict]:
    rows = []
    reference = optim.lowrank._ops.lowrank_refactorize_reference
    for layers, m, r, n in layer_shapes(c):
        generator = torch.Generator(device=device).manual_seed(0)
        start_B = [torch.randn(m, r, device=device, generator=generator) / math.sqrt(r) for _ in range(layers)]
        start_A = [torch.randn(r, n, device=device, generator=generator) / math.sqrt(n) for _ in range(layers)]
        product = torch.stack(start_B).double() @ torch.stack(start_A).double()
        fns, errors = {}, {}
        for name, fn in (("optim op", torch.ops.optim.lowrank_refactorize_), ("reference (unfused)", reference),
                         ("dense SVD of W", dense_route)):
            B = [b.clone() for b in start_B]
            A = [a.clone() for a in start_A]
            fn(B, A)
            after = torch.stack(B).double() @ torch.stack(A).double()
            errors[name] = ((after - product).norm() / product.norm()).item()
            fns[name] = (lambda fn=fn, B=B, A=A: fn(B, A))
        timings = time_interleaved_ms(fns, device, warmup=1, repeats=repeats or (3 if quick else 7))
        ours = timings["optim op"].median_ms
        for name, timing in timings.items():
            rows.append({"config": c.name, "layers": layers, "m": m, "r": r, "n": n, "impl": name,
                         "median_ms": timing.median_ms, "repeat_ms": timing.repeat_ms,
                         "over_ours": None if name == "optim op" else timing.median_ms / ours,
                         "relative_product_error": errors[name]})
        del start_B, start_A, product, fns
    return rows


# ------------------------------------------------------------------------------------------------------ output


def format_tables(result: dict) -> str:
    lines = [f"Low-rank pre-training on {result['device']} ({result['device_name']}), torch {torch.__version__}"
             f"{', --quick sizes' if result['quick'] else ''}", "",
             "Refactorization of all layers of one shape (one call) vs the dense route:"]
    header = ("config", "layers x (m, r, n)", "impl", "ms", "x ours", "|B'A'-BA|/|BA|")
    body = [(row["config"], f"{row['layers']} x ({row['m']}, {row['r']}, {row['n']})", row["impl"],
             f"{row['median_ms']:.2f}", "-" if row["over_ours"] is None else f"{row['over_ours']:.1f}x",
             f"{row['relative_product_error']:.1e}") for row in result["refactorize_rows"]]
    lines += _render(header, body, left={0, 1, 2})
    lines += ["", "x ours: that implementation's time / the op's (> 1: the op is faster)."]
    if "schedule" in result:  # not in the --gpu-headline record, which has no training part
        lines += ["", format_training(result)]
    return "\n".join(lines)


def format_training(result: dict) -> str:
    lines = [f"Training ({result['data']}; {result['schedule']}):"]
    header = ("config", "method", "params", "tokens/s", "x AdamW", "val ppl", "weights", "grads", "state",
              "w+g+s", "peak", "refactor")
    body = []
    for row in result["train_rows"]:
        if "missing" in row:
            body.append((row["config"], row["method"], "missing: " + row["missing"][:60], *[""] * 9))
            continue
        memory = row["memory"]
        full = next((r for r in result["train_rows"] if r["config"] == row["config"]
                     and r["method"] == "full-rank AdamW"), None)
        speed = (row["tokens_per_s"] / full["tokens_per_s"]) if full and full.get("tokens_per_s") else None
        body.append((row["config"], row["method"], f"{row['params'] / 1e6:.1f}M",
                     "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.0f}",
                     "-" if speed is None else f"{speed:.2f}x", f"{row['val_perplexity']:.2f}",
                     *(f"{memory[k] / MIB:.1f}" for k in ("weights", "gradients", "optimizer_state", "total")),
                     "-" if row["peak_allocated_bytes"] is None else f"{row['peak_allocated_bytes'] / MIB:.0f}",
                     "-" if row["refactor_share_of_time"] is None else f"{100 * row['refactor_share_of_time']:.2f}%"))
    lines += _render(header, body, left={0, 1})
    lines += ["", "memory in MiB (optim.lowrank.memory_report: parameters, their .grad, optimizer.state tensors incl. "
              "GaLore's projectors); peak: torch.cuda.max_memory_allocated (not measured on CPU);",
              "refactor: share of the timed training time spent in Refactorizer (refactorization + reset). "
              "val ppl after a few steps is a smoke figure, not a converged comparison."]
    if result.get("png"):
        lines.append(f"loss curves: {result['png']}")
    return "\n".join(lines)


def _render(header, body, left):
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header))]

    def render(line):
        return "  ".join(str(cell).ljust(w) if i in left else str(cell).rjust(w)
                         for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
    return [render(header), render(tuple("-" * w for w in widths)), *(render(line) for line in body)]


def plot(rows: list[dict], path: str) -> str | None:
    plt = pyplot("lowrank_loss.png")
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for row in rows:
        if "losses" in row:
            axis.plot(range(1, len(row["losses"]) + 1), row["losses"], label=f"{row['config']} {row['method']}")
    axis.set_xlabel("step")
    axis.set_ylabel("train loss (byte-level cross-entropy)")
    axis.legend(fontsize=8)
    return save(figure, path)


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out", headline: bool = False,
        fsdp: int | None = None) -> dict:
    """``headline``: part 1 alone at the 1B model's layer shapes (``quick``: the tiny model's), 3 repeats.
    ``fsdp``: instead, LowRankAdamW on that many FSDP2 ranks against one process (``benchmarks/lowrank_fsdp.py``)."""
    device = torch.device(device)
    if fsdp:
        from .lowrank_fsdp import format_table as format_fsdp, run_fsdp

        result = run_fsdp(fsdp, device, quick)
        print(format_fsdp(result), flush=True)
        return {"fsdp": result}
    if headline:
        config = CONFIGS["tiny" if quick else "1B"]
        result = {"device": str(device), "device_name": device_name(device), "quick": quick,
                  "ours_compiled_kernel": optim.has_kernel("lowrank_refactorize_", device),
                  "configs": {config.name: asdict(config)},
                  "refactorize_rows": time_refactorization(config, device, quick, repeats=3)}
        print(format_tables(result), flush=True)
        return result
    if quick:
        op_config, train_configs = CONFIGS["tiny"], [CONFIGS["tiny"]]
        schedule = Schedule(steps=31, batch=4, every=10, recovery_steps=3)
    elif device.type == "cuda":
        op_config, train_configs = CONFIGS["1B"], [CONFIGS["60M"]]
        schedule = Schedule(steps=201, batch=16, every=50, recovery_steps=10)
    else:
        op_config, train_configs = CONFIGS["60M"], [CONFIGS["60M"]]
        schedule = Schedule(steps=21, batch=2, every=10, recovery_steps=3)
    refactorize_rows = time_refactorization(op_config, device, quick)
    if not quick and device.type == "cuda":
        refactorize_rows = time_refactorization(CONFIGS["60M"], device, quick) + refactorize_rows

    tokens, data = corpus()
    split = int(0.9 * tokens.numel())
    galore_class, galore_error = import_galore()
    train_rows = []
    for c in train_configs:
        train_batches = make_batches(tokens[:split], schedule.steps, schedule.batch, c.seq, seed=0)
        eval_batches = make_batches(tokens[split:], schedule.eval_batches, schedule.batch, c.seq, seed=1)
        for method in METHODS:
            if method == "GaLore" and galore_class is None:
                train_rows.append({"config": c.name, "method": method, "missing": galore_error})
                continue
            train_rows.append(train_one(method, c, schedule, train_batches, eval_batches, device, galore_class))
    if not quick and device.type == "cuda":
        # Memory at the 1B shape (the memory target): a few steps of each low-rank method and GaLore.
        c = CONFIGS["1B"]
        memory_schedule = Schedule(steps=3, batch=2, every=2, recovery_steps=1)
        train_batches = make_batches(tokens[:split], memory_schedule.steps, memory_schedule.batch, c.seq, seed=0)
        eval_batches = make_batches(tokens[split:], 1, memory_schedule.batch, c.seq, seed=1)
        for method in METHODS:
            if method == "GaLore" and galore_class is None:
                train_rows.append({"config": c.name, "method": method, "missing": galore_error})
                continue
            train_rows.append(train_one(method, c, memory_schedule, train_batches, eval_batches, device,
                                        galore_class))
    png = plot([r for r in train_rows if r["config"] != "1B"], os.path.join(out_dir, "lowrank_loss.png"))
    result = {
        "device": str(device), "device_name": device_name(device), "quick": quick,
        "ours_compiled_kernel": optim.has_kernel("lowrank_refactorize_", device),
        "data": data + f", {tokens.numel()} tokens, 90/10 train/validation split",
        "schedule": (f"{schedule.steps} steps of {schedule.batch} x seq tokens, AdamW lr {schedule.lr}, "
                     f"refactorize every {schedule.every} with {schedule.recovery_steps} recovery steps, "
                     f"GaLore lr {schedule.galore_lr} scale {schedule.galore_scale} gap {schedule.every}, "
                     "same init (seed 0) and batches; float32"),
        "configs": {c.name: asdict(c) for c in CONFIGS.values()},
        "galore": "galore_torch.GaLoreAdamW" if galore_class else f"missing ({galore_error})",
        "refactorize_rows": refactorize_rows, "train_rows": train_rows, "png": png,
    }
    print(format_tables(result), flush=True)
    return result
