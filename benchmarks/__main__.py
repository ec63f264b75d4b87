"""Command line: ``python -m benchmarks <name|all> [--quick] [--gpu-headline] [--device D] [--out DIR] [--fsdp N]
[--full]``."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
import time

import torch

from . import BENCHMARKS
from ._report import write_summary
from ._timing import OtherProcessesLoad, busy_cpu_fraction, device_name


# Above this share of the CPUs used by other processes, the timings are flagged as unreliable.
BUSY_WARNING = 0.1


def _warn_busy(fraction: float, when: str) -> None:
    print(f"warning: other processes used {100 * fraction:.0f}% of the {os.cpu_count()} CPUs {when}; timings "
          "(multi-threaded CPU code above all) can be many times slower than on an idle machine", file=sys.stderr)


def _progress(done: int, total: int, name: str, elapsed_s: float) -> None:
    """One status line on stderr per benchmark (the runs print their own tables on stdout in between)."""
    width = 24
    filled = round(width * done / total)
    minutes, seconds = divmod(int(elapsed_s), 60)
    print(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} benchmarks, {minutes}:{seconds:02d} elapsed"
          + (f": running {name}" if done < total else ""), file=sys.stderr, flush=True)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time optim's kernels against their peers on the same inputs and write the results as JSON.",
    )
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="the benchmark to run; 'all' runs every one")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (a demo that finishes in seconds on a laptop CPU)")
    parser.add_argument("--gpu-headline", action="store_true",
                        help="only the headline comparisons, at sizes a GPU finishes in <= 45 s per benchmark "
                             "(what benchmarks/gpu_check.sh runs); with --quick, at the --quick sizes")
    parser.add_argument("--device", default=_default_device(),
                        help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="bench_out",
                        help="directory for <name>.json, the PNGs and, for 'all', summary.md/.json and ratios.png "
                             "(default: bench_out/)")
    parser.add_argument("--full", action="store_true",
                        help="stiefel only: just the RSDM paper's PCA size (n=2000, p=1500, r=700), RSDM-P against "
                             "RGD-QR, per-step time and time to a 1e-6 gap with a 60 s cap per method")
    parser.add_argument("--fsdp", type=int, default=None, metavar="N",
                        help="lowrank only: LowRankAdamW on N FSDP2 ranks (gloo on CPU) against one process")
    args = parser.parse_args(argv)
    if args.fsdp is not None and (args.name != "lowrank" or args.fsdp < 1):
        parser.error("--fsdp N (N >= 1) applies to the lowrank benchmark only")
    if args.full and args.name != "stiefel":
        parser.error("--full applies to the stiefel benchmark only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} was asked for but CUDA is not available", file=sys.stderr)
        return 2
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    os.makedirs(args.out, exist_ok=True)
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    for index, name in enumerate(names):
        _progress(index, len(names), name, time.perf_counter() - started)
        module = importlib.import_module(f"{__package__}.{BENCHMARKS[name]}")
        busy_before = busy_cpu_fraction()
        if busy_before is not None and busy_before > BUSY_WARNING:
            _warn_busy(busy_before, "just before this run")
        with OtherProcessesLoad() as load:
            options = {"fsdp": args.fsdp} if args.fsdp else {}
            if args.full:
                options["full"] = True
            result = module.run(device, quick=args.quick, out_dir=args.out, headline=args.gpu_headline, **options)
        if load.fraction is not None and load.fraction > BUSY_WARNING:
            _warn_busy(load.fraction, "during this run")
        record = {
            "benchmark": name,
            "device": str(device),
            "device_name": device_name(device),
            "cpu_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "python_version": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "quick": args.quick,
            "headline": args.gpu_headline,
            # CPU time of other processes as a fraction of all CPUs' time: a busy machine distorts the timings
            "other_processes_cpu_fraction": {"before": busy_before, "during": load.fraction},
            **result,
        }
        path = os.path.join(args.out, f"{name}.json")
        with open(path, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
            file.write("\n")
        print(f"wrote {path}")
    _progress(len(names), len(names), "done", time.perf_counter() - started)
    if len(names) > 1:
        summary = write_summary(args.out, names)
        with open(summary["paths"]["markdown"], encoding="utf-8") as file:  # the headline table, last
            print("\n" + file.read())
        for kind, path in summary["paths"].items():
            if path:
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
