"""The curvature routes: while curvature is computed, six torch calls run on versions of ours.

| PyTorch function | replaced by | why |
|---|---|---|
| ``F.scaled_dot_product_attention`` | :func:`.attention.scaled_dot_product_attention` | torch's SDPA kernels have no double backward or forward-mode rule |
| ``F.cross_entropy`` | :func:`.losses.functional_cross_entropy` | torch differentiates ``log_softmax`` twice op by op (3.3x slower on large scores) |
| ``F.linear``, ``torch.addmm`` | :func:`.linear.linear`, :func:`.linear.addmm` | a gradient only differentiated again need not compute its weight-gradient values |
| ``F.layer_norm`` | :func:`.layer_norm.layer_norm` | torch's double backward of layer normalization is ~30 elementwise ops; ours is one fused pass |
| ``torch._weight_norm`` | :func:`.weight_norm.weight_norm` | the fused weight norm's double backward is wrong (torch 2.13) and it has no forward-mode rule |

Each replacement takes the same arguments; the cross-entropy returns torch's loss and gradient bit for bit (and is
torch's function for the cases it does not cover, and below :data:`.losses.FUSED_MIN_SCORES` scores), so only
the second derivatives differ in how they are computed. The linear layers are torch's own except inside
:func:`.linear.gradient_values_unused` (a product's gradient graph whose values are never read), where a leaf
weight's gradient is a placeholder that carries the graph. The layer norm's forward and backward are torch's
``native_layer_norm`` and ``native_layer_norm_backward``; only its backward's backward is ours. ``hvp``, the
curvature operators (and with them ``SharpnessMonitor`` and the estimators) and the SophiaH/AdaHessian refresh steps
enter :func:`sdpa_curvature` themselves. Inside ``torch.compile`` only the SDPA route (to plain softmax attention,
:func:`.attention.composite_attention`) and the weight norm's are taken: the compiler derives and fuses the others
itself. Under autocast too, so that torch casts those calls as autocast says; the SDPA route casts its arguments as
torch's SDPA does there (to the autocast dtype), and the routes' backward and JVP rules run in their forwards'
dtypes (:func:`optim._library.without_autocast`).
"""

from __future__ import annotations

import contextlib
import sys
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointError, CheckpointFunction

from . import attention, layer_norm, linear, losses, weight_norm

__all__ = ["curvature_context_fn", "sdpa_curvature"]

# function -> (module, name, needed under torch.compile). Looked up by name at each call, so a test can wrap one.
_ROUTES = {
    F.scaled_dot_product_attention: (attention, "scaled_dot_product_attention", True),
    F.cross_entropy: (losses, "functional_cross_entropy", False),
    F.linear: (linear, "linear", False),  # torch's own, but inside linear.gradient_values_unused()
    torch.addmm: (linear, "addmm", False),  # the same (Hugging Face's Conv1D)
    F.layer_norm: (layer_norm, "layer_norm", False),
    torch._weight_norm: (weight_norm, "weight_norm", True),  # also compiled: the fused op has no forward-mode rule
}


class _CurvatureRoutes(TorchFunctionMode):
    """Sends the functions of ``_ROUTES`` to their replacements; all else runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is None or (not route[2] and (torch.compiler.is_compiling() or _in_autocast(args, kwargs))):
            return func(*args, **kwargs)
        module, name, _ = route
        return getattr(module, name)(*args, **kwargs)


def _in_autocast(args, kwargs) -> bool:
    """Whether autocast is on for the device of the call's first tensor. The optional routes then leave the call to
    torch, which casts it as autocast says (to bfloat16 for a linear layer; to float32 for a layer norm or a
    cross-entropy on CUDA), where ours would compute in the dtypes they are given."""
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    return first is not None and torch.is_autocast_enabled(first.device.type)


def _routing() -> bool:
    """Whether a mode of ours is already on this thread's torch-function mode stack."""
    try:
        stack = torch.overrides._get_current_function_mode_stack()
    except AttributeError:  # a torch without the helper: enter again, which is harmless (only slower)
        return False
    return any(isinstance(mode, _CurvatureRoutes) for mode in stack)


@contextlib.contextmanager
def sdpa_curvature(enabled: bool = True):
    """Within this context (when ``enabled``), the curvature routes are taken: ``F.scaled_dot_product_attention``
    is :func:`~.attention.scaled_dot_product_attention` (differentiable twice, forward-mode differentiable and
    vmappable, in O(T) memory), and ``F.cross_entropy`` on (N, C) scores gets fused second derivatives.

    Entered by ``hvp``, the curvature operators and the second-order optimizers' refresh steps; enter it yourself
    to differentiate an SDPA model twice elsewhere. Nested entries are one entry. With ``dropout_p`` > 0 (training
    mode) the attention is plain softmax attention with dropout (T×T weights kept): curvature studies evaluate in
    eval mode. Also a decorator (``@sdpa_curvature()``).
    """
    if not enabled or _routing():
        yield
        return
    # A mode does not see the calls nested inside a function it handles: F.multi_head_attention_forward (nn.Multi-
    # headAttention, nn.TransformerEncoderLayer) calls torch's SDPA there, whose fused kernels have no double
    # backward. Torch's math backend has one (T×T weights), so those nested calls take it. The modules' inference
    # fast path (taken where they see no gradient being recorded, as under torch.compile's functional transforms)
    # has no derivative at all.
    with _CurvatureRoutes(), sdpa_kernel([SDPBackend.MATH]), _mha_fastpath_off(), checkpoint_note():
        yield


@contextlib.contextmanager
def checkpoint_note():
    """Notes on what to pass to activation checkpointing, added to the errors it raises in the block: a
    ``CheckpointError`` (a recomputation outside the routes, without ``curvature_context_fn``) and the reentrant
    checkpoint's refusal of ``torch.autograd.grad``. The optimizers' refresh steps differentiate outside the
    routes' block, so they enter this one around their gradients."""
    try:
        yield
    except CheckpointError as error:
        _add_note_once(error, _CHECKPOINT_NOTE)
        raise
    except RuntimeError as error:
        if "use_reentrant=True" in str(error):
            _add_note_once(error, _REENTRANT_NOTE)
        raise


def _add_note_once(error: BaseException, note: str) -> None:
    if note not in getattr(error, "__notes__", ()):
        error.add_note(note)


@contextlib.contextmanager
def _mha_fastpath_off():
    """``torch.backends.mha.set_fastpath_enabled(False)`` for the block (a process-wide flag, as sdpa_kernel's)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


_CHECKPOINT_NOTE = (
    "optim: a checkpointed module recomputed its forward inside the backward, where the curvature routes are not "
    "taken, so the recomputation differs from the routed forward. Pass context_fn=optim.hessian.curvature_context_fn "
    "to torch.utils.checkpoint.checkpoint(..., use_reentrant=False) (Hugging Face: model.activation_checkpointing_"
    "enable(activation_checkpointing_kwargs={'use_reentrant': False, 'context_fn': "
    "optim.hessian.curvature_context_fn}))")
_REENTRANT_NOTE = (
    "optim: curvature differentiates the gradient again, which the reentrant checkpoint cannot: use "
    "use_reentrant=False with context_fn=optim.hessian.curvature_context_fn (Hugging Face: "
    "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False, 'context_fn': "
    "optim.hessian.curvature_context_fn}))")


def curvature_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the recomputation of a
    checkpointed module takes the curvature routes exactly when its forward took them.

    The backward recomputes a checkpointed forward while the autograd engine runs, and ``torch.autograd.grad`` and
    ``backward`` run with this thread's torch-function modes popped: without this, a forward routed to the
    attention ops is recomputed by torch's SDPA (a ``CheckpointError``: its saved tensors differ, and it has no
    double backward). Outside the routes (a plain training step) the recomputation is torch's, as its forward was.
    For a Hugging Face model: ``model.activation_checkpointing_enable(activation_checkpointing_kwargs=
    {"use_reentrant": False, "context_fn": optim.hessian.curvature_context_fn})`` (``gradient_checkpointing_enable``
    and ``gradient_checkpointing_kwargs`` before transformers 5). A second derivative needs the non-reentrant
    checkpoint: the reentrant one refuses ``torch.autograd.grad``.
    """
    return contextlib.nullcontext(), _RoutesWhen(_routing())


class _RoutesWhen:
    """:func:`sdpa_curvature` as a context manager that can be entered again (a recomputation runs once per
    backward that reaches it, with the same context)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._entered = []

    def __enter__(self):
        context = sdpa_curvature(self.enabled)
        context.__enter__()
        self._entered.append(context)

    def __exit__(self, *exc_info):
        return self._entered.pop().__exit__(*exc_info)


class _FirstForwardWatch(TorchFunctionMode):
    """Records which of the given tensors a reentrant checkpoint's forward uses, and which random functions the
    forward calls.

    ``torch.utils.checkpoint`` with ``use_reentrant=True`` runs its function under ``no_grad`` and differentiates it
    again only in its own backward, which ``loss.backward()`` reaches through the checkpoint's inputs. The
    curvature operators differentiate with ``torch.autograd.grad`` towards the parameters in scope: a parameter used
    only inside such a checkpoint is not in the graph, and when no input of the checkpoint is differentiated either
    (the parameters before it are out of scope) its gradient, and so every product, silently reads zero.

    A forward that draws random numbers (dropout in training mode, attention dropout, noise) is another function at
    every call: each product of an operator that runs it afresh sees another matrix.
    """

    def __init__(self, tensors: dict[int, str]):
        super().__init__()
        self._tensors = tensors
        self.hidden: list[str] = []
        self.random: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled() and _inside_reentrant_checkpoint():
            for leaf in tree_leaves((args, kwargs)):
                name = self._tensors.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if name is not None and name not in self.hidden:
                    self.hidden.append(name)
        name = _random_call(func, args, kwargs)
        if name is not None and name not in self.random:
            self.random.append(name)
        return func(*args, **kwargs)


def _argument(args, kwargs, index: int, name: str, default):
    return args[index] if len(args) > index else kwargs.get(name, default)


# Functions that draw random numbers whenever they are called, and those that do only with their dropout
# probability (argument position, name, default) above 0 and their training flag (position, name, default) set.
_ALWAYS_RANDOM = {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
                  torch.randperm, torch.normal, torch.poisson, torch.bernoulli, torch.multinomial,
                  torch.Tensor.bernoulli, torch.Tensor.bernoulli_, torch.Tensor.uniform_, torch.Tensor.normal_,
                  torch.Tensor.random_, torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_,
                  torch.Tensor.log_normal_, torch.Tensor.multinomial}
_RANDOM_WHEN = {
    **{f: ((1, "p", 0.5), (2, "training", True)) for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)},
    **{f: ((1, "p", 0.5), (2, "training", False)) for f in (F.alpha_dropout, F.feature_alpha_dropout)},
    torch.dropout: ((1, "p", 0.5), (2, "train", True)),
    torch.nn.functional.rrelu: ((None, None, 1.0), (3, "training", False)),
    F.scaled_dot_product_attention: ((4, "dropout_p", 0.0), (None, None, True)),
}


def _random_call(func, args, kwargs) -> str | None:
    """The name of ``func`` if this call draws random numbers, else None."""
    if func in _ALWAYS_RANDOM:
        return getattr(func, "__name__", repr(func))
    rule = _RANDOM_WHEN.get(func)
    if rule is None:
        return None
    (p_index, p_name, p_default), (t_index, t_name, t_default) = rule
    p = p_default if p_name is None else _argument(args, kwargs, p_index, p_name, p_default)
    training = t_default if t_name is None else _argument(args, kwargs, t_index, t_name, t_default)
    if not training or not isinstance(p, (int, float)) or p <= 0:
        return None
    return f"{func.__name__}({p_name or 'p'}={p:g})" if p_name else func.__name__


def _inside_reentrant_checkpoint() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _REENTRANT_FORWARD:
            return True
        frame = frame.f_back
    return False


_REENTRANT_FORWARD = CheckpointFunction.forward.__code__
_WATCHED = weakref.WeakKeyDictionary()  # owner -> {key: the random functions} for the forwards watched and passed


def _cache_owner(owner, key: tuple):
    """A bound method is a new object at every attribute access: its instance owns the cache entry instead."""
    function = getattr(owner, "__func__", None)
    return (owner.__self__, (function, *key)) if function is not None and hasattr(owner, "__self__") else (owner, key)


def _watched_keys(owner) -> dict:
    """The keys watched for ``owner`` and the random functions their forward called (a fresh dict, never stored,
    for an owner without weak references)."""
    try:
        return _WATCHED.setdefault(owner, {})
    except TypeError:
        return {}


def random_draws(owner, key: tuple) -> tuple[str, ...]:
    """The random functions the watched forward of ``owner`` and ``key`` called (:func:`watch_first_forward`);
    empty when it called none or was not watched (under ``torch.compile``)."""
    owner, key = _cache_owner(owner, key)
    return _watched_keys(owner).get(key, ())


@contextlib.contextmanager
def watch_first_forward(owner, key: tuple, names: tuple[str, ...], params):
    """Raise ``ValueError`` after the block (a forward with ``params`` as the tensors ``names``) if a reentrant
    checkpoint used any of them, and record the random functions it called (:func:`random_draws`). Watched once per
    ``owner`` (a model, or ``hvp``'s function) and ``key`` (the scope and train/eval mode), outside
    ``torch.compile``: a model's checkpointing and dropout change with those, not from one batch to the next."""
    owner, key = _cache_owner(owner, key)
    if torch.compiler.is_compiling() or key in _watched_keys(owner):
        yield
        return
    watch = _FirstForwardWatch({id(p): name for name, p in zip(names, params)})
    with watch:
        yield
    if watch.hidden:
        shown = ", ".join(repr(name) for name in watch.hidden[:4]) + (", ..." if len(watch.hidden) > 4 else "")
        raise ValueError(
            f"optim: the parameters {shown} are used inside a reentrant activation checkpoint "
            "(torch.utils.checkpoint with use_reentrant=True, which is also its default when use_reentrant is not "
            "passed): it hides them from torch.autograd.grad, so their curvature would read zero. Use "
            "use_reentrant=False with context_fn=optim.hessian.curvature_context_fn (Hugging Face: "
            "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False, "
            "'context_fn': optim.hessian.curvature_context_fn})), or measure in eval mode if the model checkpoints "
            "only in training")
    _watched_keys(owner)[key] = tuple(watch.random)
