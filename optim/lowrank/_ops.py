"""Ops of the low-rank family: schemas, fake kernels and plain-PyTorch references.

``optim::lowrank_refactorize_(Tensor(a!)[] B, Tensor(b!)[] A) -> ()`` rewrites L factor pairs of one shape,
``B[l]`` (m × r) and ``A[l]`` (r × n), in place into the balanced form of their product W = B·A, without forming
the m × n matrix W (Glentis et al. 2025, "weight refactorization"). For every l, in the working dtype (float64 for
float64 factors, float32 otherwise, also for bfloat16/float16 factors)::

    Q_B R_B = B              (reduced QR, Q_B m×r, R_B r×r)
    Q_A R_A = Aᵀ             (reduced QR, Q_A n×r, R_A r×r)
    U Σ Vᵀ  = R_B R_Aᵀ       (SVD of an r×r matrix)
    S       = diag(s_k)      s_k = sign of the entry of largest magnitude in column k of Q_B U (+1 if it is 0)
    B ← Q_B U S √Σ           A ← √Σ S Vᵀ Q_Aᵀ

so B·A = Q_B U Σ Vᵀ Q_Aᵀ = Q_B R_B R_Aᵀ Q_Aᵀ is unchanged (up to rounding) and BᵀB = A Aᵀ = Σ (the singular values
of W on the diagonal): both factors carry the same share √Σ of W. Q_B U are the left singular vectors of W, so the
sign convention S removes the only freedom left (u_k, v_k → −u_k, −v_k): for distinct singular values the result is
a function of the product W alone (refactorizing twice changes nothing but rounding), the same on every
implementation. Cost per
layer: O((m + n)·r²) flops instead of the O(m·n·min(m, n)) of the dense SVD of W.

Shapes and dtypes: ``B`` and ``A`` are lists of equal length L (may be 0); every ``B[l]`` has one 2-D shape (m, r),
every ``A[l]`` one 2-D shape (r, n), with 1 <= r <= min(m, n); one dtype (float64, float32, bfloat16, float16) and
one device for all. Any strides. Non-finite factors are an error (nothing is written).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._library import define_op
from .._overlap import check_no_overlap, list_operands

Tensors = Sequence[torch.Tensor]

FACTOR_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the factorizations run in for factors of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_refactorize_args(B: Tensors, A: Tensors) -> None:
    """Raise ``ValueError`` naming the first factor that does not fit the schema."""
    op = "lowrank_refactorize_"
    if len(B) != len(A):
        raise ValueError(f"{op}: B has {len(B)} tensors but A has {len(A)}; pass one (B, A) pair per layer")
    if not B:
        return
    first_b, first_a = B[0], A[0]
    if first_b.dim() != 2 or first_a.dim() != 2:
        raise ValueError(f"{op}: factors must be 2-D, got B[0] of shape {tuple(first_b.shape)} and A[0] of shape "
                         f"{tuple(first_a.shape)}")
    (m, r), (r_a, n) = first_b.shape, first_a.shape
    if r != r_a:
        raise ValueError(f"{op}: B[0] is {m}x{r} and A[0] is {r_a}x{n}; B's columns must equal A's rows (the rank)")
    if not 1 <= r <= min(m, n):
        raise ValueError(f"{op}: the rank r={r} must satisfy 1 <= r <= min(m, n) = {min(m, n)} for B {m}x{r} and "
                         f"A {r}x{n}")
    dtype, device = first_b.dtype, first_b.device
    if dtype not in FACTOR_DTYPES:
        raise ValueError(f"{op}: factors must be float64, float32, bfloat16 or float16, got {dtype}")
    for name, tensors, shape in (("B", B, (m, r)), ("A", A, (r, n))):
        for i, t in enumerate(tensors):
            if t.layout != torch.strided:
                raise ValueError(f"{op}: {name}[{i}] is sparse; dense factors are required")
            if t.dtype != dtype or t.device != device:
                raise ValueError(f"{op}: {name}[{i}] is {t.dtype} on {t.device} but B[0] is {dtype} on {device}; "
                                   "one call takes factors of one dtype and device (group the layers by both)")
            if tuple(t.shape) != shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)} but {name}[0] has shape {shape}; "
                                   "one call takes layers of one shape (group the layers by shape)")


def canonical_signs(left: torch.Tensor) -> torch.Tensor:
    """(L, r) signs: for each column of each ``left`` (L×m×r), the sign of its entry of largest magnitude (+1 for 0)."""
    largest = left.gather(1, left.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(largest < 0, -1.0, 1.0).to(left.dtype)


def balanced_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The math of the op on stacked factors B (L×m×r), A (L×r×n) in their own dtype; returns the new (B, A)."""
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.mT)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT)
    left = Q_B @ U
    root = S.sqrt() * canonical_signs(left)  # (L, r)
    return left * root[:, None, :], root[:, :, None] * (Vh @ Q_A.mT)


def lowrank_refactorize_reference(B: Tensors, A: Tensors) -> None:
    check_refactorize_args(B, A)
    check_no_overlap("lowrank_refactorize_", list_operands("B", B, True) + list_operands("A", A, True))
    if not B:
        return
    work = working_dtype(B[0].dtype)
    stacked_b = torch.stack([t.to(work) for t in B])
    stacked_a = torch.stack([t.to(work) for t in A])
    if not (stacked_b.isfinite().all() and stacked_a.isfinite().all()):
        raise ValueError("lowrank_refactorize_: the factors contain NaN or inf; nothing was changed (a diverged run "
                         "cannot be refactorized: restore a checkpoint or lower the learning rate)")
    new_b, new_a = balanced_factors(stacked_b, stacked_a)
    for l in range(len(B)):
        B[l].copy_(new_b[l])
        A[l].copy_(new_a[l])


def _lowrank_refactorize_fake(B, A) -> None:
    check_refactorize_args(B, A)


lowrank_refactorize_ = define_op(
    "lowrank_refactorize_(Tensor(a!)[] B, Tensor(b!)[] A) -> ()",
    reference=lowrank_refactorize_reference,
    fake=_lowrank_refactorize_fake,
)
