"""Ops of the Hessian family: schemas, fake kernels and plain-PyTorch references.

``optim::cross_entropy_hvp(logits, tangent, scale)`` multiplies the Hessian of softmax cross-entropy with respect
to the logits by a tangent, row by row (the last dimension is the class dimension V)::

    p = softmax(z),   out = scale · p ⊙ (u − ⟨p, u⟩)      i.e. scale · (diag(p) − p pᵀ) u

For ``F.cross_entropy(z, y, reduction="mean")`` over N rows the Hessian block of row i is (diag(pᵢ) − pᵢpᵢᵀ)/N, so
``scale = 1/N``. It is also the Gauss-Newton product of any model with a cross-entropy loss. Computed in float32
(float64 for float64 logits) with one read of z and u to reduce and one to write; no N×V intermediate is stored.

``optim::rademacher_(out, seed, offset)`` fills tensors with Rademacher probes (±1, each with probability 1/2) from
a counter-based generator. Element j (row-major) of ``out[i]`` gets counter ``offset + numel(out[0..i-1]) + j``, so a
list of param-shaped tensors holds exactly the values of one flat vector of the same total length, and the value is
a pure function of (seed, counter): identical on CPU and CUDA, for any thread layout, on every rank.

The generator is SplitMix64 (Steele, Lea & Flood 2014): ``value = +1 if top bit of mix64(mix64(seed) + (counter + 1)
· 0x9E3779B97F4A7C15) is 0 else -1``, arithmetic mod 2⁶⁴. The reference evaluates it with int64 tensor ops, whose
multiplication wraps mod 2⁶⁴ (two's complement), with logical right shifts emulated by masking.

``optim::krylov_dots(basis, w)`` gives the inner products of the Krylov loops (Lanczos, SLQ, Gram-Schmidt,
Rayleigh quotients, Hutchinson's zᵀHz) for basis (B, m, n) and w (B, n)::

    c[b, i] = Σ_j basis[b, i, j] · w[b, j]        (B, m) float64: products and sums in float64

The vectors are flat over every parameter (n = all parameters' elements), so one call covers every parameter tensor
and every basis vector. The kernels read basis and w once, with no float64 copy of basis (the reference makes one
in chunks); float32 inner products over n ~ 10⁸ entries would otherwise lose ~1e-4 of their value to rounding.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._library import LIBRARY, define_op

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


# --- cross-entropy Hessian-vector product -----------------------------------------------------------------------

def check_cross_entropy_hvp_args(logits: torch.Tensor, tangent: torch.Tensor, scale: float) -> None:
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy_hvp: logits must have a non-empty class dimension, got shape "
                         f"{tuple(logits.shape)}")
    if tangent.shape != logits.shape:
        raise ValueError(f"cross_entropy_hvp: tangent has shape {tuple(tangent.shape)} but logits has shape "
                         f"{tuple(logits.shape)}; they must match")
    if logits.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"cross_entropy_hvp: logits must be floating point, got {logits.dtype}")
    if tangent.dtype != logits.dtype or tangent.device != logits.device:
        raise RuntimeError(f"cross_entropy_hvp: tangent is {tangent.dtype} on {tangent.device} but logits is "
                           f"{logits.dtype} on {logits.device}")
    if not math.isfinite(scale):
        raise ValueError(f"cross_entropy_hvp: scale must be finite, got {scale}")


def cross_entropy_hvp_reference(logits: torch.Tensor, tangent: torch.Tensor, scale: float) -> torch.Tensor:
    check_cross_entropy_hvp_args(logits, tangent, scale)
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z, u = logits.to(work_dtype), tangent.to(work_dtype)
    p = torch.softmax(z, dim=-1)
    return (scale * p * (u - (p * u).sum(dim=-1, keepdim=True))).to(logits.dtype)


def _cross_entropy_hvp_fake(logits, tangent, scale):
    check_cross_entropy_hvp_args(logits, tangent, scale)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


cross_entropy_hvp = define_op(
    "cross_entropy_hvp(Tensor logits, Tensor tangent, float scale) -> Tensor",
    reference=cross_entropy_hvp_reference,
    fake=_cross_entropy_hvp_fake,
)


def _cross_entropy_hvp_vmap(info, in_dims, logits, tangent, scale):
    """The op is row-wise over every leading dimension, so a vmapped batch dimension is just one more of them."""
    logits_dim, tangent_dim = in_dims[0], in_dims[1]
    size = info.batch_size
    logits = logits.movedim(logits_dim, 0) if logits_dim is not None else logits.expand(size, *logits.shape)
    tangent = tangent.movedim(tangent_dim, 0) if tangent_dim is not None else tangent.expand(size, *tangent.shape)
    return cross_entropy_hvp(logits, tangent, scale), 0


torch.library.register_vmap("optim::cross_entropy_hvp", _cross_entropy_hvp_vmap, lib=LIBRARY)


def check_krylov_dots_args(basis: torch.Tensor, w: torch.Tensor) -> None:
    if basis.dim() != 3:
        raise ValueError(f"krylov_dots: basis must have shape (B, m, n), got {tuple(basis.shape)}")
    if w.dim() != 2 or w.shape[0] != basis.shape[0] or w.shape[1] != basis.shape[2]:
        raise ValueError(f"krylov_dots: w must have shape (B, n) = ({basis.shape[0]}, {basis.shape[2]}) to match basis "
                         f"{tuple(basis.shape)}, got {tuple(w.shape)}")
    if basis.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"krylov_dots: basis must be floating point, got {basis.dtype}")
    if w.dtype != basis.dtype or w.device != basis.device:
        raise RuntimeError(f"krylov_dots: w is {w.dtype} on {w.device} but basis is {basis.dtype} on {basis.device}")


# Columns per float64 chunk in the reference: bounds its float64 copies to about 2^24 elements whatever m and n are.
_REFERENCE_CHUNK_ELEMENTS = 1 << 24


def krylov_dots_reference(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    check_krylov_dots_args(basis, w)
    batch, rows, n = basis.shape
    out = torch.zeros(batch, rows, dtype=torch.float64, device=basis.device)
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, batch * rows))
    for start in range(0, n, chunk):
        piece = basis[..., start : start + chunk].to(torch.float64)
        out += torch.bmm(piece, w[:, start : start + chunk].to(torch.float64).unsqueeze(-1)).squeeze(-1)
    return out


def _krylov_dots_fake(basis, w):
    check_krylov_dots_args(basis, w)
    return basis.new_empty((basis.shape[0], basis.shape[1]), dtype=torch.float64)


krylov_dots = define_op(
    "krylov_dots(Tensor basis, Tensor w) -> Tensor",
    reference=krylov_dots_reference,
    fake=_krylov_dots_fake,
)
