"""``F.layer_norm`` whose backward, differentiated again, is one fused op.

A double-backward Hessian-vector product differentiates layer normalization's backward. Torch does that with its
generic double-backward formula, about 30 elementwise ops over the (N, D) rows; here the backward of the backward is
``optim::layer_norm_double_backward`` (math in :mod:`._ops`), one pass over the rows. The forward and the first
backward are torch's own ``native_layer_norm`` and ``native_layer_norm_backward``, so the loss and the gradient are
torch's bit for bit; only the second derivatives are computed differently.

Taken (through :func:`.routing.sdpa_curvature`) for float32/float64 tensors on a device where the op has a compiled
kernel, and not: under functorch transforms or forward-mode AD (the Functions here take ``ctx`` in ``forward``,
which spares each call the ``inspect.signature`` binding of ``setup_context``), inside checkpointed regions (see
:func:`.linear._saved_through_hooks`), or where nothing needs a gradient. A third derivative (``create_graph`` in
the second backward) and a vmapped second backward use the op's plain-PyTorch reference, which autograd and vmap
differentiate and batch.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .._library import has_kernel, without_autocast
from . import _ops
from .linear import _saved_through_hooks, functorch_wrapped

__all__ = ["layer_norm"]


def _routable(input, weight, bias) -> bool:
    if not isinstance(input, torch.Tensor) or input.dtype not in (torch.float32, torch.float64):
        return False
    if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad
                                              for t in (input, weight, bias)):
        return False
    if any(t is not None and (not isinstance(t, torch.Tensor) or t.dtype != input.dtype) for t in (weight, bias)):
        return False
    return (has_kernel("layer_norm_double_backward", input.device) and not _saved_through_hooks()
            and getattr(forward_ad, "_current_level", -1) < 0
            and not any(functorch_wrapped(t) for t in (input, weight, bias)))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm``; its backward's backward is ``optim::layer_norm_double_backward`` where the module
    docstring says it is taken."""
    if not _routable(input, weight, bias):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return _LayerNorm.apply(input, shape, weight, bias, eps)


class _LayerNorm(torch.autograd.Function):
    """``native_layer_norm``; the backward builds :class:`_LayerNormGradient` when its graph is kept."""

    @staticmethod
    def forward(ctx, input, shape, weight, bias, eps):
        out, mean, rstd = torch.native_layer_norm(input, shape, weight, bias, eps)
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        input, weight, bias, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = (needs[0], weight is not None and needs[2], bias is not None and needs[3])
        if torch.is_grad_enabled():
            grads = _LayerNormGradient.apply(grad_out, input, weight, bias, mean, rstd, ctx.shape, mask)
        else:
            with torch._C.DisableTorchFunction():  # no route applies here: spare each call the mode's dispatch
                grads = torch.ops.aten.native_layer_norm_backward(grad_out, input, ctx.shape, mean, rstd, weight,
                                                                  bias, mask)
        return grads[0] if mask[0] else None, None, grads[1] if mask[1] else None, grads[2] if mask[2] else None, None


class _LayerNormGradient(torch.autograd.Function):
    """``native_layer_norm_backward`` (torch's values); its backward is ``layer_norm_double_backward``."""

    @staticmethod
    def forward(ctx, grad_out, input, weight, bias, mean, rstd, shape, mask):
        ctx.save_for_backward(grad_out, input, weight, mean, rstd)
        ctx.shape = shape
        grads = torch.ops.aten.native_layer_norm_backward(grad_out, input, shape, mean, rstd, weight, bias, mask)
        return tuple(g if m else None for g, m in zip(grads, mask))

    @staticmethod
    @without_autocast
    def backward(ctx, u_input, u_weight, u_bias):
        grad_out, input, weight, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        plain = not torch.is_grad_enabled() and not any(functorch_wrapped(t)
                                                        for t in (grad_out, u_input, u_weight, u_bias))
        # The op has no derivative or batching rule of its own: a graph kept through it, or a vmapped backward,
        # takes the reference, whose torch ops have both. The plain call needs no route (nor the mode's dispatch).
        with torch._C.DisableTorchFunction() if plain else contextlib.nullcontext():
            features = math.prod(ctx.shape)
            u_input = torch.zeros_like(input) if u_input is None else u_input
            flat = (lambda t: None if t is None else t.reshape(features))
            arguments = (input.reshape(-1, features), mean.reshape(-1), rstd.reshape(-1), flat(weight),
                         grad_out.reshape(-1, features), u_input.reshape(-1, features), flat(u_weight), flat(u_bias))
            function = (torch.ops.optim.layer_norm_double_backward if plain
                        else _ops.layer_norm_double_backward_reference)
            d_grad_out, d_input, d_weight = function(*arguments)
            return (d_grad_out.reshape(grad_out.shape) if needs[0] else None,
                    d_input.reshape(input.shape) if needs[1] else None,
                    d_weight.reshape(weight.shape) if weight is not None and needs[2] else None,
                    None, None, None, None, None)
