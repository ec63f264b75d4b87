"""Ops of the Hessian family: schemas, fake kernels and plain-PyTorch references.

``optim::cross_entropy_hvp(logits, tangent, scale, target=None, ignore_index=-100)`` multiplies the Hessian of
softmax cross-entropy with respect to the logits by a tangent, row by row (the last dimension is the class dimension
V)::

    p = softmax(z),   out = scale · p ⊙ (u − ⟨p, u⟩)      i.e. scale · (diag(p) − p pᵀ) u

With ``target`` (the class indices, shape ``logits.shape[:-1]``, int64) a row whose target is ``ignore_index``
contributes no loss, so its Hessian block is zero: its output row is exactly 0 and its logits are not read (the
convention of ``F.cross_entropy(..., ignore_index=-100)``, padding and prompt tokens of a causal LM). Every other
target must be a class index in [0, V), as ``F.cross_entropy`` requires; checked before the product is computed,
with one host read of the check's result (on CUDA one synchronization per call that passes a target).

For ``F.cross_entropy(z, y, reduction="mean")`` over N rows the Hessian block of row i is (diag(pᵢ) − pᵢpᵢᵀ)/N, so
``scale = 1/N``. It is also the Gauss-Newton product of any model with a cross-entropy loss. Computed in float32
(float64 for float64 logits) with one read of z and u to reduce and one to write; no N×V intermediate is stored.

``optim::rademacher_(out, seed, offset)`` fills tensors with Rademacher probes (±1, each with probability 1/2) from
a counter-based generator. Element j (row-major) of ``out[i]`` gets counter ``offset + numel(out[0..i-1]) + j``, so a
list of param-shaped tensors holds exactly the values of one flat vector of the same total length, and the value is
a pure function of (seed, counter): identical on CPU and CUDA, for any thread layout, on every rank. The seed is
any int64: its 64 bits are the generator's seed (two's complement, so −1 is the seed 2⁶⁴ − 1), which lets the
second-order optimizers pass their per-step probe seeds, hashes that are negative half of the time, unchanged.

The generator is SplitMix64 (Steele, Lea & Flood 2014) used as a counter-based hash (``optim/_counter_hash.py``):
``value = +1 if the top bit of hash(seed, counter) is 0 else -1``.

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

from .._counter_hash import check_counter_range, counter_hash_tensor
from .._library import LIBRARY, define_op
from .._overlap import check_no_overlap, list_operands

def check_rademacher_args(out: Sequence[torch.Tensor], seed: int, offset: int) -> None:
    if offset < 0:
        raise ValueError(f"rademacher_: offset must be >= 0, got {offset}")
    if not out:
        return
    check_counter_range("rademacher_", offset, sum(t.numel() for t in out))
    device, dtype = out[0].device, out[0].dtype
    if not dtype.is_floating_point:
        raise ValueError(f"rademacher_: out tensors must be floating point, got {dtype}")
    for i, tensor in enumerate(out):
        if tensor.device != device or tensor.dtype != dtype:
            raise ValueError(
                f"rademacher_: out[{i}] is {tensor.dtype} on {tensor.device} but out[0] is {dtype} on {device}; "
                "one call fills tensors of one device and dtype"
            )


def rademacher_reference(out: Sequence[torch.Tensor], seed: int, offset: int) -> None:
    check_rademacher_args(out, seed, offset)
    check_no_overlap("rademacher_", list_operands("out", out, True))
    first = offset
    for tensor in out:
        # arange from 0: first + numel may be 2**63 itself, one past int64, when the last counter is 2**63 − 1
        counters = first + torch.arange(tensor.numel(), dtype=torch.int64, device=tensor.device)
        hashed = counter_hash_tensor(seed, counters)
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

def check_cross_entropy_hvp_args(logits: torch.Tensor, tangent: torch.Tensor, scale: float,
                                 target: torch.Tensor | None = None) -> None:
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy_hvp: logits must have a non-empty class dimension, got shape "
                         f"{tuple(logits.shape)}")
    if tangent.shape != logits.shape:
        raise ValueError(f"cross_entropy_hvp: tangent has shape {tuple(tangent.shape)} but logits has shape "
                         f"{tuple(logits.shape)}; they must match")
    if logits.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"cross_entropy_hvp: logits must be floating point, got {logits.dtype}")
    if tangent.dtype != logits.dtype or tangent.device != logits.device:
        raise ValueError(f"cross_entropy_hvp: tangent is {tangent.dtype} on {tangent.device} but logits is "
                           f"{logits.dtype} on {logits.device}")
    if not math.isfinite(scale):
        raise ValueError(f"cross_entropy_hvp: scale must be finite, got {scale}")
    if target is not None:
        if target.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy_hvp: target has shape {tuple(target.shape)} but logits of shape "
                             f"{tuple(logits.shape)} need {tuple(logits.shape[:-1])} (one class index per row)")
        if target.dtype != torch.int64 or target.device != logits.device:
            raise ValueError(f"cross_entropy_hvp: target must be int64 class indices on {logits.device}, got "
                             f"{target.dtype} on {target.device}")


def check_cross_entropy_targets(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """ValueError giving the first (row-major) class index of ``target`` outside [0, classes) that is not
    ``ignore_index``: what ``F.cross_entropy`` refuses. One pass over the targets and one host read (a sync on CUDA),
    against the op's N·V; the C++ twin is ``check_cross_entropy_targets`` in csrc/hessian/cross_entropy_hvp.h."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"cross_entropy_hvp: target holds class index {value}, outside [0, {classes}) for logits "
                         f"with {classes} classes; give every row a class index in range, or ignore_index="
                         f"{ignore_index} for a row without a loss")


def cross_entropy_hvp_reference(logits: torch.Tensor, tangent: torch.Tensor, scale: float,
                                target: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    check_cross_entropy_hvp_args(logits, tangent, scale, target)
    if target is not None:
        check_cross_entropy_targets(target, logits.shape[-1], ignore_index)
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z, u = logits.to(work_dtype), tangent.to(work_dtype)
    p = torch.softmax(z, dim=-1)
    out = scale * p * (u - (p * u).sum(dim=-1, keepdim=True))
    if target is not None:  # ignored rows: exactly 0, whatever their logits (NaN or inf included)
        out = out.masked_fill((target == ignore_index).unsqueeze(-1), 0.0)
    return out.to(logits.dtype)


def _cross_entropy_hvp_fake(logits, tangent, scale, target=None, ignore_index=-100):
    check_cross_entropy_hvp_args(logits, tangent, scale, target)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


cross_entropy_hvp = define_op(
    "cross_entropy_hvp(Tensor logits, Tensor tangent, float scale, Tensor? target=None, int ignore_index=-100) "
    "-> Tensor",
    reference=cross_entropy_hvp_reference,
    fake=_cross_entropy_hvp_fake,
)


def _cross_entropy_hvp_vmap(info, in_dims, logits, tangent, scale, target=None, ignore_index=-100):
    """The op is row-wise over every leading dimension, so a vmapped batch dimension is just one more of them."""
    size = info.batch_size

    def leading(tensor, dim):
        return tensor.movedim(dim, 0) if dim is not None else tensor.expand(size, *tensor.shape)

    logits, tangent = leading(logits, in_dims[0]), leading(tangent, in_dims[1])
    if target is not None:
        target = leading(target, in_dims[3])
    return cross_entropy_hvp(logits, tangent, scale, target, ignore_index), 0


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
        raise ValueError(f"krylov_dots: w is {w.dtype} on {w.device} but basis is {basis.dtype} on {basis.device}")


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


# --- the second backward of layer normalization -------------------------------------------------------------------
#
# ``optim::layer_norm_double_backward`` is the backward of layer normalization's backward, row by row over (N, D)
# rows of D normalized features. With x̂ = (x − μ) r (μ, r the row's mean and reciprocal standard deviation, as
# ``torch.native_layer_norm`` returns them), γ the weight (1 without one) and g the output gradient, the first
# backward is  dx = r (ĝ − mean(ĝ) − x̂ mean(ĝ x̂)) with ĝ = γ g,  dγ = Σ_rows g x̂,  dβ = Σ_rows g.  Given the
# cotangents u of dx, u_γ of dγ and u_β of dβ (None: zero), the op returns the derivatives of
# S = Σ u dx + Σ u_γ dγ + Σ u_β dβ with respect to g, x and γ (means over a row's D features):
#
#     a = mean(ĝ), b = mean(ĝ x̂), ū = mean(u), c = mean(u x̂), e = mean(u ĝ)
#     w = r (u − ū − c x̂)
#     ∂g = γ w + u_γ x̂ + u_β                    ∂γ = Σ_rows g w
#     G  = u_γ g − r (b u + c ĝ)                   (∂S/∂x̂ at fixed r)
#     ∂x = r (G − mean(G) − x̂ mean(G x̂)) − r² (e − ū a − c b) x̂
#
# The first term of ∂x is the normalization's own backward of G, the second the derivative through the r of dx.
# (The torch autograd double backward of F.layer_norm is the independent oracle of the tests.)


def check_layer_norm_double_backward_args(input, mean, rstd, weight, grad_out, u_input, u_weight, u_bias) -> None:
    op = "layer_norm_double_backward"
    if input.dim() != 2:
        raise ValueError(f"{op}: input must be (N, D) rows of normalized features, got shape {tuple(input.shape)}")
    rows, features = input.shape
    if input.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: input must be float32 or float64, got {input.dtype}")
    named = {"mean": (mean, (rows,)), "rstd": (rstd, (rows,)), "weight": (weight, (features,)),
             "grad_out": (grad_out, (rows, features)), "u_input": (u_input, (rows, features)),
             "u_weight": (u_weight, (features,)), "u_bias": (u_bias, (features,))}
    for name, (t, shape) in named.items():
        if t is None:
            if name in ("mean", "rstd", "grad_out", "u_input"):
                raise ValueError(f"{op}: {name} is required")
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but input {tuple(input.shape)} needs {shape}")
        if t.dtype != input.dtype or t.device != input.device:
            raise ValueError(f"{op}: {name} is {t.dtype} on {t.device} but input is {input.dtype} on {input.device}")


def layer_norm_double_backward_reference(input, mean, rstd, weight, grad_out, u_input, u_weight, u_bias):
    check_layer_norm_double_backward_args(input, mean, rstd, weight, grad_out, u_input, u_weight, u_bias)
    mean, rstd, u = mean.unsqueeze(-1), rstd.unsqueeze(-1), u_input
    x_hat = (input - mean) * rstd
    g_hat = grad_out if weight is None else grad_out * weight
    a, b = g_hat.mean(-1, keepdim=True), (g_hat * x_hat).mean(-1, keepdim=True)
    u_bar, c, e = u.mean(-1, keepdim=True), (u * x_hat).mean(-1, keepdim=True), (u * g_hat).mean(-1, keepdim=True)
    w = rstd * (u - u_bar - c * x_hat)
    d_grad_out = w if weight is None else weight * w
    big_g = -rstd * (b * u + c * g_hat)
    if u_weight is not None:
        d_grad_out = d_grad_out + u_weight * x_hat
        big_g = big_g + u_weight * grad_out
    if u_bias is not None:
        d_grad_out = d_grad_out + u_bias
    d_input = (rstd * (big_g - big_g.mean(-1, keepdim=True) - x_hat * (big_g * x_hat).mean(-1, keepdim=True))
               - rstd.square() * (e - u_bar * a - c * b) * x_hat)
    # Contiguous whatever the inputs' layout, as the kernel's and the fake's.
    return d_grad_out.contiguous(), d_input.contiguous(), (grad_out * w).sum(0)


def _layer_norm_double_backward_fake(input, mean, rstd, weight, grad_out, u_input, u_weight, u_bias):
    check_layer_norm_double_backward_args(input, mean, rstd, weight, grad_out, u_input, u_weight, u_bias)
    return input.new_empty(input.shape), input.new_empty(input.shape), input.new_empty(input.shape[-1])


layer_norm_double_backward = define_op(
    "layer_norm_double_backward(Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor grad_out, "
    "Tensor u_input, Tensor? u_weight, Tensor? u_bias) -> (Tensor, Tensor, Tensor)",
    reference=layer_norm_double_backward_reference,
    fake=_layer_norm_double_backward_fake,
)


# --- second-order optimizer steps (Sophia-H, AdaHessian) ----------------------------------------------------------
#
# ``optim::fused_sophia_`` is one step of Sophia (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order
# Optimizer for Language Model Pre-training", Algorithm 3) applied in place to lists of tensors. For every element,
# with g = -grad and u = -u if ``maximize`` (the curvature of -L is -H), u the new diagonal estimate::
#
#     m ← β1·m + (1 − β1)·g
#     h ← β2·h + (1 − β2)·u                              (only when ``hessian_products`` is given: a refresh step)
#     p ← p·(1 − lr·weight_decay)
#     p ← p − lr·clamp(m / max(ρ·h, eps), −1, 1)
#
# ``u = probes ⊙ hessian_products`` (the Hutchinson estimate z⊙Hz) when ``probes`` is given, else
# ``u = hessian_products`` (an estimate the caller already formed, e.g. an external diagonal). Both lists are empty
# on steps that do not refresh the curvature. Instead of the probe tensors the caller may give, for every tensor i,
# ``probe_seeds[i]`` and ``probe_offsets[i]``: the kernel then regenerates z[i] itself, element j (row-major) being
# the ``rademacher_`` value of seed ``probe_seeds[i]`` and counter ``probe_offsets[i] + j`` (so z[i] is
# ``rademacher_([z[i]], probe_seeds[i], probe_offsets[i])``, bit for bit). That saves reading z: a refresh step
# reads p, g, m, h, Hz and writes p, m, h (32 B per float32 element instead of 36), and z can be freed as soon as
# the Hessian-vector product is taken. ``max(ρ·h, eps)`` is the paper's max{γ·h, ε} with ρ = γ: a
# non-positive estimate (Hutchinson's can be negative) gives the denominator eps, so that coordinate moves by
# lr·sign(m), which is the paper's rule. The official code divides by ``ρ·bs·h + 1e-15`` instead, where ``bs`` (the
# tokens per batch) belongs to its Gauss-Newton-Bartlett estimator, whose estimate scales as 1/bs; the Hutchinson
# estimate of the mean loss's Hessian carries no such factor, and adding eps (rather than taking the max) lets a
# negative h flip the update's sign, so we follow the paper.
#
# ``optim::fused_adahessian_`` is one step of AdaHessian (Yao et al. 2021, Algorithm 1) with the official code's
# decoupled weight decay. With t = ``step`` (after the increment), t_h = ``hessian_step`` (refreshes so far, the
# current one included), k = ``hessian_power`` and D the (spatially averaged) |z⊙Hz| diagonal::
#
#     m ← β1·m + (1 − β1)·g
#     v ← β2·v + (1 − β2)·D²                             (only when ``hessian_diagonals`` is given)
#     p ← p·(1 − lr·weight_decay)
#     p ← p − lr/(1 − β1ᵗ) · m / ((√v / √(1 − β2^t_h))ᵏ + eps)
#
# Shapes and dtypes (both ops): params and grads share a shape and a dtype (float64, float32, bfloat16, float16); the
# states (exp_avgs, hessians / exp_hessian_diag_sqs) are float32 for bfloat16/float16 params and the param's dtype
# otherwise, and the arithmetic runs in that dtype; the curvature lists (hessian_products, probes,
# hessian_diagonals), when given, have one tensor per param of the param's shape and either the param's dtype or the
# state dtype (one dtype per list; probes the dtype of hessian_products). All tensors of a call live on one device.
# Non-finite inputs are not filtered (the optimizer classes check them before calling the ops).

Tensors = Sequence[torch.Tensor]
SECOND_ORDER_PARAM_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def second_order_state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer state (and of the update arithmetic) for a parameter of ``param_dtype``."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _check_finite_at_least(caller: str, name: str, value: float, low: float, *, strict: bool = False) -> None:
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise ValueError(f"{caller}: {name} must be a finite number {'>' if strict else '>='} {low:g}, got {value}")


def _check_beta(caller: str, name: str, value: float) -> None:
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{caller}: {name} must be in [0, 1), got {value}")


def check_sophia_hyperparameters(*, lr: float, beta1: float, beta2: float, rho: float, weight_decay: float,
                                 eps: float, caller: str = "fused_sophia_") -> None:
    """``ValueError`` naming ``caller`` and the first hyperparameter outside its range (eps > 0: with h = 0 and
    m = 0 the ratio would be 0/0)."""
    _check_finite_at_least(caller, "lr", lr, 0.0)
    _check_beta(caller, "beta1", beta1)
    _check_beta(caller, "beta2", beta2)
    _check_finite_at_least(caller, "rho", rho, 0.0)
    _check_finite_at_least(caller, "weight_decay", weight_decay, 0.0)
    _check_finite_at_least(caller, "eps", eps, 0.0, strict=True)


def check_adahessian_hyperparameters(*, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                                     hessian_power: float, caller: str = "fused_adahessian_") -> None:
    """``ValueError`` naming ``caller`` and the first hyperparameter outside its range (eps > 0: the update divides
    by (√v/√(1 − β2^t_h))ᵏ + eps, which is 0 where v = 0 and k > 0, e.g. before the first refresh)."""
    _check_finite_at_least(caller, "lr", lr, 0.0)
    _check_beta(caller, "beta1", beta1)
    _check_beta(caller, "beta2", beta2)
    _check_finite_at_least(caller, "weight_decay", weight_decay, 0.0)
    _check_finite_at_least(caller, "eps", eps, 0.0, strict=True)
    if not (0.0 <= hessian_power <= 1.0):
        raise ValueError(f"{caller}: hessian_power must be in [0, 1], got {hessian_power}")


def check_second_order_tensors(op: str, params: Tensors, grads: Tensors, states: dict[str, Tensors],
                               curvature: dict[str, Tensors]) -> None:
    """Raise ``ValueError`` naming the first list or tensor that does not fit the schemas above.

    ``states`` are the written state lists (state dtype); ``curvature`` the optional read-only lists (empty, or one
    tensor per param in the param's or the state dtype, one dtype per list).
    """
    n = len(params)
    for name, tensors in {"grads": grads, **states}.items():
        if len(tensors) != n:
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors but params has {n}; pass one entry per "
                             "parameter in every list")
    for name, tensors in curvature.items():
        if len(tensors) not in (0, n):
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors but params has {n}; pass one per parameter, "
                             "or an empty list on steps without a curvature update")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in SECOND_ORDER_PARAM_DTYPES:
        raise ValueError(f"{op}: params must be float64, float32, bfloat16 or float16, got {dtype}")
    state_dtype = second_order_state_dtype(dtype)
    curvature_dtypes = {}
    for name, tensors in curvature.items():
        if tensors:
            curvature_dtypes[name] = tensors[0].dtype
            if tensors[0].dtype not in (dtype, state_dtype):
                allowed = f"{dtype}" if dtype == state_dtype else f"{dtype} or {state_dtype}"
                raise ValueError(f"{op}: {name}[0] is {tensors[0].dtype}; for {dtype} params it must be {allowed}")

    def check_like(name: str, i: int, tensor: torch.Tensor, param: torch.Tensor, want: torch.dtype) -> None:
        if tensor.layout != torch.strided:
            raise ValueError(f"{op}: {name}[{i}] is sparse; dense tensors are required")
        if tensor.device != device or tensor.dtype != want:
            raise ValueError(f"{op}: {name}[{i}] is {tensor.dtype} on {tensor.device}; it must be {want} on {device}")
        if tensor.shape != param.shape:
            raise ValueError(f"{op}: {name}[{i}] has shape {tuple(tensor.shape)} but params[{i}] has shape "
                               f"{tuple(param.shape)}")

    for i, p in enumerate(params):
        if p.device != device or p.dtype != dtype:
            raise ValueError(f"{op}: params[{i}] is {p.dtype} on {p.device} but params[0] is {dtype} on {device}; "
                               "one call takes tensors of one device and dtype (the optimizers group them for you)")
        check_like("grads", i, grads[i], p, dtype)
        for name, tensors in states.items():
            check_like(name, i, tensors[i], p, state_dtype)
        for name, tensors in curvature.items():
            if tensors:
                check_like(name, i, tensors[i], p, curvature_dtypes[name])


def _check_sophia_args(params, grads, exp_avgs, hessians, hessian_products, probes, probe_seeds,
                       probe_offsets) -> None:
    check_second_order_tensors("fused_sophia_", params, grads, {"exp_avgs": exp_avgs, "hessians": hessians},
                               {"hessian_products": hessian_products, "probes": probes})
    if probes and not hessian_products:
        raise ValueError("fused_sophia_: probes were given without hessian_products; the probes multiply the "
                         "Hessian-vector products, pass both or neither")
    if probes and probes[0].dtype != hessian_products[0].dtype:
        raise ValueError(f"fused_sophia_: probes are {probes[0].dtype} but hessian_products are "
                           f"{hessian_products[0].dtype}; they must match")
    if len(probe_seeds) != len(probe_offsets) or len(probe_seeds) not in (0, len(params)):
        raise ValueError(f"fused_sophia_: probe_seeds has {len(probe_seeds)} entries and probe_offsets "
                         f"{len(probe_offsets)} but params has {len(params)}; give one seed and one offset per "
                         "parameter, or neither")
    if probe_seeds and not hessian_products:
        raise ValueError("fused_sophia_: probe_seeds were given without hessian_products; the probes multiply the "
                         "Hessian-vector products, pass both or neither")
    if probe_seeds and probes:
        raise ValueError("fused_sophia_: both probes and probe_seeds were given; pass the probe tensors or the "
                         "(seed, offset) pairs that regenerate them, not both")
    for i, offset in enumerate(probe_offsets):
        if offset < 0:
            raise ValueError(f"fused_sophia_: probe_offsets[{i}] must be >= 0, got {offset}")


def regenerated_probes(tensors: Tensors, seeds: Sequence[int], offsets: Sequence[int],
                       dtype: torch.dtype) -> list[torch.Tensor]:
    """The probes ``fused_sophia_`` regenerates from (``seeds[i]``, ``offsets[i]``): tensors shaped like
    ``tensors[i]``, in ``dtype``."""
    probes = []
    for tensor, seed, offset in zip(tensors, seeds, offsets):
        probe = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
        rademacher_reference([probe], seed, offset)
        probes.append(probe)
    return probes


def fused_sophia_reference(params: Tensors, grads: Tensors, exp_avgs: Tensors, hessians: Tensors,
                           hessian_products: Tensors, probes: Tensors, *, lr: float, beta1: float, beta2: float,
                           rho: float, weight_decay: float, eps: float, maximize: bool,
                           probe_seeds: Sequence[int] = (), probe_offsets: Sequence[int] = ()) -> None:
    check_sophia_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, rho=rho, weight_decay=weight_decay, eps=eps)
    _check_sophia_args(params, grads, exp_avgs, hessians, hessian_products, probes, probe_seeds, probe_offsets)
    check_no_overlap("fused_sophia_", list_operands("params", params, True) + list_operands("grads", grads, False)
                     + list_operands("exp_avgs", exp_avgs, True) + list_operands("hessians", hessians, True)
                     + list_operands("hessian_products", hessian_products, False)
                     + list_operands("probes", probes, False))
    if probe_seeds:
        probes = regenerated_probes(params, probe_seeds, probe_offsets, hessian_products[0].dtype)
    sign = -1.0 if maximize else 1.0
    for i, (param, grad, exp_avg, hessian) in enumerate(zip(params, grads, exp_avgs, hessians)):
        work = exp_avg.dtype  # the arithmetic runs in the state's dtype; a low-precision param is rounded once
        p, g = param.to(work), grad.to(work)
        if maximize:
            g = -g
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        if hessian_products:
            estimate = hessian_products[i].to(work)
            if probes:
                estimate = estimate * probes[i].to(work)
            hessian.mul_(beta2).add_(estimate, alpha=sign * (1.0 - beta2))
        p.mul_(1.0 - lr * weight_decay)
        ratio = (exp_avg / (rho * hessian).clamp_min(eps)).clamp_(-1.0, 1.0)
        p.add_(ratio, alpha=-lr)
        if p is not param:
            param.copy_(p)


def _fused_sophia_fake(params, grads, exp_avgs, hessians, hessian_products, probes, *, lr, beta1, beta2, rho,
                       weight_decay, eps, maximize, probe_seeds=(), probe_offsets=()) -> None:
    _check_sophia_args(params, grads, exp_avgs, hessians, hessian_products, probes, probe_seeds, probe_offsets)


fused_sophia_ = define_op(
    "fused_sophia_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] hessians, "
    "Tensor[] hessian_products, Tensor[] probes, *, float lr, float beta1, float beta2, float rho, "
    "float weight_decay, float eps, bool maximize, int[] probe_seeds=[], int[] probe_offsets=[]) -> ()",
    reference=fused_sophia_reference,
    fake=_fused_sophia_fake,
)


def _check_adahessian_args(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, step,
                           hessian_step) -> None:
    if step < 1 or hessian_step < 1:
        raise ValueError(f"fused_adahessian_: step and hessian_step are the counts after this step's increment and "
                         f"must be >= 1, got step={step}, hessian_step={hessian_step}")
    if hessian_step > step:
        raise ValueError(f"fused_adahessian_: hessian_step={hessian_step} exceeds step={step}; the curvature is "
                         "refreshed at most once per step, so the refreshes so far cannot outnumber the steps")
    check_second_order_tensors("fused_adahessian_", params, grads,
                               {"exp_avgs": exp_avgs, "exp_hessian_diag_sqs": exp_hessian_diag_sqs},
                               {"hessian_diagonals": hessian_diagonals})


def fused_adahessian_reference(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_hessian_diag_sqs: Tensors,
                               hessian_diagonals: Tensors, *, lr: float, beta1: float, beta2: float,
                               weight_decay: float, eps: float, hessian_power: float, step: int, hessian_step: int,
                               maximize: bool) -> None:
    check_adahessian_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                                     hessian_power=hessian_power)
    _check_adahessian_args(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, step, hessian_step)
    check_no_overlap("fused_adahessian_", list_operands("params", params, True)
                     + list_operands("grads", grads, False) + list_operands("exp_avgs", exp_avgs, True)
                     + list_operands("exp_hessian_diag_sqs", exp_hessian_diag_sqs, True)
                     + list_operands("hessian_diagonals", hessian_diagonals, False))
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**hessian_step)
    for i, (param, grad, exp_avg, exp_hessian_diag_sq) in enumerate(zip(params, grads, exp_avgs,
                                                                        exp_hessian_diag_sqs)):
        work = exp_avg.dtype
        p, g = param.to(work), grad.to(work)
        if maximize:
            g = -g
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        if hessian_diagonals:
            d = hessian_diagonals[i].to(work)
            exp_hessian_diag_sq.mul_(beta2).addcmul_(d, d, value=1.0 - beta2)
        p.mul_(1.0 - lr * weight_decay)
        scaled = exp_hessian_diag_sq.sqrt() / bias_correction2_sqrt
        if hessian_power != 1.0:
            scaled = scaled.pow(hessian_power)
        p.addcdiv_(exp_avg, scaled.add_(eps), value=-step_size)
        if p is not param:
            param.copy_(p)


def _fused_adahessian_fake(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, *, lr, beta1, beta2,
                           weight_decay, eps, hessian_power, step, hessian_step, maximize) -> None:
    _check_adahessian_args(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, step, hessian_step)


fused_adahessian_ = define_op(
    "fused_adahessian_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_hessian_diag_sqs, Tensor[] hessian_diagonals, *, float lr, float beta1, float beta2, "
    "float weight_decay, float eps, float hessian_power, int step, int hessian_step, bool maximize) -> ()",
    reference=fused_adahessian_reference,
    fake=_fused_adahessian_fake,
)
