"""One AdamW ``.step()``: ``optim.AdamW`` (default path: the fused kernel) vs ``torch.optim.AdamW`` fused and foreach.

Every implementation steps the same parameter shapes, starting values and gradients, in one process. Only
``.step()`` is timed: gradients are filled once with random values (never zeros, so no update degenerates) and reused
by every step. Before timing, each implementation runs ``CORRECTNESS_STEPS`` steps from the shared starting point and
its parameters are compared with ``torch.optim.AdamW(foreach=False, fused=False)`` (the single-tensor loop) run in
float32 from the same point, so the table also shows that the numbers agree.

Bandwidth is an explicit byte count divided by the median step time: per parameter element, the step reads p, g,
m, v and writes p, m, v, i.e. ``2·|p| + |g| + 2·|m| + 2·|v|`` bytes where ``|x|`` is x's element size (28 B for
float32 params with float32 moments; the one-element step counters are not counted). It is compared with the
device's measured ``dst.copy_(src)`` bandwidth from the same run.

Headline set (``--gpu-headline``): the whole benchmark at its default sizes; a GPT-2-small step moves 3.5 GB, about
a millisecond on an H200, so every implementation's correctness steps and repeats fit well inside 45 s.
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass
from typing import Callable

import torch

import optim

from ._timing import GB, cpu_last_level_cache_bytes, device_name, measure_copy_bandwidth, time_interleaved_ms

HYPERPARAMETERS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
CORRECTNESS_STEPS = 10
OUR_OP = "fused_adamw_"
# A row whose slowest repeat is this many times its fastest is flagged: something else was using the machine.
UNSTABLE_SPREAD = 2.0

BYTE_COUNT_CONVENTION = (
    "bytes per step = sum over parameters of numel * (2*size(p) + size(g) + 2*size(exp_avg) + 2*size(exp_avg_sq)): "
    "read p, g, m, v and write p, m, v; 28 B/param for float32 params with float32 moments; step counters not "
    "counted; GB = 1e9 bytes"
)
COPY_CONVENTION = "dst.copy_(src) of one float32 buffer: (bytes read + bytes written) / median time"


@dataclass(frozen=True)
class ParamSet:
    name: str
    description: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            count = 1
            for size in shape:
                count *= size
            total += count
        return total


def gpt2_shapes(n_layer: int = 12, vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768):
    """Parameter shapes of a GPT-2 model (Hugging Face layout: Conv1D weights are stored in x out)."""
    shapes = [(vocab_size, n_embd), (n_positions, n_embd)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (n_embd,), (n_embd,),  # ln_1 weight, bias
            (n_embd, 3 * n_embd), (3 * n_embd,),  # attn.c_attn weight, bias
            (n_embd, n_embd), (n_embd,),  # attn.c_proj weight, bias
            (n_embd,), (n_embd,),  # ln_2 weight, bias
            (n_embd, 4 * n_embd), (4 * n_embd,),  # mlp.c_fc weight, bias
            (4 * n_embd, n_embd), (n_embd,),  # mlp.c_proj weight, bias
        ]
    shapes += [(n_embd,), (n_embd,)]  # ln_f weight, bias
    return tuple(shapes)


def many_small_shapes(count: int, smallest: int, largest: int, seed: int = 0):
    """``count`` vectors with sizes drawn uniformly from [smallest, largest]: a step dominated by per-tensor cost."""
    rng = random.Random(seed)
    return tuple((rng.randint(smallest, largest),) for _ in range(count))


def param_sets(quick: bool) -> list[ParamSet]:
    if quick:
        # Scaled down so the whole --quick run (correctness steps included) takes seconds on a 2-core CPU.
        gpt2 = ParamSet("gpt2-2L-v8192", "GPT-2 small shapes scaled down to 2 layers and an 8192-token vocabulary",
                        gpt2_shapes(n_layer=2, vocab_size=8192))
        small = ParamSet("many-small", "1000 vectors of 256..4096 elements", many_small_shapes(1000, 256, 4096))
    else:
        gpt2 = ParamSet("gpt2-small", "GPT-2 small (124M): wte, wpe, 12 layers, ln_f", gpt2_shapes())
        small = ParamSet("many-small", "2000 vectors of 256..4096 elements", many_small_shapes(2000, 256, 4096))
    return [gpt2, small]


@dataclass(frozen=True)
class Implementation:
    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]


OURS = Implementation("optim.AdamW", lambda params: optim.AdamW(params, **HYPERPARAMETERS))
PEERS = (
    Implementation("torch fused", lambda params: torch.optim.AdamW(params, fused=True, **HYPERPARAMETERS)),
    Implementation("torch foreach", lambda params: torch.optim.AdamW(params, foreach=True, **HYPERPARAMETERS)),
)
REFERENCE = Implementation(
    "torch single-tensor",
    lambda params: torch.optim.AdamW(params, foreach=False, fused=False, **HYPERPARAMETERS),
)


@dataclass(frozen=True)
class Settings:
    warmup: int
    repeats: int
    min_repeat_ms: float  # short steps are repeated back to back inside one timed repeat
    copy_nbytes: int


def settings_for(device: torch.device, quick: bool) -> Settings:
    if device.type == "cuda":
        if quick:
            return Settings(warmup=3, repeats=10, min_repeat_ms=5.0, copy_nbytes=256 << 20)
        return Settings(warmup=10, repeats=30, min_repeat_ms=20.0, copy_nbytes=1 << 30)
    # The copy buffer must be well beyond the last-level cache (hundreds of MiB on server CPUs), or the copy
    # figure is the cache's bandwidth rather than memory's.
    cache = cpu_last_level_cache_bytes() or 0
    copy_nbytes = min(max(256 << 20, 2 * cache), 2 << 30)
    if quick:
        return Settings(warmup=2, repeats=10, min_repeat_ms=0.0, copy_nbytes=copy_nbytes)
    return Settings(warmup=2, repeats=15, min_repeat_ms=0.0, copy_nbytes=copy_nbytes)


def make_inputs(param_set: ParamSet, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Starting parameters and gradients shared by every implementation (standard normal gradients, never zero)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = [(0.02 * torch.randn(shape, generator=generator, device=device)).to(dtype) for shape in param_set.shapes]
    grads = [torch.randn(shape, generator=generator, device=device).to(dtype) for shape in param_set.shapes]
    return params, grads


def build(implementation: Implementation, initial_params, grads, dtype: torch.dtype):
    """Fresh parameters (copies of ``initial_params`` in ``dtype``) with ``grads`` attached, and the optimizer."""
    params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in initial_params]
    for param, grad in zip(params, grads):
        # The gradient tensors are shared between implementations: an AdamW step (maximize=False) only reads them.
        param.grad = grad if grad.dtype == dtype else grad.to(dtype)
    return params, implementation.make(params)


def bytes_per_step(optimizer: torch.optim.Optimizer, params) -> int:
    total = 0
    for p in params:
        state = optimizer.state[p]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        total += p.numel() * (2 * p.element_size() + p.grad.element_size() + 2 * m.element_size()
                              + 2 * v.element_size())
    return total


def max_abs_difference(params, reference) -> float:
    with torch.no_grad():
        per_tensor = [(p.float() - r).abs().max() for p, r in zip(params, reference)]
    return torch.stack(per_tensor).max().item()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(param_set: ParamSet, dtype: torch.dtype, device: torch.device, settings: Settings,
             copy_gb_per_s: float) -> list[dict]:
    initial_params, grads = make_inputs(param_set, dtype, device)

    # The reference runs in float32 from the same (possibly rounded) starting values, so for bf16 params the
    # difference includes each implementation's own rounding.
    reference_params, reference = build(REFERENCE, initial_params, [g.float() for g in grads], torch.float32)
    for _ in range(CORRECTNESS_STEPS):
        reference.step()
    reference_final = [p.detach() for p in reference_params]
    del reference, reference_params
    release(device)

    # Every implementation is built and checked first, then all are timed with interleaved repeats; holding all
    # three at once costs memory (about 6 GB for gpt2-small in float32) but keeps a passing disturbance from
    # landing on one implementation only.
    built = {}
    differences = {}
    for implementation in (OURS, *PEERS):
        params, optimizer = build(implementation, initial_params, grads, dtype)
        for _ in range(CORRECTNESS_STEPS):
            optimizer.step()
        differences[implementation.name] = max_abs_difference(params, reference_final)
        built[implementation.name] = (params, optimizer)
    del reference_final
    release(device)

    timings = time_interleaved_ms({name: optimizer.step for name, (_, optimizer) in built.items()}, device,
                                  warmup=settings.warmup, repeats=settings.repeats,
                                  min_repeat_ms=settings.min_repeat_ms)
    ours_ms = timings[OURS.name].median_ms
    rows = []
    for name, (params, optimizer) in built.items():
        timing = timings[name]
        moved = bytes_per_step(optimizer, params)
        gb_per_s = moved / (timing.median_ms * 1e-3) / GB
        rows.append({
            "set": param_set.name,
            "dtype": str(dtype).removeprefix("torch."),
            "params": param_set.numel,
            "tensors": len(param_set.shapes),
            "impl": name,
            "bytes_per_step": moved,
            "bytes_per_param": moved / param_set.numel,
            "median_ms": timing.median_ms,
            "repeat_ms": timing.repeat_ms,
            "steps_per_repeat": timing.calls_per_repeat,
            "repeat_spread": max(timing.repeat_ms) / min(timing.repeat_ms),  # slowest / fastest repeat
            "gb_per_s": gb_per_s,
            "fraction_of_copy_bandwidth": gb_per_s / copy_gb_per_s,
            # torch time / our time: > 1 means optim.AdamW is faster. None on our own row.
            "torch_over_ours": None if name == OURS.name else timing.median_ms / ours_ms,
            "max_abs_diff_vs_reference": differences[name],
        })
    del built, initial_params, grads
    release(device)
    return rows


def _format_count(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}k"


def format_table(result: dict) -> str:
    header = ("set", "dtype", "params", "tensors", "impl", "B/param", "ms/step", "GB/s", "of copy", "torch/ours",
              f"max|dp| {CORRECTNESS_STEPS} steps")
    body = []
    previous_case = None
    for row in result["rows"]:
        case = (row["set"], row["dtype"])
        first = case != previous_case
        previous_case = case
        body.append((
            row["set"] if first else "",
            row["dtype"] if first else "",
            _format_count(row["params"]) if first else "",
            str(row["tensors"]) if first else "",
            row["impl"],
            f"{row['bytes_per_param']:.0f}",
            f"{row['median_ms']:.3f}",
            f"{row['gb_per_s']:.1f}",
            f"{100 * row['fraction_of_copy_bandwidth']:.0f}%",
            "-" if row["torch_over_ours"] is None else f"{row['torch_over_ours']:.2f}x",
            f"{row['max_abs_diff_vs_reference']:.1e}",
        ))
    left_aligned = {0, 1, 4}
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def render(line):
        cells = [cell.ljust(w) if i in left_aligned else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        return "  ".join(cells).rstrip()

    copy = result["copy_bandwidth"]
    kernel = result["ours_compiled_kernel"]
    lines = [
        f"AdamW .step(): optim.AdamW vs torch.optim.AdamW on {result['device']} ({result['device_name']}), "
        f"torch {torch.__version__}{', --quick sizes' if result['quick'] else ''}",
        f"optim.AdamW path: {result['ours_path']}",
        f"copy bandwidth: {copy['gb_per_s']:.1f} GB/s ({COPY_CONVENTION}, {copy['nbytes'] >> 20} MiB)",
        "bytes/step: read p, g, m, v + write p, m, v per element (28 B/param for fp32 params and moments); GB = 1e9 B",
        "",
        render(header),
        render(tuple("-" * w for w in widths)),
        *(render(line) for line in body),
        "",
        "torch/ours: torch ms / optim.AdamW ms (> 1: optim.AdamW is faster).",
        f"max|dp|: largest |param difference| after {CORRECTNESS_STEPS} steps vs torch.optim.AdamW(foreach=False) "
        "in float32, same start.",
    ]
    for description in result["param_sets"]:
        lines.append(f"{description['name']}: {description['description']} "
                     f"({_format_count(description['params'])} params in {description['tensors']} tensors)")
    unstable = [f"{row['set']} {row['dtype']} {row['impl']} ({row['repeat_spread']:.1f}x)" for row in result["rows"]
                if row["repeat_spread"] > UNSTABLE_SPREAD]
    if unstable:
        lines.append(f"NOTE: the slowest repeat was over {UNSTABLE_SPREAD:g}x the fastest (the machine was probably "
                     "busy; rerun on an idle one) in:")
        lines.append("      " + ", ".join(unstable))
    cache = result.get("cpu_last_level_cache_bytes")
    if cache:
        # On CPU the copy is not a strict roof: writing dst first reads its lines from memory (read-for-ownership,
        # not in the byte count), while AdamW writes back lines it has just read; and the cache may hold part of
        # the working set between steps.
        lines.append("CPU: GB/s can exceed the copy figure: the copy also reads dst's lines before writing them "
                     "(uncounted),")
        lines.append(f"     AdamW does not, and the last-level cache ({cache >> 20} MiB) can keep part of a step's data.")
    if not kernel:
        lines.append(f"NOTE: optim has no compiled {OUR_OP} kernel for {result['device']}; the optim.AdamW rows "
                     "time its fallback, not the fused kernel.")
    return "\n".join(lines)


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out", headline: bool = False) -> dict:
    device = torch.device(device)
    settings = settings_for(device, quick)
    kernel = optim.has_kernel(OUR_OP, device)
    if kernel:
        ours_path = f"compiled optim::{OUR_OP} kernel for {device.type}"
    else:
        # optim.AdamW falls back to its torch._foreach path when the kernel is missing (see optim.fused.adamw).
        ours_path = f"no compiled optim::{OUR_OP} kernel for {device.type}: fallback (torch._foreach path) timed"

    copy = measure_copy_bandwidth(device, settings.copy_nbytes)
    sets = param_sets(quick)
    dtypes = [torch.float32]
    if device.type == "cuda" and not quick:
        dtypes.append(torch.bfloat16)
    rows = []
    for dtype in dtypes:
        for param_set in sets:
            rows += run_case(param_set, dtype, device, settings, copy.gb_per_s)

    result = {
        "device": str(device),
        "device_name": device_name(device),
        "quick": quick,
        "ours_compiled_kernel": kernel,
        "ours_path": ours_path,
        "cpu_last_level_cache_bytes": cpu_last_level_cache_bytes() if device.type == "cpu" else None,
        "byte_count_convention": BYTE_COUNT_CONVENTION,
        "copy_bandwidth": {"convention": COPY_CONVENTION, "nbytes": copy.nbytes, "bytes_moved": copy.bytes_moved,
                           "median_ms": copy.median_ms, "gb_per_s": copy.gb_per_s},
        "hyperparameters": {**HYPERPARAMETERS, "betas": list(HYPERPARAMETERS["betas"])},
        "correctness": {"steps": CORRECTNESS_STEPS,
                        "reference": "torch.optim.AdamW(foreach=False, fused=False) in float32, same start",
                        "metric": "max over elements of |param - reference param|"},
        "timing": {"warmup": settings.warmup, "repeats": settings.repeats, "statistic": "median",
                   "order": "repeats of the implementations interleaved, rotating which goes first",
                   "timer": "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter"},
        "param_sets": [{"name": s.name, "description": s.description, "params": s.numel, "tensors": len(s.shapes)}
                       for s in sets],
        "rows": rows,
    }
    print(format_table(result), flush=True)
    return result
