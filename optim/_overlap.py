"""Memory-overlap checks of the raw ops' references: the rule of ``check_no_overlap`` in ``csrc/common/checks.h``.

A raw op writes some of its tensors in place. Before anything is written, the reference and the kernel both refuse

1. a written tensor that overlaps itself (an ``expand()``ed tensor: several elements at one address), and
2. a written tensor that shares memory with another tensor argument of the call,

with the same ``ValueError`` message, in the same order (tests assert that the messages are equal). A tensor covers
the bytes ``[data_ptr, data_ptr + (1 + sum((size_d − 1)·stride_d))·itemsize)``; empty tensors cover nothing. The
pairs are found by one sweep over the intervals sorted by (start, position), keeping the furthest end of all
tensors and of the written ones: O(k log k) for k tensors.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from ._library import define_op, has_kernel

__all__ = ["check_no_overlap", "check_no_overlap_across_calls", "list_operands"]

Operand = tuple[str, torch.Tensor, bool]  # (name as messages print it, tensor, written by the op)


def list_operands(name: str, tensors: Sequence[torch.Tensor], written: bool) -> list[Operand]:
    """``[("name[0]", t0, written), ("name[1]", t1, written), ...]``."""
    return [(f"{name}[{i}]", t, written) for i, t in enumerate(tensors)]


def check_no_overlap(op: str, operands: Iterable[Operand]) -> None:
    """Raise ``ValueError`` naming the first written tensor that overlaps itself, or the first pair (a written
    tensor and any other argument) that shares memory; nothing has been written when it raises."""
    operands = [(name, t, written) for name, t, written in operands if t is not None]
    for name, t, written in operands:
        if written and t.numel() and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{op}: {name} has internally overlapping memory (e.g. an expand()ed tensor); the op "
                             f"writes it, so every element needs its own memory: pass {name}.clone()")
    intervals = []
    for k, (_, t, _) in enumerate(operands):
        if not t.numel():
            continue
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        start = t.data_ptr()
        intervals.append((start, start + extent * t.element_size(), k))
    intervals.sort(key=lambda interval: (interval[0], interval[2]))
    end_all = end_written = None
    owner_all = owner_written = 0
    for start, end, k in intervals:
        written = operands[k][2]
        other = k
        if written and end_all is not None and start < end_all:
            other = owner_all
        elif not written and end_written is not None and start < end_written:
            other = owner_written
        if other != k:
            first, second = min(other, k), max(other, k)
            writer = operands[k if written else other][0]
            raise ValueError(f"{op}: {operands[first][0]} and {operands[second][0]} share memory; the op writes "
                             f"{writer}, so it must not overlap another argument: pass separate tensors (.clone() "
                             "one of them)")
        if end_all is None or end > end_all:
            end_all, owner_all = end, k
        if written and (end_written is None or end > end_written):
            end_written, owner_written = end, k



def shares_storage_reference(written: Sequence[torch.Tensor], read: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor (on the CPU): whether two tensors of ``written``, or one of ``written`` and one of ``read``,
    share a storage (by the storages' data pointers; tensors of ``read`` sharing one among themselves do not
    count)."""
    storages = {t.untyped_storage().data_ptr() for t in written}
    shared = len(storages) != len(written) or any(t.untyped_storage().data_ptr() in storages for t in read)
    return torch.tensor(shared)


def _shares_storage_fake(written, read) -> torch.Tensor:
    return torch.empty((), dtype=torch.bool)


# ``optim::shares_storage(written, read) -> Tensor``: ``shares_storage_reference`` in one call. Its CPU kernel
# (csrc/common/shares_storage_cpu.cpp) reads each tensor's storage pointer in C++: 34 µs against 43 µs for 140
# tensors, where from Python ``untyped_storage().data_ptr()`` builds a storage object per tensor.
shares_storage = define_op(
    "shares_storage(Tensor[] written, Tensor[] read) -> Tensor",
    reference=shares_storage_reference,
    fake=_shares_storage_fake,
)


def check_no_overlap_across_calls(op: str, written: Sequence[torch.Tensor], read: Sequence[torch.Tensor],
                                  operands: Callable[[], Iterable[Operand]]) -> None:
    """``check_no_overlap`` over the tensors of several op calls that one step makes (one per param group), before
    the first call writes: each call checks its own tensors, but not those of the calls before and after it.

    The interval sweep, and the names of ``operands()``, cost ~5 µs per tensor in Python; first, for well under
    1 µs per tensor, the storages (``shares_storage``): when no ``written`` tensor shares a storage with another
    argument (the usual case: autograd allocates each gradient, the optimizer each moment) no two can overlap.
    ``read`` tensors sharing one storage among themselves (DDP's ``gradient_as_bucket_view`` gradients) do not
    count. None entries are skipped."""
    written = [t for t in written if t is not None]
    read = [t for t in read if t is not None]
    if has_kernel("shares_storage", "cpu"):
        shared = shares_storage.default(written, read)  # CPU lists: the kernel; CUDA ones: the reference
    else:
        shared = shares_storage_reference(written, read)
    if bool(shared):
        check_no_overlap(op, operands())
