"""Losses whose second derivatives run on fused kernels.

``cross_entropy(logits, target)`` is softmax cross-entropy whose Hessian-vector products, by double backward
("rr") or forward-over-reverse ("fr"), apply ``optim::cross_entropy_hvp`` once instead of differentiating through
``log_softmax`` op by op (which stores several N×V intermediates). Use it as the ``loss_fn`` of a
``HessianOperator`` or inside any function given to ``optim.hvp`` for language-model-sized vocabularies.
"""

from __future__ import annotations

import torch

from ._ops import cross_entropy_hvp

__all__ = ["cross_entropy"]


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _CrossEntropyGradient(torch.autograd.Function):
    """g(z) = scale · (softmax(z) − onehot(y)), the gradient of the loss in the logits.

    Its derivative in z is the symmetric matrix scale · (diag(p) − p pᵀ) per row, so both its vector-Jacobian
    product (backward) and its Jacobian-vector product (jvp) are ``cross_entropy_hvp``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
        probabilities = torch.softmax(logits.to(_work_dtype(logits)), dim=-1)
        onehot = torch.zeros_like(probabilities).scatter_(-1, target.unsqueeze(-1), 1.0)
        return (scale * (probabilities - onehot)).to(logits.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, _, scale = inputs
        ctx.save_for_backward(logits)
        ctx.save_for_forward(logits)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad_gradient: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return cross_entropy_hvp(logits, grad_gradient, ctx.scale), None, None

    @staticmethod
    def jvp(ctx, logits_tangent: torch.Tensor, target_tangent, scale_tangent):
        (logits,) = ctx.saved_tensors
        return cross_entropy_hvp(logits, logits_tangent, ctx.scale)


class _CrossEntropy(torch.autograd.Function):
    """L(z) = scale · Σ_rows (logsumexp(z) − z[y])."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
        z = logits.to(_work_dtype(logits))
        picked = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (scale * (torch.logsumexp(z, dim=-1) - picked).sum()).to(logits.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, scale = inputs
        ctx.save_for_backward(logits, target)
        ctx.save_for_forward(logits, target)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, target = ctx.saved_tensors
        return grad_loss * _CrossEntropyGradient.apply(logits, target, ctx.scale), None, None

    @staticmethod
    def jvp(ctx, logits_tangent: torch.Tensor, target_tangent, scale_tangent):
        logits, target = ctx.saved_tensors
        return (_CrossEntropyGradient.apply(logits, target, ctx.scale) * logits_tangent).sum()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy with fused second derivatives.

    Args:
        logits: (..., V) scores, the class dimension LAST (``F.cross_entropy`` wants it at dim 1 for inputs of more
            than two dimensions; for (N, V) the two agree).
        target: (...) class indices in [0, V) (no ``ignore_index``, no probabilities, no label smoothing).
        reduction: "mean" (over all rows) or "sum".

    Returns the scalar loss, equal to ``F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))``. Gradients,
    double backward, ``torch.func.grad``/``jvp``/``vmap`` work; a third derivative does not.
    """
    if logits.dim() < 1 or target.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: target has shape {tuple(target.shape)} but logits of shape {tuple(logits.shape)} need "
            f"target shape {tuple(logits.shape[:-1])} (class dimension last)"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: target must hold class indices (int64), got {target.dtype}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    rows = target.numel()
    if rows == 0:
        raise ValueError("cross_entropy: empty batch (no rows); the mean over no rows is undefined")
    scale = 1.0 / rows if reduction == "mean" else 1.0
    return _CrossEntropy.apply(logits, target.long(), scale)
