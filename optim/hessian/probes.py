"""Random probe vectors for the stochastic estimators.

Rademacher probes come from the counter-based op ``optim::rademacher_`` (see ``_ops.py``): (seed, offset) fixes
every value, whatever the device, so estimates are reproducible and every rank of a distributed run draws the same
probes without communicating. Consecutive probes use consecutive offsets, ``offset + i·n`` for probe i of length n.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._ops import rademacher_


def rademacher(
    shape: int | Sequence[int],
    *,
    seed: int,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A tensor of ``shape`` with ±1 entries, element j (row-major) drawn from counter ``offset + j``.

    A (k, n) block therefore holds k probes of length n with offsets ``offset + i·n``.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    rademacher_([out], seed, offset)
    return out


def rademacher_like(tensors: Sequence[torch.Tensor], *, seed: int, offset: int = 0) -> list[torch.Tensor]:
    """Param-shaped probes: together the same values as ``rademacher(sum of numels, seed=seed, offset=offset)``.

    Tensors of several dtypes or devices are filled group by group, each with its own counters kept.
    """
    out = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    first, starts = offset, []
    for t in out:
        starts.append(first)
        first += t.numel()
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(out):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for index in groups.values():
        # Counters are consecutive only within a run of adjacent tensors; fill each maximal run with one call.
        run: list[int] = []
        for i in index + [None]:
            if run and (i is None or i != run[-1] + 1):
                rademacher_([out[j] for j in run], seed, starts[run[0]])
                run = []
            if i is not None:
                run.append(i)
    return out
