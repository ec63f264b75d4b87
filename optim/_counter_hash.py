"""SplitMix64 as a counter-based generator: the one hash behind every random draw of the package's kernels.

``hash(seed, counter) = mix64(mix64(seed) + (counter + 1) · 0x9E3779B97F4A7C15)`` mod 2⁶⁴ (Steele, Lea & Flood
2014: consecutive counters give consecutive SplitMix64 outputs). A draw is a pure function of (seed, counter), so
CPU, CUDA and the plain-PyTorch references agree bit for bit for any thread layout and on every rank. The C++ twin
is ``csrc/common/device_math.h`` (``mix64``, ``counter_hash``); users: ``optim::rademacher_`` (Hutchinson probes),
``optim::rsdm_sample_rows_`` (RSDM's row sets) and the per-step probe seeds of the second-order optimizers.

The tensor versions use int64 tensors, whose multiplication wraps mod 2⁶⁴ (two's complement); logical right shifts
are emulated by masking.
"""

from __future__ import annotations

import torch

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
UINT64 = 1 << 64


# A draw's counters are int64: the ``count`` counters from ``offset`` on must stay below this.
COUNTER_LIMIT = 1 << 63


def check_counter_range(op: str, offset: int, count: int) -> None:
    """Raise ``ValueError`` unless counters ``offset .. offset + count − 1`` fit in int64 (``offset`` ≥ 0 checked
    by the caller); the C++ twin is ``check_counter_range`` in ``csrc/common/counters.h``, with the same message."""
    if count > 0 and offset > COUNTER_LIMIT - count:
        raise ValueError(f"{op}: offset {offset} leaves no room below 2**63 for the {count} counters of out; use an "
                         f"offset of at most {COUNTER_LIMIT - count}")


def as_int64(value: int) -> int:
    """The int64 whose two's-complement bits are ``value`` mod 2⁶⁴."""
    value %= UINT64
    return value - UINT64 if value >= 1 << 63 else value


def mix64_int(value: int) -> int:
    """SplitMix64's finalizer on a Python int, mod 2⁶⁴ (used for the seed)."""
    z = value % UINT64
    z = ((z ^ (z >> 30)) * MIX_MULTIPLIERS[0]) % UINT64
    z = ((z ^ (z >> 27)) * MIX_MULTIPLIERS[1]) % UINT64
    return z ^ (z >> 31)


def logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >> bits`` on the uint64 bits of an int64 tensor (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ logical_shift_right(z, 30)) * as_int64(MIX_MULTIPLIERS[0])
    z = (z ^ logical_shift_right(z, 27)) * as_int64(MIX_MULTIPLIERS[1])
    return z ^ logical_shift_right(z, 31)


def counter_hash_tensor(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """``hash(seed, counter)`` for an int64 tensor of counters, as int64 bits."""
    return mix64_tensor((counters + 1) * as_int64(GOLDEN_GAMMA) + as_int64(mix64_int(seed)))
