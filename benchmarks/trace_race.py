"""The spectrum benchmark's trace race alone: ``optim.trace(HessianOperator(...), num_probes=P)`` against PyHessian's
``trace(maxIter=P, tol=-inf)`` on the same model and batch, alternating, two rounds (a quick repeat of one row of
``python -m benchmarks spectrum``). Run as ``python -m benchmarks.trace_race mlp|gpt P`` (CPU; needs pyhessian)."""

from __future__ import annotations

import sys
import time

import torch

import optim
from optim.hessian.hvp import batching_choice

from ._models import gpt_case, mlp_case, sequence_cross_entropy


def main(which: str, probes: int) -> None:
    case = (gpt_case if which == "gpt" else mlp_case)(torch.device("cpu"), quick=False)
    model, batch = case.model, (case.inputs, case.targets)
    model.eval()

    def ours():
        return optim.trace(optim.HessianOperator(model, sequence_cross_entropy, batch), num_probes=probes,
                           seed=0).estimate

    def pyhessian():
        from pyhessian import hessian

        torch.manual_seed(0)
        samples = hessian(model, sequence_cross_entropy, data=batch, cuda=False).trace(maxIter=probes,
                                                                                      tol=float("-inf"))
        model.zero_grad(set_to_none=True)
        return sum(samples) / len(samples)

    for _ in range(2):
        for name, fn in (("optim", ours), ("PyHessian", pyhessian)):
            start = time.perf_counter()
            value = fn()
            print(f"{name:<10} {time.perf_counter() - start:8.2f} s  trace {float(value):.6g}  "
                  f"(blocks of 32: {batching_choice(model, 32)})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
