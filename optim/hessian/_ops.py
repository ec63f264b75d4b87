"""Ops of the Hessian family: schemas, fake kernels and plain-PyTorch references.

``optim::rademacher_(out, seed, offset)`` fills tensors with Rademacher probes (±1, each with probability 1/2) from
a counter-based generator. Element j (row-major) of ``out[i]`` gets counter ``offset + numel(out[0..i-1]) + j``, so a
list of param-shaped tensors holds exactly the values of one flat vector of the same total length, and the value is
a pure function of (seed, counter): identical on CPU and CUDA, for any thread layout, on every rank.

The generator is SplitMix64 (Steele, Lea & Flood 2014): ``value = +1 if top bit of mix64(mix64(seed) + (counter + 1)
· 0x9E3779B97F4A7C15) is 0 else -1``, arithmetic mod 2⁶⁴. The reference evaluates it with int64 tensor ops, whose
multiplication wraps mod 2⁶⁴ (two's complement), with logical right shifts emulated by masking.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._library import define_op

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
UINT64 = 1 << 64


def _as_int64(value: int) -> int:
    """The int64 whose two's-complement bits are ``value`` mod 2⁶⁴."""
    value %= UINT64
    return value - UINT64 if value >= 1 << 63 else value


def mix64_int(value: int) -> int:
    """SplitMix64's finalizer on a Python int, mod 2⁶⁴ (used for the seed)."""
    z = value % UINT64
    z = ((z ^ (z >> 30)) * MIX_MULTIPLIERS[0]) % UINT64
    z = ((z ^ (z >> 27)) * MIX_MULTIPLIERS[1]) % UINT64
    return z ^ (z >> 31)


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _logical_shift_right(z, 30)) * _as_int64(MIX_MULTIPLIERS[0])
    z = (z ^ _logical_shift_right(z, 27)) * _as_int64(MIX_MULTIPLIERS[1])
    return z ^ _logical_shift_right(z, 31)


def check_rademacher_args(out: Sequence[torch.Tensor], seed: int, offset: int) -> None:
    if offset < 0:
        raise ValueError(f"rademacher_: offset must be >= 0, got {offset}")
    if not out:
        return
    device, dtype = out[0].device, out[0].dtype
    if not dtype.is_floating_point:
        raise ValueError(f"rademacher_: out tensors must be floating point, got {dtype}")
    for i, tensor in enumerate(out):
        if tensor.device != device or tensor.dtype != dtype:
            raise RuntimeError(
                f"rademacher_: out[{i}] is {tensor.dtype} on {tensor.device} but out[0] is {dtype} on {device}; "
                "one call fills tensors of one device and dtype"
            )


def rademacher_reference(out: Sequence[torch.Tensor], seed: int, offset: int) -> None:
    check_rademacher_args(out, seed, offset)
    mixed_seed = _as_int64(mix64_int(seed))
    first = offset
    for tensor in out:
        counters = torch.arange(first + 1, first + 1 + tensor.numel(), dtype=torch.int64, device=tensor.device)
        hashed = _mix64_tensor(counters * _as_int64(GOLDEN_GAMMA) + mixed_seed)
        negative = hashed < 0  # the top bit
        tensor.copy_((1 - 2 * negative.to(tensor.dtype)).view(tensor.shape))
        first += tensor.numel()


def _rademacher_fake(out, seed, offset) -> None:
    check_rademacher_args(out, seed, offset)


rademacher_ = define_op(
    "rademacher_(Tensor(a!)[] out, int seed, int offset) -> ()",
    reference=rademacher_reference,
    fake=_rademacher_fake,
)
