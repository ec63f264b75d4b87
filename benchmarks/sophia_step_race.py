"""The sophia benchmark's training step between curvature refreshes alone, with many interleaved repeats.

``python -m benchmarks.sophia_step_race [--full] [--repeats N] [--device D] [--out DIR]``: the GPT case of part 1 of
``python -m benchmarks sophia`` (``--quick`` sizes unless ``--full``; same model, weights, batch, hyperparameters
and step functions) with only three rows: ``torch.optim.AdamW(fused=True)`` (``zero_grad``, ``backward``,
``step``), and ``optim.SophiaH`` / ``optim.AdaHessian`` between refreshes (closure protocol, ``update_period`` so
large that only the first, untimed step refreshes). Their repeats alternate (N of each, default 100; the order
rotates), and the table gives the medians and torch's time / ours (> 1: ours faster) from the same run, plus the
median of the per-repeat ratios. Prints the table and writes ``DIR/sophia_step_race.json`` (default ``bench_out/``)
with every repeat, the thread count and the share of the CPUs other processes used during the run. Time it with
``OMP_NUM_THREADS=1``: the issue's setting, and what keeps a shared 2-core machine's noise out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys

import torch

import optim

from ._timing import OtherProcessesLoad, device_name, time_interleaved_ms
from .sophia import ADAHESSIAN_HYPER, NEVER, SOPHIA_HYPER, _torch_adamw, base_model_and_loss, gpt_step_case

ANCHOR = "torch.optim.AdamW"


def race(device: torch.device, quick: bool, repeats: int) -> dict:
    case = gpt_step_case(quick)
    base, loss_of = base_model_and_loss(case, device)

    def fresh_model():
        model = case["make"]().to(device)
        model.load_state_dict(base.state_dict())
        return model

    model = fresh_model()
    adamw, path = _torch_adamw(list(model.parameters()))

    def torch_step(model=model, opt=adamw):
        opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        opt.step()

    fns = {ANCHOR: torch_step}
    for name, cls, hyper in (("optim.SophiaH", optim.SophiaH, SOPHIA_HYPER),
                             ("optim.AdaHessian", optim.AdaHessian, ADAHESSIAN_HYPER)):
        model = fresh_model()
        opt = cls(list(model.parameters()), **hyper, update_period=NEVER, seed=0)

        def closure_step(model=model, opt=opt):
            opt.step(lambda: loss_of(model))
        fns[f"{name} between refreshes"] = closure_step
    for fn in fns.values():
        fn()  # the first step refreshes the curvature of the second-order optimizers; untimed
    with OtherProcessesLoad() as load:
        timings = time_interleaved_ms(fns, device, warmup=3, repeats=repeats)
    anchor = timings[ANCHOR]
    rows = []
    for name, timing in timings.items():
        per_repeat = [a / b for a, b in zip(anchor.repeat_ms, timing.repeat_ms)]
        rows.append({"impl": name if name != ANCHOR else f"{ANCHOR} ({path})", "ms_per_step": timing.median_ms,
                     "torch_over_ours": anchor.median_ms / timing.median_ms,
                     "median_repeat_torch_over_ours": statistics.median(per_repeat),
                     "min_ms": min(timing.repeat_ms), "repeat_ms": timing.repeat_ms})
    return {"case": case["case"], "description": case["description"], "model": case["config"],
            "params": sum(p.numel() for p in base.parameters()), "repeats": repeats, "rows": rows,
            "other_processes_cpu_fraction": load.fraction}


def format_table(result: dict) -> str:
    load = result["other_processes_cpu_fraction"]
    lines = [f"Training step between refreshes (forward + backward + update) on {result['device']} "
             f"({result['device_name']}), torch {torch.__version__}, {result['threads']} thread(s), "
             f"{result['repeats']} interleaved repeats",
             f"model: {result['description']}, {result['params'] / 1e6:.2f}M params; other processes used "
             + ("?" if load is None else f"{100 * load:.0f}%") + " of the CPUs",
             "ratio: torch's median ms / ours (> 1: ours faster); per-repeat: median of the repeats' ratios", ""]
    width = max(len(row["impl"]) for row in result["rows"])
    lines.append(f"{'implementation'.ljust(width)}  {'ms/step':>8}  {'min ms':>8}  {'ratio':>6}  {'per-repeat':>10}")
    lines.append(f"{'-' * width}  {'-' * 8}  {'-' * 8}  {'-' * 6}  {'-' * 10}")
    for row in result["rows"]:
        lines.append(f"{row['impl'].ljust(width)}  {row['ms_per_step']:8.3f}  {row['min_ms']:8.3f}  "
                     f"{row['torch_over_ours']:5.3f}x  {row['median_repeat_torch_over_ours']:9.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sophia_step_race", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the GPT-2-small shape instead of the --quick one")
    parser.add_argument("--repeats", type=int, default=100, help="interleaved repeats of each step (default 100)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench_out", help="directory for sophia_step_race.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {"benchmark": "sophia_step_race", "device": str(device), "device_name": device_name(device),
              "quick": not args.full, "threads": torch.get_num_threads(), "torch_version": torch.__version__,
              "python": platform.python_version(),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.sophia_step_race " + shlex.join(sys.argv[1:] if argv is None else argv),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              **race(device, not args.full, args.repeats)}
    print(format_table(result), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sophia_step_race.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
