"""Ops of the attention family: scaled-dot-product attention with first- and second-order rules in O(T) memory.

Shapes: ``q`` (B, Hq, Tq, d), ``k`` (B, Hkv, Tk, d), ``v`` (B, Hkv, Tk, dv), with Hkv dividing Hq (grouped-query
attention: query head h reads key/value head ``h // (Hq/Hkv)``, as ``repeat_interleave`` of K and V would). Per
(batch, query head), with scale s and M the mask (0 where allowed, −∞ where not: ``is_causal`` forbids j > i, a
boolean ``attn_mask`` forbids its False entries, a floating ``attn_mask`` is added; it broadcasts to
(B, Hq, Tq, Tk))::

    S = s·Q Kᵀ + M,    P = softmax_rows(S),    O = P V,    lse_i = log Σ_j exp(S_ij)

Ops (each ``optim::<name>``; ``attn_mask``, ``is_causal`` and ``scale`` as above, trailing in every schema):

``sdpa_forward(q, k, v)`` → ``(O, lse)``
    ``O`` (B, Hq, Tq, dv) in q's dtype, ``lse`` (B, Hq, Tq) in the working dtype (float64 for float64 inputs, else
    float32). A row with no allowed key has lse = −∞, O = 0 and zero derivatives (where softmax would be NaN).
``sdpa_backward(dO, q, k, v, O, lse)`` → ``(dQ, dK, dV)``, the gradient of ⟨dO, O(Q, K, V)⟩::

    dP = dO Vᵀ,   D_i = Σ_j dO_ij O_ij (= Σ_j P_ij dP_ij),   dS = P ⊙ (dP − D)
    dQ = s·dS K,   dK = s·dSᵀ Q,   dV = Pᵀ dO                 (dK, dV summed over the query heads of a group)

``sdpa_forward_jvp(q, k, v, O, lse, q_dot, k_dot, v_dot)`` → ``Ȯ``, the directional derivative of O::

    Ṡ = s·(Q̇ Kᵀ + Q K̇ᵀ),   Ṗ = P ⊙ (Ṡ − r),  r_i = Σ_j P_ij Ṡ_ij,   Ȯ = Ṗ V + P V̇

``sdpa_backward_jvp(dO, q, k, v, O, lse, dO_dot, q_dot, k_dot, v_dot)`` → ``(dQ̇, dK̇, dV̇)``, the directional
derivative of the backward along (Q̇, K̇, V̇, dȮ)::

    dṖ = dȮ Vᵀ + dO V̇ᵀ,   Ḋ_i = Σ_j (dȮ_ij O_ij + dO_ij Ȯ_ij),   dṠ = Ṗ ⊙ (dP − D) + P ⊙ (dṖ − Ḋ)
    dQ̇ = s·(dṠ K + dS K̇),   dK̇ = s·(dṠᵀ Q + dSᵀ Q̇),   dV̇ = Ṗᵀ dO + Pᵀ dȮ

No fifth op is needed for the double backward: ``(dQ, dK, dV) = ∇_{Q,K,V} φ`` with φ = ⟨dO, O(Q, K, V)⟩, so the
vector-Jacobian product of the backward against cotangents u = (u_Q, u_K, u_V) is ``∇²φ·u`` for the Q, K, V
parts (the Hessian of φ is symmetric: this is ``sdpa_backward_jvp`` along u with dȮ = 0) and ``J u`` for the dO
part (the backward is ``Jᵀ dO``, linear in dO: this is ``sdpa_forward_jvp`` along u). See ``attention.py``.

Memory. The ``*_reference`` functions materialize every (Tq, Tk) matrix: they are the oracle of the tests. The
default kernels (``*_blocked``) run over tiles of :data:`QUERY_TILE` query rows, batched over B·Hq: each tile
recomputes its rows of P from lse (``P = exp(S − lse)``, no second softmax), so the largest intermediate is
(B, Hq, QUERY_TILE, Tk), and the memory of a call is O(B·Hq·(Tq + Tk)·d) plus that tile, never B·Hq·Tq·Tk. The
compiled CPU kernel (``csrc/hessian/attention_cpu.cpp``) overrides them on CPU. Float16/bfloat16 inputs are computed
in float32 and the results rounded once.
"""

from __future__ import annotations

import math

import torch

from .._library import LIBRARY, define_op

__all__ = ["sdpa_forward", "sdpa_backward", "sdpa_forward_jvp", "sdpa_backward_jvp", "QUERY_TILE",
           "check_attention_args",
           "sdpa_forward_reference", "sdpa_backward_reference", "sdpa_forward_jvp_reference",
           "sdpa_backward_jvp_reference"]

# Query rows per tile of the default (Python) kernels: the (B·Hq, QUERY_TILE, Tk) float32 tiles of S, P and their
# tangents stay within a few hundred MB at Tk = 4096 and B·Hq = 12, and 128 rows keep each matmul large enough to
# run at the BLAS's speed. A module attribute (not a schema argument) so that tests can make it small.
QUERY_TILE = 128

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- checks ------------------------------------------------------------------------------------------------------

def _check_same(op: str, name: str, tensor: torch.Tensor, shape: tuple, like: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(f"{op}: {name} is {tensor.dtype} on {tensor.device} but query is {like.dtype} on "
                         f"{like.device}; they must match")


def check_attention_args(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                         scale: float) -> None:
    """ValueError naming the argument when q, k, v, attn_mask or scale do not describe one attention."""
    for name, tensor in (("query", q), ("key", k), ("value", v)):
        if tensor.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape (batch, heads, tokens, head_dim), got "
                             f"{tuple(tensor.shape)}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"{op}: query must be float64, float32, bfloat16 or float16, got {q.dtype}")
    for name, tensor in (("key", k), ("value", v)):
        if tensor.dtype != q.dtype or tensor.device != q.device:
            raise ValueError(f"{op}: {name} is {tensor.dtype} on {tensor.device} but query is {q.dtype} on {q.device}; "
                             "they must match")
    batch, heads, _, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"{op}: key {tuple(k.shape)} and value {tuple(v.shape)} must have the batch size {batch} of "
                         f"query {tuple(q.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: key {tuple(k.shape)} and value {tuple(v.shape)} must have the same heads and tokens")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"{op}: key has {k.shape[1]} heads, which must divide the {heads} heads of query "
                         "(grouped-query attention)")
    if k.shape[3] != dim:
        raise ValueError(f"{op}: key has head_dim {k.shape[3]} but query has {dim}; they must match")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ValueError(f"{op}: attn_mask must be boolean (True = attend) or floating point (added to the "
                             f"scores), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on {q.device}")
        full = (batch, heads, q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), full)
            ok = attn_mask.dim() <= 4
        except RuntimeError:
            ok = False
        if not ok or torch.broadcast_shapes(tuple(attn_mask.shape), full) != full:
            raise ValueError(f"{op}: attn_mask has shape {tuple(attn_mask.shape)}, which does not broadcast to "
                             f"(batch, heads, query tokens, key tokens) = {full}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def _check_saved(op: str, q, k, v, out, lse) -> None:
    batch, heads, tokens, _ = q.shape
    _check_same(op, "out", out, (batch, heads, tokens, v.shape[3]), q)
    if tuple(lse.shape) != (batch, heads, tokens) or lse.dtype != work_dtype(q.dtype) or lse.device != q.device:
        raise ValueError(f"{op}: lse must be {work_dtype(q.dtype)} of shape {(batch, heads, tokens)} on {q.device}, "
                         f"got {lse.dtype} of shape {tuple(lse.shape)} on {lse.device}")


# --- shared pieces ------------------------------------------------------------------------------------------------

def _expand_kv(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, Tk, ·) → (B, Hq, Tk, ·): key/value head h // (Hq/Hkv) for query head h (O(T·d), not T²)."""
    groups = heads // tensor.shape[1]
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def _reduce_kv(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, Tk, ·) → (B, Hkv, Tk, ·): the sum over the query heads of each group."""
    batch, heads = tensor.shape[:2]
    if heads == kv_heads:
        return tensor
    return tensor.view(batch, kv_heads, heads // kv_heads, *tensor.shape[2:]).sum(2)


def _mask_tile(attn_mask, is_causal, shape, rows: slice, keys: int, dtype, device) -> torch.Tensor | None:
    """The additive mask of query rows ``rows`` and the first ``keys`` keys (0 / −∞, or the float mask),
    broadcastable to (B, Hq, rows, keys)."""
    bias = None
    if attn_mask is not None:
        mask = attn_mask.broadcast_to(shape)[:, :, rows, :keys]  # a view: only this tile is converted
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, -math.inf)
        else:
            bias = mask.to(dtype)
    if is_causal:
        i = torch.arange(rows.start, rows.stop, device=device).unsqueeze(-1)
        j = torch.arange(keys, device=device)
        causal = torch.zeros(i.shape[0], keys, dtype=dtype, device=device).masked_fill_(j > i, -math.inf)
        bias = causal if bias is None else bias + causal
    return bias


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """P = exp(S − lse) from the saved lse; rows with lse = −∞ (no allowed key) give P = 0, not NaN."""
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - safe.unsqueeze(-1))


def _tiles(tokens: int, tile: int | None):
    tile = max(1, tokens if tile is None else tile)  # no query rows: no tiles
    return [slice(start, min(start + tile, tokens)) for start in range(0, tokens, tile)]


class _Inputs:
    """q, k, v (and tangents) in the working dtype, K and V expanded to the query heads."""

    def __init__(self, q, k, v, attn_mask, is_causal, scale):
        self.dtype = work_dtype(q.dtype)
        self.heads, self.kv_heads = q.shape[1], k.shape[1]
        self.q = q.to(self.dtype)
        self.k = _expand_kv(k.to(self.dtype), self.heads)
        self.v = _expand_kv(v.to(self.dtype), self.heads)
        self.mask, self.causal, self.scale = attn_mask, is_causal, scale
        self.full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def kv(self, tensor):
        return _expand_kv(tensor.to(self.dtype), self.heads)

    def keys(self, rows: slice) -> slice:
        """The keys query rows ``rows`` can attend to: with ``is_causal`` none past the last row (half the work)."""
        return slice(0, min(rows.stop, self.full[3]) if self.causal else self.full[3])

    def scores(self, rows: slice) -> torch.Tensor:
        keys = self.keys(rows)
        scores = self.scale * (self.q[:, :, rows] @ self.k[:, :, keys].transpose(-1, -2))
        bias = _mask_tile(self.mask, self.causal, self.full, rows, keys.stop, self.dtype, self.q.device)
        return scores if bias is None else scores + bias


# --- forward ------------------------------------------------------------------------------------------------------

def _forward(q, k, v, attn_mask, is_causal, scale, tile):
    x = _Inputs(q, k, v, attn_mask, is_causal, scale)
    out = q.new_empty(q.shape[:3] + (v.shape[3],))
    lse = torch.empty(q.shape[:3], dtype=x.dtype, device=q.device)
    for rows in _tiles(q.shape[2], tile):
        scores = x.scores(rows)
        lse_rows = torch.logsumexp(scores, dim=-1)
        lse[:, :, rows] = lse_rows
        out[:, :, rows] = (_probabilities(scores, lse_rows) @ x.v[:, :, x.keys(rows)]).to(q.dtype)
    return out, lse


def sdpa_forward_reference(q, k, v, attn_mask=None, is_causal=False, scale=1.0):
    """The test oracle: every (Tq, Tk) matrix at once, in the working dtype."""
    check_attention_args("sdpa_forward", q, k, v, attn_mask, scale)
    return _forward(q, k, v, attn_mask, is_causal, scale, None)


def sdpa_forward_blocked(q, k, v, attn_mask=None, is_causal=False, scale=1.0):
    check_attention_args("sdpa_forward", q, k, v, attn_mask, scale)
    return _forward(q, k, v, attn_mask, is_causal, scale, QUERY_TILE)


def _sdpa_forward_fake(q, k, v, attn_mask=None, is_causal=False, scale=1.0):
    check_attention_args("sdpa_forward", q, k, v, attn_mask, scale)
    return (q.new_empty(q.shape[:3] + (v.shape[3],)),
            q.new_empty(q.shape[:3], dtype=work_dtype(q.dtype)))


_TAIL = "Tensor? attn_mask=None, bool is_causal=False, float scale=1.0"

sdpa_forward = define_op(f"sdpa_forward(Tensor q, Tensor k, Tensor v, {_TAIL}) -> (Tensor, Tensor)",
                         reference=sdpa_forward_blocked, fake=_sdpa_forward_fake)


# --- backward -----------------------------------------------------------------------------------------------------

def _backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, tile):
    x = _Inputs(q, k, v, attn_mask, is_causal, scale)
    d_out, o = grad_out.to(x.dtype), out.to(x.dtype)
    grad_q = q.new_empty(q.shape)
    grad_k = torch.zeros(x.k.shape, dtype=x.dtype, device=q.device)
    grad_v = torch.zeros(x.v.shape, dtype=x.dtype, device=q.device)
    delta = (d_out * o).sum(-1)  # D
    for rows in _tiles(q.shape[2], tile):
        keys = x.keys(rows)
        p = _probabilities(x.scores(rows), lse[:, :, rows])
        d_o = d_out[:, :, rows]
        d_s = p * (d_o @ x.v[:, :, keys].transpose(-1, -2) - delta[:, :, rows].unsqueeze(-1))
        grad_q[:, :, rows] = (scale * (d_s @ x.k[:, :, keys])).to(q.dtype)
        grad_k[:, :, keys] += scale * (d_s.transpose(-1, -2) @ x.q[:, :, rows])
        grad_v[:, :, keys] += p.transpose(-1, -2) @ d_o
    return grad_q, _reduce_kv(grad_k, x.kv_heads).to(k.dtype), _reduce_kv(grad_v, x.kv_heads).to(v.dtype)


def _check_backward(op, grad_out, q, k, v, out, lse, attn_mask, scale):
    check_attention_args(op, q, k, v, attn_mask, scale)
    _check_saved(op, q, k, v, out, lse)
    _check_same(op, "grad_out", grad_out, tuple(out.shape), q)


def sdpa_backward_reference(grad_out, q, k, v, out, lse, attn_mask=None, is_causal=False, scale=1.0):
    _check_backward("sdpa_backward", grad_out, q, k, v, out, lse, attn_mask, scale)
    return _backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, None)


def sdpa_backward_blocked(grad_out, q, k, v, out, lse, attn_mask=None, is_causal=False, scale=1.0):
    _check_backward("sdpa_backward", grad_out, q, k, v, out, lse, attn_mask, scale)
    return _backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, QUERY_TILE)


def _sdpa_backward_fake(grad_out, q, k, v, out, lse, attn_mask=None, is_causal=False, scale=1.0):
    _check_backward("sdpa_backward", grad_out, q, k, v, out, lse, attn_mask, scale)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels' are


sdpa_backward = define_op(
    f"sdpa_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_TAIL}) "
    "-> (Tensor, Tensor, Tensor)",
    reference=sdpa_backward_blocked, fake=_sdpa_backward_fake)


# --- forward JVP --------------------------------------------------------------------------------------------------

def _tangent_tile(x: _Inputs, p, rows, q_dot, k_dot, v_dot):
    """(Ṗ, Ȯ) on the query rows ``rows``; ``k_dot`` and ``v_dot`` already expanded to the query heads."""
    keys = x.keys(rows)
    s_dot = x.scale * (q_dot[:, :, rows] @ x.k[:, :, keys].transpose(-1, -2)
                       + x.q[:, :, rows] @ k_dot[:, :, keys].transpose(-1, -2))
    p_dot = p * (s_dot - (p * s_dot).sum(-1, keepdim=True))
    return p_dot, p_dot @ x.v[:, :, keys] + p @ v_dot[:, :, keys]


def _forward_jvp(q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask, is_causal, scale, tile):
    x = _Inputs(q, k, v, attn_mask, is_causal, scale)
    q_dot, k_dot, v_dot = q_dot.to(x.dtype), x.kv(k_dot), x.kv(v_dot)
    out_dot = out.new_empty(out.shape)
    for rows in _tiles(q.shape[2], tile):
        p = _probabilities(x.scores(rows), lse[:, :, rows])
        out_dot[:, :, rows] = _tangent_tile(x, p, rows, q_dot, k_dot, v_dot)[1].to(out.dtype)
    return out_dot


def _check_forward_jvp(op, q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask, scale):
    check_attention_args(op, q, k, v, attn_mask, scale)
    _check_saved(op, q, k, v, out, lse)
    for name, tangent, primal in (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)):
        _check_same(op, name, tangent, tuple(primal.shape), q)


def sdpa_forward_jvp_reference(q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask=None, is_causal=False, scale=1.0):
    _check_forward_jvp("sdpa_forward_jvp", q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask, scale)
    return _forward_jvp(q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask, is_causal, scale, None)


def sdpa_forward_jvp_blocked(q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask=None, is_causal=False, scale=1.0):
    _check_forward_jvp("sdpa_forward_jvp", q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask, scale)
    return _forward_jvp(q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask, is_causal, scale, QUERY_TILE)


def _sdpa_forward_jvp_fake(q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask=None, is_causal=False, scale=1.0):
    _check_forward_jvp("sdpa_forward_jvp", q, k, v, out, lse, q_dot, k_dot, v_dot, attn_mask, scale)
    return out.new_empty(out.shape)  # contiguous, as the kernels' are


sdpa_forward_jvp = define_op(
    "sdpa_forward_jvp(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor q_dot, Tensor k_dot, "
    f"Tensor v_dot, {_TAIL}) -> Tensor",
    reference=sdpa_forward_jvp_blocked, fake=_sdpa_forward_jvp_fake)


# --- backward JVP -------------------------------------------------------------------------------------------------

def _backward_jvp(grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot, attn_mask, is_causal, scale, tile):
    x = _Inputs(q, k, v, attn_mask, is_causal, scale)
    d_out, o, d_out_dot = grad_out.to(x.dtype), out.to(x.dtype), grad_out_dot.to(x.dtype)
    q_dot, k_dot, v_dot = q_dot.to(x.dtype), x.kv(k_dot), x.kv(v_dot)
    grad_q_dot = q.new_empty(q.shape)
    grad_k_dot = torch.zeros(x.k.shape, dtype=x.dtype, device=q.device)
    grad_v_dot = torch.zeros(x.v.shape, dtype=x.dtype, device=q.device)
    delta = (d_out * o).sum(-1, keepdim=True)  # D
    for rows in _tiles(q.shape[2], tile):
        keys = x.keys(rows)
        k_rows, v_rows, k_dot_rows, v_dot_rows = x.k[:, :, keys], x.v[:, :, keys], k_dot[:, :, keys], v_dot[:, :, keys]
        p = _probabilities(x.scores(rows), lse[:, :, rows])
        p_dot, o_dot = _tangent_tile(x, p, rows, q_dot, k_dot, v_dot)
        d_o, d_o_dot, q_rows, q_dot_rows = d_out[:, :, rows], d_out_dot[:, :, rows], x.q[:, :, rows], q_dot[:, :, rows]
        d_p_centered = d_o @ v_rows.transpose(-1, -2) - delta[:, :, rows]  # dP − D
        d_s = p * d_p_centered
        d_p_dot = d_o_dot @ v_rows.transpose(-1, -2) + d_o @ v_dot_rows.transpose(-1, -2)
        delta_dot = (d_o_dot * o[:, :, rows] + d_o * o_dot).sum(-1, keepdim=True)  # Ḋ
        d_s_dot = p_dot * d_p_centered + p * (d_p_dot - delta_dot)
        grad_q_dot[:, :, rows] = (scale * (d_s_dot @ k_rows + d_s @ k_dot_rows)).to(q.dtype)
        grad_k_dot[:, :, keys] += scale * (d_s_dot.transpose(-1, -2) @ q_rows + d_s.transpose(-1, -2) @ q_dot_rows)
        grad_v_dot[:, :, keys] += p_dot.transpose(-1, -2) @ d_o + p.transpose(-1, -2) @ d_o_dot
    return (grad_q_dot, _reduce_kv(grad_k_dot, x.kv_heads).to(k.dtype),
            _reduce_kv(grad_v_dot, x.kv_heads).to(v.dtype))


def _check_backward_jvp(op, grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot, attn_mask, scale):
    _check_backward(op, grad_out, q, k, v, out, lse, attn_mask, scale)
    _check_same(op, "grad_out_dot", grad_out_dot, tuple(out.shape), q)
    for name, tangent, primal in (("q_dot", q_dot, q), ("k_dot", k_dot, k), ("v_dot", v_dot, v)):
        _check_same(op, name, tangent, tuple(primal.shape), q)


def sdpa_backward_jvp_reference(grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot, attn_mask=None,
                                is_causal=False, scale=1.0):
    _check_backward_jvp("sdpa_backward_jvp", grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot,
                        attn_mask, scale)
    return _backward_jvp(grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot, attn_mask, is_causal, scale,
                         None)


def sdpa_backward_jvp_blocked(grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot, attn_mask=None,
                              is_causal=False, scale=1.0):
    _check_backward_jvp("sdpa_backward_jvp", grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot,
                        attn_mask, scale)
    return _backward_jvp(grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot, attn_mask, is_causal, scale,
                         QUERY_TILE)


def _sdpa_backward_jvp_fake(grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot, attn_mask=None,
                            is_causal=False, scale=1.0):
    _check_backward_jvp("sdpa_backward_jvp", grad_out, q, k, v, out, lse, grad_out_dot, q_dot, k_dot, v_dot,
                        attn_mask, scale)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels' are


sdpa_backward_jvp = define_op(
    "sdpa_backward_jvp(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out_dot, "
    f"Tensor q_dot, Tensor k_dot, Tensor v_dot, {_TAIL}) -> (Tensor, Tensor, Tensor)",
    reference=sdpa_backward_jvp_blocked, fake=_sdpa_backward_jvp_fake)


# --- vmap ---------------------------------------------------------------------------------------------------------
#
# Every op is independent per (batch, query head), so a vmapped dimension of size N is folded into the head
# dimension, (N, B, H, ...) → (B, N·H, ...): query head n·Hq + h then reads key head n·Hkv + h // G, the same
# grouping, and a mask without a head dimension (the usual (B, 1, Tq, Tk) or (Tq, Tk)) still broadcasts unchanged.
# Unbatched operands (the primals when vmapping over tangents) are expanded to the N copies.

def _fold(tensor, dim, size):
    """(…with the vmapped dim at ``dim``…) → (B, N·H, …)."""
    tensor = tensor.unsqueeze(0).expand(size, *tensor.shape) if dim is None else tensor.movedim(dim, 0)
    return tensor.transpose(0, 1).reshape(tensor.shape[1], size * tensor.shape[2], *tensor.shape[3:])


def _unfold(tensor, size):
    """(B, N·H, …) → (B, N, H, …), returned with out_dim 1."""
    return tensor.view(tensor.shape[0], size, tensor.shape[1] // size, *tensor.shape[2:])


def _fold_mask(mask, dim, size, full4):
    if mask is None:
        return None
    if dim is None:
        if mask.dim() < 3 or mask.shape[-3] == 1:
            return mask  # no head dimension: broadcasts over N·H as it did over H
        mask = mask.broadcast_to((full4[0],) + tuple(mask.shape[-3:]) if mask.dim() == 3 else mask.shape)
        return mask.unsqueeze(1).expand(mask.shape[0], size, *mask.shape[1:]).reshape(
            mask.shape[0], size * mask.shape[1], *mask.shape[2:])
    mask = mask.movedim(dim, 0)
    mask = mask.broadcast_to((size,) + full4)  # a mask that varies over the vmapped dim: materialized per copy
    return mask.transpose(0, 1).reshape(full4[0], size * full4[1], *full4[2:])


_TAIL_DEFAULTS = (None, False, 1.0)  # attn_mask, is_causal, scale: _TAIL's defaults


def _register_vmap(name, op, tensor_count, out_count):
    def rule(info, in_dims, *args, **kwargs):
        size = info.batch_size
        tensors = args[:tensor_count]
        # The dispatcher leaves out trailing arguments equal to their defaults (no mask, not causal, scale 1.0:
        # Whisper scales its queries itself), or passes them by name.
        tail = list(args[tensor_count:]) + list(_TAIL_DEFAULTS[len(args) - tensor_count:])
        for index, key in enumerate(("attn_mask", "is_causal", "scale")):
            if key in kwargs:
                tail[index] = kwargs[key]
        mask, is_causal, scale = tail
        in_dims = tuple(in_dims) + (None,) * (tensor_count + 1 - len(in_dims))
        offset = 1 if name.startswith("sdpa_backward") else 0  # the backward ops take grad_out first
        q, k = tensors[offset], tensors[offset + 1]
        q_dim, k_dim = in_dims[offset], in_dims[offset + 1]
        q_shape = q.shape if q_dim is None else q.movedim(q_dim, 0).shape[1:]
        k_shape = k.shape if k_dim is None else k.movedim(k_dim, 0).shape[1:]
        full4 = (q_shape[0], q_shape[1], q_shape[2], k_shape[2])
        folded = [_fold(t, d, size) for t, d in zip(tensors, in_dims[:tensor_count])]
        result = op(*folded, _fold_mask(mask, in_dims[tensor_count], size, full4), is_causal, scale)
        if out_count == 1:
            return _unfold(result, size), 1
        return tuple(_unfold(r, size) for r in result), (1,) * out_count

    torch.library.register_vmap(f"optim::{name}", rule, lib=LIBRARY)


_register_vmap("sdpa_forward", sdpa_forward, 3, 2)
_register_vmap("sdpa_backward", sdpa_backward, 6, 3)
_register_vmap("sdpa_forward_jvp", sdpa_forward_jvp, 8, 1)
_register_vmap("sdpa_backward_jvp", sdpa_backward_jvp, 10, 3)
