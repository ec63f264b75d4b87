"""``F.linear`` for a gradient whose graph is differentiated but whose values are never read.

A Hessian-vector product by double backward ("rr") differentiates ``⟨∇f, v⟩``: it needs the graph of the gradient,
not its values. For ``y = x Wᵀ + b`` the first backward computes ``∇_x = g W`` (read further down the backward),
``∇_b = Σ g`` and ``∇_W = gᵀ x``, one matrix product in three of a gradient, whose value nothing reads: the second
backward through ``∇_W`` needs only ``g`` and ``x`` (``∂⟨∇_W, u⟩/∂g = x uᵀ``, ``∂⟨∇_W, u⟩/∂x = g u``). Inside
:func:`gradient_values_unused` (the products of ``hvp`` without ``return_grad`` and the operators' kept graphs),
``F.linear`` of a leaf weight (one of the differentiated tensors itself, so that nothing differentiates through the
value) returns a node whose first backward gives ``∇_W`` as a zero placeholder with that graph. Every later
backward (the products themselves, with ``create_graph=False``) computes the real ``gᵀ x``, so the products are
exact. The forward is torch's ``F.linear``; ``∇_x`` and ``∇_b`` are computed as torch does, by matrix product
and sum. Not inside a checkpointed region (see :func:`_saved_through_hooks`), nor under functorch transforms: so
the Functions here take ``ctx`` in ``forward`` (functorch would need ``setup_context``, whose ``apply`` binds the
arguments through ``inspect.signature``, ~25 µs a call: 5% of a small MLP's product).

The GGN and the empirical Fisher build ``Jᵀd`` (a first backward to a variable output cotangent d) only to
differentiate it with respect to d (``J v``); inside :func:`transposed_products_unused` both products of a layer's
first backward are placeholders, so that graph costs no matrix product at all (the unkept GGN product on the MLP
2.28 → 1.69 gradients, on the GPT 2.38 → 1.79; the unkept Fisher on the MLP 2.30 → 1.71).

Measured on the 7.4M-parameter GPT-2-shaped benchmark model (one CPU thread): the gradient's graph (forward and
``create_graph`` backward) 198 → 138 ms against 186 ms for a gradient; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .._library import without_autocast

__all__ = ["gradient_values_unused", "linear", "transposed_products_unused"]

_state = threading.local()


def gradient_values_unused(leaves=()):
    """Within this context (on this thread), ``F.linear`` of a weight that is one of ``leaves`` (the tensors the
    gradient is taken with respect to) gets a first-backward gradient whose value is a placeholder (see the module
    docstring): only for a gradient that is differentiated again and never read. No leaves: no placeholder."""
    return _Unused(frozenset(id(t) for t in leaves), cotangent_only=False)


def transposed_products_unused(leaves=()):
    """As :func:`gradient_values_unused`, for a first backward ``Jᵀd`` to a variable output cotangent ``d`` that is
    differentiated with respect to ``d`` alone (``J v`` as the backward of ``⟨Jᵀd, v⟩`` to d, in the GGN and the
    empirical Fisher): the input gradients ``d W`` are placeholders too, since ``J v`` needs neither value (Jᵀd is
    linear in d), so building the graph costs no matrix product; the backward of a placeholder pair gives
    ``u_x Wᵀ + x u_Wᵀ`` to the layer's cotangent and nothing to its input or weight. The zeros flow on through the
    rest of that first backward, whose derivative in d does not depend on them (a backward is linear in its
    cotangent): only a custom ``autograd.Function`` that branches on its gradient's values would see a difference."""
    return _Unused(frozenset(id(t) for t in leaves), cotangent_only=True)


def _values_unused() -> frozenset:
    """The ids of the leaves a placeholder context is in effect for on this thread."""
    return getattr(_state, "leaves", frozenset())


class _Unused:
    """The context of :func:`gradient_values_unused` and :func:`transposed_products_unused`; it can be entered
    again."""

    def __init__(self, leaf_ids: frozenset, cotangent_only: bool):
        self.setting = (leaf_ids, cotangent_only)
        self._before = []

    def __enter__(self):
        self._before.append((_values_unused(), getattr(_state, "cotangent_only", False)))
        _state.leaves, _state.cotangent_only = self.setting

    def __exit__(self, *exc_info):
        _state.leaves, _state.cotangent_only = self._before.pop()


def _saved_through_hooks() -> bool:
    """Whether saved tensors go through hooks here: a checkpointed region (``torch.utils.checkpoint``), whose
    recomputation in the backward sees the module's own parameters, not the leaves, and would save other tensors
    than a routed forward did (a ``CheckpointError``). The route is not taken there."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):  # a torch without the query: as without hooks
        return False


def functorch_wrapped(t) -> bool:
    """Whether ``t`` is a tensor wrapped by a functorch transform (vmap, grad, jvp): the routes leave those alone."""
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _routable(input, weight) -> bool:
    return (isinstance(weight, torch.Tensor) and id(weight) in _values_unused() and isinstance(input, torch.Tensor)
            and not _saved_through_hooks()
            and weight.requires_grad and weight.grad_fn is None and weight.dim() == 2 and input.dim() >= 1
            and not functorch_wrapped(input) and not functorch_wrapped(weight))


def linear(input, weight, bias=None):
    """``F.linear``, with the placeholder weight gradient of the module docstring inside
    :func:`gradient_values_unused` for a leaf weight; ``F.linear`` itself otherwise."""
    if not _routable(input, weight):
        return F.linear(input, weight, bias)
    return _Linear.apply(input, weight, bias, False)


def addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    """``torch.addmm``; as :func:`linear` for ``input + mat1 @ mat2`` with a leaf ``mat2`` (the weight, stored
    (in, out): Hugging Face's ``Conv1D`` of GPT-2) and the default ``beta``, ``alpha`` and no ``out``."""
    if out is not None or beta != 1 or alpha != 1 or not _routable(mat1, mat2) or mat1.dim() != 2:
        return torch.addmm(input, mat1, mat2, beta=beta, alpha=alpha, out=out)
    return _Linear.apply(mat1, mat2, input, True)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as (out, in): ``F.linear`` stores it so, ``addmm``'s ``mat2`` as (in, out)."""
    return weight.mT if transposed else weight


def _cotangent_product(u_input, u_weight, input, weight, shape) -> torch.Tensor | None:
    """``u_x Wᵀ + x u_Wᵀ`` (W as (out, in); either cotangent may be None, both: None) shaped ``shape``: the share
    of a layer's output cotangent in ``⟨g W, u_x⟩ + ⟨gᵀ x, u_W⟩``, in one accumulating matrix product instead of
    two results and a sum the size of the layer's output (on an LM head, (tokens, vocabulary))."""
    if u_input is None:
        return None if u_weight is None else input.matmul(u_weight.mT)
    rows = _rows(u_input).mm(weight.mT)
    if u_weight is not None:
        # in place only without a graph: a graph would need the product before the addition
        rows = (torch.addmm if torch.is_grad_enabled() else torch.Tensor.addmm_)(rows, _rows(input), u_weight.mT)
    return rows.view(shape)


def _weight_gradient(grad_output, input, transposed: bool) -> torch.Tensor:
    """``gᵀ x`` in the weight's own layout."""
    return _rows(input).mT.mm(_rows(grad_output)) if transposed else _rows(grad_output).mT.mm(_rows(input))


class _Linear(torch.autograd.Function):
    """``x Wᵀ + b`` (``F.linear``) or ``b + x W`` (``addmm``, ``transposed``), by torch's own function."""

    @staticmethod
    def forward(ctx, input, weight, bias, transposed):
        ctx.save_for_backward(input, weight)
        ctx.transposed = transposed
        ctx.cotangent_only = getattr(_state, "cotangent_only", False)
        ctx.bias_shape = None if bias is None else bias.shape
        return torch.addmm(bias, input, weight) if transposed else F.linear(input, weight, bias)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        transposed = ctx.transposed
        grad_bias = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_bias = _rows(grad_output).sum(0)
            if grad_bias.shape != ctx.bias_shape:  # addmm's input broadcast to the output
                grad_bias = torch.ops.aten.sum_to_size(grad_output, ctx.bias_shape)
        # The first backward builds the gradient's graph (create_graph: grad mode on): there the weight's gradient
        # is the placeholder. The products after it run without a graph and need the real value.
        if not (ctx.needs_input_grad[1] and torch.is_grad_enabled()):
            grad_input = grad_output.matmul(_out_in(weight, transposed)) if ctx.needs_input_grad[0] else None
            grad_weight = _weight_gradient(grad_output, input, transposed) if ctx.needs_input_grad[1] else None
            return grad_input, grad_weight, grad_bias, None
        if ctx.cotangent_only:
            grad_input, grad_weight = _TransposedPlaceholders.apply(grad_output, input, weight, transposed)
            grad_input = grad_input if ctx.needs_input_grad[0] else None
        elif ctx.needs_input_grad[0]:
            grad_input, grad_weight = _LinearGradients.apply(grad_output, input, weight, transposed)
        else:
            grad_input, grad_weight = None, _PlaceholderWeightGradient.apply(grad_output, input, weight, transposed)
        return grad_input, grad_weight, grad_bias, None


class _PlaceholderWeightGradient(torch.autograd.Function):
    """Zeros shaped like the weight, standing for ``gᵀ x``: its backward is that product's."""

    @staticmethod
    def forward(ctx, grad_output, input, weight, transposed):
        ctx.save_for_backward(grad_output, input)  # the weight only gives the shape: gᵀ x does not read it
        ctx.transposed = transposed
        return torch.zeros_like(weight)

    @staticmethod
    @without_autocast
    def backward(ctx, u):
        grad_output, input = ctx.saved_tensors
        u = _out_in(u, ctx.transposed)
        d_grad_output = input.matmul(u.mT) if ctx.needs_input_grad[0] else None
        d_input = grad_output.matmul(u) if ctx.needs_input_grad[1] else None
        return d_grad_output, d_input, None, None


class _LinearGradients(torch.autograd.Function):
    """``(g W, placeholder for gᵀ x)`` in one node, so that its backward adds both products' share of ``∂g`` in
    one matrix product (:func:`_cotangent_product`). W is (out, in) here; ``transposed`` as in :class:`_Linear`."""

    @staticmethod
    def forward(ctx, grad_output, input, weight, transposed):
        ctx.save_for_backward(grad_output, input, weight)
        ctx.transposed = transposed
        return grad_output.matmul(_out_in(weight, transposed)), torch.zeros_like(weight)

    @staticmethod
    @without_autocast
    def backward(ctx, u_input, u_weight):
        grad_output, input, weight = ctx.saved_tensors
        transposed = ctx.transposed
        weight = _out_in(weight, transposed)
        u_weight = None if u_weight is None else _out_in(u_weight, transposed)
        d_input = d_weight = None
        d_grad_output = _cotangent_product(u_input, u_weight, input, weight, grad_output.shape)
        if u_input is not None:
            d_weight = _weight_gradient(grad_output, u_input, transposed)  # ∂⟨g W, u_x⟩/∂W = gᵀ u_x
        if u_weight is not None:
            d_input = grad_output.matmul(u_weight)
        return (d_grad_output if ctx.needs_input_grad[0] else None, d_input if ctx.needs_input_grad[1] else None,
                d_weight if ctx.needs_input_grad[2] else None, None)


class _TransposedPlaceholders(torch.autograd.Function):
    """Placeholders for ``(g W, gᵀ x)`` in a transposed graph (:func:`transposed_products_unused`): differentiated
    with respect to g alone, so the backward gives only ``∂g`` (and nothing to x or W, whose paths that backward does
    not take)."""

    @staticmethod
    def forward(ctx, grad_output, input, weight, transposed):
        ctx.save_for_backward(input, weight)
        ctx.transposed = transposed
        ctx.shape = grad_output.shape
        ctx.set_materialize_grads(False)  # an unused placeholder (the first layer's input gradient) gets None
        return torch.zeros_like(input), torch.zeros_like(weight)

    @staticmethod
    @without_autocast
    def backward(ctx, u_input, u_weight):
        input, weight = ctx.saved_tensors
        weight = _out_in(weight, ctx.transposed)
        u_weight = None if u_weight is None else _out_in(u_weight, ctx.transposed)
        return _cotangent_product(u_input, u_weight, input, weight, ctx.shape), None, None, None
