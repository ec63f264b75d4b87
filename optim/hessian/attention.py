"""Scaled-dot-product attention with second-order rules, and the routing of ``F.scaled_dot_product_attention`` to it.

:func:`scaled_dot_product_attention` computes ``softmax(s·Q Kᵀ + M) V`` (the math and shapes:
``_attention_ops.py``) through two ``torch.autograd.Function`` s, so that every derivative a curvature computation
takes exists and none stores a (Tq, Tk) matrix:

``_Attention`` (forward ``optim::sdpa_forward``)
    ``backward`` is ``_AttentionBackward.apply`` (so the backward itself is differentiable), ``jvp`` is
    ``optim::sdpa_forward_jvp`` (forward-mode AD: ``torch.func.jvp``, GGN products ``J v``).
``_AttentionBackward`` (forward ``optim::sdpa_backward``)
    ``jvp`` is ``optim::sdpa_backward_jvp`` (forward-over-reverse HVPs: ``jvp(grad(f))``). ``backward`` (double
    backward, ``create_graph=True``) needs no op of its own: the backward is ``∇_{Q,K,V} φ`` with
    ``φ = ⟨dO, O(Q, K, V)⟩``, so against cotangents ``u = (u_Q, u_K, u_V)`` of (dQ, dK, dV) its vector-Jacobian
    product is ``∇²φ·u`` for Q, K, V (the Hessian of φ is symmetric: ``sdpa_backward_jvp`` along u with dȮ = 0) and
    ``(∂O/∂(Q,K,V))·u`` for dO (the backward is ``Jᵀ dO``, linear in dO: ``sdpa_forward_jvp`` along u).

Both set ``generate_vmap_rule = True``; the ops have vmap rules (the vmapped dimension folds into the heads), so
``torch.func.vmap`` over tangents or cotangents (k probes at once, ``is_grads_batched=True``) runs one call per op.

Inside ``torch.compile`` the attention is :func:`composite_attention`, plain softmax attention of torch ops that the
compiler differentiates and fuses (T×T scores): dynamo inlines an ``autograd.Function``'s forward and drops its
``jvp`` (pytorch/pytorch#192985), which gave compiled forward-mode products zero attention tangents.

:func:`~.routing.sdpa_curvature` is a ``TorchFunctionMode`` that sends ``F.scaled_dot_product_attention`` to
:func:`scaled_dot_product_attention`; ``hvp``, ``HessianOperator``, ``GGNOperator``, ``EmpiricalFisherOperator``
(and with them ``SharpnessMonitor`` and the estimators) and the SophiaH/AdaHessian refresh steps enter it
themselves, so a Hugging Face model with ``attn_implementation="sdpa"`` needs no change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._library import without_autocast
from . import _attention_ops as ops

__all__ = ["scaled_dot_product_attention"]


def _zeros_if_none(tangent, like):
    return torch.zeros_like(like) if tangent is None else tangent


class _Attention(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, scale):
        return ops.sdpa_forward(q, k, v, attn_mask, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, is_causal, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)  # a by-product for the backward; attention returns only O
        # A double backward sends no cotangent to O through _AttentionBackward (which returns None for out: its
        # dependence on (q, k, v) is in its own derivatives); unmaterialized, that None costs nothing instead of a
        # backward of zeros.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.save_for_forward(q, k, v, out, lse, attn_mask)
        ctx.is_causal, ctx.scale = is_causal, scale

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None
        grad_q, grad_k, grad_v = _AttentionBackward.apply(grad_out, q, k, v, out, lse, attn_mask, ctx.is_causal,
                                                          ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None

    @staticmethod
    @without_autocast
    def jvp(ctx, q_dot, k_dot, v_dot, mask_dot, is_causal_dot, scale_dot):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        out_dot = ops.sdpa_forward_jvp(q, k, v, out, lse, _zeros_if_none(q_dot, q), _zeros_if_none(k_dot, k),
                                       _zeros_if_none(v_dot, v), attn_mask, ctx.is_causal, ctx.scale)
        return out_dot, None


class _AttentionBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale):
        return ops.sdpa_backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, q, k, v, out, lse, attn_mask, is_causal, scale = inputs
        ctx.save_for_backward(grad_out, q, k, v, out, lse, attn_mask)
        ctx.save_for_forward(grad_out, q, k, v, out, lse, attn_mask)
        ctx.is_causal, ctx.scale = is_causal, scale

    @staticmethod
    @without_autocast
    def backward(ctx, u_q, u_k, u_v):
        grad_out, q, k, v, out, lse, attn_mask = ctx.saved_tensors
        u_q, u_k, u_v = _zeros_if_none(u_q, q), _zeros_if_none(u_k, k), _zeros_if_none(u_v, v)
        grad_q, grad_k, grad_v = ops.sdpa_backward_jvp(grad_out, q, k, v, out, lse, torch.zeros_like(grad_out), u_q,
                                                       u_k, u_v, attn_mask, ctx.is_causal, ctx.scale)
        grad_grad_out = ops.sdpa_forward_jvp(q, k, v, out, lse, u_q, u_k, u_v, attn_mask, ctx.is_causal, ctx.scale)
        # out and lse are functions of (q, k, v): their dependence is already in the products above.
        return grad_grad_out, grad_q, grad_k, grad_v, None, None, None, None, None

    @staticmethod
    @without_autocast
    def jvp(ctx, grad_out_dot, q_dot, k_dot, v_dot, out_dot, lse_dot, mask_dot, is_causal_dot, scale_dot):
        grad_out, q, k, v, out, lse, attn_mask = ctx.saved_tensors
        # out_dot and lse_dot are the tangents of functions of (q, k, v); the op derives them itself.
        return ops.sdpa_backward_jvp(grad_out, q, k, v, out, lse, _zeros_if_none(grad_out_dot, grad_out),
                                     _zeros_if_none(q_dot, q), _zeros_if_none(k_dot, k), _zeros_if_none(v_dot, v),
                                     attn_mask, ctx.is_causal, ctx.scale)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with JVP, double-backward and vmap rules, in O(T) memory.

    Same arguments and result as torch's: ``query`` (B, Hq, Tq, d), ``key`` (B, Hkv, Tk, d), ``value``
    (B, Hkv, Tk, dv), or all 3-D (B, T, ·: one head); ``attn_mask`` boolean (True = attend) or additive,
    broadcastable to (B, Hq, Tq, Tk); ``is_causal`` keeps key j ≤ query i (top-left aligned, as torch's);
    ``scale`` defaults to 1/√d; ``enable_gqa`` allows Hkv < Hq (dividing it). Returns (B, Hq, Tq, dv).

    ``dropout_p`` > 0 (a model in training mode: a second-order optimizer's refresh step on a Hugging Face model
    with attention dropout) drops attention weights as torch's math SDPA does, P ↦ P ⊙ M / (1 − dropout_p) with one
    Bernoulli mask M per call, through :func:`composite_attention` of torch ops: the curvature of that realization,
    what eager attention gives, with its T×T weights kept. Curvature studies evaluate in eval mode (dropout 0).
    An additive ``attn_mask`` that is differentiated (a learned bias: T5's relative positions) takes the same
    composite, so its derivatives are there; a mask that is data takes the ops.

    Raises:
        ValueError: ``dropout_p`` outside [0, 1], inputs that are not 3-D or 4-D, mismatched dtypes, devices or
            shapes, heads that do not divide, ``attn_mask`` that does not broadcast, or Hkv ≠ Hq without
            ``enable_gqa``.
        TypeError: an argument that is not a tensor.
    """
    where = "scaled_dot_product_attention"
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(tensor).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{where}: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    autocast_dtype = _autocast_dtype(query.device.type)
    if autocast_dtype is not None:
        # torch's SDPA is on autocast's lower-precision list: its floating arguments (float64 excepted) are cast to
        # the autocast dtype, which also reconciles a query and key that rotary positions made float32 while the
        # value stayed bfloat16 (a Hugging Face LLaMA under autocast).
        query, key, value, attn_mask = (t.to(autocast_dtype) if t is not None and t.is_floating_point()
                                        and t.dtype != torch.float64 else t for t in (query, key, value, attn_mask))
        with torch.autocast(query.device.type, enabled=False):
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p <= 1:
        raise ValueError(f"{where}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    dims = query.dim()
    if dims not in (3, 4):
        raise ValueError(f"{where}: query must be 3-D (batch, tokens, dim) or 4-D (batch, heads, tokens, dim), got "
                         f"shape {tuple(query.shape)}")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != dims:
            raise ValueError(f"{where}: {name} has {tensor.dim()} dimensions but query has {dims}; they must match")
    if dims == 4 and not enable_gqa and key.shape[1] != query.shape[1]:
        raise ValueError(f"{where}: key has {key.shape[1]} heads but query has {query.shape[1]}; pass "
                         "enable_gqa=True for grouped-query attention")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    scale = float(scale)
    if dims == 3:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    ops.check_attention_args(where, query, key, value, attn_mask, scale)
    if dropout_p > 0:
        # The mask must be kept for every derivative of this call; the ops would have to re-draw it per tile.
        out = composite_attention(query, key, value, attn_mask, bool(is_causal), scale, float(dropout_p))
    elif torch.compiler.is_compiling():
        # Dynamo inlines an autograd.Function's forward and drops its jvp (pytorch/pytorch#192985: zero tangents,
        # silently), so compiled forward-mode products differentiate the composite instead (T×T scores).
        out = composite_attention(query, key, value, attn_mask, bool(is_causal), scale)
    elif _is_differentiated(attn_mask):
        # A learned additive bias (T5's relative positions): the ops take masks as data, so the composite gives
        # its derivatives, with the (Tq, Tk) scores the bias already has.
        out = composite_attention(query, key, value, attn_mask, bool(is_causal), scale)
    else:
        out, _ = _Attention.apply(query, key, value, None if attn_mask is None else attn_mask.detach(),
                                  bool(is_causal), scale)
    return out.squeeze(1) if dims == 3 else out


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, None where it is off (or has no autocast)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # a device type without autocast (meta)
        return None


def _is_differentiated(mask: torch.Tensor | None) -> bool:
    """Whether a derivative is taken of a floating ``mask``: it requires grad, carries a forward-mode tangent, or
    is tracked by a ``torch.func`` grad or jvp level (a bias computed from the parameters in ``jvp(grad(f))``)."""
    if mask is None or not mask.is_floating_point():
        return False
    if mask.requires_grad or torch.autograd.forward_ad.unpack_dual(mask).tangent is not None:
        return True
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(mask):
        if functorch.is_gradtrackingtensor(mask):
            return True
        mask = functorch.get_unwrapped(mask)
    return False


def composite_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                        is_causal: bool, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``dropout(softmax(s·Q Kᵀ + M)) V`` of plain torch ops, differentiable by autograd and functorch to any order;
    rows with no allowed key give 0 (as the ops). Shapes as :func:`scaled_dot_product_attention`'s 4-D ones; the
    scores are (B, Hq, Tq, Tk), in float32 for half-precision inputs. ``dropout_p`` > 0 applies ``F.dropout`` to
    the weights (torch's math SDPA's order)."""
    out_dtype, dtype = q.dtype, ops.work_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(groups, 1), v.to(dtype).repeat_interleave(groups, 1)
    scores = scale * q @ k.transpose(-1, -2)
    allowed = torch.ones(scores.shape, dtype=torch.bool, device=q.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(dtype)
    if is_causal:
        allowed = allowed & torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    empty = ~allowed.any(-1, keepdim=True)
    # A row with no allowed key is softmaxed as zeros and then zeroed: no NaN, nor in any derivative.
    p = torch.softmax(scores.masked_fill(~allowed, -math.inf).masked_fill(empty, 0.0), -1).masked_fill(~allowed, 0.0)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return (p @ v).to(out_dtype)
