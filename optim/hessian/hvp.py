"""Hessian-vector products of a scalar function of several tensors, one probe or k probes per linearization.

For a loss ``L(x)`` of the parameters ``x = (x_1, ..., x_m)`` (a list of tensors) and a direction ``v`` shaped like
``x``, the Hessian-vector product is the directional derivative of the gradient::

    Hv = d/dt ∇L(x + t·v) |_{t=0} = ∇_x ( ∇L(x) · v )        (H symmetric, so Hv = vᵀH)

Four ways to compute it (``mode``):

``"rr"`` reverse-over-reverse (double backward)
    One forward and one backward with ``create_graph=True`` give ``g = ∇L(x)`` as a differentiable graph; a second
    backward of ``g`` against ``v`` (a vector-Jacobian product of the gradient, ``vᵀ ∂g/∂x = vᵀH = (Hv)ᵀ``) gives
    ``Hv``. For k probes the forward and the first backward are shared, and the k second backwards run either
    batched over the probes (``torch.autograd.grad(..., is_grads_batched=True)``, vmap) or as a loop of k ordinary
    backwards on the retained graph, whichever measured faster for this function (see :data:`MEASURE_MIN_PROBES`):
    vmap's batched kernels do not always pay for its overhead (on CPU the loop measured 1.95× a gradient per probe
    at k = 8 on a GPT against vmap's 2.95×, and 1.35× against 1.54× on an MLP). An op whose backward cannot be
    batched (vmap has no rule for it) makes it take the loop.
``"fr"`` forward-over-reverse (``torch.func``)
    ``Hv`` is the forward-mode derivative (``torch.func.jvp``) of ``torch.func.grad(L)`` along ``v``; the k-probe
    case maps the tangent over the probes with ``torch.func.vmap`` (the primal forward and backward are not
    batched, so they run once). Needs ``f`` to be compatible with the ``torch.func`` transforms: no in-place update
    of captured tensors (BatchNorm running statistics in train mode), no ``autograd.Function`` without
    ``setup_context``, forward-AD formulas for every op.
``"fd"`` central finite difference of gradients (approximate)
    ``Hv ≈ (∇L(x + h·v) − ∇L(x − h·v)) / (2h)``: two first-order gradients per probe, no second-order graph, so
    the memory of a gradient. The step is chosen from the dtype:

        h = ε^(1/3) · max(1, ‖x‖) / ‖v‖           (ε = torch.finfo(dtype).eps of the least precise param)

    so the step in parameter space has length ``‖h·v‖ = ε^(1/3)·max(1, ‖x‖)``, i.e. a relative change of about
    ε^(1/3) per coordinate. The truncation error of the central difference is ``(h²/6)·∇³L[v, v, ·] = O(h²)`` and the
    rounding error of the two gradients divided by ``2h`` is ``O(ε/h)``; this h balances the two, so both are
    ``O(ε^(2/3))`` relative: about 4e-11 in float64 and 2e-5 in float32 before model-dependent constants (the size
    of the third derivative, and how much the gradient's rounding error exceeds ε·‖∇L‖). :func:`fd_rtol` gives the
    relative tolerance the tests hold it to, ``‖fd − Hv‖ ≤ fd_rtol(dtype)·‖Hv‖``, on well-scaled models (entries
    and curvature of order one). It is unusable in bfloat16/float16 (ε^(1/3) ≈ 0.1–0.2): evaluate in float32.
    The parameters are never written to: f is evaluated at new tensors ``x ± h·v``, so ``params`` keep their bits
    whatever f does, raising included. Non-smooth functions (ReLU, max-pooling: the step crosses kinks of the
    gradient) break the error bound silently, so each probe is also estimated with the half step h/2 (two more
    gradients per probe): where the two estimates differ by more than the tolerance, ``‖fd_h − fd_{h/2}‖ >
    fd_rtol·‖fd_h‖`` plus the gradients' rounding level, a ``RuntimeWarning`` gives the measured discrepancy
    (``strict=True`` raises ``ValueError`` instead; ``strict=False`` skips the check and its cost).
``"auto"``
    The fastest exact mode that works for ``f``: the modes in :data:`AUTO_ORDER` are tried in turn, and the first
    one that does not raise ``RuntimeError`` / ``NotImplementedError`` is used and remembered for this function
    object (a weak-keyed cache, so a later call goes straight to it; the other modes are tried again only if the
    remembered one starts failing). ``"rr"`` comes first because it measured faster than ``"fr"`` for one probe
    (2.2–2.7× a gradient against 3.1–4.6× on CPU MLPs; 3.6× against 4.6× on an H100 MLP, where ``"fr"`` also took
    6.2× the gradient's memory), comparable at k = 8 (1.5–2.5× against 2.0–2.2× a gradient per probe on CPU), and
    because more functions support it: ``"fr"`` fails on ``F.mse_loss`` with its default ``reduction="mean"``
    (pytorch/pytorch#123996) and on BatchNorm in train mode. ``"fr"`` is the fall-back for functions whose second
    backward is not implemented. ``ValueError`` from the input checks is never caught. A failed attempt has run f
    once: a function with side effects sees them twice on the first call.

``compile=True``
    The forward-over-reverse product (``"fr"``: ``jvp`` of ``grad``) through ``torch.compile`` (inductor, static
    shapes). It is compiled at the first call for a function (or, for a :class:`~optim.HessianOperator`, a model,
    loss and parameter scope) and a signature (the shapes, dtypes and devices of the params and of the batch), and
    reused after that: across Lanczos iterations, Hutchinson probes, monitor steps. A block of k probes runs the
    compiled one-probe product k times (a vmapped product compiled for minutes and past 20 GB on a 7M-parameter GPT
    on a CPU). The first call's seconds, compilation included, are added to :func:`compile_seconds`. Measured on
    CPU (``python -m benchmarks curvature``, 2 threads, one run; benchmarks/RESULTS.md): on a 7.4M-parameter GPT
    the compiled product took 2.46× a gradient against 3.48× for torch's double backward (0.71×; 12 s to compile),
    on a 4.2M-parameter MLP, whose time is its matrix products, 2.65× against 3.27× (0.81×). Without
    ``return_grad`` the compiled function does not return the gradient, so the compiler drops the weight-gradient
    products of the primal backward (about one matrix product in nine). Double backward (``"rr"``) cannot be compiled
    (AOTAutograd does not differentiate a compiled backward twice) and ``"fd"`` needs no compiler, so
    ``compile=True`` takes ``mode="auto"`` or ``"fr"`` only, with ``"fr"``'s requirements on ``f``. Recompilation
    follows ``torch.compile``'s own rules (a new shape, a module attribute it guarded on); past dynamo's recompile
    limit (``torch._dynamo.config.recompile_limit`` versions of the product in one process, 8 by default) the
    product runs uncompiled, with the same numbers.

Mixed precision: the exact modes run in the parameters' dtype, so their error is that dtype's rounding. On the
test models (an MLP, a conv net and an attention block, entries of order one) ``‖Hv − Hv₆₄‖ ≤ 8·ε·‖Hv₆₄‖``, where
``Hv₆₄`` is the float64 product at the same (rounded) inputs and ε = ``torch.finfo(dtype).eps``; measured
1.0–1.4·ε in float32 (ε = 1.2e-7), float16 (9.8e-4) and bfloat16 (7.8e-3: about 1% relative in bfloat16). For
curvature studies evaluate in float32 or float64; bfloat16 products are fine for optimizer preconditioners.

The result is detached: no graph is built through ``Hv`` (the product is for estimators and optimizers, not for
third derivatives).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
import weakref
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .._finite import first_nonfinite
from .linear import gradient_values_unused
from .routing import sdpa_curvature, watch_first_forward

__all__ = ["hvp", "fd_rtol", "compile_seconds", "MODES", "AUTO_ORDER"]

MODES = ("auto", "rr", "fr", "fd")
AUTO_ORDER = ("rr", "fr")

Tensors = Sequence[torch.Tensor]


class Remembered:
    """What was measured or learned, per weakly referenced key (a function, a model, an operator) and sub-key: the
    entries die with the key's object; a key that is None or cannot be weakly referenced remembers nothing."""

    def __init__(self):
        self._entries: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()

    def get(self, key: object, sub: object = None):
        try:
            return self._entries.get(key, {}).get(sub)
        except TypeError:  # not weak-referenceable or not hashable
            return None

    def set(self, key: object, sub: object, value) -> None:
        if key is None:
            return
        try:
            self._entries.setdefault(key, {})[sub] = value
        except TypeError:  # not weak-referenceable or not hashable: nothing to remember it by
            pass


# The mode "auto" settled on, per function (and per HessianOperator, which passes itself as key).
_auto_choice = Remembered()

# Errors that mean "this mode cannot differentiate this function", as opposed to bad input (ValueError).
_MODE_FAILURES = (RuntimeError, NotImplementedError)

# How the k second backwards of a "rr" block run, per key (as _auto_choice) and probe count: "vmap" or "loop".
_batching_choice = Remembered()
# From this many probes on, the first block of a key measures both ways on its own probes (no extra work) and
# remembers the faster per probe; smaller blocks take the loop (a vmap of one or two probes only adds overhead).
MEASURE_MIN_PROBES = 4
# How many probes of that first block run each way for the measurement (at most half of the block each).
MEASURE_PROBES = 4
# vmap is chosen only when its measured time per probe is below this fraction of the loop's: the loop is the one
# that can never lose to a plain loop, and one measurement on a few probes is noisy (a 4.2M-parameter MLP on a CPU
# measured vmap ahead on its first block and then ran 2.66x a gradient per probe with it, against 1.96x looped).
VMAP_ADVANTAGE = 0.8


def fd_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of ``mode="fd"``: ``‖fd − Hv‖ ≤ fd_rtol(dtype)·‖Hv‖`` on well-scaled models.

    ``100·ε^(2/3)``: 3.7e-9 for float64, 2.4e-3 for float32. The order ε^(2/3) comes from the step choice (see the
    module docstring); the factor 100 is margin over the model-dependent constant, which was about 1 on the test
    models (an MLP, a conv net and an attention block: errors of 3–5e-11 in float64 and 2–3.5e-5 in float32 over
    random directions). Badly scaled models (large third derivatives, gradients computed with heavy cancellation)
    can exceed it; use an exact mode when it matters.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"fd_rtol: dtype must be a floating-point dtype, got {dtype}")
    return 100.0 * torch.finfo(dtype).eps ** (2.0 / 3.0)


def differentiable(function: Callable) -> Callable:
    """``function`` run with gradients on and outside inference mode, whatever its caller's mode: a curvature
    product differentiates, also inside an evaluation loop's ``torch.no_grad()`` or Lightning's validation under
    ``torch.inference_mode()`` (where the Gauss-Newton and Fisher products raised "Inference tensors cannot be saved
    for backward" and the Hessian's rr mode failed over to fr)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return function(*args, **kwargs)

    return run


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it where it was made in inference mode (autograd cannot save it for a backward)."""
    return t.clone() if t.is_inference() else t


@differentiable
@sdpa_curvature()  # SDPA models: F.scaled_dot_product_attention has no double backward or forward-mode rule
def hvp(
    f: Callable[..., torch.Tensor],
    params: Tensors,
    v: Tensors,
    *,
    mode: str = "auto",
    return_grad: bool = False,
    compile: bool = False,
    strict: bool | None = None,
):
    """The Hessian of ``f`` at ``params`` times ``v``: ``Hv = ∇(∇f(params)·v)``.

    Args:
        f: ``f(*params)`` returns the loss, a floating-point tensor with one element (functional, as in
            ``torch.autograd.functional.hvp``).
        params: a non-empty list or tuple of floating-point tensors ``x_i``; not modified (they are detached, so
            whether they require grad does not matter).
        v: one tensor per param, either shaped like it (one probe: ``v[i].shape == x_i.shape``) or with a leading
            probe dimension k shared by every entry (``v[i].shape == (k, *x_i.shape)``): k products at once, which
            share the forward and the first backward. Same dtype and device as the param.
        mode: ``"auto"``, ``"rr"``, ``"fr"`` (exact) or ``"fd"`` (approximate); see the module docstring.
        return_grad: also return the gradient ``∇f(params)`` (exact in every mode; ``"fd"`` pays one more backward).
        compile: compute the product with a ``torch.compile``'d forward-over-reverse function, compiled once per
            ``f`` and signature (see the module docstring); ``mode`` must then be ``"auto"`` or ``"fr"``.
        strict: ``mode="fd"`` only: ``None`` (default) warns when the half-step estimate shows that f is not
            smooth at the scale of the step, ``True`` raises ``ValueError`` then, ``False`` skips that check.

    Returns:
        ``Hv``, a list (a tuple if ``v`` is a tuple) shaped like ``v`` (with the leading k if ``v`` has it); with
        ``return_grad=True`` the pair ``(Hv, grad)``, ``grad`` a list shaped like ``params`` (no probe dimension).
        Entries of params that f does not use get zeros.

    Raises:
        ValueError: empty, non-floating, meta or sparse params (a param with no elements is fine: its product is
            empty); v of the wrong length, shapes, dtype or device, or a probe
            dimension that differs between entries; non-finite values in v; f returning something other than a
            one-element floating tensor, or a non-finite loss; an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"hvp: unknown mode {mode!r}; use one of {', '.join(repr(m) for m in MODES)}")
    if not callable(f):
        raise TypeError(f"hvp: f must be callable as f(*params) -> loss, got a {type(f).__name__}")
    if strict is not None and not isinstance(strict, bool):  # 1 == True: `in (None, True, False)` took it
        raise TypeError(f"hvp: strict must be None, True or False, got {strict!r}")
    if not isinstance(return_grad, bool):
        raise TypeError(f"hvp: return_grad must be True or False, got {return_grad!r}")
    check_compile(compile, mode, where="hvp")
    params = check_params(params, where="hvp")
    probes, k = check_vectors(params, v, where="hvp")
    if compile and k != 0:
        hv, grad = compiled_hvp(f, f, params, probes, k, need_grad=return_grad)
    else:
        hv, grad = compute_hvp(_watched(f), params, probes, k, mode=mode, need_grad=return_grad, auto_key=f,
                               strict=strict)
    if isinstance(v, tuple):
        hv = tuple(hv)
    return (hv, grad) if return_grad else hv


# ----------------------------------------------------------------------------------------------------------------
# Input checks (shared with HessianOperator)


def check_params(params: Tensors, *, where: str, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """``params`` as a list of detached tensors, or ``ValueError`` naming what is wrong (``params[i]``, or the
    parameter's name from ``names``)."""
    if isinstance(params, torch.Tensor):
        raise ValueError(f"{where}: params must be a list or tuple of tensors, got a single tensor; wrap it as [t]")
    if not _is_sequence_like(params):
        raise ValueError(f"{where}: params must be a list or tuple of tensors, got a {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError(f"{where}: params is empty; pass at least one tensor to differentiate with respect to")
    for i, p in enumerate(params):
        name = f"params[{i}]" if names is None else f"parameter {names[i]!r}"
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{where}: {name} is a {type(p).__name__}, not a tensor")
        if not p.dtype.is_floating_point:
            raise ValueError(
                f"{where}: {name} has dtype {p.dtype}; the Hessian needs floating-point params "
                "(convert it with .double() or .float(), or leave it out of params)"
            )
        _check_dense_with_values(p, name, where)
    return [p.detach() for p in params]


def _is_sequence_like(value) -> bool:
    """A list, a tuple or another iterable of entries (``model.parameters()``); not a string or a mapping."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))


def _check_dense_with_values(t: torch.Tensor, name: str, where: str) -> None:
    """A strided tensor with values: autograd's products need both (a meta tensor has no values to differentiate
    at, and failed deep inside the first backward)."""
    if t.device.type == "meta":
        raise ValueError(f"{where}: {name} is a meta tensor (shapes only, no values); the Hessian needs the values: "
                         "materialize it first (e.g. model.to_empty(device=...) and load the weights)")
    if t.layout != torch.strided:
        raise ValueError(f"{where}: {name} is a {t.layout} tensor; products need dense tensors (.to_dense())")


def check_vectors(
    params: list[torch.Tensor], v: Tensors, *, where: str, check_finite: bool = True
) -> tuple[list[torch.Tensor], int | None]:
    """``v`` as a list of detached tensors and its probe count k (None for a single probe), or ``ValueError``."""
    if isinstance(v, torch.Tensor):
        raise ValueError(
            f"{where}: v must be a list of tensors shaped like params (one per param), got a single tensor; "
            "wrap it as [v]"
        )
    if not _is_sequence_like(v):
        raise ValueError(f"{where}: v must be a list or tuple of tensors shaped like params, got a "
                         f"{type(v).__name__}")
    v = list(v)
    if len(v) != len(params):
        raise ValueError(
            f"{where}: v has {len(v)} tensors but params has {len(params)}; pass one tensor per param"
        )
    for i, t in enumerate(v):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: v[{i}] is a {type(t).__name__}, not a tensor")

    def probe_count(i: int) -> int | None | str:
        shape, param_shape = tuple(v[i].shape), tuple(params[i].shape)
        if shape == param_shape:
            return None
        if len(shape) == len(param_shape) + 1 and shape[1:] == param_shape:
            return shape[0]
        return "mismatch"

    k = probe_count(0)
    for i in range(len(v)):
        count = probe_count(i)
        if count == "mismatch":
            param_shape = tuple(params[i].shape)
            raise ValueError(
                f"{where}: v[{i}] has shape {tuple(v[i].shape)} but params[{i}] has shape {param_shape}; expected "
                f"{param_shape} for one probe or {_probe_shape(param_shape)} for k probes"
            )
        if count != k:
            raise ValueError(
                f"{where}: v[{i}] has {_describe_probes(count)} (shape {tuple(v[i].shape)}) but v[0] has "
                f"{_describe_probes(k)}; every entry of v needs the same leading probe dimension k, or none"
            )
    for i, (t, p) in enumerate(zip(v, params)):
        if t.dtype != p.dtype or t.device != p.device:
            raise ValueError(
                f"{where}: v[{i}] is {t.dtype} on {t.device} but params[{i}] is {p.dtype} on {p.device}; "
                "convert v with .to(param)"
            )
        _check_dense_with_values(t, f"v[{i}]", where)
    if check_finite:
        i = first_nonfinite(v)
        if i is not None:
            raise ValueError(f"{where}: v[{i}] contains non-finite values (nan or inf); the product would be undefined")
    return [t.detach() for t in v], k


def _probe_shape(shape: tuple) -> str:
    return "(k, " + ", ".join(map(str, shape)) + ")" if shape else "(k,)"


def _describe_probes(k: int | None) -> str:
    return "no probe dimension" if k is None else f"a probe dimension of k={k}"


def _scalar_loss(out) -> torch.Tensor:
    """The loss f returned, as a 0-dim tensor, or ``ValueError`` saying what f returned instead."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"f must return the loss as a tensor with one element, got a {type(out).__name__}")
    if out.numel() != 1:
        raise ValueError(
            f"f must return a scalar loss (a tensor with one element), got shape {tuple(out.shape)}; reduce it "
            "first, e.g. with .mean() or .sum()"
        )
    if not out.dtype.is_floating_point:
        raise ValueError(f"f must return a floating-point loss, got dtype {out.dtype}")
    return out.reshape(())


def _check_finite_loss(loss: torch.Tensor, at: str = "params") -> None:
    if not bool(torch.isfinite(loss.detach())):
        raise ValueError(
            f"f returned a non-finite loss ({float(loss.detach())}) at {at}; the Hessian is undefined there "
            "(check the inputs and params for nan/inf, or the loss for log(0) and overflow)"
        )


def _watched(f: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``f`` with its arguments refused where a reentrant checkpoint hides them (:mod:`.routing`)."""

    def call(*params):
        names = tuple(f"params[{i}]" for i in range(len(params)))
        with watch_first_forward(f, (len(params),), names, params):
            return f(*params)

    return call


# ----------------------------------------------------------------------------------------------------------------
# The modes. Each takes checked inputs and returns (Hv as a list shaped like v, gradient list or None).


def compute_hvp(
    f: Callable[..., torch.Tensor],
    params: list[torch.Tensor],
    v: list[torch.Tensor],
    k: int | None,
    *,
    mode: str,
    need_grad: bool,
    auto_key: object = None,
    batch_key: object = None,
    strict: bool | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """``hvp`` on inputs already passed through :func:`check_params` / :func:`check_vectors`.

    ``auto_key`` is the object under which ``mode="auto"`` remembers its choice (``f`` for :func:`hvp`);
    ``batch_key`` the one under which a "rr" block remembers vmap or loop (default ``auto_key``: an operator passes
    its model, which the estimators' fresh operators share); ``strict`` is :func:`hvp`'s (the smoothness check of
    ``mode="fd"``).
    """
    if batch_key is None:
        batch_key = auto_key
    if k == 0:
        # No probes: nothing to differentiate twice, but the gradient may still be asked for.
        grad = loss_and_gradient(f, params, at="params")[1] if need_grad else None
        return [t.clone() for t in v], grad
    if mode == "rr":
        return _hvp_rr(f, params, v, k, batch_key, need_grad)
    if mode == "fr":
        return _hvp_fr(f, params, v, k)
    if mode == "fd":
        return _hvp_fd(f, params, v, k, need_grad, strict)
    if mode == "auto":
        return _hvp_auto(f, params, v, k, auto_key, batch_key, need_grad)
    raise ValueError(f"hvp: unknown mode {mode!r}; use one of {', '.join(repr(m) for m in MODES)}")


def auto_choice(key: object) -> str | None:
    """The mode ``"auto"`` settled on for ``key`` (a function, or a HessianOperator), or None if not decided yet."""
    return _auto_choice.get(key)


def remember_auto_choice(key: object, mode: str) -> None:
    """Record ``mode`` as what ``"auto"`` settled on for ``key`` (see :func:`auto_choice`)."""
    _auto_choice.set(key, None, mode)


def _hvp_auto(f, params, v, k, key, batch_key, need_grad=True):
    chosen = auto_choice(key)
    order = ([chosen] if chosen else []) + [m for m in AUTO_ORDER if m != chosen]
    first_error = None
    for mode in order:
        try:
            result = _hvp_rr(f, params, v, k, batch_key, need_grad) if mode == "rr" else _hvp_fr(f, params, v, k)
        except _MODE_FAILURES as error:
            if first_error is None:
                first_error = error
            elif hasattr(first_error, "add_note"):
                first_error.add_note(f"hvp(mode='auto'): mode {mode!r} failed too: {type(error).__name__}: {error}")
            continue
        if mode != chosen:
            remember_auto_choice(key, mode)
        return result
    raise first_error


def _hvp_rr(f, params, v, k, key=None, need_grad=True):
    leaves, grads = first_order_graph(f, params, gradient_values=need_grad)
    hv = second_backward(leaves, grads, v, k, keep_graph=False, key=key)
    if not need_grad:
        return hv, None
    grad = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    return hv, grad


def first_order_graph(f, params, *, gradient_values: bool = True) -> tuple[list[torch.Tensor], tuple]:
    """``(leaves, ∇f(leaves))`` with the gradient's graph (``create_graph``): the first half of a "rr" product.

    ``leaves`` are detached aliases of ``params`` (same storage) that require grad. With ``gradient_values=False``
    the graph is all the caller uses: linear layers' weight gradients are then placeholders with the right graph
    (:mod:`.linear`), which saves about one matrix product in three of the gradient.
    """
    leaves = [p.detach().requires_grad_(True) for p in params]
    unused = contextlib.nullcontext() if gradient_values else gradient_values_unused(leaves)
    with torch.enable_grad(), unused:
        loss = _scalar_loss(f(*leaves))
        _check_finite_loss(loss)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    return leaves, grads


def second_backward(leaves, grads, v, k, *, keep_graph: bool, key: object = None) -> list[torch.Tensor]:
    """``H v`` from the gradient's graph: one backward of ``⟨∇f, v⟩`` per probe (see :func:`batched_vjp`).

    ``keep_graph=True`` keeps the graph for further products (a :class:`HessianOperator` reusing it); ``key``
    names the function (or operator) under which the faster way to run a block of probes is remembered.
    """
    return batched_vjp(grads, leaves, v, k, keep_graph=keep_graph, key=key)


def batched_vjp(outputs, inputs, cotangents, k, *, keep_graph: bool, key: object = None,
                kind: str | None = None) -> list[torch.Tensor]:
    """``Σ_j cotangents_jᵀ ∂outputs_j/∂inputs_i`` for each input i: one backward per probe.

    ``cotangents[j]`` is shaped like ``outputs[j]`` (one probe, ``k`` None) or with a leading k; the k backwards of
    a block run as :func:`batched_backward` chooses for ``key`` and ``kind`` (which backward of a product this is,
    when a key's products run several: None for the Hessian's second backward). An output that is None or carries
    no graph contributes nothing; an input no output reaches gets zeros (with the leading k).
    """
    # An output entry that is None or carries no graph does not depend on the inputs.
    live = [i for i, g in enumerate(outputs) if g is not None and g.requires_grad]
    products = [None] * len(inputs)
    if live:
        outputs = [outputs[i] for i in live]
        directions = [cotangents[i] for i in live]
        if k is None:
            products = torch.autograd.grad(outputs, inputs, directions, retain_graph=keep_graph, allow_unused=True)
        elif k == 1:  # one probe in a block (Lanczos, power iteration): a plain backward, vmap only adds overhead
            products = torch.autograd.grad(outputs, inputs, [d[0] for d in directions], retain_graph=keep_graph,
                                           allow_unused=True)
            products = [None if product is None else product.unsqueeze(0) for product in products]
        else:
            products = batched_backward(outputs, inputs, directions, k, keep_graph, key, kind)
    # An input the backward does not reach has a zero column.
    lead = () if k is None else (k,)
    return [
        product if product is not None else torch.zeros(lead + tuple(x.shape), dtype=x.dtype, device=x.device)
        for product, x in zip(products, inputs)
    ]


def _vmapped_backward(outputs, leaves, directions):
    # retain_graph: if vmap gives up half-way, the loop still needs the graph.
    return torch.autograd.grad(outputs, leaves, directions, retain_graph=True, allow_unused=True,
                               is_grads_batched=True)


def _product_views(leaves, count: int) -> list[torch.Tensor] | None:
    """Views shaped ``(count, *leaf.shape)`` of one new ``(count, Σ numel)`` buffer, one per leaf, when the leaves
    share a dtype and device (else None): products written there are the ``(k, n)`` block a
    :class:`~optim.hessian.operator.CurvatureOperator` hands on as it is, instead of stacking and then
    concatenating a copy of a block that is gigabytes on a large model."""
    if len({(x.dtype, x.device) for x in leaves}) != 1:
        return None
    numels = [x.numel() for x in leaves]
    buffer = torch.empty((count, sum(numels)), dtype=leaves[0].dtype, device=leaves[0].device)
    return [piece.view((count, *x.shape)) for piece, x in zip(buffer.split(numels, dim=1), leaves)]


def _looped_backward(outputs, leaves, directions, keep_graph, out=None):
    """One backward per probe, written into ``out`` (views from :func:`_product_views`, zeros for a leaf no output
    reaches) when given or possible; stacked per leaf otherwise."""
    count = directions[0].shape[0]
    views = out if out is not None else _product_views(leaves, count)
    # Each leaf's k rows as views made once, and one foreach copy per probe: a copy_ per (probe, leaf) cost more
    # than torch.stack on a small model (1.8 against 1.0 ms for 8 probes of a 0.7M-parameter GPT, one CPU thread).
    rows = None if views is None else [view.unbind(0) for view in views]
    per_probe = []
    for j in range(count):
        products = torch.autograd.grad(outputs, leaves, [d[j] for d in directions],
                                       retain_graph=keep_graph or j < count - 1, allow_unused=True)
        if rows is None:
            per_probe.append(products)
            continue
        reached = [(leaf_rows[j], product) for leaf_rows, product in zip(rows, products) if product is not None]
        if reached:
            torch._foreach_copy_([target for target, _ in reached], [product for _, product in reached])
        for leaf_rows, product in zip(rows, products):
            if product is None:
                leaf_rows[j].zero_()
    if views is not None:
        return views
    return [None if per_probe[0][i] is None else torch.stack([probe[i] for probe in per_probe])
            for i in range(len(leaves))]


def batching_choice(key, k: int, kind: str | None = None) -> str | None:
    """How blocks of k probes run for ``key`` (and ``kind``, see :func:`batched_vjp`): "vmap", "loop", or None
    before the first block measured it."""
    return _batching_choice.get(key, _choice_key(k, kind))


def _choice_key(k: int, kind: str | None):
    return k if kind is None else (kind, k)


# The two backwards of an output-space product (GGN, empirical Fisher): J v to the outputs' cotangent, Jᵀ w to the
# parameters; each remembers its own vmap-or-loop choice per model.
OUTPUT_SPACE_BACKWARDS = ("J v", "J^T w")


def probes_loop(key, k: int, kinds) -> bool:
    """Whether a block of k probes for ``key`` runs every backward of ``kinds`` as a loop: below
    :data:`MEASURE_MIN_PROBES`, or as measured. A product made of several backwards can then run probe by probe
    (:func:`per_probe`) instead of backward by backward over (k, ...) blocks of intermediates."""
    return k < MEASURE_MIN_PROBES or all(batching_choice(key, k, kind) == "loop" for kind in kinds)


def _elapsed_s(device: torch.device, start: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def batched_backward(outputs, leaves, directions, k, keep_graph=False, key=None, kind=None):
    """``vᵀ ∂g/∂x`` for the k probes stacked in ``directions``: vmapped, or a loop of k backwards.

    Blocks below :data:`MEASURE_MIN_PROBES` take the loop. Otherwise the first block of ``key`` runs
    :data:`MEASURE_PROBES` of its probes (at most half) vmapped and as many looped, timed (the device synchronized
    around each on CUDA), remembers vmap for ``(key, k)`` if its time per probe is below :data:`VMAP_ADVANTAGE`
    times the loop's (the loop otherwise) and runs the rest of the
    block that way: a losing way costs a few probes once, not half of a large block. A vmap that fails (no batching
    rule, ``.item()``, data-dependent control flow, a NumPy round-trip in a custom backward) makes ``(key, k)``
    loop.
    """
    sub = _choice_key(k, kind)
    choice = _batching_choice.get(key, sub) if k >= MEASURE_MIN_PROBES else "loop"
    if choice == "loop":
        return _looped_backward(outputs, leaves, directions, keep_graph)
    try:
        if choice == "vmap":
            return _vmapped_backward(outputs, leaves, directions)
        device = directions[0].device
        m = min(k // 2, MEASURE_PROBES)
        start = time.perf_counter()
        pieces = [_vmapped_backward(outputs, leaves, [d[:m] for d in directions])]
        vmap_s = _elapsed_s(device, start)
    except RuntimeError:
        # Only this call is retried: a genuine error re-raises from the loop.
        _batching_choice.set(key, sub, "loop")
        return _looped_backward(outputs, leaves, directions, keep_graph)
    last = 2 * m == k
    views = _product_views(leaves, k)  # the block's rows are written in place: no concatenation of the pieces

    def rows(first, stop):
        return None if views is None else [view[first:stop] for view in views]

    vmapped = [(pieces[0], 0, m)]  # (products, first row, stop row): vmap's, to be copied into the block
    start = time.perf_counter()
    pieces.append(_looped_backward(outputs, leaves, [d[m:2 * m] for d in directions], keep_graph or not last,
                                   out=rows(m, 2 * m)))
    loop_s = _elapsed_s(device, start)
    choice = "vmap" if vmap_s < VMAP_ADVANTAGE * loop_s else "loop"
    _batching_choice.set(key, sub, choice)
    if not last:
        rest = [d[2 * m:] for d in directions]
        if choice == "vmap":
            pieces.append(_vmapped_backward(outputs, leaves, rest))
            vmapped.append((pieces[-1], 2 * m, k))
        else:
            pieces.append(_looped_backward(outputs, leaves, rest, keep_graph, out=rows(2 * m, k)))
    if views is not None:
        for products, first, stop in vmapped:
            for view, product in zip(rows(first, stop), products):
                if product is None:  # a leaf no output reaches
                    view.zero_()
                else:
                    view.copy_(product)
        return views
    # A leaf no output reaches is None in the vmapped pieces and zeros in the looped ones.
    return [None if any(piece[i] is None for piece in pieces) else torch.cat([piece[i] for piece in pieces])
            for i in range(len(leaves))]


def _hvp_fr(f, params, v, k):
    primals = tuple(p.detach() for p in params)

    def loss_and_value(*xs):
        loss = _scalar_loss(f(*xs))
        return loss, loss  # the second copy comes back as aux, unwrapped, for the finiteness check

    grad_of_f = torch.func.grad(loss_and_value, argnums=tuple(range(len(primals))), has_aux=True)

    def along(*tangents):
        return torch.func.jvp(grad_of_f, primals, tangents, has_aux=True)

    if k is None:
        grad, hv, loss = along(*v)
    else:
        # The primals are not batched, so under vmap the forward and the gradient run once for all k tangents;
        # randomness="same" gives every probe the same dropout mask, as the shared forward of "rr" does.
        grad, hv, loss = torch.func.vmap(along, out_dims=(None, 0, None), randomness="same")(*v)
    _check_finite_loss(loss)
    return list(hv), list(grad)


# ----------------------------------------------------------------------------------------------------------------
# The compiled forward-over-reverse product

class CompileTimes:
    """Per key (a function, or a model for the operators): the signatures compiled for it and the seconds their
    first calls took. Nothing here refers to the key's objects (a value holding its key would keep it alive); a
    key that cannot be weakly referenced is not timed."""

    def __init__(self):
        self._signatures: "weakref.WeakKeyDictionary[object, set]" = weakref.WeakKeyDictionary()
        self._seconds: "weakref.WeakKeyDictionary[object, float]" = weakref.WeakKeyDictionary()

    def seconds(self, key: object) -> float:
        try:
            return self._seconds.get(key, 0.0)
        except TypeError:
            return 0.0

    def is_new(self, key: object, signature: tuple) -> bool:
        try:
            return signature not in self._signatures.get(key, ())
        except TypeError:
            return False

    def add(self, key: object, signature: tuple, seconds: float) -> None:
        self._signatures.setdefault(key, set()).add(signature)
        self._seconds[key] = self.seconds(key) + seconds

    def first_call_timer(self, key: object, signature: tuple) -> Callable[[], None]:
        """Started now; call it after each compiled call: the first, for a (key, signature) not seen yet, adds
        the seconds since the start (the compilation included)."""
        start, pending = time.perf_counter(), [self.is_new(key, signature)]

        def mark() -> None:
            if pending[0]:
                self.add(key, signature, time.perf_counter() - start)
                pending[0] = False
        return mark


@functools.cache
def compiled(function: Callable) -> Callable:
    """``torch.compile(function)``, made at the first use and shared by every caller."""
    return torch.compile(function, dynamic=False)


def per_probe(product_of: Callable[[list[torch.Tensor]], list[torch.Tensor]], v: list[torch.Tensor],
              k: int | None) -> list[torch.Tensor]:
    """``product_of(direction)`` for one probe (``k`` None), or per entry over the k probes of a block, written
    into one ``(k, n)`` block as they come (:func:`_product_views`; stacked where the entries' dtypes or devices
    differ): the compiled products run their one-probe function k times (vmapping the tangents inside the compiled
    function compiled for minutes and past 20 GB on a 7M-parameter GPT on a CPU), so one compilation serves Lanczos
    (one probe) and Hutchinson (blocks) alike; the GGN and Fisher run their looped blocks so."""
    if k is None:
        return list(product_of(list(v)))
    views = _product_views([t[0] for t in v], k) if k else None  # each product is copied into the (k, n) block
    if views is None:
        products = [product_of([t[j] for t in v]) for j in range(k)]
        return [torch.stack([product[i] for product in products]) for i in range(len(v))]
    rows = [view.unbind(0) for view in views]
    for j in range(k):
        torch._foreach_copy_([leaf_rows[j] for leaf_rows in rows], list(product_of([t[j] for t in v])))
    return views


class OutputsDoNotFit(Exception):
    """Raised inside a compiled output-space product when the model's outputs do not fit its formula (shapes,
    dtype): the caller computes that product eagerly."""


class CompiledOutputProducts:
    """The compiled products of one operator kind whose function differentiates the model's outputs (the GGN's
    ``Jᵀ H_z J v``, the empirical Fisher's ``Jᵀ R (Rᵀ J v)``): one ``torch.compile``'d ``function(*args,
    direction) -> (product, aux)`` for every model (``aux``: what shows the loss finite), its first call per (model, signature) timed, and per model the
    signatures whose outputs did not fit (:class:`OutputsDoNotFit`), whose later products go eager at once instead
    of running the compiled forward again only to leave it. Nothing refers to an operator (a SharpnessMonitor
    builds one per measurement)."""

    def __init__(self, function: Callable):
        self.function = function
        self.times = CompileTimes()
        self._unfit = Remembered()  # model -> {signature: True}

    def seconds(self, model: object) -> float:
        return self.times.seconds(model)

    def __call__(self, model, signature: tuple, args: tuple, v: list[torch.Tensor], k: int | None,
                 check: Callable[[torch.Tensor], None]) -> list[torch.Tensor] | None:
        """``function(*args, direction)``'s products for one probe (``k`` None) or a ``(k, ...)`` block, the first
        probe's ``aux`` passed to ``check`` (every probe's is the same); None where the outputs did not fit, and
        while a module of ``model`` is in training mode (:func:`in_eval_mode`): the caller computes the product
        eagerly."""
        if not in_eval_mode(model) or self._unfit.get(model, signature):
            return None
        mark = self.times.first_call_timer(model, signature)

        checked = []

        def product_of(direction):
            product, aux = compiled(self.function)(*args, direction)
            mark()
            if not checked:
                check(aux)
                checked.append(True)
            return product

        try:
            return per_probe(product_of, v, k)
        except OutputsDoNotFit:
            self._unfit.set(model, signature, True)
            return None


def in_eval_mode(model) -> bool:
    """Whether no module of ``model`` is in training mode. A compiled output-space product evaluates the forward
    twice (in ``jvp`` and in ``vjp``), so a module that draws random numbers in training mode (dropout) would give J
    and Jᵀ of two different masks: those products are computed eagerly, on one forward."""
    return not any(module.training for module in model.modules())


_hvp_compile_times = CompileTimes()


def check_compile(compile: object, mode: str, *, where: str) -> None:
    if not isinstance(compile, bool):
        raise ValueError(f"{where}: compile must be True or False, got {compile!r}")
    if compile and mode not in ("auto", "fr"):
        raise ValueError(
            f"{where}: compile=True computes forward-over-reverse products (mode 'fr'); mode={mode!r} cannot be "
            "compiled (AOTAutograd does not differentiate a compiled backward twice, and 'fd' needs no compiler): "
            "use mode='auto' or 'fr'"
        )


def compile_seconds(key: object) -> float:
    """Seconds the first calls of the compiled products of ``key`` took, compilation included (0 if none)."""
    return _hvp_compile_times.seconds(key)


def _signature(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else ("value", repr(t))
                 for t in tensors)


def _fr_product(f, params, v, k, with_grad):
    """``(Hv, f)`` at params by ``jvp(grad(f))``, the tangent vmapped over k probes, and ``∇f`` first with
    ``with_grad`` (the function compiled). Without it the compiled graph drops the weight-gradient products of the
    primal backward (one matrix product of about nine per linear layer): only their tangents are returned."""
    n = len(params)

    def loss_and_value(*xs):
        loss = _scalar_loss(f(*xs))
        return loss, loss

    grad_of_f = torch.func.grad(loss_and_value, argnums=tuple(range(n)), has_aux=True)

    def along(*tangents):
        return torch.func.jvp(grad_of_f, tuple(params), tangents, has_aux=True)

    if k is None:
        grad, hv, loss = along(*v)
    else:
        grad, hv, loss = torch.func.vmap(along, out_dims=(None, 0, None), randomness="same")(*v)
    return (grad, hv, loss) if with_grad else (hv, loss)


def compiled_hvp(key, f, params, v, k, signature_extra=(), *, need_grad=True):
    """``(Hv, ∇f)`` by the compiled :func:`_fr_product` (``∇f`` None without ``need_grad``); the first call per
    (key, signature) is timed.

    Dynamo keeps the compiled code (one cache per process for this function, up to its recompile limit), guarded on
    ``f``'s code and what it closes over; ``signature_extra`` (the batch) completes the signature that is timed.
    """
    mark = _hvp_compile_times.first_call_timer(key, (_signature(params), _signature(signature_extra), need_grad))
    grad = None

    def product_of(direction):
        nonlocal grad
        # Every probe of a block runs the same compiled variant (returning ∇f or not): one compilation.
        out = compiled(_fr_product)(f, list(params), direction, None, need_grad)
        (grad, hv, loss) = out if need_grad else (None, *out)
        mark()
        _check_finite_loss(loss)
        return hv

    products = per_probe(product_of, v, k)
    return products, None if grad is None else list(grad)


def loss_and_gradient(f, points: list[torch.Tensor], *, at: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(f(points), ∇f(points))``, first order only; ``points`` are not modified."""
    leaves = [p.detach().requires_grad_(True) for p in points]
    with torch.enable_grad():
        loss = _scalar_loss(f(*leaves))
        _check_finite_loss(loss, at)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, points)]


def _norm(tensors: Tensors) -> float:
    """The Euclidean norm of a list of tensors taken as one vector, accumulated in float64."""
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def _hvp_fd(f, params, v, k, need_grad, strict=None):
    eps = max(torch.finfo(p.dtype).eps for p in params)
    dtype = max((p.dtype for p in params), key=lambda d: torch.finfo(d).eps)
    scale = max(1.0, _norm(params))
    probes = [v] if k is None else [[t[j] for t in v] for j in range(k)]
    results = []
    worst = None  # (relative discrepancy of the half-step estimate, probe index)
    for index, direction in enumerate(probes):
        length = _norm(direction)
        if length == 0.0:
            results.append([torch.zeros_like(d) for d in direction])
            continue
        h = eps ** (1.0 / 3.0) * scale / length
        # New tensors, never params themselves: nothing to restore, whatever f does.
        _, grad_plus = loss_and_gradient(f, [p + h * d for p, d in zip(params, direction)], at="params + h·v")
        _, grad_minus = loss_and_gradient(f, [p - h * d for p, d in zip(params, direction)], at="params - h·v")
        results.append([(gp - gm) / (2.0 * h) for gp, gm in zip(grad_plus, grad_minus)])
        if strict is not False:
            # The half step: for a smooth f the two estimates agree to the truncation and rounding errors.
            _, half_plus = loss_and_gradient(f, [p + 0.5 * h * d for p, d in zip(params, direction)],
                                             at="params + h·v/2")
            _, half_minus = loss_and_gradient(f, [p - 0.5 * h * d for p, d in zip(params, direction)],
                                              at="params - h·v/2")
            difference = _norm([(hp - hm) / h - r for hp, hm, r in zip(half_plus, half_minus, results[-1])])
            size = _norm(results[-1])
            rounding = 100.0 * eps * max(_norm(grad_plus), _norm(grad_minus)) / h
            if difference > fd_rtol(dtype) * size + rounding:
                relative = difference / size if size else math.inf
                if worst is None or relative > worst[0]:
                    worst = (relative, index)
    if worst is not None:
        message = (f"hvp(mode='fd'): the estimate with the half step differs from the full-step one by "
                   f"{worst[0]:.3g} (relative, probe {worst[1]}), more than the {fd_rtol(dtype):.2g} of fd_rtol"
                   f"({dtype}): f is not smooth at the scale of the step h·‖v‖ = {eps ** (1.0 / 3.0) * scale:.2g} "
                   "(ReLU, max-pooling or another kink is crossed), so the finite difference can be far off. Use "
                   "an exact mode ('rr' or 'fr')")
        if strict:
            raise ValueError(message + "; strict=True raised instead of warning")
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    hv = results[0] if k is None else [torch.stack([r[i] for r in results]) for i in range(len(params))]
    grad = loss_and_gradient(f, params, at="params")[1] if need_grad else None
    return hv, grad
