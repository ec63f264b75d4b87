"""The Hessian of a model's loss on a data set, as a linear operator on its parameters.

For a model with parameters ``θ`` (the in-scope subset, flattened: ``θ ∈ ℝⁿ``), a criterion ``ℓ`` and batches
``(X_b, Y_b)`` of weight ``N_b`` each, the operator is the Hessian of the size-weighted mean of the batch losses::

    L(θ) = Σ_b (N_b / N) · ℓ(model(X_b; θ), Y_b),        N = Σ_b N_b,
    H    = ∇²L(θ) = Σ_b (N_b / N) · ∇²ℓ_b(θ)              (n × n, symmetric, never materialized)

With a criterion that averages over its batch (``reduction="mean"``, the PyTorch default) ``L`` is the mean loss
over all the data, whatever the batch sizes: ``N_b`` is what the criterion's mean divides by. For
:func:`~optim.hessian.losses.causal_lm_loss`, :func:`~optim.hessian.losses.cross_entropy`, ``F.cross_entropy`` and
``nn.CrossEntropyLoss`` on class indices that is the targets they count (padding and other ignored targets left
out; class weights summed), so batches with padding or of other lengths give the mean over all counted tokens,
the operator of the same data as one batch (:func:`~optim.hessian.losses.loss_terms`); for any other criterion
(a wrapper of these, ``model_loss``) it is the number of rows of the target (``targets.shape[0]``; 1 for a 0-dim
target). A batch of weight 0 (every target ignored) is left out. ``H @ v`` costs one Hessian-vector product per
batch (see :func:`optim.hessian.hvp.hvp` for the modes), evaluated at the model's parameters as they are when it
is called.

Data-parallel (a ``DistributedDataParallel`` model, or ``process_group``): each rank holds its own batches and the
sums over b run over the batches of every rank, ``Σ_b N_b C_b v`` and ``N`` all-reduced at each product, so every
rank gets the operator of the global data, that of one process given all the ranks' batches as a list (to rounding).
Every rank must call every product (the estimators do: their probes are the same on every rank for one seed).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Callable, Iterable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from .._library import autocast_state
from ..fused.distributed import check_process_group, is_dtensor, sum_

from . import losses
from .krylov import _dot64
from .routing import random_draws, sdpa_curvature, watch_first_forward
from .hvp import (_MODE_FAILURES, MODES, auto_choice, check_compile, check_params, check_vectors, compile_seconds,
                  MEASURE_MIN_PROBES, batched_vjp, batching_choice, compiled_hvp, compute_hvp, differentiable,
                  first_order_graph, loss_and_gradient, normal_tensor, remember_auto_choice, second_backward)

__all__ = ["CurvatureOperator", "HessianOperator"]


_BATCH_FORMS = ("an (inputs, targets) pair with targets a tensor, or a mapping of the model's keyword inputs with a "
                "'labels' tensor (a Hugging Face batch: the labels are the targets)")


def _is_batch(data) -> bool:
    """One batch: a 2-tuple or 2-list whose second entry (the targets) is a tensor, or a mapping with a tensor
    ``"labels"`` (:func:`as_pair`)."""
    if isinstance(data, Mapping):
        return isinstance(data.get("labels"), torch.Tensor)
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor)


def as_pair(batch) -> tuple[object, torch.Tensor]:
    """``(inputs, targets)`` of a batch: the pair itself, or of a Hugging Face batch (a mapping with ``"labels"``,
    as its collators yield) the other entries and the labels, so the model is called without them and
    ``loss_fn(outputs, labels)`` gives the loss. Mapping inputs come as a dict (:func:`_plain_inputs`)."""
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if key != "labels"}, batch["labels"]
    return _plain_inputs(batch[0]), batch[1]


def _check_batch(batch, index: int, where: str) -> None:
    if not _is_batch(batch):
        raise ValueError(
            f"{where}: data batch {index} is a {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + (" without a 'labels' tensor" if isinstance(batch, Mapping) else "")
            + f"; each batch must be {_BATCH_FORMS}"
        )


# Integer dtypes by element size: a tensor's bits, compared as integers, so that NaN matches NaN and -0.0 != 0.0.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.bool:
        return tensor
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.view(_BITS[tensor.element_size()])


def _dots64(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise ``Σ_pieces Σ_j a[i, j] b[i, j]`` of two param-shaped lists with a leading k, in float64: one
    ``optim::krylov_dots`` per piece, summed piece by piece in ``params`` order."""
    total = None
    for x, y in zip(a, b):
        dots = _dot64(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1))
        total = dots if total is None else total.add_(dots)
    return total


class CapturedState:
    """Copies of every tensor a kept graph captured, to prove the graph fresh before each reuse.

    Version counters cannot: ``p.data.add_(...)`` and BatchNorm's update of its running statistics leave ``_version``
    unchanged, and a graph reused after either silently differentiates the old function. So the tensors' contents
    are compared, bit for bit, with copies taken when the graph was built (one pass over them and one host sync per
    tensor; the copies cost their memory once, next to the activations the graph already holds).
    """

    def __init__(self, tensors: list[torch.Tensor]):
        # The captured objects themselves, kept alive: the key holds their ids, which a new tensor (a parameter
        # assigned in place of a freed one) could otherwise be given, and pass for the old one.
        self.sources = list(tensors)
        self.tensors = [t.detach() for t in tensors]
        self.copies = [t.clone() for t in self.tensors]

    def unchanged(self) -> bool:
        # torch.equal of the bit patterns (NaN equals itself, -0 differs from 0): one fused pass per tensor,
        # without the bool tensor of ``!=`` (2.6x faster on CPU than ``(a != b).any()``).
        return all(torch.equal(_bits(tensor), _bits(copy)) for tensor, copy in zip(self.tensors, self.copies))


class StateNotKept(Exception):
    """Raised by a subclass's ``_build`` or first ``_apply`` when the kept state turns out not to work for this model
    (``mode="auto"`` learning that the Hessian's graph cannot be differentiated twice): the product is then computed
    the one-shot way, which takes it from there."""


class KeptGraph(NamedTuple):
    """What an operator keeps between products on one batch, with what proves it fresh."""

    key: tuple  # the structure it was built for: modes, and identity, storage and shape of what it captured
    captured: CapturedState
    state: object  # the operator's own: the gradient's graph (Hessian), the output's graph (GGN), G (Fisher)


def _the_block_viewed(tensors: list[torch.Tensor], k: int) -> torch.Tensor | None:
    """The ``(k, n)`` buffer whose consecutive column ranges ``tensors`` view, in order (what a looped block of
    products returns), else None: flattening it is then the buffer itself, not a copy."""
    base = tensors[0]._base
    if base is None or base.dim() != 2 or not base.is_contiguous() or k == 0:
        return None
    offset = base.storage_offset()
    width = base.shape[1]
    for t in tensors:
        if t._base is not base or t.shape[0] != k or t.storage_offset() != offset or t.stride(0) != width or \
                not t[0].is_contiguous():
            return None
        offset += t[0].numel()
    return base if base.shape[0] == k and offset - base.storage_offset() == width else None


class CurvatureOperator:
    """The shared machinery of :class:`HessianOperator`, :class:`~optim.hessian.ggn.GGNOperator` and
    :class:`~optim.hessian.fisher.EmpiricalFisherOperator`: an ``(n, n)`` symmetric matrix ``C`` of a model's loss on
    ``data``, weighted over batches as the module docstring says, applied to vectors of the in-scope parameters.

    It owns the constructor's common arguments (model, loss_fn, data, param_filter, reuse_graph, compile) and their
    validation, the batches and their weighting (``C = Σ_b (N_b / N) C_b``), the flat layout (:meth:`flatten`,
    :meth:`unflatten`), the vector protocol of :meth:`matvec` ((n,), (k, n), param-shaped lists), ``num_matvecs``,
    :meth:`loss_and_grad`, and the kept per-batch state with its freshness check (:class:`CapturedState`). A
    subclass gives the per-batch product through three hooks:

    * ``_build(inputs, targets, params, rows)``: the state a product on that batch needs (a graph, a matrix);
    * ``_apply(state, v, k)``: ``C_b v`` from it, for v a checked param-shaped list with k probes (None: one);
      ``state`` must stay usable for further products;
    * ``_can_keep(batch)``: whether the state of that one batch may be kept between products now (besides
      ``reuse_graph`` and the train/eval rule), and optionally ``_batch_product`` for a cheaper one-shot product.
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
        process_group: dist.ProcessGroup | None = None,
    ):
        where = self._where
        check_compile(compile, "fr", where=where)
        model, process_group = data_parallel(model, process_group, where)
        if compile and reuse_graph is True:
            raise ValueError(f"{where}: compile=True recomputes the forward in the compiled product, so there is no "
                             "graph to reuse; pass reuse_graph=None or False with it")
        if not isinstance(model, nn.Module):
            raise ValueError(f"{where}: model must be a torch.nn.Module, got a {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(
                f"{where}: loss_fn must be callable as loss_fn(output, target), got a {type(loss_fn).__name__}"
            )
        if loss_fn is losses.model_loss:
            check_model_loss(model, where, type(self).__name__, compile)
        if param_filter is not None and not callable(param_filter):
            raise ValueError(
                f"{where}: param_filter must be callable as param_filter(name, param) -> bool, got a "
                f"{type(param_filter).__name__}"
            )
        if reuse_graph is not None and not isinstance(reuse_graph, bool):  # 1 == True: `in` would take it
            raise ValueError(f"{where}: reuse_graph must be None, True or False, got {reuse_graph!r}")
        if _is_batch(data):
            stored = [data]
        elif isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, str, Mapping)):
            stored = None
        else:
            raise ValueError(
                f"{where}: data must be one batch or an iterable of batches, a batch being {_BATCH_FORMS}; got a "
                f"{type(data).__name__}" + (" without a 'labels' tensor" if isinstance(data, Mapping) else "")
            )
        selected = [
            (name, p)
            for name, p in model.named_parameters()
            if p.requires_grad and (param_filter is None or param_filter(name, p))
        ]
        if not selected:
            raise ValueError(
                f"{where}: no parameters in scope: the model has no parameter that requires grad"
                + (" and passes param_filter" if param_filter is not None else "")
            )
        params = [p for _, p in selected]
        check_params(params, where=where, names=[name for name, _ in selected])
        reject_sharded(selected, where)
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"{where}: the parameters in scope mix dtypes or devices "
                f"({sorted(map(str, dtypes))} on {sorted(map(str, devices))}); flat vectors need one of each: "
                "convert the model, or restrict the scope with param_filter"
            )
        if stored is None:
            # A one-shot iterator would be empty at the second product.
            stored = list(data) if iter(data) is data else data
        if isinstance(stored, (list, tuple)):  # a loader is read at each product; a list can be checked now
            for index, batch in enumerate(stored):
                _check_batch(batch, index, where)
        self.names = [name for name, _ in selected]
        self.params = params
        self.model = model
        self.loss_fn = loss_fn
        self.dtype = params[0].dtype
        self.device = params[0].device
        self._shapes = [p.shape for p in params]
        self._numels = [p.numel() for p in params]
        self.n = sum(self._numels)
        self.shape = (self.n, self.n)
        self.num_matvecs = 0
        self.random_draws: tuple[str, ...] = ()
        self.compile = compile
        self.reuse_graph = False if compile else reuse_graph
        self._graph: KeptGraph | None = None  # the kept state of the one batch
        self._data = stored
        self.process_group = process_group

    @property
    def _where(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self._where}(n={self.n}, params={len(self.params)}, dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------------------------------------------------------
    # Flat vectors

    def flatten(self, tensors) -> torch.Tensor:
        """A param-shaped list as one vector ``(n,)``; with a leading k on every entry, a ``(k, n)`` block."""
        tensors = list(tensors)
        _, k = check_vectors(
            [p.detach() for p in self.params], tensors, where=f"{self._where}.flatten", check_finite=False
        )
        return self._flat(tensors, k)

    @staticmethod
    def _flat(tensors: list[torch.Tensor], k: int | None) -> torch.Tensor:
        if k is None:
            return torch.cat([t.reshape(-1) for t in tensors])
        block = _the_block_viewed(tensors, k)
        if block is not None:
            return block
        return torch.cat([t.reshape(k, math.prod(t.shape[1:])) for t in tensors], dim=1)  # k may be 0

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A vector ``(n,)`` as a param-shaped list, or a ``(k, n)`` block as a list with a leading k on every entry.

        The pieces are views of ``flat`` when its layout allows it (any contiguous ``flat`` does).
        """
        if not isinstance(flat, torch.Tensor) or flat.dim() not in (1, 2) or flat.shape[-1] != self.n:
            shape = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
            raise ValueError(
                f"{self._where}.unflatten: expected a tensor of shape ({self.n},) or (k, {self.n}), got {shape}"
            )
        pieces = flat.split(self._numels, dim=-1)
        lead = tuple(flat.shape[:-1])
        return [piece.reshape(lead + tuple(shape)) for piece, shape in zip(pieces, self._shapes)]

    # ------------------------------------------------------------------------------------------------------------
    # Products

    @differentiable
    def matvec(self, v):
        """``C v`` for a flat vector ``(n,)``, a block ``(k, n)`` of row vectors, or a param-shaped list."""
        where = self._where
        if isinstance(v, torch.Tensor):
            self._check_flat(v, (1, 2))
            return self.flatten(self._product(self.unflatten(v)))
        if isinstance(v, (list, tuple)):
            product = self._product(list(v))
            return tuple(product) if isinstance(v, tuple) else product
        raise ValueError(
            f"{where}: v must be a tensor of shape ({self.n},) or (k, {self.n}), or a list of tensors shaped "
            f"like params, got a {type(v).__name__}"
        )

    def _check_flat(self, v: torch.Tensor, dims: tuple[int, ...]) -> None:
        if v.dim() not in dims or v.shape[-1] != self.n:
            raise ValueError(
                f"{self._where}: v has shape {tuple(v.shape)}; expected "
                + ("a flat vector ({n},), a block (k, {n}) of k row vectors, or a list shaped like params"
                   if 1 in dims else "a block (k, {n}) of k row vectors").format(n=self.n)
            )
        if v.dtype != self.dtype or v.device != self.device:
            raise ValueError(
                f"{self._where}: v is {v.dtype} on {v.device} but the parameters are {self.dtype} on "
                f"{self.device}; convert v with .to(dtype=H.dtype, device=H.device)"
            )

    @differentiable
    def quadratic_forms(self, V: torch.Tensor) -> torch.Tensor:
        """``(k,)`` float64: ``v_iᵀ C v_i`` for the rows of a ``(k, n)`` block (what a Hutchinson trace needs).

        Here ``Σ_j V[i, j] (C V[i])_j`` from ``C @ V``, products and sums in float64; :class:`HessianOperator`
        on a kept graph dots each product as it comes instead, without holding the ``(k, n)`` result.
        """
        self._check_flat(V, (2,))
        return _dots64(self.unflatten(V), self.unflatten(self.matvec(V)))

    def __matmul__(self, v):
        return self.matvec(v)

    def __rmatmul__(self, v):
        # vᵀC = (Cv)ᵀ: C is symmetric, and a (k, n) block times C is its rows times C.
        return self.matvec(v)

    @differentiable
    def loss_and_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, ∇L)``: the weighted mean loss (a 0-dim tensor) and its gradient as a flat ``(n,)`` vector."""
        params = self._current_params()
        total_loss, total_grad, total_weight = None, None, 0
        for inputs, targets, weight in self._batches():
            loss, grad = loss_and_gradient(self._loss_of(inputs, targets), params, at="the model's parameters")
            flat = torch.cat([g.reshape(-1) for g in grad])
            if total_grad is None:
                total_loss, total_grad = weight * loss, weight * flat
            else:
                total_loss, total_grad = total_loss + weight * loss, total_grad.add_(flat, alpha=weight)
            total_weight += weight
        if self.process_group is not None:
            total_loss, total_grad = self._over_ranks([total_loss, total_grad], total_weight, [(), (self.n,)])
            return total_loss, total_grad
        self._check_some_rows(total_weight)
        return total_loss / total_weight, total_grad.div_(total_weight)

    def _over_ranks(self, sums: list[torch.Tensor | None], weight: int, shapes) -> list[torch.Tensor]:
        """``Σ_ranks sums / Σ_ranks weight`` over ``process_group``: the local weighted sums (None where this rank
        has no rows: zeros of ``shapes``) all-reduced, divided by the global row count. Raises on every rank when
        no rank has a row."""
        sums = [torch.zeros(shape, dtype=self.dtype, device=self.device) if t is None else t
                for t, shape in zip(sums, shapes)]
        rows = torch.tensor([float(weight)], dtype=torch.float64, device=self.device)
        dist.all_reduce(rows, group=self.process_group)
        self._check_some_rows(rows.item())
        sum_(sums, self.process_group)
        return [t.div_(rows.item()) for t in sums]

    def release_graph(self) -> None:
        """Free the kept state (its activations or matrix); the next product rebuilds it. See ``reuse_graph``."""
        self._graph = None

    def _can_keep(self, batch) -> bool:
        return True

    def _current_params(self) -> list[torch.Tensor]:
        """The in-scope parameters as the model holds them now, detached, looked up by name; ``params`` follows.

        A parameter replaced since the last product (``model.fc.weight = nn.Parameter(...)``, a checkpoint loaded
        by assignment) is a new tensor: products are taken at it, and the kept state, which captured the old one
        (its identity is in the key of :meth:`_captured`), is rebuilt. The flat layout is fixed at construction, so
        a name gone from the model, or a parameter of another shape, dtype or device, is refused: build a new
        operator for the model as it is now.
        """
        where, current, params = self._where, dict(self.model.named_parameters()), []
        for name, old, shape in zip(self.names, self.params, self._shapes):
            p = current.get(name)
            if p is None:
                raise ValueError(f"{where}: the model no longer has the parameter {name!r} this operator was built "
                                 "for; build a new operator for the model as it is now")
            if p.shape != shape or p.dtype != self.dtype or p.device != self.device:
                raise ValueError(f"{where}: parameter {name!r} is now {p.dtype} {tuple(p.shape)} on {p.device}, but "
                                 f"the operator was built for {self.dtype} {tuple(shape)} on {self.device} (its flat "
                                 "vectors have that layout); build a new operator for the model as it is now")
            params.append(p)
        if any(p is not old for p, old in zip(params, self.params)):
            self.params = params
        return check_params(params, where=where, names=self.names)

    def _check_model(self) -> None:
        """Raise ``ValueError`` if the model's current state is one this operator cannot handle (before computing)."""

    def _captured(self, batch) -> tuple[tuple, list[torch.Tensor]] | None:
        """``(key, tensors)``: what a kept state depends on, or None when it must not be kept (``reuse_graph``).

        The tensors are every parameter and buffer of the model and every tensor of the batch; the key is the modes
        and, per tensor, its identity, storage and layout (a replaced tensor, ``p.data = ...``, changes it), plus the
        batch's non-tensor leaves. Their contents are checked separately (:class:`CapturedState`).
        """
        if self.reuse_graph is False or not self._can_keep(batch):
            return None
        training = tuple(module.training for module in self.model.modules())
        if self.reuse_graph is None and any(training):
            return None
        modes = (training, autocast_state())  # a graph built in or out of an autocast region serves only there
        inputs, targets = as_pair(batch)
        leaves = tree_leaves(inputs) + [targets]
        if not all(leaf is None or isinstance(leaf, (torch.Tensor, bool, int, float, str)) for leaf in leaves):
            return None  # an object in the batch: its contents cannot be checked for changes
        tensors = [*self.model.parameters(), *(b for b in self.model.buffers() if b is not None)]
        tensors += [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        layout = tuple((id(t), t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in tensors)
        scalars = tuple(leaf for leaf in leaves if not isinstance(leaf, torch.Tensor))
        return (modes, layout, scalars), tensors

    def _batch_product(self, inputs, targets, params, v, k, rows) -> list[torch.Tensor]:
        """``C_b v`` on one batch without keeping anything (default: build the state, apply it, drop it)."""
        return self._apply(self._build(inputs, targets, params, rows), v, k)

    def _kept_state(self, params: list[torch.Tensor]):
        """The state of the one batch, kept between products and proven fresh (built now if it was not); None
        when nothing may be kept (several batches, ``reuse_graph``, train mode, ...). May raise StateNotKept."""
        batch = self._data[0] if isinstance(self._data, list) and len(self._data) == 1 else None
        captured = None if batch is None or not _is_batch(batch) else self._captured(batch)
        if captured is None:
            self._graph = None
            return None
        key, tensors = captured
        graph = self._graph
        if graph is None or graph.key != key or not graph.captured.unchanged():
            self._graph = graph = None  # free the old state before building the new one
            batches = list(self._batches())
            if not batches and self.process_group is not None:
                return None  # this rank's share is empty: the other ranks' rows make the product
            self._check_some_rows(len(batches))
            inputs, targets, rows = batches[0]
            state = self._build(inputs, targets, params, rows)
            self._graph = graph = KeptGraph(key, CapturedState(tensors), state)
        return graph.state

    @sdpa_curvature()  # every product of every operator (and so the monitor and the estimators) builds here
    def _product(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        where = self._where
        params = self._current_params()
        v, k = check_vectors(params, v, where=where)
        self._check_model()
        if k == 0:  # no probes: an empty block, once the data is known to have rows
            rows = sum(rows for _, _, rows in self._batches())
            if self.process_group is not None:
                self._over_ranks([], rows, [])
            self._check_some_rows(rows if self.process_group is None else 1)
            return [t.clone() for t in v]
        try:
            state = self._kept_state(params)
            if state is not None:
                product = self._apply(state, v, k)
                self.num_matvecs += 1 if k is None else k
                self.random_draws = ()  # the kept graph's one draw serves every product
                if self.process_group is not None:
                    rows = self._batch_weight(as_pair(self._data[0])[1])
                    return self._over_ranks([t * rows for t in product], rows, [t.shape for t in v])
                return product
        except StateNotKept:
            self._graph = None
        total, first_weight, total_weight = None, 0, 0
        for inputs, targets, weight in self._batches():
            product = self._batch_product(inputs, targets, params, v, k, weight)
            if total is None:
                total, first_weight = product, weight
            else:
                if total_weight == first_weight:  # the second batch: weight the first one now
                    total = [first_weight * t for t in total]
                for acc, t in zip(total, product):
                    acc.add_(t, alpha=weight)
            total_weight += weight
        self.num_matvecs += 1 if k is None else k
        self.random_draws = random_draws(self.model, forward_key(self.model, tuple(self.names)))
        if self.process_group is not None:
            if total is not None and total_weight == first_weight:
                total = [t * first_weight for t in total]
            return self._over_ranks([None] * len(v) if total is None else total, total_weight, [t.shape for t in v])
        self._check_some_rows(total_weight)
        # One batch: its product as it is, bit for bit what a kept state gives (w·t/w may round).
        return total if total_weight == first_weight else [t.div_(total_weight) for t in total]

    # ------------------------------------------------------------------------------------------------------------
    # The model and the loss as functions of the in-scope parameters

    def _batches(self):
        """``(inputs, targets, weight)`` for every batch of ``data`` of weight > 0 (:meth:`_batch_weight`)."""
        for index, batch in enumerate(self._data):
            _check_batch(batch, index, self._where)
            inputs, targets = as_pair(batch)
            weight = self._batch_weight(targets)
            if weight == 0:
                continue
            targets = normal_tensor(targets.to(self.device, non_blocking=True))
            yield *self._measured_rows(with_decoder_inputs(self.model, batch_inputs(inputs, self.device), targets),
                                       targets, weight), weight

    def _measured_rows(self, inputs, targets, weight: float):
        """The rows of a batch (of ``weight``, :meth:`_batch_weight`) the operator measures: all of them (the
        empirical Fisher leaves out the rows with nothing to predict)."""
        return inputs, targets

    def _batch_weight(self, targets: torch.Tensor) -> float:
        """``N_b``: the terms the criterion averages over (:func:`~optim.hessian.losses.loss_terms`: the counted
        tokens of a causal-LM or cross-entropy loss with ignored targets), else the rows of ``targets``."""
        terms = losses.loss_terms(self.loss_fn, targets)
        return batch_rows(targets) if terms is None else terms

    def _check_some_rows(self, total_weight: float) -> None:
        if total_weight == 0:
            raise ValueError(f"{self._where}: data has no batch with at least one row (one target that is not "
                             "ignored, for a cross-entropy or causal-LM loss); the average is undefined")

    def _output_of(self, inputs) -> Callable[..., object]:
        """``z(*params)``: the model's outputs on ``inputs`` (:func:`model_outputs`) with the in-scope parameters
        replaced by the arguments, for the operators in the outputs."""
        return model_outputs(self.model, tuple(self.names), inputs)

    def _loss_of(self, inputs, targets) -> Callable[..., torch.Tensor]:
        """``f(*params)``: the loss of this batch with the in-scope parameters replaced by the arguments."""
        return loss_of_parameters(self.model, self.loss_fn, tuple(self.names), inputs, targets)


def data_parallel(model, process_group, where: str):
    """``(model, process_group)`` to measure: a ``DistributedDataParallel`` model's ``.module`` with its group
    (unless one is given), the global batch's curvature, as it is trained on (DDP's own forward would leave its
    reducer waiting for a backward that never comes); anything else as given. The group is checked here."""
    check_process_group(process_group, caller=where)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model.process_group if process_group is None else process_group
    return model, process_group


def check_model_loss(model: nn.Module, where: str, operator: str, compile: bool) -> None:
    """Raise ``ValueError`` unless ``operator`` (a class name) can take ``loss_fn=model_loss`` on ``model``: the
    model's forward must take ``labels``; the GGN, and the Fisher's compiled product, need the loss as a function
    of the model's outputs."""
    if operator == "GGNOperator" or (operator == "EmpiricalFisherOperator" and compile):
        raise ValueError(
            f"{where}: loss_fn=optim.hessian.model_loss is the loss the model computes, not a function of its outputs, "
            f"which {'the Gauss-Newton matrix' if operator == 'GGNOperator' else 'the compiled Fisher product'} "
            "needs: pass the criterion (optim.hessian.causal_lm_loss for a causal LM, F.cross_entropy, ...)"
            + ("" if operator == "GGNOperator" else ", or compile=False"))
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the call will tell
        return
    if not any(p.name == "labels" or p.kind is p.VAR_KEYWORD for p in parameters):
        raise ValueError(
            f"{where}: loss_fn=optim.hessian.model_loss differentiates the loss the model returns when called with "
            f"labels=..., but {type(model).__name__}.forward takes no labels: pass a criterion "
            "loss_fn(output, target)")


def reject_sharded(named_params, where: str) -> None:
    """``ValueError`` for a DTensor parameter among ``(name, param)`` pairs: FSDP2 unshards in its forward hooks,
    which a functional call of the module bypasses, so every product would be wrong (it was zero)."""
    sharded = [name for name, p in named_params if is_dtensor(p)]
    if sharded:
        raise ValueError(
            f"{where}: parameter {sharded[0]!r} is a DTensor (the model is sharded by FSDP2's fully_shard), and the "
            "curvature operators differentiate whole parameters through a functional call the sharding does not "
            "take part in. Measure an unsharded copy (its full state dict, e.g. torch.distributed.checkpoint."
            "state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))) with "
            "process_group= to share the data, or the model under DDP")


def batch_rows(targets: torch.Tensor) -> int:
    """``N_b``, a batch's weight: the rows of its target (1 for a 0-dim target)."""
    return targets.shape[0] if targets.dim() > 0 else 1


def _buffer_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers of modules in train mode, which BatchNorm would otherwise update in place."""
    copies = {}
    for module_name, module in model.named_modules():
        if module.training:
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    name = f"{module_name}.{buffer_name}" if module_name else buffer_name
                    copies[name] = buffer.clone()
    return copies


def _plain_inputs(inputs):
    """A mapping as a dict (a Hugging Face ``BatchEncoding`` is a ``UserDict``, which pytrees do not open)."""
    return dict(inputs) if isinstance(inputs, Mapping) and not isinstance(inputs, dict) else inputs


def batch_inputs(inputs, device: torch.device):
    """A batch's inputs as the model is called with them: a mapping as a dict, every tensor on ``device``."""
    return tree_map_only(torch.Tensor, lambda t: normal_tensor(t.to(device, non_blocking=True)),
                         _plain_inputs(inputs))


_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


def with_decoder_inputs(model: nn.Module, inputs, labels: torch.Tensor):
    """A Hugging Face encoder-decoder's inputs with the decoder inputs it builds from the labels itself.

    ``model(**batch)`` of a T5, BART or Whisper batch without decoder inputs shifts the labels right
    (``prepare_decoder_input_ids_from_labels``, or for an encoder-decoder without it the labels after its
    ``config.decoder_start_token_id``, -100 as ``pad_token_id``); the operators call the model without the labels,
    so they build them first. Any other model's inputs, or a batch that has decoder inputs, are returned as they
    are."""
    if not isinstance(inputs, dict) or any(key in inputs for key in _DECODER_INPUTS):
        return inputs
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return {**inputs, "decoder_input_ids": prepare(labels=labels)}
    config = getattr(model, "config", None)
    start, pad = getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)
    if getattr(config, "is_encoder_decoder", False) and isinstance(start, int) and isinstance(pad, int):
        # what Whisper's forward does without the method: the labels shifted right after the start token, the
        # ignored positions as padding
        shifted = torch.cat([labels.new_full((*labels.shape[:-1], 1), start), labels[..., :-1]], dim=-1)
        return {**inputs, "decoder_input_ids": shifted.masked_fill(shifted == -100, pad)}
    return inputs


def model_arguments(model: nn.Module, inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model's call on a batch's inputs: a mapping whose keys all name parameters of
    ``model.forward`` as keyword arguments (a Hugging Face batch: ``input_ids``, ``attention_mask``), a tuple or
    list as the positional arguments when ``forward`` cannot take it as one but can take its elements
    (``forward(self, x, mask)`` with inputs ``(x, mask)``), anything else as the one positional argument (a model
    whose ``forward(batch)`` reads a dict)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no signature to read: positional, as before
        return (inputs,), {}
    if isinstance(inputs, Mapping) and inputs:
        parameters = signature.parameters.values()
        named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if all(isinstance(key, str) and key in named for key in inputs):
            return (), dict(inputs)
    if isinstance(inputs, (tuple, list)) and len(inputs) > 1 and not _binds(signature, inputs) \
            and _binds(signature, *inputs):
        return tuple(inputs), {}
    return (inputs,), {}


def _binds(signature: inspect.Signature, *args) -> bool:
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def forward_key(model: nn.Module, names: tuple[str, ...]) -> tuple:
    """What a model's forward is watched once for: the scope and every module's train/eval mode (dropout turned
    off in one module, ``model.dropout.eval()``, is another forward)."""
    return names, tuple(module.training for module in model.modules())


# These close over the model, the loss and the batch only, never an operator: the compiled product is guarded on
# what its function closes over, so one compilation serves every operator of the same model and loss (a
# SharpnessMonitor builds one per measurement), and no cache keeps an operator (and its batch) alive.
def model_output(model: nn.Module, names: tuple[str, ...], inputs, labels=None) -> Callable[..., object]:
    """``f(*params) = model(inputs)`` (:func:`model_arguments`; with ``labels=labels`` when given) with the
    parameters ``names`` replaced by the arguments."""
    args, kwargs = model_arguments(model, inputs)
    if labels is not None:
        kwargs["labels"] = labels

    def output(*params: torch.Tensor):
        state = _buffer_copies(model)
        state.update(zip(names, params))
        with watch_first_forward(model, forward_key(model, names), names, params):
            return torch.func.functional_call(model, state, args, kwargs)

    return output


def output_tensor(result):
    """The one tensor the GGN and the empirical Fisher differentiate of a model's ``result``: the ``.logits`` of a
    Hugging Face output, any other result as it is (for the caller to refuse if not a tensor)."""
    logits = getattr(result, "logits", None)
    return logits if isinstance(logits, torch.Tensor) and not isinstance(result, torch.Tensor) else result


def model_outputs(model: nn.Module, names: tuple[str, ...], inputs) -> Callable[..., object]:
    """``z(*params)``: :func:`model_output` as its :func:`output_tensor`."""
    output = model_output(model, names, inputs)

    def outputs(*params: torch.Tensor):
        return output_tensor(output(*params))

    return outputs


def loss_of_parameters(model: nn.Module, loss_fn: Callable, names: tuple[str, ...], inputs, targets) -> Callable:
    """``f(*params) = loss_fn(z, targets)``, z the model's :func:`output_tensor` (a Hugging Face output's
    ``.logits``, as the GGN and the Fisher take it), with the parameters ``names`` replaced by the arguments; for
    ``loss_fn`` :func:`~optim.hessian.losses.model_loss`, the ``.loss`` of the model called with ``labels=targets``."""
    if loss_fn is losses.model_loss:
        output = model_output(model, names, inputs, labels=targets)
        return lambda *params: losses.model_loss(output(*params))
    outputs = model_outputs(model, names, inputs)

    def loss(*params: torch.Tensor) -> torch.Tensor:
        return loss_fn(outputs(*params), targets)

    return loss


class HessianOperator(CurvatureOperator):
    """``H``, the Hessian of ``loss_fn(model(inputs), targets)`` averaged over ``data``, for ``H @ v`` products.

    Args:
        model: an ``nn.Module``. Its parameters are read at each product (after an optimizer step, ``H`` is the
            Hessian at the new point); the operator never writes to the model.
        loss_fn: ``loss_fn(output, target)`` returns a scalar, like a PyTorch criterion; use one that averages
            over the batch. A Hugging Face model's output object is passed as its ``.logits`` (as to the GGN and
            the Fisher), so ``F.cross_entropy`` works on a sequence classifier as it is.
            :func:`optim.hessian.model_loss` takes the loss the model returns itself (``model(**batch).loss``:
            the model is called with ``labels=`` the targets).
        data: one ``(inputs, targets)`` batch, or an iterable of such batches (a list, a ``DataLoader``): the
            products and :meth:`loss_and_grad` are averages over the batches weighted by their row counts (see the
            module docstring). A list or a ``DataLoader`` is iterated again at every product (a shuffling loader
            changes the order, not the average, unless it drops a last partial batch or augments randomly); a
            one-shot iterator (a generator) is stored as a list on construction. ``inputs`` is passed to the model
            as its one positional argument, or, a tuple whose elements ``model.forward`` takes (and not the tuple
            itself), as its positional arguments, or, a mapping whose keys all name parameters of
            ``model.forward``, as keyword arguments (``({"input_ids": ids, "attention_mask": mask}, labels)`` for
            a Hugging Face model); its tensors are moved to the parameters' device. A Hugging Face collator's
            batch, a mapping with a ``"labels"`` tensor (``{"input_ids": ..., "attention_mask": ..., "labels":
            ...}``, a ``BatchEncoding``), is the pair of its other entries and its labels. Batches with no rows are
            skipped.
        param_filter: ``param_filter(name, param) -> bool`` picks the parameters in scope among
            ``model.named_parameters()`` that require grad (e.g. one layer, for a per-layer Hessian); the others are
            held fixed at their current values. Default: every parameter that requires grad.
        mode: how each Hessian-vector product is computed: ``"auto"``, ``"rr"``, ``"fr"`` or ``"fd"``
            (:func:`optim.hessian.hvp.hvp`). ``"auto"`` settles on one mode for this operator at the first product.
        reuse_graph: keep the graph of the gradient (forward and first backward, ``create_graph``) between products,
            so that each further product costs only the second backward (about 2/3 of a fresh "rr" product; what
            Lanczos, Hutchinson and SLQ do dozens of times). It applies to one-batch ``data`` with the "rr" mode
            (or "auto" once it has settled on it), and the graph is rebuilt whenever anything it captured changed:
            a parameter (in scope or not), a buffer (BatchNorm's running statistics after a train-mode forward) or a
            tensor of the batch modified in place, through ``.data`` included, or replaced, or the model's
            train/eval modes (checked bit for bit against copies taken at the build: see :class:`CapturedState`).
            Inputs that hold anything but tensors and plain Python scalars are never reused. ``None``
            (default): reuse when no module is in training mode (``model.eval()``), where the loss is a
            deterministic function of the parameters; ``True`` also in training mode, where a dropout mask is then
            drawn once and kept for every product (a fixed, symmetric random operator); ``False``: never. The
            graph holds the activations (the memory of one training step's backward), plus a copy of the
            parameters, buffers and batch, until the operator is deleted or :meth:`release_graph` is called.
        compile: compute each product with the ``torch.compile``'d forward-over-reverse function of
            :func:`optim.hvp` (``compile=True``): compiled at the first product for this model, loss, scope and
            batch shapes, and reused by every later product and by later operators on the same model and loss (a
            :class:`~optim.SharpnessMonitor` builds one per measurement). :attr:`compile_seconds` reports the time.
            ``mode`` must be ``"auto"`` or ``"fr"``; no graph is kept (``reuse_graph`` must not be True).
        process_group: data-parallel: ``data`` is this rank's share and the operator is that of the data of every
            rank of the group (module docstring); every rank calls every product. Default: the group of a
            ``DistributedDataParallel`` model (whose ``.module`` is then differentiated), else None (this process's
            data only; pass ``model.module`` for a rank's own curvature under DDP).

    The model is evaluated in its current mode, as set by ``model.train()`` / ``model.eval()``: in train mode
    dropout draws a new mask at every product (all the probes of one ``(k, n)`` block share a mask) and BatchNorm
    normalizes with the statistics of each batch, which is the Hessian of the training loss but a random operator
    with dropout (:attr:`random_draws` names what drew; the eigenvalue and density estimators refuse it, the trace
    and diagonal average over the draws). Call ``model.eval()`` for a deterministic, symmetric Hessian (dropout off,
    BatchNorm with its running statistics). In train mode the operator hands the model copies of the buffers of its
    training-mode modules, so products do not update BatchNorm's running statistics (nor its batch counter);
    ``mode="fr"`` cannot differentiate through that in-place update, ``"rr"`` (which ``"auto"`` picks) can.

    Attributes:
        params: the in-scope parameters (the model's own tensors, in ``named_parameters()`` order). They are
            looked up by name at each product: a parameter replaced in the model (``model.fc.weight =
            nn.Parameter(w)``) is the one differentiated from then on (a kept graph is rebuilt); one gone from the
            model, or of another shape, dtype or device, raises ``ValueError`` (build a new operator).
        names: their names.
        n: the total number of their elements; ``shape == (n, n)``.
        dtype, device: the parameters' dtype and device (one of each; filter the parameters to get there).
        num_matvecs: the number of Hessian-vector products done so far, each probe counting one, each over all of
            ``data`` (so a ``(k, n)`` block adds k). Reset it freely.
        random_draws: the random functions (``dropout(p=0.1)``, ``scaled_dot_product_attention(dropout_p=0.1)``,
            ``randn``, ...) the model's forward called in the last product, when that product ran it afresh (no
            kept graph): each product then applies another matrix. Empty otherwise. :func:`~optim.top_eigenvalues`
            and :func:`~optim.spectral_density`, which need one matrix, refuse such an operator; Hutchinson's
            :func:`~optim.trace` and :func:`~optim.diagonal` average over the draws as over the probes.

    Vectors: ``H @ v`` (or ``H.matvec(v)``, or ``v @ H``, the same since H is symmetric) takes

    * a flat vector of shape ``(n,)`` and returns ``(n,)``;
    * a block of k row vectors of shape ``(k, n)`` and returns ``(k, n)``, row i being ``H v_i``; the k probes share
      each batch's forward and first backward;
    * a list shaped like ``params`` (optionally with a leading k on every entry) and returns a list shaped like it.

    The flat order is ``params`` order, each parameter row-major: :meth:`flatten` and :meth:`unflatten` convert.
    The batches, the flat layout, the vector protocol and the kept-graph check are those of
    :class:`CurvatureOperator`, shared with :class:`~optim.hessian.ggn.GGNOperator` and
    :class:`~optim.hessian.fisher.EmpiricalFisherOperator`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data,
        *,
        param_filter: Callable[[str, torch.Tensor], bool] | None = None,
        mode: str = "auto",
        reuse_graph: bool | None = None,
        compile: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ):
        if mode not in MODES:
            raise ValueError(
                f"{self._where}: unknown mode {mode!r}; use one of {', '.join(repr(m) for m in MODES)}"
            )
        check_compile(compile, mode, where=self._where)
        self.mode = mode
        super().__init__(model, loss_fn, data, param_filter=param_filter, reuse_graph=reuse_graph, compile=compile,
                         process_group=process_group)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", mode={self.mode!r})"

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first calls of compiled products for this model (compilation included)."""
        return compile_seconds(self.model)

    @property
    def resolved_mode(self) -> str | None:
        """The mode the products use: ``mode``, or for ``"auto"`` the one it settled on (None before a product)."""
        return auto_choice(self) if self.mode == "auto" else self.mode

    def _can_keep(self, batch) -> bool:
        # "auto" before its first product: "rr", tried first, keeps the graph it builds (StateNotKept if it fails).
        return (self.mode if self.mode != "auto" else auto_choice(self)) in ("rr", None)

    def _deciding(self) -> bool:
        return self.mode == "auto" and auto_choice(self) is None

    def _build(self, inputs, targets, params, rows):
        try:
            return first_order_graph(self._loss_of(inputs, targets), params, gradient_values=False)
        except _MODE_FAILURES as error:
            if self._deciding():
                raise StateNotKept from error
            raise

    def _apply(self, state, v, k):
        leaves, gradients = state
        # The vmap-or-loop choice is remembered per model: estimators and the monitor build a new operator per call,
        # which would otherwise measure again (half a block vmapped) every time.
        try:
            product = second_backward(leaves, gradients, v, k, keep_graph=True, key=self.model)
        except _MODE_FAILURES as error:
            if self._deciding():
                raise StateNotKept from error
            raise
        if self._deciding():
            remember_auto_choice(self, "rr")
        return product

    @differentiable
    @sdpa_curvature()
    def quadratic_forms(self, V: torch.Tensor) -> torch.Tensor:
        """``(k,)`` float64 ``v_iᵀ H v_i`` for the rows of a ``(k, n)`` block. On a kept graph whose blocks loop
        (see ``hvp``: vmap or loop), each product is dotted with its probe as it comes and dropped: no ``(k, n)``
        result is allocated, copied or checked. Otherwise (nothing kept, vmap, the choice not made yet) from
        ``H @ V``. Sums are in float64, piece by piece in ``params`` order, so both ways agree to rounding."""
        self._check_flat(V, (2,))
        k = V.shape[0]
        if (k == 0 or self._deciding() or self.process_group is not None
                or (k >= MEASURE_MIN_PROBES and batching_choice(self.model, k) != "loop")):
            return super().quadratic_forms(V)
        params = self._current_params()
        self._check_model()
        state = self._kept_state(params)  # decided, so its build raises no StateNotKept
        if state is None:
            return super().quadratic_forms(V)
        leaves, gradients = state
        pieces, _ = check_vectors(params, self.unflatten(V), where=self._where)  # finite, as a product's are
        values = torch.empty(k, dtype=torch.float64, device=V.device)
        for i in range(k):
            probe = [piece[i : i + 1] for piece in pieces]
            product = batched_vjp(gradients, leaves, probe, 1, keep_graph=True)
            values[i : i + 1] = _dots64(probe, product)
        self.num_matvecs += k
        return values

    def _batch_product(self, inputs, targets, params, v, k, rows):
        if self.compile:
            hv, _ = compiled_hvp(self.model, self._loss_of(inputs, targets), params, v, k, (inputs, targets),
                                 need_grad=False)
        else:
            hv, _ = compute_hvp(self._loss_of(inputs, targets), params, v, k, mode=self.mode, need_grad=False,
                                auto_key=self, batch_key=self.model)
        return hv
