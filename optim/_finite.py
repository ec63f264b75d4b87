"""Finiteness checks of many or large tensors at the cost of one reduction, not of ``isfinite``'s bool tensors."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ._library import has_kernel
from .fused._ops import all_finite as all_finite_op

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_SUM_DTYPES = (torch.float32, torch.float64)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: one pass over the tensors and one sync per device.

    Where the compiled ``optim::all_finite`` kernel exists for the device (the CPU), it reads each tensor once and
    writes nothing else. Elsewhere the reduction is the 2-norm (``_foreach_norm``, ord=2: on CPU about 5× cheaper
    than ord=1, 20× cheaper than the max-abs one and ~8× cheaper than ``torch.isfinite(x).all()``, which
    materializes bool tensors; torch 2.13): a non-finite element makes it non-finite, and a finite norm means every
    element is finite. A norm that overflows (‖x‖ > ~1.8e19 in float32) is confirmed element-wise.
    """
    if len(tensors) == 1 and type(tensors[0]) is torch.Tensor and tensors[0].dtype in _SUM_DTYPES:
        # One plain float32/float64 tensor (a single-matrix RSDM or Riemannian step): its sum, one plain reduction, is
        # about half the norm's time and skips the stack of the norms (measured on one CPU thread at 512×512:
        # 16 µs against 45 µs warm, 0.11 ms against 0.26 ms in a cold single step). A non-finite element makes the
        # sum non-finite; a finite sum means every element is finite, and an overflowing one is confirmed
        # element-wise.
        tensor = tensors[0]
        return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())
    if all(type(t) in _PLAIN and t.is_cpu for t in tensors) and has_kernel("all_finite", "cpu"):
        # the usual case (an optimizer's CPU gradients): one call, without sorting by device (~0.5 µs a tensor)
        return bool(all_finite_op(tensors if type(tensors) is list else list(tensors)))
    by_device: dict[tuple[torch.device, bool], list[torch.Tensor]] = {}
    for tensor in tensors:
        # subclasses (DTensor, which has no sharding rule for the op; fake tensors) take the _foreach_norm path
        by_device.setdefault((tensor.device, type(tensor) in _PLAIN), []).append(tensor)
    for (device, plain), group in by_device.items():
        if plain and has_kernel("all_finite", device):
            if not bool(all_finite_op(group)):
                return False
            continue
        norms = torch._foreach_norm(group, ord=2)
        if len({n.dtype for n in norms}) > 1:
            norms = [n.float() for n in norms]
        if not bool(torch.stack(norms).isfinite().all()):
            if not all(bool(torch.isfinite(t).all()) for t in group):
                return False
    return True


def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int | None:
    """The index of the first tensor with a NaN or inf element, None when all are finite (fast when they are)."""
    if all_finite(tensors):
        return None
    return next(i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all()))
