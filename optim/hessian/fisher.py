"""The empirical Fisher matrix of a model's loss, from per-sample gradients, as a linear operator on its parameters.

For ``N`` rows in all over the batches of ``data``, and the per-sample loss of row i,

    ℓ_i(θ) = loss_fn(model(x_i[None]; θ), y_i[None])        (the criterion on the one-row slice of the batch)

with gradient ``g_i = ∇_θ ℓ_i`` (n,), the empirical Fisher is the mean outer product of the per-sample gradients::

    F = (1/N) Σ_i g_i g_iᵀ = (1/N) Gᵀ G,        G = [g_1; ...; g_N]   (N × n),      F v = (1/N) Gᵀ (G v)

Scaling: the ``1/N`` is always there, whatever the criterion's reduction. For a criterion that reduces over the
rows only (cross-entropy on (N, C) logits), ``"mean"`` (the PyTorch default) and ``"sum"`` give the same one-row
loss, so the same ``F``, and the mean of the ``ℓ_i`` is the loss ``L`` of
:class:`~optim.hessian.operator.HessianOperator` (``∇L = (1/N) Σ_i g_i``). A criterion that also averages within
a row (``F.mse_loss``'s ``"mean"`` over all elements, a language model's mean over tokens) makes ``ℓ_i`` the
row's own mean, again with ``L = (1/N) Σ_i ℓ_i``; its ``"sum"`` would scale ``ℓ_i`` by the row's element count m
and ``F`` by m². A "row" is a slice along dim 0 of the inputs and the targets
(a sequence, for a language model whose loss averages over the sequence's tokens). ``F`` is symmetric and positive
semi-definite, of rank at most N.

The per-sample gradients are ``torch.func.vmap`` over ``torch.func.grad`` of ``ℓ_i``, the batch's rows mapped
(``randomness="different"``: each row its own dropout mask in train mode).

A product that does not keep ``G`` never forms it either. For a model that treats rows independently, row i of
the batched outputs ``z = f(X)`` is the output of row i alone, so ``g_i = J_iᵀ r_i`` with ``J_i = ∂z_i/∂θ`` and
``r_i = ∇_{z_i} ℓ_i`` the per-sample gradient in the outputs (``R``: shaped like ``z``). Then::

    G v = (⟨r_i, (J v)_i⟩)_i = w (N,),        Gᵀ w = Σ_i w_i J_iᵀ r_i = Jᵀ (w ⊙ R)

one Jacobian-vector product of the outputs, ``R`` from the outputs alone (``vmap`` of ``grad`` of the criterion
on one-row slices, no model pass) and one vector-Jacobian product: the work of a GGN product (about twice a
gradient's matrix products eagerly, 5/3 compiled) and the memory of one training step's graph, not ``N × n``,
where recomputing the per-sample gradients costs up to a gradient per row. Eagerly ``J v`` is the GGN's
double-backward product (the backward of ``⟨Jᵀd, v⟩`` to ``d``, on the one forward: no forward-mode rules needed,
one dropout mask); the compiled function (``compile=True``) takes it by ``jvp``.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .._library import without_autocast
from .hvp import (OUTPUT_SPACE_BACKWARDS, CompiledOutputProducts, OutputsDoNotFit, Remembered, _elapsed_s,
                  _scalar_loss, _signature, batched_vjp, differentiable, per_probe, probes_loop)
from .linear import transposed_products_unused
from .losses import model_loss, row_terms
from .operator import CurvatureOperator, StateNotKept, as_pair, batch_inputs, batch_rows

__all__ = ["EmpiricalFisherOperator", "DEFAULT_MAX_KEPT_BYTES"]

DEFAULT_MAX_KEPT_BYTES = 1 << 30  # 1 GiB of per-sample gradients
# Rows of the per-sample gradients timed on the first unkept product of a batch signature (_measured_product).
MEASURE_ROWS = 4
# model -> {("kept", shapes): "G", "forward" or "misaligned" (outputs not row-aligned: only G can be kept);
# ("unkept", k, shapes): "outputs" or "per-sample"}: the way measured faster on the first build or unkept
# product there
_ways = Remembered()

# The models whose per-sample gradients could not be vmapped (data-dependent control flow): a loop of rows there,
# "functorch" (torch.func.grad per row) or "autograd" (torch.autograd.grad per row, for a model with an
# autograd.Function that functorch refuses: BLOOM's GeLU has no setup_context).
_row_by_row = Remembered()


class EmpiricalFisherOperator(CurvatureOperator):
    """``F = (1/N) Gᵀ G``, the empirical Fisher of ``loss_fn`` on ``data`` from per-sample gradients ``G`` (N × n).

    See the module docstring for the math and how the per-sample loss is formed from ``loss_fn`` (the criterion on
    one-row slices of each batch). The constructor and the vector protocol are
    :class:`~optim.hessian.operator.HessianOperator`'s (without ``mode``): ``F @ v`` for ``(n,)``, ``(k, n)``
    blocks and param-shaped lists, ``flatten`` / ``unflatten``, ``num_matvecs``, ``loss_and_grad``; every estimator
    and :class:`~optim.hessian.monitor.SharpnessMonitor` (``curvature="fisher"``) accept it. Batches are weighted
    by their row counts, so over several batches ``F`` is the mean over all their rows.

    Args:
        model: an ``nn.Module``; it is called on one-row slices (``x_i[None]``) under ``vmap`` (one row at a time
            where vmap cannot follow it: control flow on its inputs' values), so it must treat rows independently:
            a BatchNorm module in training mode (batch statistics) is refused with a ``ValueError`` at the product;
            call ``model.eval()``. A Hugging Face output's ``.logits`` are the outputs ``z`` that ``loss_fn``
            receives.
        loss_fn: ``loss_fn(output, target)`` returning a scalar, called on one row's output and target;
            :func:`optim.hessian.model_loss`: the model's own loss on the row (products take ``G``).
        data: as for ``HessianOperator``; ``inputs`` a tensor (or a tuple/list/dict of tensors) whose dim 0 is the
            rows, ``targets`` a tensor with at least one dimension, of the same number of rows.
        param_filter, process_group: as for ``HessianOperator``.
        reuse_graph: keep a state of one-batch ``data`` between products, under HessianOperator's rules:
            ``None`` (default) when no module is in training mode, ``True`` also in training mode (dropout masks
            drawn once), ``False`` never; rebuilt whenever a parameter, buffer, batch tensor or mode changed
            (compared bit for bit: :class:`~optim.hessian.operator.CapturedState`); :meth:`release_graph` frees it.
            The state is ``G`` (a product is then two matrix-vector products over it, ``G v`` and ``Gᵀ(G v)``) or
            the forward in the outputs (the model's activations, the graph of ``Jᵀd`` and ``R``: a product is two
            backwards, as the GGN's on its kept forward), whichever the first build of the batch's shapes measured
            faster per product (``_measure_kept``; ``G`` estimated from a few rows), remembered per model: ``G``
            wins for few rows of much work each (sequences), the forward for many light rows, where ``G`` is slow
            to build and to read. ``G`` only where the outputs are not row-aligned (see ``compile``), the forward
            only where ``G`` does not fit ``max_kept_bytes``.
        max_kept_bytes: the memory bound of ``G``: it is kept only when the whole batch's ``N_b · n · itemsize``
            bytes fit (default 1 GiB). Without a kept state (several batches, ``reuse_graph`` off, or neither way
            possible) each product is taken the faster of two ways, as timed on the first product of each batch
            shape and k (``_measured_product``): on one forward in the outputs, or from the per-sample gradients
            recomputed in chunks of ``max(1, max_kept_bytes // (n · itemsize))`` rows, accumulating
            ``G_cᵀ (G_c v)`` chunk by chunk, so that at most one chunk of ``G`` (at least one row, ``n`` entries)
            is alive at a time.
        compile: compute each product with a ``torch.compile``'d function of one probe that never forms ``G``:
            ``Jᵀ (w ⊙ R)`` with ``w = ⟨r_i, (J v)_i⟩`` (module docstring), ``J v`` by forward mode, ``R`` by
            ``grad`` of ``loss_fn`` on one-row slices of the outputs, ``Jᵀ`` by ``vjp``; compiled at the first
            product for this model and batch shapes and reused by every later product and operator on them (a
            block of k probes runs it k times); :attr:`compile_seconds` reports the time. It needs the model's
            output to be one floating-point tensor whose dim 0 is the rows (row i the output of row i alone:
            "row-aligned") and forward-mode rules (as ``optim.hvp(mode="fr")``); other outputs, and every product
            while a module is in training mode (the forward runs twice, so dropout would draw two masks), are
            computed eagerly as without it (:attr:`last_path` says which ran). Nothing is kept (``reuse_graph``
            must not be True): on one batch the kept state is faster for many products; ``compile`` pays for
            several batches and fresh points.

    Attributes:
        last_path: how the last product was computed: ``"kept G"``, ``"kept forward"``, ``"outputs"`` (eagerly
            on one forward in the outputs), ``"per-sample"`` (``G`` recomputed in chunks), ``"compiled"``; None
            before the first product.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data,
        *,
        param_filter: Callable[[str, torch.Tensor], bool] | None = None,
        reuse_graph: bool | None = None,
        max_kept_bytes: int = DEFAULT_MAX_KEPT_BYTES,
        compile: bool = False,
        process_group=None,
    ):
        if isinstance(max_kept_bytes, bool) or not isinstance(max_kept_bytes, int) or max_kept_bytes < 0:
            raise ValueError(f"{self._where}: max_kept_bytes must be an integer >= 0, got {max_kept_bytes!r}")
        self.max_kept_bytes = max_kept_bytes
        super().__init__(model, loss_fn, data, param_filter=param_filter, reuse_graph=reuse_graph, compile=compile,
                         process_group=process_group)
        self.last_path: str | None = None

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first calls of compiled Fisher products for this model (compilation included)."""
        return fisher_compile_seconds(self.model)

    def _row_bytes(self) -> int:
        return self.n * self.params[0].element_size()

    def _batch_weight(self, targets: torch.Tensor) -> int:
        # F averages g_i g_iᵀ over rows, each row's loss its own mean: a batch weighs its rows, but for the rows
        # with nothing to predict
        terms = row_terms(self.loss_fn, targets)
        return batch_rows(targets) if terms is None else int((terms > 0).sum())

    def _measured_rows(self, inputs, targets, weight: int):
        # A row whose targets are all ignored (a prompt-only sequence, all its labels -100) has the one-row loss
        # 0/0 and no part in the batch's loss, nor in its Hessian or GGN: it is left out of F as well. The weight
        # counts the other rows, so a batch without such rows is known from it.
        if weight == batch_rows(targets):
            return inputs, targets
        terms = row_terms(self.loss_fn, targets)
        self._check_rows(inputs, targets, batch_rows(targets))
        kept = (terms > 0).to(targets.device)
        return tree_map(lambda t: t[kept.to(t.device)] if isinstance(t, torch.Tensor) else t, inputs), targets[kept]

    def _fits(self, rows: int) -> bool:
        return rows * self._row_bytes() <= self.max_kept_bytes

    def _can_keep(self, batch) -> bool:
        inputs, targets = as_pair(batch)
        rows = batch_rows(targets)
        # the forward can be kept whatever the rows, unless the outputs proved not row-aligned
        return self._fits(rows) or _ways.get(self.model, self._way_key("kept", (inputs, targets))) != "misaligned"

    def _way_key(self, kind: str, batch, *extra) -> tuple:
        """The key of a remembered way (``_ways``): its kind, the parameters' and the batch tensors' shapes and
        dtypes (not their devices: a batch is moved to the parameters' before a product), and ``extra``."""
        tensors = [*self.params, *(t for t in tree_leaves(batch) if isinstance(t, torch.Tensor))]
        return (kind, *extra) + tuple((tuple(t.shape), t.dtype) for t in tensors)

    def _check_model(self) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    f"{self._where}: module {name or type(module).__name__} is a BatchNorm in training mode, whose "
                    "output for one row depends on the other rows of the batch: per-sample gradients are undefined; "
                    "call model.eval()"
                )

    def _check_rows(self, inputs, targets, rows: int) -> None:
        where = self._where
        if targets.dim() == 0:
            raise ValueError(f"{where}: targets must have a row dimension (dim 0) for per-sample losses, got a "
                             "0-dim tensor")
        for leaf in tree_leaves(inputs):
            if not isinstance(leaf, torch.Tensor):
                raise ValueError(f"{where}: inputs must be tensors (or a tuple/list/dict of tensors) to slice rows "
                                 f"from, got a {type(leaf).__name__}")
            if leaf.dim() == 0 or leaf.shape[0] != rows:
                raise ValueError(f"{where}: an input tensor of shape {tuple(leaf.shape)} does not have the targets' "
                                 f"{rows} rows on dim 0; per-sample losses slice both along dim 0")

    @differentiable
    def per_sample_gradients(self, inputs, targets) -> torch.Tensor:
        """``G`` (rows, n): row i is ``g_i = ∇_θ loss_fn(model(x_i[None]), y_i[None])``, flattened in params order."""
        self._check_model()
        targets, inputs = targets.to(self.device), batch_inputs(inputs, self.device)
        rows = batch_rows(targets)
        self._check_rows(inputs, targets, rows)
        return self._gradients(inputs, targets, self._current_params())

    def _gradients(self, inputs, targets, params) -> torch.Tensor:
        loss_of = self._loss_of

        def row_loss(ps, x, y):
            loss = _scalar_loss(loss_of(tree_map(lambda t: t.unsqueeze(0), x), y.unsqueeze(0))(*ps))
            return loss, loss.detach()

        row_gradient = torch.func.grad(row_loss, has_aux=True)
        per_row = torch.func.vmap(row_gradient, in_dims=(None, 0, 0), randomness="different")

        def autograd_row(ps, x, y):
            leaves = [p.detach().requires_grad_() for p in ps]
            with torch.enable_grad():
                loss, value = row_loss(leaves, x, y)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)], value

        def by_rows(gradient):
            rows = [gradient(tuple(params), tree_map(lambda t: t[i], inputs), targets[i])
                    for i in range(targets.shape[0])]
            return [torch.stack(pieces) for pieces in zip(*(g for g, _ in rows))], torch.stack([r for _, r in rows])

        # torch.func.grad differentiates inside whatever the outer grad mode is; no_grad keeps the outer autograd
        # from recording a graph through the parameters outside the scope.
        with torch.no_grad():
            way = _row_by_row.get(self.model)
            if way is not None:
                grads, row_losses = by_rows(autograd_row if way == "autograd" else row_gradient)
            else:
                try:
                    grads, row_losses = per_row(tuple(params), inputs, targets)
                except RuntimeError:
                    # Some models cannot be vmapped: one that branches on its inputs' values (a Hugging Face
                    # model's attention mask), an op without a batching rule that fails on the batched shapes
                    # (an nn.LSTM: "output with shape [1, 16] doesn't match the broadcast shape"), or one with
                    # an autograd.Function functorch refuses. If one row at a time works (by torch.func, else by
                    # autograd), the model's rows go that way from now on; if not, its error is the model's.
                    try:
                        grads, row_losses = by_rows(row_gradient)
                        way = "functorch"
                    except RuntimeError:
                        grads, row_losses = by_rows(autograd_row)
                        way = "autograd"
                    _row_by_row.set(self.model, None, way)
        _check_finite_rows(row_losses)
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)

    def _build(self, inputs, targets, params, rows):
        """The kept state of one batch: ``G`` (a product is then two matrix-vector products over it) or the
        forward in the outputs (two backwards), whichever the first build of the batch shape measured faster per
        product (``_measure_kept``); the forward where ``G`` does not fit ``max_kept_bytes``, ``G`` where the
        outputs are not row-aligned."""
        self._check_rows(inputs, targets, rows)
        key = self._way_key("kept", (inputs, targets))
        choice, fits = _ways.get(self.model, key), self._fits(rows)
        tried = choice not in ("G", "misaligned") or not fits
        forward = self._forward_state(inputs, targets, params, rows) if tried else None
        if tried and forward is None:
            _ways.set(self.model, key, "misaligned")
            if not fits:  # neither can be kept: the outputs are not row-aligned and G is too large
                raise StateNotKept
        elif forward is not None and (choice == "forward" or not fits or
                                      self._measure_kept(forward, inputs, targets, params, rows, key)):
            return forward
        del forward
        return self._gradients(inputs, targets, params), rows

    def _measure_kept(self, forward, inputs, targets, params, rows, key) -> bool:
        """Whether a product on the kept ``forward`` beat one on ``G``, estimated from the per-sample gradients of
        the first :data:`MEASURE_ROWS` rows (its two matrix-vector products read ``G``, so their time is about
        linear in the rows); remembered for the model and batch shape. A probe of ones, so that no random number
        is drawn."""
        probe = [torch.ones_like(p) for p in params]
        start = time.perf_counter()
        self._forward_product(forward, probe, None, keep_graph=True)
        forward_s = _elapsed_s(self.device, start)
        sample = min(rows, MEASURE_ROWS)
        G = self._gradients(tree_map(lambda t: t[:sample], inputs), targets[:sample], params)
        flat = self._flat(probe, None)
        start = time.perf_counter()
        self._fisher_times(G, flat)
        g_s = _elapsed_s(self.device, start) * rows / sample
        won = forward_s <= g_s
        _ways.set(self.model, key, "forward" if won else "G")
        return won

    def _apply(self, state, v, k) -> list[torch.Tensor]:
        if isinstance(state, _Forward):
            self.last_path = "kept forward"
            return self._forward_product(state, v, k, keep_graph=True)
        G, rows = state
        self.last_path = "kept G"
        return self.unflatten(self._fisher_times(G, self._flat(v, k)) / rows)

    @staticmethod
    @without_autocast  # G's products in its own dtype (under autocast they came out bfloat16)
    def _fisher_times(G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``Gᵀ(G V)`` for V (n,) or rows (k, n)."""
        if V.dim() == 1:
            return G.T @ (G @ V)
        return (V @ G.T) @ G  # (k, N) then (k, n)

    def _batch_product(self, inputs, targets, params, v, k, rows):
        self._check_rows(inputs, targets, rows)
        if self.compile:
            product = compiled_fisher(self.model, self._output_of(inputs), self.loss_fn, targets, rows, params, v, k,
                                      (inputs, targets))
            if product is not None:
                self.last_path = "compiled"
                return [t / rows for t in product]
        key = self._way_key("unkept", (inputs, targets), k)
        choice = _ways.get(self.model, key)
        if choice is None:
            return self._measured_product(inputs, targets, params, v, k, rows, key)
        if choice == "outputs":
            product = self._output_space_product(inputs, targets, params, v, k, rows)
            if product is not None:
                self.last_path = "outputs"
                return product
        return self._per_sample_product(inputs, targets, params, v, k, rows)

    def _measured_product(self, inputs, targets, params, v, k, rows, key):
        """The first unkept product of a batch signature and k: on one forward in the outputs, timed against the
        per-sample gradients of its first :data:`MEASURE_ROWS` rows scaled to all of them (their cost is about
        linear in the rows); the faster is remembered for the model. The per-sample way costs about a gradient plus
        the writes and reads of ``G``, whatever k; the outputs' about two gradients per probe: few rows of much
        work each (sequences) favour the first, many light rows the second."""
        start = time.perf_counter()
        product = self._output_space_product(inputs, targets, params, v, k, rows)
        outputs_s = _elapsed_s(self.device, start)
        if product is None:
            _ways.set(self.model, key, "per-sample")
            return self._per_sample_product(inputs, targets, params, v, k, rows)
        sample = min(rows, MEASURE_ROWS)
        start = time.perf_counter()
        self._per_sample_product(tree_map(lambda t: t[:sample], inputs), targets[:sample], params, v, k, sample)
        per_sample_s = _elapsed_s(self.device, start) * rows / sample
        _ways.set(self.model, key, "per-sample" if per_sample_s < outputs_s else "outputs")
        self.last_path = "outputs"
        return product

    def _per_sample_product(self, inputs, targets, params, v, k, rows):
        """``(1/N_b) Σ_c G_cᵀ (G_c v)`` over chunks of rows of the per-sample gradients (``max_kept_bytes``)."""
        self.last_path = "per-sample"
        V = self._flat(v, k)
        chunk = max(1, self.max_kept_bytes // self._row_bytes())
        total = torch.zeros_like(V)
        for start in range(0, rows, chunk):
            rows_slice = slice(start, min(rows, start + chunk))
            G = self._gradients(tree_map(lambda t: t[rows_slice], inputs), targets[rows_slice], params)
            total += self._fisher_times(G, V)
            del G
        return self.unflatten(total / rows)

    def _output_space_product(self, inputs, targets, params, v, k, rows) -> list[torch.Tensor] | None:
        """``F_b v = (1/N_b) Jᵀ (w ⊙ R)`` on one forward (module docstring); None where the outputs are not one
        floating-point tensor whose dim 0 is the rows."""
        forward = self._forward_state(inputs, targets, params, rows)
        return None if forward is None else self._forward_product(forward, v, k, keep_graph=False)

    def _forward_state(self, inputs, targets, params, rows) -> _Forward | None:
        """One forward for products in the outputs: the outputs z, ``Jᵀd`` as a graph linear in the variable
        cotangent ``d`` and ``R``; None where z is not one floating-point tensor whose dim 0 is the rows, or where
        the loss is the model's own (``model_loss``: not a function of z to take R from)."""
        if self.loss_fn is model_loss:
            return None
        leaves = [p.detach().requires_grad_(True) for p in params]
        # Jᵀd is only differentiated to d (J v): its linear layers' products are placeholders (linear.py).
        with torch.enable_grad(), transposed_products_unused(leaves):
            output = self._output_of(inputs)(*leaves)
        if not _row_aligned(output, rows):
            return None
        per_row_output_grads, row_losses = _per_row_output_gradients(self.loss_fn, output.detach(), targets)
        _check_finite_rows(row_losses)
        cotangent = transposed = None
        if output.requires_grad:
            with torch.enable_grad():
                cotangent = torch.zeros_like(output).requires_grad_(True)
                transposed = torch.autograd.grad(output, leaves, cotangent, create_graph=True, allow_unused=True)
        return _Forward(leaves, output, cotangent, transposed, per_row_output_grads, rows)

    def _forward_product(self, forward: _Forward, v, k, *, keep_graph: bool) -> list[torch.Tensor]:
        if not forward.output.requires_grad:  # the outputs do not depend on the parameters in scope: J = 0
            return [torch.zeros_like(t) for t in v]
        if k is not None and probes_loop(self.model, k, OUTPUT_SPACE_BACKWARDS):
            # probe by probe, the graph kept to the last: no (k, *z.shape) block of J v
            return per_probe(lambda direction: self._forward_product(forward, direction, None,
                                                                     keep_graph=True), v, k)
        # J v: the backward of ⟨Jᵀd, v⟩ to d (Jᵀd is linear in d, so its derivative in d is J). A block's backwards
        # loop or run vmapped as measured once per model.
        (jv,) = batched_vjp(list(forward.transposed), [forward.cotangent], v, k, keep_graph=True, key=self.model,
                            kind=OUTPUT_SPACE_BACKWARDS[0])
        products = batched_vjp([forward.output], forward.leaves, [_weighted_rows(forward.per_row_output_grads, jv)],
                               k, keep_graph=keep_graph, key=self.model, kind=OUTPUT_SPACE_BACKWARDS[1])
        return [t.div_(forward.rows) for t in products]


class _Forward(NamedTuple):
    """One batch's forward for products in the outputs (``_forward_state``)."""

    leaves: list
    output: torch.Tensor
    cotangent: torch.Tensor | None
    transposed: tuple | None
    per_row_output_grads: torch.Tensor
    rows: int


def _check_finite_rows(row_losses: torch.Tensor) -> None:
    if not bool(torch.isfinite(row_losses).all()):
        bad = int(torch.nonzero(~torch.isfinite(row_losses))[0, 0])
        raise ValueError(
            f"EmpiricalFisherOperator: a non-finite loss ({float(row_losses[bad])}) of row {bad} of the batch alone, "
            "so its per-sample gradient is undefined. A row with nothing to predict (every label -100, or a causal LM "
            "row whose only label is at its first position) has the mean loss 0/0: leave such rows out of the batch "
            "(the operator leaves them out itself for causal_lm_loss, F.cross_entropy, nn.CrossEntropyLoss and "
            "optim.hessian.cross_entropy as loss_fn); otherwise check the inputs and parameters for nan/inf, or the "
            "loss for log(0) and overflow")


def _row_aligned(output, rows: int) -> bool:
    """Whether ``output`` is one floating-point tensor whose dim 0 is the batch's rows (row i the output of row i
    alone, for a model that treats rows independently)."""
    return isinstance(output, torch.Tensor) and output.dtype.is_floating_point and output.dim() > 0 and \
        output.shape[0] == rows


def _per_row_output_gradients(loss_fn, output: torch.Tensor, targets: torch.Tensor):
    """``(R, ℓ)``: ``R[i] = ∇_{z_i} ℓ_i`` (shaped like ``output``) and the (N,) per-sample losses
    ``ℓ_i = loss_fn(z_i[None], y_i[None])``, from the outputs alone."""
    def row_loss(z, y):
        loss = _scalar_loss(loss_fn(z.unsqueeze(0), y.unsqueeze(0)))
        return loss, loss

    return torch.func.vmap(torch.func.grad(row_loss, has_aux=True))(output, targets)


def _weighted_rows(per_row_output_grads: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
    """``w ⊙ R`` with ``w_i = ⟨r_i, (J v)_i⟩``: the cotangent of ``Gᵀ G v``; ``jv`` shaped like ``R`` or with a
    leading k (then so is the result)."""
    lead = jv.dim() - per_row_output_grads.dim()
    w = (per_row_output_grads * jv).reshape(jv.shape[:lead + 1] + (-1,)).sum(dim=-1)
    return per_row_output_grads * w.reshape(w.shape + (1,) * (per_row_output_grads.dim() - 1))


def _fisher_product(output_fn, loss_fn, targets, rows, params, direction):
    """``(Gᵀ G v, ℓ)`` for one probe, ``ℓ`` the (N,) per-sample losses (module docstring): ``z`` and ``J v`` by
    ``jvp`` of the outputs, ``R`` by ``grad`` of the criterion on one-row slices of ``z``, ``Jᵀ (w ⊙ R)`` by
    ``vjp`` (the compiler shares the primal forward of the two)."""
    primals = tuple(params)
    output, jv = torch.func.jvp(output_fn, primals, tuple(direction))
    if not _row_aligned(output, rows):
        raise OutputsDoNotFit
    per_row_output_grads, row_losses = _per_row_output_gradients(loss_fn, output, targets)
    _, pullback = torch.func.vjp(output_fn, *primals)
    return pullback(_weighted_rows(per_row_output_grads, jv)), row_losses


# One compiled function for every model and criterion, guarded by dynamo on what ``output_fn`` closes over.
_compiled_fisher_products = CompiledOutputProducts(_fisher_product)


def fisher_compile_seconds(model) -> float:
    """Seconds the first calls of ``model``'s compiled Fisher products took, compilation included (0 if none)."""
    return _compiled_fisher_products.seconds(model)


def compiled_fisher(model, output_fn, loss_fn, targets, rows, params, v, k, signature_extra):
    """``Gᵀ G v`` (not divided by the rows) for one probe (``k`` None) or a ``(k, ...)`` block, by the compiled
    :func:`_fisher_product`; None where the outputs are not one row-aligned floating-point tensor (the caller
    computes the product eagerly)."""
    signature = (_signature(params), _signature(signature_extra))
    return _compiled_fisher_products(model, signature, (output_fn, loss_fn, targets, rows, list(params)), v, k,
                                     _check_finite_rows)
