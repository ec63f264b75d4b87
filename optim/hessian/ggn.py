"""The generalized Gauss-Newton matrix of a model's loss, as a linear operator on its parameters.

For a model ``f(x; θ)`` with outputs ``z = f(X_b; θ)`` (any shape, m entries in all) on batch b, a criterion
``ℓ(z, Y_b)`` and the Jacobian ``J_b = ∂z/∂θ`` (m × n), the Hessian of the batch loss splits into two terms::

    ∇²ℓ_b(θ) = J_bᵀ H_b J_b + Σ_j (∂ℓ/∂z_j) ∇²_θ z_j,        H_b = ∇²_z ℓ(z, Y_b)   (m × m)

The first term is the GGN, ``G_b = J_bᵀ H_b J_b``; the operator is its batch average weighted as
:class:`~optim.hessian.operator.HessianOperator`'s (``G = Σ_b (N_b / N) G_b``, N_b the batch's counted targets or
rows). It is symmetric, and positive semi-definite whenever the loss is convex in the outputs (``H_b ⪰ 0``:
cross-entropy, squared error), which the Hessian is not. For softmax cross-entropy it equals the Fisher
information of the model's predictive distribution.

One product ``G_b v`` is three steps, each k-batched for a ``(k, n)`` block:

1. ``u = J_b v`` (m,): a Jacobian-vector product of the outputs;
2. ``w = H_b u``: the loss's Hessian in the outputs, by
   * softmax cross-entropy (``F.cross_entropy`` / ``nn.CrossEntropyLoss`` on (N, C) logits and (N,) class indices,
     and ``optim.hessian.cross_entropy`` on (..., V), without class weights, label smoothing or ignored targets):
     the fused op ``torch.ops.optim.cross_entropy_hvp``, ``s · p ⊙ (u − ⟨p, u⟩)`` per row (p = softmax(z),
     s = 1/rows for a mean, 1 for a sum);
   * ``optim.hessian.causal_lm_loss`` (its defaults: no attention mask, ``ignore_index=-100``, a mean): the same
     form on the positions t < T − 1 whose label at t + 1 is kept, s = 1/K over the K kept pairs, and 0 on the
     others (the last position and the ignored ones);
   * squared error (``F.mse_loss`` / ``nn.MSELoss``, targets shaped like the outputs): ``w = c·u``, c = 2/m for a
     mean, 2 for a sum;
   * any other ``loss_fn``: autograd, a backward of ``⟨∇_z ℓ, u⟩`` through the graph of ``∇_z ℓ`` (built once per
     batch, with ``create_graph``, on the detached outputs);
3. ``J_bᵀ w`` (n,): a vector-Jacobian product of the outputs.

The forward is kept between products (see ``reuse_graph``): one forward of the model and one backward of the
outputs against a variable cotangent ``d`` with ``create_graph`` give ``J_bᵀ d`` as a graph, linear in ``d``. Then
``J_b v`` is the backward of ``⟨J_bᵀ d, v⟩`` to ``d`` (the "double-backward" Jacobian-vector product: its cost is
that of a backward, about two GEMMs per linear layer, and it needs no forward-mode rules and no re-run of the
primal), and ``J_bᵀ w`` is the backward of the kept forward against ``w`` (two GEMMs per linear layer). A product
on a kept forward is so about 4 GEMMs per linear layer against 3 for a gradient (forward 1, backward 2).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import losses
from ._ops import cross_entropy_hvp
from .hvp import (OUTPUT_SPACE_BACKWARDS, CompiledOutputProducts, OutputsDoNotFit, _check_finite_loss,
                  _scalar_loss, _signature, batched_vjp, per_probe, probes_loop)
from .linear import transposed_products_unused
from .operator import CurvatureOperator, model_outputs

__all__ = ["GGNOperator"]


class _OutputHessian:
    """``H_b = ∇²_z ℓ(z, Y_b)`` at the batch's outputs ``z``, applied to (k, *z.shape) or z-shaped tangents."""

    def __init__(self, loss_fn, output: torch.Tensor, targets: torch.Tensor, where: str):
        z = output.detach()
        self._targets = targets
        self.kind, self._scale, self._z, self._graph = self._closed_form(loss_fn, z, targets)
        if self.kind is None:
            # Any loss: the graph of ∇_z ℓ, differentiated again against each tangent.
            point = z.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = _scalar_loss(loss_fn(point, targets))
                _check_finite_loss(loss, at="the model's outputs")
                if loss.requires_grad:
                    (gradient,) = torch.autograd.grad(loss, point, create_graph=True, allow_unused=True)
                else:
                    gradient = None
            self.kind, self._graph = "autograd", (point, gradient)
        else:
            with torch.no_grad():  # the value only: a scalar, finite loss (the closed forms never evaluate it)
                _check_finite_loss(_scalar_loss(loss_fn(z, targets)), at="the model's outputs")

    @staticmethod
    def _closed_form(loss_fn, z, targets):
        form = closed_form_output_hessian(loss_fn, targets)
        scale = None if form is None else output_hessian_scale(*form, z, targets)
        if scale is None:
            return None, None, z, None
        kind = form[0] if form[0] in ("mse", "causal_lm") else "cross_entropy"
        return kind, scale, z, None

    def __call__(self, u: torch.Tensor, k: int | None, key: object = None) -> torch.Tensor:
        if self.kind == "causal_lm":
            return causal_lm_output_hessian(self._z, u, self._targets)
        if self.kind == "cross_entropy":
            z = self._z if k is None else self._z.expand((k,) + tuple(self._z.shape))  # the op is row-wise
            return cross_entropy_hvp(z, u.contiguous(), self._scale)
        if self.kind == "mse":
            return self._scale * u
        point, gradient = self._graph
        return batched_vjp([gradient], [point], [u], k, keep_graph=True, key=key, kind="H_z u")[0]


class _OutputGraph:
    """One batch's kept forward: ``z = f(θ)``, and ``Jᵀd`` as a graph linear in the variable cotangent ``d``."""

    def __init__(self, leaves, output, cotangent, transposed, output_hessian):
        self.leaves, self.output, self.cotangent = leaves, output, cotangent
        self.transposed, self.output_hessian = transposed, output_hessian


class GGNOperator(CurvatureOperator):
    """``G = Σ_b (N_b/N) J_bᵀ H_b J_b``, the generalized Gauss-Newton matrix of ``loss_fn(model(inputs), targets)``.

    See the module docstring for the math and the three steps of a product. The constructor and the vector
    protocol are :class:`~optim.hessian.operator.HessianOperator`'s (without ``mode``): ``G @ v`` for ``(n,)``,
    ``(k, n)`` blocks (row i is ``G v_i``; the k probes share the batch's forward) and param-shaped lists;
    ``flatten`` / ``unflatten``; ``num_matvecs``; ``loss_and_grad``; ``params``, ``names``, ``n``, ``shape``,
    ``dtype``, ``device``. Every estimator (:func:`~optim.hessian.spectrum.top_eigenvalues`, ``trace``,
    ``diagonal``, ``spectral_density``) and :class:`~optim.hessian.monitor.SharpnessMonitor` (``curvature="ggn"``)
    accept it.

    Args:
        model: an ``nn.Module`` returning one floating-point tensor (the outputs ``z``, any shape), or a Hugging Face
            output, whose ``.logits`` are ``z`` (``loss_fn`` then receives them, as ``causal_lm_loss`` takes them).
        loss_fn: ``loss_fn(output, target)`` returning a scalar. Cross-entropy and MSE get closed forms of ``H_b``
            (module docstring); any other criterion is differentiated twice in the outputs by autograd.
        data, param_filter, process_group: as for ``HessianOperator``.
        compile: compute each product with a ``torch.compile``'d function of one probe, ``Jᵀ (H_z (J v))``: ``J v``
            by forward mode (``torch.func.jvp`` of the outputs), ``H_z`` in closed form, ``Jᵀ w`` by ``vjp``;
            compiled at the first product for this model and batch shapes and reused by every later product and
            operator on them (a block of k probes runs it k times). :attr:`compile_seconds` reports the time. It
            applies to the criteria with a closed form (cross-entropy without class weights, label smoothing or
            ignored targets, ``causal_lm_loss`` with its defaults, and MSE: see the module docstring); any other
            criterion or batch, and every product while a module is in training mode (the compiled function runs
            the forward twice, in ``jvp`` and in ``vjp``, so dropout would draw two masks), is computed eagerly
            (``output_hessian`` says which ran: ``"compiled"`` or the eager kind). No graph is kept
            (``reuse_graph`` must not be True); the model needs forward-mode rules (as ``optim.hvp(mode="fr")``).
        reuse_graph: keep each product's forward (the model's activations, the graph of ``Jᵀd`` and, for a
            generic loss, the graph of ``∇_z ℓ``) between products on one-batch ``data``, so a further product is
            two backwards and no forward. ``None`` (default): when no module is in training mode; ``True``: also in
            training mode (a dropout mask then drawn once for every product); ``False``: never. It is rebuilt
            whenever anything it captured changed (parameters in scope or not, buffers, the batch, the modes;
            compared bit for bit, as HessianOperator does: :class:`~optim.hessian.operator.CapturedState`);
            :meth:`release_graph` frees it. The memory is that of one training step's backward graph plus its
            first-order backward (``create_graph``), plus a copy of the parameters, buffers and batch.

    Attributes:
        output_hessian: how ``H_b`` was applied at the last product: ``"cross_entropy"``, ``"causal_lm"``, ``"mse"`` or
            ``"autograd"`` (eager), ``"compiled"`` (``compile=True``); None before the first product.

    The model is evaluated in its current mode, like HessianOperator (train-mode BatchNorm uses batch statistics
    and its running statistics are left alone; ``model.eval()`` for a deterministic operator).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data,
        *,
        param_filter: Callable[[str, torch.Tensor], bool] | None = None,
        reuse_graph: bool | None = None,
        compile: bool = False,
        process_group=None,
    ):
        super().__init__(model, loss_fn, data, param_filter=param_filter, reuse_graph=reuse_graph, compile=compile,
                         process_group=process_group)
        self.output_hessian: str | None = None

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first calls of compiled GGN products for this model (compilation included)."""
        return ggn_compile_seconds(self.model)

    def _batch_product(self, inputs, targets, params, v, k, rows):
        if self.compile:
            product = compiled_ggn(self.model, model_outputs(self.model, tuple(self.names), inputs), self.loss_fn,
                                   targets, params, v, k, (inputs, targets))
            if product is not None:
                self.output_hessian = "compiled"
                return product
        return super()._batch_product(inputs, targets, params, v, k, rows)

    def _build(self, inputs, targets, params, rows) -> _OutputGraph:
        where = self._where
        leaves = [p.detach().requires_grad_(True) for p in params]
        # Jᵀd is only differentiated to d (J v): its linear layers' products are placeholders (linear.py).
        with torch.enable_grad(), transposed_products_unused(leaves):
            output = self._output_of(inputs)(*leaves)
            if not isinstance(output, torch.Tensor) or not output.dtype.is_floating_point:
                got = f"dtype {output.dtype}" if isinstance(output, torch.Tensor) else f"a {type(output).__name__}"
                raise ValueError(f"{where}: the model must return one floating-point tensor (the outputs z of "
                                 f"J = dz/dθ) or an output with .logits, got {got}")
            output_hessian = _OutputHessian(self.loss_fn, output, targets, where)
            cotangent = torch.zeros_like(output).requires_grad_(True)
            if output.requires_grad:
                transposed = torch.autograd.grad(output, leaves, cotangent, create_graph=True, allow_unused=True)
            else:  # the outputs do not depend on the parameters in scope: J = 0
                transposed = [None] * len(leaves)
        self.output_hessian = output_hessian.kind
        return _OutputGraph(leaves, output, cotangent, transposed, output_hessian)

    def _apply(self, state: _OutputGraph, v, k) -> list[torch.Tensor]:
        if not state.output.requires_grad:  # the outputs do not depend on the parameters in scope: J = 0
            return [torch.zeros_like(t) for t in v]
        if k is not None and probes_loop(self.model, k, OUTPUT_SPACE_BACKWARDS):
            # probe by probe: no (k, *z.shape) blocks of J v and H_z J v (k logit tensors each on a language model)
            return per_probe(lambda direction: self._block_product(state, direction, None), v, k)
        return self._block_product(state, v, k)

    def _block_product(self, state: _OutputGraph, v, k) -> list[torch.Tensor]:
        # J v: the backward of ⟨Jᵀd, v⟩ to d (Jᵀd is linear in d, so its derivative in d is J).
        # Each backward of a block loops or runs vmapped as measured once per model (no key: measured every time).
        (jv,) = batched_vjp(state.transposed, [state.cotangent], v, k, keep_graph=True, key=self.model,
                            kind=OUTPUT_SPACE_BACKWARDS[0])
        w = state.output_hessian(jv, k, self.model)
        return batched_vjp([state.output], state.leaves, [w], k, keep_graph=True, key=self.model,
                           kind=OUTPUT_SPACE_BACKWARDS[1])


def closed_form_output_hessian(loss_fn, targets) -> tuple[str, str] | None:
    """``(kind, reduction)`` of the criteria whose ``H_z`` is applied in closed form (module docstring), when
    ``targets`` fit it (cross-entropy: integer class indices, none of them ignored); None otherwise."""
    integer = not targets.dtype.is_floating_point and not targets.dtype.is_complex and targets.dtype != torch.bool
    ce_module = isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and \
        loss_fn.label_smoothing == 0.0 and loss_fn.reduction in ("mean", "sum")
    if (loss_fn is F.cross_entropy or ce_module) and integer and targets.dim() == 1:
        ignore_index = loss_fn.ignore_index if ce_module else -100
        if not bool((targets == ignore_index).any()):
            return "cross_entropy", loss_fn.reduction if ce_module else "mean"
        return None
    if loss_fn is losses.cross_entropy and integer and targets.numel() > 0:
        # its default ignore_index: ignored rows would need a zero Hessian and the mean over the kept ones
        return ("cross_entropy_last_dim", "mean") if not bool((targets == -100).any()) else None
    if loss_fn is losses.causal_lm_loss and integer and targets.dim() >= 1:
        return "causal_lm", "mean"
    mse_module = isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction in ("mean", "sum")
    if (loss_fn is F.mse_loss or mse_module) and targets.dtype.is_floating_point:
        return "mse", loss_fn.reduction if mse_module else "mean"
    return None


def causal_lm_output_hessian(z: torch.Tensor, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``H_z u`` of ``causal_lm_loss(z, labels)`` (module docstring): z (..., T, V) logits, u shaped like z or with a
    leading k, labels z.shape[:-1]. The 1/K is a tensor (no host read, so a compiled product needs no graph break);
    with no kept pair the loss itself is refused before this is used."""
    lead = u.dim() - z.dim()
    labels = labels[..., 1:]
    kept = (labels != -100).sum()
    logits = z[..., :-1, :]
    if lead:
        logits, labels = logits.expand(u.shape[:lead] + logits.shape), labels.expand(u.shape[:lead] + labels.shape)
    w = cross_entropy_hvp(logits.contiguous(), u[..., :-1, :].contiguous(), 1.0, labels.contiguous(), -100)
    return F.pad(w / kept, (0, 0, 0, 1))  # the last position predicts nothing


def output_hessian_scale(kind: str, reduction: str, z: torch.Tensor, targets) -> float | None:
    """The scale s of the closed form (``s · p ⊙ (u − ⟨p, u⟩)`` per row for cross-entropy, ``s · u`` for MSE) at
    outputs ``z``, or None when ``z`` does not fit the criterion's shapes."""
    if kind == "cross_entropy":
        fits = z.dim() == 2 and targets.shape == z.shape[:1]
        return (1.0 / z.shape[0] if reduction == "mean" else 1.0) if fits else None
    if kind == "causal_lm":  # 1/K is applied by causal_lm_output_hessian, from the labels
        return 1.0 if z.dim() >= 2 and z.shape[-2] >= 2 and targets.shape == z.shape[:-1] else None
    if kind == "cross_entropy_last_dim":
        return 1.0 / targets.numel() if z.dim() >= 1 and targets.shape == z.shape[:-1] else None
    fits = targets.shape == z.shape and targets.dtype == z.dtype
    return (2.0 / z.numel() if reduction == "mean" else 2.0) if fits else None


def _ggn_product(output_fn, targets, kind, reduction, params, direction):
    """``(G v, z)`` for one probe: ``u = J v`` and ``z`` by ``jvp`` of the outputs, ``w = H_z u`` in closed form,
    ``Jᵀ w`` by ``vjp`` (the compiler shares the primal forward of the two). The criterion is not called here: it
    is never differentiated here because inductor (torch 2.13, CPU, float64) crashed on ``jvp(grad(F.mse_loss))``,
    and its value (the finite check's) is taken outside, where no criterion can break the compiled graph."""
    primals = tuple(params)
    output, jv = torch.func.jvp(output_fn, primals, tuple(direction))
    if not isinstance(output, torch.Tensor) or not output.dtype.is_floating_point:
        raise OutputsDoNotFit
    scale = output_hessian_scale(kind, reduction, output, targets)
    if scale is None:
        raise OutputsDoNotFit
    if kind == "causal_lm":
        w = causal_lm_output_hessian(output, jv, targets)
    else:
        w = scale * jv if kind == "mse" else cross_entropy_hvp(output, jv, scale)
    _, pullback = torch.func.vjp(output_fn, *primals)
    return pullback(w), output


# One compiled function for every model and criterion, guarded by dynamo on what ``output_fn`` closes over (the
# model, the batch).
_compiled_ggn_products = CompiledOutputProducts(_ggn_product)


def ggn_compile_seconds(model) -> float:
    """Seconds the first calls of ``model``'s compiled GGN products took, compilation included (0 if none)."""
    return _compiled_ggn_products.seconds(model)


def compiled_ggn(model, output_fn, loss_fn, targets, params, v, k, signature_extra) -> list[torch.Tensor] | None:
    """``G v`` for one probe (``k`` None) or a ``(k, ...)`` block, by the compiled :func:`_ggn_product`; the first
    call per (model, signature) is timed into :func:`ggn_compile_seconds`. None where the criterion or the outputs
    have no closed form there (:func:`closed_form_output_hessian`): the caller computes the product eagerly."""
    form = closed_form_output_hessian(loss_fn, targets)
    if form is None:
        return None
    signature = (_signature(params), _signature(signature_extra), form)
    def check(output):
        with torch.no_grad():
            _check_finite_loss(_scalar_loss(loss_fn(output, targets)), at="the model's outputs")

    return _compiled_ggn_products(model, signature, (output_fn, targets, *form, list(params)), v, k, check)


def apply_output_hessian(loss_fn, output: torch.Tensor, targets, u: torch.Tensor, where: str) -> torch.Tensor:
    """``H u`` with ``H = ∇²_z loss_fn(z, targets)`` at ``z = output`` (detached) and ``u`` shaped like it: the
    closed forms of the module docstring where they apply, else autograd."""
    return _OutputHessian(loss_fn, output, targets, where)(u, None)


def ggn_vector_products(output: torch.Tensor, targets, loss_fn, leaves: list[torch.Tensor],
                        vectors: list[torch.Tensor], where: str) -> list[torch.Tensor]:
    """``G v = Jᵀ H J v`` for one probe ``vectors`` (shaped like ``leaves``) through the graph of ``output`` (the
    model's outputs z as functions of ``leaves``; consumed by the last backward). ``J v`` is the double-backward
    Jacobian-vector product of the module docstring (a backward of ``⟨Jᵀd, v⟩`` to the cotangent ``d``), so no
    forward-mode rule is needed; zeros for leaves the outputs do not reach."""
    if not output.requires_grad:
        return [torch.zeros_like(x) for x in leaves]
    with torch.enable_grad():
        cotangent = torch.zeros_like(output).requires_grad_(True)
        transposed = torch.autograd.grad(output, leaves, cotangent, create_graph=True, allow_unused=True)
        (jv,) = batched_vjp(list(transposed), [cotangent], list(vectors), None, keep_graph=False)
    w = apply_output_hessian(loss_fn, output, targets, jv, where)
    return batched_vjp([output], leaves, [w], None, keep_graph=False)
