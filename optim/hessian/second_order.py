"""What Sophia-H and AdaHessian share: the closure protocol, the Hutchinson curvature estimate and its probes.

The closure protocol (``step(closure)``)
    ``closure()`` computes the loss and **returns** it without calling ``backward()``. The optimizer calls it under
    ``torch.enable_grad()`` and differentiates the returned loss itself with ``torch.autograd.grad``, building a
    second-order graph (``create_graph=True``) only on the steps that refresh the curvature estimate. On those steps
    it draws one Rademacher probe z per refresh (see *Probes*), computes the Hessian-vector product
    ``Hz = ∇(∇L·z)`` by a second ``torch.autograd.grad`` through that graph, and forms the Hutchinson estimate
    ``diag(H) ≈ z⊙Hz``. The graph is released before the step returns, and ``p.grad`` is set to the plain
    (graph-free) gradient for users who inspect it.

    Also accepted:

    * On steps that do **not** refresh, a closure that calls ``loss.backward()`` itself (the usual torch.optim
      closure), or no closure at all after ``loss.backward()``: the optimizer then uses ``p.grad`` like a first-order
      optimizer. It tells the two kinds of closure apart by whether ``p.grad`` changed during the call. On a
      refresh step such a closure is an error (the graph it freed is the one the Hessian-vector product needs)
      unless it called ``loss.backward(create_graph=True)``, as below.
    * ``loss.backward(create_graph=True)`` followed by ``step()`` without a closure (the protocol of other Hessian
      optimizers), or inside the closure (Lightning's automatic optimization with the module's ``backward`` hook
      passing ``create_graph=True``): on a refresh step the Hessian-vector product is taken through the graph the
      gradients carry, and ``p.grad`` is then replaced by a detached copy, which breaks the reference cycle
      parameter → grad → graph → parameter that otherwise leaks memory. The closure runs inside the curvature
      routes on refresh steps, so an SDPA model needs nothing more.
    * An externally computed Hessian diagonal, ``step(closure, hessian_diagonal=...)`` or
      :meth:`set_hessian_diagonal` before the step: it replaces the Hutchinson estimate for the parameters it
      covers (no Hessian-vector product is computed for them) and counts as a refresh for them.

Gauss-Newton curvature (``hessian="ggn"`` or ``"ggn-fd"``, with ``loss_fn``)
    The refresh multiplies the probe by the generalized Gauss-Newton matrix ``G = Jᵀ H J`` (J: the Jacobian of the
    model's outputs z in the parameters; H: the Hessian of ``loss_fn(z, targets)`` in z) instead of the Hessian:
    Sophia-G's curvature (Liu et al. 2023), positive semi-definite for convex criteria, so ``z⊙Gz`` estimates a
    diagonal that Hessian saddles do not make negative. The closure returns ``(outputs, targets)`` instead of the
    loss, on every step (the loss is ``loss_fn(outputs, targets)``, which ``step`` returns); a Hugging Face output's
    ``.logits`` are the outputs, as for ``GGNOperator``::

        opt = optim.SophiaH(model.parameters(), lr=1e-3, hessian="ggn", loss_fn=F.cross_entropy, seed=0)
        loss = opt.step(lambda: (model(x), y))
        # a causal LM: hessian="ggn", loss_fn=causal_lm_loss and opt.step(lambda: (lm(input_ids=ids), ids))

    ``loss_fn`` is any criterion; cross-entropy (``F.cross_entropy``, ``nn.CrossEntropyLoss``,
    ``optim.hessian.cross_entropy``, ``causal_lm_loss``) and squared error get closed forms of H, others are
    differentiated twice in the outputs (``optim.hessian.ggn``). ``"ggn"`` takes ``Jz`` by the double-backward
    Jacobian-vector product through the closure's graph (a backward of ``⟨Jᵀd, z⟩`` in the cotangent d) and
    ``Jᵀ(HJz)`` by one more backward: exact, to rounding. ``"ggn-fd"`` takes ``Jz ≈ (f(θ + hz) − f(θ − hz))/2h``
    from two forwards without a graph (h as for ``"fd"``) and ``Jᵀ(HJz)`` by ``outputs.backward`` of one more
    forward, so it runs under FSDP2: four forwards and two backwards per refresh step. Measured against the explicit
    ``JᵀHJz`` (a tanh MLP, ``tests/hessian/test_gauss_newton_curvature.py``): ``"ggn"`` 3e-16 relative in float64,
    1e-7 in float32; ``"ggn-fd"`` 1.5e-11 and 1.7e-5 (cross-entropy), 7.5e-12 and 8e-6 (squared error). A refresh
    step needs the closure (its outputs), so ``loss.backward()`` then ``step()`` works only between refreshes.

Probes
    The probe of parameter p at a refresh is drawn by the counter-based generator ``optim::rademacher_`` (identical
    on CPU and CUDA, on every rank) with seed ``probe_seed(group["seed"], step)`` and counters starting at the total
    number of elements of the parameters before p in ``param_groups`` order, so the probe of a step is one
    Rademacher vector over all parameters. ``step`` is p's step count before the step, kept in the state, so a run
    resumed from a ``state_dict`` draws the same probes as the uninterrupted run. Give every rank of a data-parallel
    run the same ``seed``; with ``seed=None`` one is drawn from torch's default generator at construction (the same
    on ranks that called ``torch.manual_seed`` with the same value) and kept in the param groups. With a
    ``process_group`` the ranks agree on the seeds at construction (see below).

Data parallel (DDP)
    DDP averages gradients in hooks that only ``loss.backward()`` runs: the ``torch.autograd.grad`` calls of the
    closure protocol bypass them (each rank would step on its local gradient, and silently diverge), and DDP's
    backward with ``create_graph=True`` cannot build the second-order graph (it raises, or its gradients lose the
    graph). The recipe: wrap the model in DDP as usual, pass ``process_group=torch.distributed.group.WORLD`` (or a
    subgroup) and let the closure return the loss::

        model = DDP(net)
        opt = optim.SophiaH(model.parameters(), lr=1e-3, seed=0, process_group=dist.group.WORLD)
        loss = opt.step(lambda: F.cross_entropy(model(x_local), y_local))

    The optimizer then averages over the group, in one all-reduce per dtype, everything it differentiates itself:
    the gradients of the closure's loss and the Hessian-vector products Hz (gradients that carry a graph, after
    ``loss.backward(create_graph=True)`` on a model that is not wrapped in DDP, count as its own). Gradients left in
    ``p.grad`` by a plain ``backward()`` (a closure that calls it on a step that does not refresh, DDP's usual
    path) are used as they are: DDP has averaged them. The probes are the same on every rank (the seeds are
    broadcast from the group's rank 0 at construction when drawn, and a ValueError is raised on every rank when
    explicitly given seeds differ), so the mean of the ranks' z⊙H_r z is z⊙Hz of the mean loss: with equal
    per-rank batches, the step is the single-process step on the global batch up to rounding. A parameter without
    gradient on some ranks gets a zero local gradient there; one without gradient on every rank does not step.
    An external ``hessian_diagonal`` is used as given (give the same on every rank). The parameters must start
    equal on every rank (DDP broadcasts them when it wraps the model).
    Caveat: with ``DDP(..., gradient_as_bucket_view=True)`` DDP's forward replaces ``p.grad`` by bucket views after
    its first backward, which the optimizer cannot tell from a ``backward()`` in the closure (it would take the old
    gradient). There, let the closure return the loss on every step, or keep DDP's default
    ``gradient_as_bucket_view=False``.

Mixed precision (``torch.amp.GradScaler``)
    bfloat16 autocast needs nothing. With float16 and a ``GradScaler``, differentiate the scaled loss yourself and
    let the scaler call the step (GradScaler does not take closures)::

        scaler.scale(loss).backward(create_graph=opt.next_step_refreshes())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    The optimizers declare ``_step_supports_amp_scaling``, so the scaler passes its scale and its overflow flag
    instead of unscaling ``p.grad`` itself: the step divides both the gradient and the Hessian-vector product by
    the scale (the HVP through the scaled gradient's graph carries the scale too, which GradScaler's own unscaling
    would miss), and a step whose scaled gradients overflowed is skipped with nothing changed (the gradients'
    graph released); the scaler then lowers the scale. ``scaler.unscale_(opt)`` before a refresh step (e.g. for
    clipping) is rejected for that reason; on the other steps it works as with any optimizer.

FSDP2
    With ``fully_shard`` the parameters are DTensor shards whose gradients FSDP2 produces only in
    ``loss.backward()`` (``torch.autograd.grad`` returns None for them, and there is no double backward through
    its hooks), so the exact Hessian-vector product cannot be taken. ``hessian="fd"`` (the default for DTensor
    parameters) takes it by central finite differences instead (``hessian="ggn-fd"``, the Gauss-Newton product of
    *Gauss-Newton curvature*, likewise): the optimizer runs ``backward()`` on the closure's
    loss at θ, and on refresh steps at θ + hz and θ − hz (the refreshed parameters moved in place, then restored
    bit for bit), and ``Hz ≈ (∇L(θ + hz) − ∇L(θ − hz)) / 2h`` with h = ε^{1/3}·max(1, ‖θ‖)/‖z‖ as in
    ``hvp(mode="fd")``: three forward and backward passes per refresh step, one otherwise. Its error is
    O(h²·‖∇³L‖) plus rounding ε/h, about ε^{2/3} relative on smooth losses (float64 ~1e-11, float32 ~3e-5); the
    Hutchinson estimate z⊙Hz that Sophia and AdaHessian average is far noisier than that. The ranks of the mesh
    agree on the seeds at construction (rank 0's where drawn; given seeds that differ raise on every rank), and each
    rank draws the probe entries of its own rows (the counters of the whole probe), so the probes, the curvature
    and the step equal one process's ``hessian="fd"`` on the global batch up to the rounding of the gradient
    reduction, which the difference quotient divides by h: after 20 steps on 2 and 4 gloo ranks (``tests/test_distributed.py``) within
    1e-7 relative in float64; in float32 SophiaH (refresh every 3 steps) within 1e-5 (measured 9e-7) and AdaHessian
    (every step) within 1e-3 (measured 2.1e-4, parameters of magnitude < 1); HSDP (a 2-D mesh, placements
    ``(Replicate(), Shard(0))``) alike; ``hessian="ggn-fd"`` (forward differences of the outputs, see *Gauss-Newton
    curvature*; FSDP2 modules that keep their gathered parameters after a forward are resharded after each of its
    forwards without a graph, so the next sees the moved shards) within the same tolerances. The optimizer state is
    sharded like the parameters. ``process_group`` must
    stay None (FSDP2 reduces the gradients); the closure must return the loss without calling ``backward()``::

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = optim.SophiaH(model.parameters(), lr=1e-3, seed=0)         # hessian="auto": "fd" here
        loss = opt.step(lambda: F.cross_entropy(model(x_local), y_local))
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.optim import Optimizer

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

from .._counter_hash import GOLDEN_GAMMA, UINT64, as_int64, mix64_int
from .._finite import all_finite
from .._library import has_kernel
from .._overlap import check_no_overlap_across_calls
from .._step_wrapper import LeanStepMixin
from .._validate import (SparseGradientError, StateSpec, check_group_params, check_group_settings,
                         check_incoming_state_dict, checked_groups)
from .._validate import check_betas as _check_betas
from .._validate import check_param_state, fill_group_defaults, install_state_dict_hooks
from ._ops import SECOND_ORDER_PARAM_DTYPES, second_order_state_dtype
from ..fused._ops import add_to_counts_
from ..fused.distributed import (agree_over_mesh, average_, check_process_group, check_row_sharded, is_dtensor,
                                 local_rows, reject_dtensors, resharding_fsdp_modules)
from .ggn import apply_output_hessian, ggn_vector_products
from .hvp import second_backward
from .operator import output_tensor
from .losses import model_loss
from .routing import checkpoint_note, sdpa_curvature
from .probes import rademacher_like

__all__ = ["probe_seed"]


# What the refresh steps multiply the probe by, and how: the Hessian "exact" (double backward), "fd" (finite
# differences of two backward passes: what works under FSDP2), "auto" ("fd" for DTensor parameters, else "exact");
# the generalized Gauss-Newton matrix "ggn" (double-backward Jacobian-vector product) or "ggn-fd" (the Jacobian-vector
# product by finite differences of two forwards: what works under FSDP2). The GGN modes take a ``loss_fn``.
HESSIAN_MODES = ("auto", "exact", "fd", "ggn", "ggn-fd")
GGN_MODES = ("ggn", "ggn-fd")


def probe_seed(seed: int, step: int) -> int:
    """The ``optim::rademacher_`` seed of the probes of the refresh at ``step`` (a hash of both, as an int64)."""
    return as_int64(mix64_int((seed + step * GOLDEN_GAMMA) % UINT64))


def group_indices(keys: Sequence[Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return groups


def select(tensors: Sequence, index: list[int]) -> list:
    return [tensors[i] for i in index]


# The step counts are float32 (as torch's optimizers keep them): whole numbers are exact up to 2**24.
_LAST_COUNTED_STEP = 2**24


class _CountMirror:
    """Python floats of the optimizer's count tensors (one-element CPU float32: ``step``, ``hessian_step``), so that
    the refresh schedule and AdaHessian's bias corrections do not read each count from the host on every step (an
    ``item()`` is a dispatcher call, ~0.5 µs warm and several times that after a backward pass).

    An entry is trusted only while it is for the very tensor and its version counter has not moved: any write by a
    torch op (``add_``, ``fill_``, ``copy_``; ``load_state_dict`` replaces the tensors) makes the next read a host
    read again. The optimizer's own increments (``optim::add_to_counts_``, whose compiled kernel leaves the version
    counter alone) go through :meth:`add`, which keeps the entries of counts it knew exact: whole numbers below
    2**24, where float32 adds 1 exactly as Python does."""

    _EXACT = float(2**24)

    def __init__(self):
        self._entries: dict[int, tuple[torch.Tensor, int, float]] = {}

    def read(self, count: torch.Tensor) -> float:
        if type(count) is not torch.Tensor:  # a subclass, or whatever a state holds: as before, no mirror
            return count.item()
        entry = self._entries.get(id(count))
        if entry is not None and entry[0] is count and entry[1] == count._version:
            return entry[2]
        value = count.item()
        if len(self._entries) > 4096:  # counts of replaced states (load_state_dict) are forgotten in bulk
            self._entries.clear()
        self._entries[id(count)] = (count, count._version, value)
        return value

    def add(self, counts: list[torch.Tensor], value: float) -> None:
        """``add_to_counts_(counts, value)``, with the mirror kept in sync."""
        entries, value = self._entries, float(value)
        known = [entries.get(id(t)) for t in counts]
        add_to_counts_(counts, value)
        for t, entry in zip(counts, known):
            if entry is None:
                continue
            old = entry[2]
            if entry[0] is t and entry[1] == t._version and old.is_integer() and value.is_integer() and \
                    0.0 <= old + value < self._EXACT:
                entries[id(t)] = (t, t._version, old + value)  # the compiled kernel: the version did not move
            else:
                del entries[id(t)]  # written by a torch op (the reference kernel), or an inexact sum: read again


@dataclass(eq=False)
class _StepWork:
    """What the stages of one ``SecondOrderOptimizer.step`` know about the parameters it updates, index-aligned
    with ``params`` (in ``param_groups`` order): gathered (``params``, ``grads``, ``loss``, ``graph_grads``, and
    for an average over the process group ``averaging`` and ``has_local_grad``), then the curvature
    (``hessian_products`` and ``probes``: None where not refreshed; ``probe_counters``: id(p) -> the ``(seed,
    offset)`` its probe was drawn from), reduced in place, and consumed by the update."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    loss: Any = None
    graph_grads: list[torch.Tensor] | None = None  # the gradients that carry the graph of the exact HVP
    averaging: bool = False
    has_local_grad: list[bool] | None = None  # which zero-filled gradients exist on this rank
    hessian_products: list[torch.Tensor | None] = field(default_factory=list)
    probes: list[torch.Tensor | None] = field(default_factory=list)
    probe_counters: dict[int, tuple[int, int]] = field(default_factory=dict)
    fd_candidates: list[torch.Tensor] | None = None  # hessian="fd": the parameters its backward passes write
    fd_saved_grads: list[torch.Tensor | None] | None = None  # ... and their p.grad before the step
    outputs: torch.Tensor | None = None  # hessian="ggn": the model's outputs (with their graph on a refresh step)
    targets: Any = None  # ... and the targets the closure returned with them

    def __post_init__(self):
        self.hessian_products = [None] * len(self.params)
        self.probes = [None] * len(self.params)

    @classmethod
    def zero_filled(cls, params, grads) -> _StepWork:
        """Every parameter, with zeros for a missing gradient, so that all ranks all-reduce the same tensors (the
        gradients that exist are remembered for the average): the work of a step averaged over the group."""
        return cls(list(params), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)],
                   averaging=True, has_local_grad=[g is not None for g in grads])

    def set_curvature(self, index: list[int], products, probes, counters) -> None:
        """Hz, z and z's counters of the parameters at ``index``."""
        for i, hz, z, counter in zip(index, products, probes, counters):
            self.hessian_products[i] = hz
            self.probes[i] = z
            self.probe_counters[id(self.params[i])] = counter


class SecondOrderOptimizer(LeanStepMixin, Optimizer):
    """Base class of :class:`SophiaH` and :class:`AdaHessian`: the closure protocol of the module docstring.

    Subclasses define ``_name``, ``_state_dtype_keys``, ``_count_keys``, ``_check_group(group)`` and
    ``_update(groups_work)``; the base computes gradients, curvature and probes and checks them.
    """

    _name = "SecondOrderOptimizer"
    _state_dtype_keys: tuple[str, ...] = ()  # floating state tensors kept in the state dtype
    _count_keys: tuple[str, ...] = ("step",)  # counts kept as CPU float32 tensors

    def __init__(self, params, defaults: dict[str, Any], *, process_group=None, hessian: str = "auto",
                 loss_fn: Callable | None = None):
        check_process_group(process_group, caller=self._name)
        if hessian not in HESSIAN_MODES:
            raise ValueError(f"{self._name}: hessian must be one of {HESSIAN_MODES}, got {hessian!r}")
        if (hessian in GGN_MODES) != (loss_fn is not None):
            raise ValueError(
                f"{self._name}: hessian={hessian!r} with loss_fn={'None' if loss_fn is None else 'a criterion'}: "
                "the Gauss-Newton curvature (hessian='ggn' or 'ggn-fd') needs loss_fn, the criterion "
                "loss_fn(outputs, targets) whose Hessian in the outputs it uses (the closure then returns "
                "(outputs, targets)); the Hessian modes take the loss from the closure and no loss_fn")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{self._name}: loss_fn must be callable as loss_fn(outputs, targets), got "
                             f"{type(loss_fn).__name__}")
        if loss_fn is model_loss:
            raise ValueError(f"{self._name}: loss_fn=optim.hessian.model_loss is the loss the model computes, not a "
                             "function of its outputs, which the Gauss-Newton curvature needs: pass the criterion "
                             "(optim.hessian.causal_lm_loss for a causal LM, F.cross_entropy, ...), or use "
                             "hessian='auto' with a closure that returns the model's loss")
        # not in defaults: state dicts hold plain values only
        self._loss_fn, self._process_group = loss_fn, process_group
        drawn_seed = defaults.get("seed") is None
        if defaults.get("seed") is None:
            defaults["seed"] = int(torch.randint(0, 2**62, ()).item())
        elif not isinstance(defaults["seed"], int):
            raise ValueError(f"{self._name}: seed must be an int or None, got {defaults['seed']!r}")
        super().__init__(params, defaults)
        sharded = any(is_dtensor(p) for p in self._all_params())
        if sharded and hessian in ("exact", "ggn"):
            instead = "hessian='fd' (or 'auto'): finite differences of two backward passes" if hessian == "exact" \
                else "hessian='ggn-fd': the Jacobian-vector product by finite differences of two forwards"
            reject_dtensors(self._all_params(), caller=self._name,
                            why="FSDP2 produces the gradients of sharded parameters only in loss.backward() and "
                                "torch.autograd.grad cannot differentiate through its hooks, so there is no "
                                f"double backward to take. Pass {instead} (see optim.hessian.second_order)")
        if sharded and process_group is not None:
            raise ValueError(f"{self._name}: process_group is for DDP; under FSDP2 the sharded gradients are already "
                             "reduced by fully_shard's backward. Pass process_group=None")
        check_row_sharded(self._all_params(), caller=self._name, why="the finite-difference curvature draws probes")
        self._finite_differences = hessian in ("fd", "ggn-fd") or (hessian == "auto" and sharded)
        self._ggn = hessian in GGN_MODES
        self._hessian_mode = hessian
        self._sharded = sharded
        for group in self.param_groups:
            self._check_whole_group(group)
            for p in group["params"]:
                if p.dtype not in SECOND_ORDER_PARAM_DTYPES:
                    raise ValueError(f"{self._name}: a parameter of shape {tuple(p.shape)} is {p.dtype}; only "
                                     "float64, float32, bfloat16 and float16 parameters can be optimized")
        self._pending_diagonal: dict[int, torch.Tensor] = {}
        install_state_dict_hooks(self)
        if process_group is not None:
            self._agree_on_seeds(drawn_seed)
        elif sharded:  # FSDP2: one probe seed on every rank of the mesh, as one process has one
            first = next(p for p in self._all_params() if is_dtensor(p))
            seeds = agree_over_mesh([g["seed"] for g in self.param_groups], first.device_mesh,
                                    first.to_local().device, given=not drawn_seed, caller=self._name,
                                    why="each rank would draw the probe entries of its rows from another seed, and "
                                        "the curvature would match no single-process run")
            for g, seed in zip(self.param_groups, seeds):
                g["seed"] = seed

    def _agree_on_seeds(self, drawn: bool) -> None:
        """Make the probe seeds of every param group equal on all ranks of the process group: rank 0's seeds win
        where they were drawn (``seed=None``); explicitly given seeds that differ raise on every rank."""
        import torch.distributed as dist

        group = self._process_group
        device = self._all_params()[0].device if self._all_params() else torch.device("cpu")
        local = torch.tensor([g["seed"] for g in self.param_groups], dtype=torch.int64, device=device)
        first = local.clone()
        dist.broadcast(first, src=dist.get_global_rank(group, 0), group=group)
        mismatch = torch.tensor([0 if drawn else int(bool((local != first).any()))], device=device)
        dist.all_reduce(mismatch, op=dist.ReduceOp.MAX, group=group)
        if int(mismatch.item()):
            raise ValueError(f"{self._name}: the probe seeds differ between the ranks of process_group (this rank: "
                             f"{local.tolist()}, rank 0: {first.tolist()}); pass the same seed on every rank (or "
                             "seed=None, and rank 0's is used), or the ranks' Hutchinson probes would differ")
        for g, seed in zip(self.param_groups, first.tolist()):
            g["seed"] = int(seed)

    # ------------------------------------------------------------------------------------------------ interface

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_whole_group(self, group: dict[str, Any], index: int | None = None) -> dict[str, float]:
        """Everything a step reads from a group, in one place for construction, ``add_param_group``,
        ``load_state_dict`` and every step: its settings (all present, bools where bools belong), the probe seed
        (an int) and the class's hyperparameters (returned as Python floats)."""
        where = "the param group" if index is None else f"param group {index}"
        check_group_settings(group, self.__dict__.get("defaults", group), self._name, where=where)
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{self._name}: seed of {where} must be an int, got {seed!r}")
        return self._check_group(group)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Zero counts (CPU float32 scalars) and zero state tensors shaped like ``p`` in the state dtype."""
        for key in self._count_keys:
            state[key] = torch.zeros((), dtype=torch.float32)
        dtype = second_order_state_dtype(p.dtype)
        for key in self._state_dtype_keys:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _update(self, work: list[dict[str, Any]]) -> None:
        """Apply the step. ``work`` has one entry per param group with the lists of the parameters that step:
        ``params``, ``grads``, ``states`` (their state dicts), ``hessian_products`` (Hz, None where not refreshed),
        ``probes`` (z or None), ``probe_counters`` (the ``(seed, offset)`` z was drawn from, or None),
        ``diagonals`` (an external estimate or None), ``group`` and ``hyper`` (``_check_group(group)``'s values,
        checked by ``step``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- external diagonal

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _parse_diagonal(self, diagonal) -> dict[int, torch.Tensor]:
        params = self._all_params()
        if isinstance(diagonal, dict):
            items = []
            known = {id(p): p for p in params}
            for p, d in diagonal.items():
                if id(p) not in known:
                    raise ValueError(f"{self._name}: hessian_diagonal has a key that is not a parameter of this "
                                     "optimizer")
                items.append((p, d))
        else:
            diagonal = list(diagonal)
            if len(diagonal) != len(params):
                raise ValueError(f"{self._name}: hessian_diagonal has {len(diagonal)} entries but the optimizer has "
                                 f"{len(params)} parameters; pass one per parameter in param_groups order (None to "
                                 "leave one to the Hutchinson estimate), or a dict {parameter: diagonal}")
            items = list(zip(params, diagonal))
        parsed = {}
        for i, (p, d) in enumerate(items):
            if d is None:
                continue
            if not isinstance(d, torch.Tensor) or d.shape != p.shape or not d.dtype.is_floating_point:
                what = f"shape {tuple(d.shape)} and dtype {d.dtype}" if isinstance(d, torch.Tensor) else type(d)
                raise ValueError(f"{self._name}: hessian_diagonal entry {i} has {what}; it must be a floating-point "
                                 f"tensor of its parameter's shape {tuple(p.shape)}")
            d = d.detach().to(device=p.device, dtype=second_order_state_dtype(p.dtype))
            parsed[id(p)] = d
        if parsed and not all_finite(list(parsed.values())):
            raise ValueError(f"{self._name}: hessian_diagonal has non-finite values; nothing was changed")
        return parsed

    def set_hessian_diagonal(self, diagonal) -> None:
        """Use ``diagonal`` (the diagonal of the Hessian of the loss, one tensor per parameter in ``param_groups``
        order with None for parameters left to the Hutchinson estimate, or a dict ``{parameter: tensor}``) as the
        curvature estimate of the next :meth:`step`, instead of a Hessian-vector product."""
        self._pending_diagonal = self._parse_diagonal(diagonal)

    # ----------------------------------------------------------------------------------------------------- step

    def _refresh_due(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        state = self.state.get(p)
        step = int(state["step"].item()) if state else 0
        return step % group["update_period"] == 0

    def _due_for_refresh(self, external: dict[int, torch.Tensor]) -> set[int]:
        """The ids of the parameters whose curvature this step refreshes by a Hessian-vector product: due by
        ``_refresh_due`` and without an external diagonal."""
        if type(self)._refresh_due is not SecondOrderOptimizer._refresh_due:  # a subclass's own schedule
            return {id(p) for group in self.param_groups for p in group["params"]
                    if id(p) not in external and self._refresh_due(p, group)}
        # ``_refresh_due`` inlined: no call per parameter (~2 µs each on a small step), and the counts from their
        # mirror (no host read of a count the optimizer wrote itself)
        due, state_of, read = set(), self.state, self._counts.read
        for group in self.param_groups:
            period = group["update_period"]
            for p in group["params"]:
                if id(p) in external:
                    continue
                state = state_of.get(p)
                count = int(read(state["step"])) if state else 0
                if count >= _LAST_COUNTED_STEP:
                    raise ValueError(f"{self._name}.step: {self._where(p)} has taken {count} steps, as many as its "
                                     "float32 step count holds exactly (2**24); a further step would not count. "
                                     "Continue with a new optimizer (fresh state) or torch.optim.AdamW")
                if count % period == 0:
                    due.add(id(p))
        return due

    @property
    def _counts(self) -> _CountMirror:
        """The mirror of the step counts (created on first use: it is not part of the pickled optimizer)."""
        mirror = self.__dict__.get("_count_mirror")
        if mirror is None:
            mirror = self.__dict__["_count_mirror"] = _CountMirror()
        return mirror

    def next_step_refreshes(self) -> bool:
        """Whether the next :meth:`step` computes a Hessian-vector product, i.e. needs a second-order graph of the
        closure's loss: some trainable parameter is due for a refresh and no diagonal was set for it with
        :meth:`set_hessian_diagonal`. A closure can use a ``torch.compile``'d model only when this is False (the
        compiled autograd graph cannot be differentiated twice; see ``tests/test_compile.py``)."""
        return any(id(p) not in self._pending_diagonal and self._refresh_due(p, group)
                   for group in self.param_groups for p in group["params"] if p.requires_grad)

    # torch.amp.GradScaler.step sets ``grad_scale`` and ``found_inf`` on the optimizer and calls step() without
    # unscaling the gradients first (module docstring, *Mixed precision*).
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, hessian_diagonal=None):
        """One step; see the class docstring for the closure protocol. Returns the closure's loss (or None).

        Stages: gather the gradients, take the curvature (Hessian-vector products), reduce (average over the
        process group, unscale, check finiteness), update; only the last writes parameters or state (the backward
        passes of ``hessian="fd"`` write ``p.grad`` and move parameters by ±hz, restored bit for bit)."""
        # every group's settings and hyperparameters, checked once per step; the update uses these values
        hypers = self._step_hypers()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self._skips_overflowed_step(closure, found_inf):
            return None
        external = self._parse_diagonal(hessian_diagonal) if hessian_diagonal is not None else self._pending_diagonal
        self._pending_diagonal = {}
        # once per step: the schedule reads each parameter's step count (a host read), asked several times below
        due = self._due_for_refresh(external)
        if closure is None and found_inf is None and self._only_creates_state(due):
            return None
        with checkpoint_note():  # the gradients of a refresh are differentiated outside the routes' block
            work = self._gather(closure, due, grad_scale, found_inf)
            self._curvature(work, closure, due)
        self._reduce(work, grad_scale)
        self._apply_update(work, closure, external, hypers)
        return work.loss

    def _step_hypers(self) -> list:
        """``_check_whole_group(group, index)`` of every param group, re-checked only where a value changed
        (``checked_groups``)."""
        return checked_groups(self, self._check_whole_group)

    def _skips_overflowed_step(self, closure, found_inf) -> bool:
        """GradScaler's overflow flag: True (the gradients' graphs released) when the scaled step overflowed."""
        if found_inf is None:
            return False
        if closure is not None:
            raise ValueError(
                f"{self._name}.step: a closure was given through torch.amp.GradScaler.step, which cannot scale "
                "the loss the optimizer differentiates; with a GradScaler call scaler.scale(loss).backward() "
                "(create_graph=True on refresh steps, see opt.next_step_refreshes()) and scaler.step(opt)")
        if bool(found_inf.item()):  # the host sync GradScaler's own skip makes too
            self._release_grad_graphs()  # GradScaler skips this step and lowers the scale
            return True
        return False

    # ------------------------------------------------------------------------------------- stage 1: gradients

    def _gather(self, closure, due: set[int], grad_scale, found_inf) -> _StepWork:
        """The parameters that step and their gradients (and the loss): by the optimizer's own backward passes
        (``hessian="fd"``), from ``p.grad`` (no closure), or from the closure (returning the loss, or calling
        ``backward()`` itself)."""
        if self._finite_differences:
            return self._gather_by_backward(closure, grad_scale)
        if closure is None:
            work = self._gather_from_grads(due, grad_scale, found_inf)
        else:
            work = self._gather_from_closure(closure, due)
        if isinstance(work.loss, torch.Tensor):
            work.loss = work.loss.detach()
        self._check_gradients(work.params, work.grads)
        return work

    def _evaluate(self, closure) -> tuple[Any, torch.Tensor | None, Any]:
        """``(loss, outputs, targets)`` of one closure call: the loss it returns (outputs and targets None), or with
        the Gauss-Newton curvature ``loss_fn(outputs, targets)`` of the ``(outputs, targets)`` it returns."""
        result = closure()
        if not self._ggn:
            return result, None, None
        pair = isinstance(result, (tuple, list)) and len(result) == 2
        outputs = output_tensor(result[0]) if pair else None
        if not isinstance(outputs, torch.Tensor) or not outputs.dtype.is_floating_point:
            if isinstance(outputs, torch.Tensor):
                got = f"outputs of dtype {outputs.dtype}"
            elif pair:
                got = f"outputs of type {type(outputs).__name__}"
            else:
                got = f"a {type(result).__name__}" + (f" of {len(result)}" if isinstance(result, (tuple, list)) else "")
            raise ValueError(
                f"{self._name}.step: with hessian={self._hessian_mode!r} the closure must return (outputs, targets), "
                "the model's floating-point outputs (a tensor, or a Hugging Face output with .logits) and what "
                "loss_fn(outputs, targets) compares them with (the optimizer takes the loss and the Gauss-Newton "
                f"products from them), got {got}")
        targets = result[1]
        return self._loss_fn(outputs, targets), outputs, targets

    def _gather_from_grads(self, due: set[int], grad_scale, found_inf) -> _StepWork:
        """No closure: ``p.grad`` as left by ``loss.backward()``, with its graph after ``create_graph=True``."""
        stepping = [p for p in self._all_params() if p.grad is not None]
        work = _StepWork(stepping, [p.grad for p in stepping])
        if self._process_group is not None and any(g.requires_grad for g in work.grads):
            # Gradients with a graph come from backward(create_graph=True), which DDP cannot have averaged.
            trainable = [p for p in self._all_params() if p.requires_grad]
            work = _StepWork.zero_filled(trainable, [p.grad for p in trainable])
        if due and any(id(p) in due for p in work.params):
            if self._ggn:
                raise ValueError(
                    f"{self._name}.step: this step refreshes the Gauss-Newton estimate (hessian="
                    f"{self._hessian_mode!r}), which needs the model's outputs: pass step(closure) where closure() "
                    "returns (outputs, targets) without calling backward(), or give the diagonal with "
                    "step(hessian_diagonal=...)")
            # A gradient without a graph beside others with one is constant in the parameters (its Hessian row
            # is zero), as the closure's autograd.grad returns it; none with a graph means no create_graph=True.
            if not any(g.requires_grad for p, g in zip(work.params, work.grads) if id(p) in due):
                raise ValueError(
                    f"{self._name}.step: this step refreshes the Hessian estimate (every update_period steps, "
                    "and at the first step) but no closure was given. Pass step(closure) where closure() "
                    "returns the loss without calling backward(), or call loss.backward(create_graph=True) "
                    "before step(), or give the diagonal with step(hessian_diagonal=...)")
            if found_inf is not None and grad_scale is None:
                raise ValueError(
                    f"{self._name}.step: GradScaler.unscale_(optimizer) was called before this step, which "
                    "refreshes the Hessian estimate: it unscaled the gradients but not their graph, so the "
                    "Hessian-vector product would still carry the loss scale. On refresh steps (see "
                    "opt.next_step_refreshes()) call scaler.step(opt) without unscale_ first; gradient clipping, "
                    "which needs unscale_, can run on the other steps")
            work.graph_grads = work.grads
        return work

    def _gather_from_closure(self, closure, due: set[int]) -> _StepWork:
        """A closure: the gradients of the loss it returns (with their graph on a refresh step), or those its
        own ``backward()`` left in ``p.grad`` (told apart by whether ``p.grad`` changed during the call)."""
        candidates = [p for p in self._all_params() if p.requires_grad]
        before = [p.grad for p in candidates]
        versions = [None if g is None else g._version for g in before]
        # a refresh differentiates the loss twice (sdpa_curvature(False) would only cost its generator)
        with torch.enable_grad(), sdpa_curvature() if due else contextlib.nullcontext():
            loss, outputs, targets = self._evaluate(closure)
        did_backward = False
        for p, old, version in zip(candidates, before, versions):
            grad = p.grad
            if grad is not None and (grad is not old or grad._version != version):
                did_backward = True
                break
        if did_backward:
            stepping = [p for p in candidates if p.grad is not None]
            work = _StepWork(stepping, [p.grad for p in stepping], loss=loss)
            if due and any(id(p) in due for p in stepping):
                # backward(create_graph=True) in the closure (Lightning's automatic optimization with its backward
                # hook overridden, AdaHessian's original loop) leaves the graph in p.grad, as without a closure
                with_graph = any(g.requires_grad for p, g in zip(work.params, work.grads) if id(p) in due)
                if self._ggn or not with_graph:
                    raise ValueError(
                        f"{self._name}.step: the closure called backward(), but this step refreshes the "
                        + ("Gauss-Newton estimate, which differentiates the outputs: return (outputs, targets) "
                           "from the closure without calling backward()" if self._ggn else
                           "Hessian estimate and needs the graph of the loss. Return the loss from the closure "
                           "without calling backward() (the optimizer differentiates it), or call "
                           "loss.backward(create_graph=True) in it") + ", at least on refresh steps")
                if self._process_group is not None:  # DDP cannot have averaged gradients that carry a graph
                    work = _StepWork.zero_filled(candidates, [p.grad for p in candidates])
                    work.loss = loss
                work.graph_grads = work.grads
            return work
        if not candidates:  # every parameter is frozen: nothing to step, as in torch.optim
            return _StepWork([], [], loss=loss)
        self._check_loss(loss)
        refresh = bool(due) and any(id(p) in due for p in candidates)
        try:
            # The Gauss-Newton products differentiate the outputs, not the gradient: the forward graph is kept.
            all_grads = torch.autograd.grad(loss, candidates, create_graph=refresh and not self._ggn,
                                            retain_graph=refresh, allow_unused=True)
        except RuntimeError as error:
            if refresh:
                self._raise_if_compiled(error)
            raise
        if self._process_group is None and all(g is None for g in all_grads):
            # loss.backward() would have reached them inside the checkpoint's own backward; autograd.grad cannot
            raise ValueError(
                f"{self._name}.step: the closure's loss requires grad but none of the optimizer's parameters is in "
                "its graph, so nothing would step. A reentrant activation checkpoint (torch.utils.checkpoint with "
                "use_reentrant=True) hides the parameters inside it from torch.autograd.grad: use "
                "use_reentrant=False (with context_fn=optim.hessian.curvature_context_fn), or compute the loss "
                "from these parameters")
        if self._process_group is not None:
            work = _StepWork.zero_filled(candidates, all_grads)
        else:
            if all(g is not None for g in all_grads):  # every candidate was used
                work = _StepWork(candidates, list(all_grads))
            else:
                work = _StepWork([p for p, g in zip(candidates, all_grads) if g is not None],
                                 [g for g in all_grads if g is not None])
        work.loss = loss
        if refresh and self._ggn:
            work.outputs, work.targets = outputs, targets
        elif refresh:
            work.graph_grads = work.grads
        return work

    def _gather_by_backward(self, closure, grad_scale) -> _StepWork:
        """``hessian="fd"``: the gradients by ``loss.backward()`` on the closure's loss (FSDP2, or DDP, reduces
        them there); :meth:`_finite_difference_products` runs the two more passes of a refresh."""
        if closure is None or grad_scale is not None:
            raise ValueError(
                f"{self._name}.step: with finite-difference curvature (hessian='fd', the default under FSDP2) pass "
                "step(closure), where closure() returns the loss without calling backward(): the optimizer runs "
                "the backward passes (one, and two more on refresh steps at the parameters ± h·z); a GradScaler's "
                "scaled step is not supported there")
        candidates = [p for p in self._all_params() if p.requires_grad]
        if not candidates:
            with torch.enable_grad():
                loss, _, _ = self._evaluate(closure)
            return _StepWork([], [], loss=loss.detach() if isinstance(loss, torch.Tensor) else loss,
                             averaging=self._process_group is not None)
        saved_grads = [p.grad for p in candidates]
        with self._restoring_grads(candidates, saved_grads):
            loss, all_grads = self._backward_gradients(closure, candidates)
            stepping = [p for p, g in zip(candidates, all_grads) if g is not None]
            work = _StepWork(stepping, [g for g in all_grads if g is not None], loss=loss,
                             averaging=self._process_group is not None)
            self._check_gradients(work.params, work.grads)
        work.fd_candidates, work.fd_saved_grads = candidates, saved_grads
        return work

    @staticmethod
    @contextlib.contextmanager
    def _restoring_grads(candidates, saved_grads):
        """``p.grad`` back to ``saved_grads`` when the block raises (the backward passes wrote it)."""
        try:
            yield
        except BaseException:
            for p, g in zip(candidates, saved_grads):
                p.grad = g
            raise

    def _backward_gradients(self, closure, candidates) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The closure's loss and, by its ``backward()``, the gradients of ``candidates`` (None where unused)."""
        for p in candidates:
            p.grad = None
        with torch.enable_grad():
            value, _, _ = self._evaluate(closure)
            self._check_loss(value)
            value.backward()
        return value.detach(), [p.grad for p in candidates]

    # ------------------------------------------------------------------------------------- stage 2: curvature

    def _curvature(self, work: _StepWork, closure, due: set[int]) -> None:
        """The Hessian-vector products Hz and probes z of the parameters due for a refresh, into ``work``; the
        gradients' graph is released."""
        if self._finite_differences:
            if work.fd_candidates is not None:
                products = self._ggn_finite_difference_products if self._ggn else self._finite_difference_products
                with self._restoring_grads(work.fd_candidates, work.fd_saved_grads):
                    products(work, closure, due)
            work.grads = [g.detach() for g in work.grads]
            return
        if work.graph_grads is not None or work.outputs is not None:
            index = [i for i, p in enumerate(work.params) if id(p) in due]
            params = [work.params[i] for i in index]
            probes, counters = self._draw_probes(params)
            with torch.enable_grad():
                try:
                    if work.outputs is not None:
                        products = ggn_vector_products(work.outputs, work.targets, self._loss_fn, params, probes,
                                                       where=f"{self._name}.step")
                    else:
                        products = second_backward(params, [work.graph_grads[i] for i in index], probes, None,
                                                   keep_graph=False)
                except RuntimeError as error:
                    self._raise_if_compiled(error)
                    raise
            work.set_curvature(index, products, probes, counters)
            del products
        work.grads = [g.detach() if g.requires_grad else g for g in work.grads]
        work.graph_grads = work.outputs = work.targets = None  # the second-order graph dies here

    def _finite_difference_probes(self, work: _StepWork, due: set[int]):
        """``(index, moved, probes, counters, h)`` of a finite-difference refresh (None when nothing is due): the
        parameters due, their probes, and ``h = ε^{1/3}·max(1, ‖θ‖)/‖z‖`` as ``hvp(mode="fd")`` takes it (ε of the
        parameters' dtype, norms over the refreshed parameters, whole under FSDP2)."""
        index = [i for i, p in enumerate(work.params) if id(p) in due]
        if not index:
            return None
        moved = [work.params[i] for i in index]
        probes, counters = self._draw_probes(moved)
        eps = max(torch.finfo(p.dtype).eps for p in moved)
        length = math.sqrt(sum(p.numel() for p in moved))  # ‖z‖ of a Rademacher probe
        h = eps ** (1.0 / 3.0) * max(1.0, _global_norm(moved)) / length
        return index, moved, probes, counters, h

    @staticmethod
    @contextlib.contextmanager
    def _shifting(moved: list[torch.Tensor], probes: list[torch.Tensor]):
        """``shift(t)`` sets the parameters ``moved`` to ``θ + t·z`` (θ: their values on entry); θ is restored bit
        for bit on exit."""
        originals = [p.detach().clone() for p in moved]

        def shift(t: float) -> None:
            with torch.no_grad():
                for p, original, z in zip(moved, originals, probes):
                    p.copy_(original).add_(z, alpha=t)
        try:
            yield shift
        finally:
            with torch.no_grad():
                for p, original in zip(moved, originals):
                    p.copy_(original)

    def _finite_difference_products(self, work: _StepWork, closure, due: set[int]) -> None:
        """``Hz ≈ (∇L(θ + hz) − ∇L(θ − hz)) / 2h`` from two more backward passes (the parameters due for a
        refresh moved by ±hz, then restored bit for bit)."""
        setup = self._finite_difference_probes(work, due)
        if setup is None:
            return
        index, moved, probes, counters, h = setup
        position = {id(p): k for k, p in enumerate(work.fd_candidates)}
        sides = []
        with self._shifting(moved, probes) as shift:
            for sign in (1.0, -1.0):
                shift(sign * h)
                _, side = self._backward_gradients(closure, work.fd_candidates)
                sides.append([side[position[id(p)]] for p in moved])
        products = [torch.zeros_like(p) if plus is None or minus is None else ((plus - minus) / (2.0 * h)).detach()
                    for p, plus, minus in zip(moved, *sides)]
        work.set_curvature(index, products, probes, counters)

    def _ggn_finite_difference_products(self, work: _StepWork, closure, due: set[int]) -> None:
        """``Gz = Jᵀ H J z`` with ``Jz ≈ (f(θ + hz) − f(θ − hz)) / 2h`` from two forwards without a graph (the
        parameters due moved by ±hz, then restored bit for bit), ``H`` the criterion's Hessian in the outputs at θ,
        and ``Jᵀ(H Jz)`` by one more forward and ``outputs.backward(H Jz)`` (so FSDP2 reduces it like a gradient)."""
        setup = self._finite_difference_probes(work, due)
        if setup is None:
            return
        index, moved, probes, counters, h = setup
        sides = []
        with self._shifting(moved, probes) as shift:
            for sign in (1.0, -1.0):
                shift(sign * h)
                with torch.no_grad(), resharding_fsdp_modules() if self._sharded else contextlib.nullcontext():
                    sides.append(self._evaluate(closure)[1].detach())
        for p in work.fd_candidates:
            p.grad = None
        with torch.enable_grad():
            _, outputs, targets = self._evaluate(closure)
            if not sides[0].shape == sides[1].shape == outputs.shape:
                raise ValueError(f"{self._name}.step: the closure's outputs changed shape between its calls of one "
                                 f"step ({tuple(sides[0].shape)}, {tuple(sides[1].shape)}, {tuple(outputs.shape)}); "
                                 "the finite-difference Gauss-Newton product compares them: return the same batch")
            jz = (sides[0] - sides[1]) / (2.0 * h)
            w = apply_output_hessian(self._loss_fn, outputs, targets, jz, where=f"{self._name}.step")
            if outputs.requires_grad:
                outputs.backward(w)
        products = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in moved]
        work.set_curvature(index, products, probes, counters)

    # ---------------------------------------------------------------------------------------- stage 3: reduce

    def _reduce(self, work: _StepWork, grad_scale) -> None:
        """Average over the process group (where ``work.averaging``), unscale (``grad_scale``), and raise if a
        checked gradient or Hessian-vector product is not finite."""
        if work.averaging:
            self._average(work)
        if grad_scale is not None:
            # The loss was multiplied by the scale, and with it the gradient and every Hessian-vector product.
            work.grads = _unscaled(work.grads, grad_scale)
            work.hessian_products = _unscaled(work.hessian_products, grad_scale)
        if all(group.get("check_finite", True) for group in self.param_groups):  # the default: every tensor
            checked = work.grads + [t for t in work.hessian_products if t is not None]
        else:
            unchecked = {id(p) for group in self.param_groups if not group.get("check_finite", True)
                         for p in group["params"]}
            checked = [g for p, g in zip(work.params, work.grads) if id(p) not in unchecked]
            checked += [t for p, t in zip(work.params, work.hessian_products)
                        if t is not None and id(p) not in unchecked]
        if checked and not _all_finite_on_every_rank(checked, self._sharded):
            self._raise_non_finite(work.params, work.grads, work.hessian_products)

    def _average(self, work: _StepWork) -> None:
        """Average gradients and Hessian-vector products over the process group in place (one all-reduce per
        dtype), then drop the parameters that had no gradient on any rank."""
        grads = work.grads
        has_local_grad = work.has_local_grad if work.has_local_grad is not None else [True] * len(grads)
        used = torch.tensor(has_local_grad, dtype=grads[0].dtype, device=grads[0].device) if grads else None
        tensors = grads + [hz for hz in work.hessian_products if hz is not None] + ([used] if used is not None else [])
        average_(tensors, self._process_group)
        if used is None or bool((used > 0).all()):
            return
        keep = (used > 0).tolist()
        work.params, work.grads, work.hessian_products, work.probes = (
            [t for t, k in zip(tensors_, keep) if k]
            for tensors_ in (work.params, work.grads, work.hessian_products, work.probes))

    # ---------------------------------------------------------------------------------------- stage 4: update

    def _apply_update(self, work: _StepWork, closure, external: dict[int, torch.Tensor],
                      hypers: list | None = None) -> None:
        """Check the states, set ``p.grad`` to the plain gradient, and run ``_update`` on one entry per group
        (``hypers``: each group's ``_check_group`` values, as ``step`` checked them; asked again where None)."""
        stepping, grads = work.params, work.grads
        members = self._checked_states(stepping)
        self._check_apart(work, members, external)
        # Nothing has been modified up to here: every error above leaves parameters and state as they were.
        if closure is not None:
            for p, g in zip(stepping, grads):
                p.grad = g
        else:
            for p, g in zip(stepping, grads):
                old = p.grad
                if old is None or old.requires_grad:
                    p.grad = g
        diagonals = [external.get(id(p)) for p in stepping] if external else None
        hessian_products, probes, probe_counters = work.hessian_products, work.probes, work.probe_counters
        # Between refreshes (no products, probes or diagonals) the per-parameter curvature lists are all None.
        curvature = any(t is not None for t in hessian_products) or any(t is not None for t in probes) or \
            (diagonals is not None and any(t is not None for t in diagonals))
        entries = []
        for g, (group, (params, index, states)) in enumerate(zip(self.param_groups, members)):
            if not params:
                continue
            for k, state in enumerate(states):
                if not state:
                    p = params[k]
                    state = self.state[p]
                    self._init_state(p, state)
                    states[k] = state
            n = len(index)
            entry = {"group": group, "params": params, "grads": [grads[i] for i in index], "states": states,
                     "hyper": hypers[g] if hypers is not None else self._check_group(group)}
            if curvature:
                entry["hessian_products"] = [hessian_products[i] for i in index]
                entry["probes"] = [probes[i] for i in index]
                entry["probe_counters"] = [probe_counters.get(id(stepping[i])) if probes[i] is not None else None
                                           for i in index]
                entry["diagonals"] = [diagonals[i] for i in index] if diagonals is not None else [None] * n
            else:
                for key in ("hessian_products", "probes", "probe_counters", "diagonals"):
                    entry[key] = [None] * n
            entries.append(_local_entry(entry) if self._sharded else entry)
        self._update(entries)

    def _check_apart(self, work: _StepWork, members, external: dict[int, torch.Tensor]) -> None:
        """The update writes the counts, then runs one op per group, each checking its own tensors: a gradient or
        curvature tensor sharing memory with a parameter or state tensor (of its group or another) is refused
        here, before anything is written (``optim._overlap``). FSDP2's DTensors are left to the ops, which check
        their local shards."""
        if self._sharded:
            return
        states = [(g, j, state) for g, (_, _, group_states) in enumerate(members) for j, state in
                  enumerate(group_states) if state]
        written = list(work.params) + [t for _, _, state in states for t in state.values()
                                       if isinstance(t, torch.Tensor)]
        read = [t for t in (*work.grads, *work.hessian_products, *work.probes, *external.values())
                if isinstance(t, torch.Tensor)]

        def operands():
            named = [(f"the parameter {self._where(p)}", p, True) for p in work.params]
            named += [(f"the state {key!r} of parameter {j} of param group {g}", t, True) for g, j, state in states
                      for key, t in state.items() if isinstance(t, torch.Tensor)]
            named += [(f"the gradient of {self._where(p)}", t, False) for p, t in zip(work.params, work.grads)]
            named += [(f"a curvature tensor of {self._where(p)}", t, False) for p, ts in
                      zip(work.params, zip(work.hessian_products, work.probes)) for t in ts
                      if isinstance(t, torch.Tensor)]
            named += [("a hessian_diagonal entry", t, False) for t in external.values()]
            return named
        check_no_overlap_across_calls(f"{self._name}.step", written, read, operands)

    def _only_creates_state(self, due: set[int]) -> bool:
        """A step without a closure at lr = 0 in every group that is due to refresh the curvature from gradients
        without a graph (what ``torch.distributed.checkpoint.state_dict.get_state_dict`` runs on an optimizer with
        no state yet, to create it): the state of every parameter with a gradient is created, nothing else."""
        def zero(lr) -> bool:
            return bool(lr == 0) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr == 0
        if not all(zero(group["lr"]) for group in self.param_groups):  # first: training steps stop here
            return False
        with_grad = [p for p in self._all_params() if p.grad is not None]
        if not with_grad or not any(id(p) in due for p in with_grad) or any(p.grad.requires_grad for p in with_grad):
            return False
        for p in with_grad:
            if not self.state[p]:
                self._init_state(p, self.state[p])
        return True

    def _release_grad_graphs(self) -> None:
        """Detach gradients that carry a graph (``backward(create_graph=True)``) on a step that is skipped, so that
        the parameter → grad → graph → parameter cycle does not keep the graph alive."""
        for p in self._all_params():
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()

    # What AOTAutograd (every torch.compile backend but "eager") raises when its backward is asked for a graph.
    _COMPILED_BACKWARD_ERRORS = ("does not currently support double backward", "non-empty donated buffers")

    def _raise_if_compiled(self, error: RuntimeError) -> None:
        """Re-raise torch.compile's double-backward errors with what to do instead (nothing was modified yet)."""
        if any(text in str(error) for text in self._COMPILED_BACKWARD_ERRORS):
            raise RuntimeError(
                f"{self._name}.step: this step refreshes the Hessian estimate, which differentiates the gradient a "
                "second time, but the loss came through torch.compile, whose autograd graphs cannot be "
                "differentiated twice; parameters and optimizer state were left unchanged. On refresh steps compute "
                "the loss with the eager model (opt.next_step_refreshes() says which steps), or give the diagonal "
                "with step(hessian_diagonal=...)") from error

    def _check_loss(self, loss) -> None:
        source = "loss_fn(outputs, targets)" if self._ggn else "the closure"
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"{self._name}.step: {source} must return the loss as a tensor (without calling "
                             f"backward()), got {type(loss).__name__}")
        if loss.numel() != 1 or not loss.dtype.is_floating_point:
            raise ValueError(f"{self._name}.step: {source} must return a scalar floating-point loss, got a "
                             f"{loss.dtype} tensor of shape {tuple(loss.shape)}; reduce it (e.g. .mean()) first")
        if not loss.requires_grad:
            raise ValueError(f"{self._name}.step: the loss returned by {source} does not require grad; compute "
                             "it from the parameters with autograd enabled (not under torch.no_grad())")

    def _raise_non_finite(self, stepping, grads, hessian_products) -> None:
        names = {id(p): i for i, p in enumerate(self._all_params())}
        for kind, tensors in (("gradient", grads), ("Hessian-vector product", hessian_products)):
            for p, t in zip(stepping, tensors):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"{self._name}.step: the {kind} of parameter {names[id(p)]} (shape {tuple(p.shape)}) has "
                        "non-finite values; parameters and optimizer state were left unchanged. Check the loss for "
                        "overflow (lower the learning rate, use gradient clipping or a GradScaler)")

    def _draw_probes(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Rademacher probes for ``params`` (see the module docstring), and for each the ``(seed, offset)`` of
        ``rademacher_`` that draws it alone (a fused kernel can regenerate it from them): one ``rademacher_`` call
        per run of parameters that are consecutive in ``param_groups`` order and share the seed and the step
        count."""
        start, group_of = {}, {}
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                start[id(p)] = offset
                group_of[id(p)] = group
                offset += p.numel()
        order = {id(p): i for i, p in enumerate(self._all_params())}

        def key(p):
            state = self.state.get(p)
            return group_of[id(p)]["seed"], int(state["step"].item()) if state else 0

        out: dict[int, torch.Tensor] = {}
        counters: dict[int, tuple[int, int]] = {}
        run: list[torch.Tensor] = []
        for p in [q for q in params if is_dtensor(q)]:
            # A row shard holds rows a..b of the whole probe: the counters from start + a·(row length) on.
            seed, step = key(p)
            _, first_row, _ = local_rows(p)
            offset = start[id(p)] + first_row * (p.numel() // max(p.shape[0], 1))
            local = rademacher_like([p.to_local()], seed=probe_seed(seed, step), offset=offset)[0]
            out[id(p)] = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                            run_check=False)
            counters[id(p)] = (probe_seed(seed, step), offset)
        for p in sorted([q for q in params if not is_dtensor(q)], key=lambda q: order[id(q)]) + [None]:
            if run and (p is None or order[id(p)] != order[id(run[-1])] + 1 or key(p) != key(run[-1])):
                seed, step = key(run[0])
                for q, z in zip(run, rademacher_like(run, seed=probe_seed(seed, step), offset=start[id(run[0])])):
                    out[id(q)] = z
                    counters[id(q)] = (probe_seed(seed, step), start[id(q)])
                run = []
            if p is not None:
                run.append(p)
        return [out[id(p)] for p in params], [counters[id(p)] for p in params]

    # ------------------------------------------------------------------------------------------------ state dict

    def _where(self, p: torch.Tensor) -> str:
        for g, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return f"parameter {i} of param group {g}"
        return f"a parameter of shape {tuple(p.shape)}"

    def _check_gradients(self, stepping: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Dense gradients of each parameter's shape and dtype, before anything is written."""
        strided = torch.strided
        if all(g.layout is strided and g.shape == p.shape for p, g in zip(stepping, grads)):
            return  # the usual case, in one pass; the loop below names the first gradient that is not
        for p, g in zip(stepping, grads):
            if g.layout != torch.strided:
                raise SparseGradientError(f"{self._name} does not support sparse gradients: the gradient of "
                                          f"{self._where(p)} is {g.layout}; use a dense gradient (e.g. "
                                          "nn.Embedding(sparse=False))")
            if g.shape != p.shape:
                raise ValueError(f"{self._name}: the gradient of {self._where(p)} has shape {tuple(g.shape)} but "
                                 f"the parameter has shape {tuple(p.shape)}")

    def _state_spec(self) -> StateSpec:
        return StateSpec({**{key: "count" for key in self._count_keys},
                          **{key: "param" for key in self._state_dtype_keys}})

    def _fast_state_check(self) -> tuple[frozenset, tuple[str, ...], tuple[str, ...]] | None:
        """What the fast pass of :meth:`_checked_states` accepts: (keys, param keys, count keys) of
        ``_state_spec()``, None when the spec has a kind the fast pass does not know (then every state takes the
        full check). Derived once per spec (the class's keys; an override of ``_state_spec`` is asked every step)."""
        if type(self)._state_spec is SecondOrderOptimizer._state_spec:
            cache_key = (self._count_keys, self._state_dtype_keys)
            cached = getattr(self, "_fast_state_check_cache", None)
            if cached is not None and cached[0] == cache_key:
                return cached[1]
        else:
            cache_key = None
        spec = self._state_spec()
        keys = frozenset(spec.required) if not spec.optional else None
        param_keys = tuple(k for k, kind in spec.required.items() if kind == "param")
        count_keys = tuple(k for k, kind in spec.required.items() if kind == "count")
        fast = None if keys is None or len(param_keys) + len(count_keys) != len(keys) else (keys, param_keys,
                                                                                              count_keys)
        if cache_key is not None:
            self._fast_state_check_cache = (cache_key, fast)
        return fast

    def _checked_states(self, stepping: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], list[int], list]]:
        """Per param group (aligned with ``param_groups``), ``(params, index, states)`` of the parameters the step
        updates: ``params[k]`` is ``stepping[index[k]]``, ``states[k]`` its state dict (None where there is none
        yet), once every existing state has been checked for this class's keys and shapes (one pass: the update
        gathers its lists from it)."""
        # The fast pass accepts what this class creates (exactly its keys; state tensors of the parameter's shape in
        # a floating dtype; counts as one-element float32 tensors); anything else goes to check_param_state, which
        # accepts what it accepts and raises with the details otherwise.
        fast = self._fast_state_check()
        keys, param_keys, count_keys = fast if fast is not None else (None, (), ())
        groups = self.param_groups
        # The usual step updates every parameter in param_groups order: positions without a lookup per parameter.
        everything = [q for group in groups for q in group["params"]]
        in_order = len(stepping) == len(everything) and all(map(operator.is_, stepping, everything))
        position = None if in_order else {id(p): i for i, p in enumerate(stepping)}
        tensor_type, float32, state_of = torch.Tensor, torch.float32, self.state
        members = []
        first = 0
        for g, group in enumerate(groups):
            group_params = group["params"]
            if position is None:
                params = list(group_params)
                index = list(range(first, first + len(params)))
                first += len(params)
            else:
                params, index = [], []
                for p in group_params:
                    i = position.get(id(p))
                    if i is not None:
                        params.append(p)
                        index.append(i)
            states = [state_of.get(p) for p in params]
            members.append((params, index, states))
            for p, state in zip(params, states):
                if not state:
                    continue
                if keys is not None and state.keys() == keys:
                    shape, usual = p.shape, True
                    for k in param_keys:
                        v = state[k]
                        if type(v) is not tensor_type or v.shape != shape or not v.is_floating_point():
                            usual = False
                            break
                    if usual:
                        for k in count_keys:
                            v = state[k]
                            if type(v) is not tensor_type or v.dtype is not float32 or v.numel() != 1:
                                usual = False
                                break
                    if usual:
                        continue
                j = next(k for k, q in enumerate(group_params) if q is p)
                check_param_state(f"{self._name}.step", f"the state of parameter {j} of param group {g}", p,
                                  state, self._state_spec(), values=False)
        return members

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` after checking the whole group (its parameters: Tensors listed once, of a
        supported dtype; its hyperparameters), so a group that could not be stepped is never added."""
        check_group_params(param_group, self._name, dtype_ok=lambda p: p.dtype in SECOND_ORDER_PARAM_DTYPES,
                           dtypes_text="float64, float32, bfloat16 and float16")
        self._check_whole_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------------- state dict (torch's hooks)

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load pre hook: the whole incoming state (the class that saved it, every group's values, every
        parameter's state keys, shapes and counts) is checked before anything is replaced."""
        check_incoming_state_dict(self, state_dict, self._name, check_group=lambda group, params:
                                  self._check_whole_group(group), spec_of=lambda group: self._state_spec())

    def _after_state_dict_loaded(self, state_dict: dict[str, Any]) -> None:
        """torch's load post hook: state tensors back in their working dtype (float32 for bf16/fp16 parameters)
        and the counts as float32 tensors on the CPU (torch's loader casts both to the parameter's dtype and
        device)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for saved_id, p in zip(saved_ids, self._all_params()):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            for key in self._state_dtype_keys:
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=second_order_state_dtype(p.dtype), copy=True)
            for key in self._count_keys:
                if key in saved:
                    value = saved[key]
                    value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                    state[key] = value.to(device="cpu", dtype=torch.float32, copy=True).reshape(())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        fill_group_defaults(self)
        install_state_dict_hooks(self)


def _unscaled(tensors: list[torch.Tensor | None], grad_scale: torch.Tensor) -> list[torch.Tensor | None]:
    """``t / grad_scale`` for every tensor (None kept), out of place: a rejected step must leave ``p.grad`` as it
    was. One multi-tensor multiply per device and dtype, by the reciprocal computed in float64."""
    out: list[torch.Tensor | None] = list(tensors)
    keys = [None if t is None else (t.device, t.dtype) for t in tensors]
    for key, index in group_indices(keys).items():
        if key is None:
            continue
        device, dtype = key
        inverse = grad_scale.to(device=device, dtype=torch.float64).reciprocal().to(
            torch.float64 if dtype == torch.float64 else torch.float32)
        for i, t in zip(index, torch._foreach_mul([tensors[i] for i in index], inverse)):
            out[i] = t
    return out


def check_betas(name: str, betas) -> tuple[float, float]:
    """(beta1, beta2) as floats (numbers or 1-element Tensors in [0, 1), torch's messages first)."""
    return _check_betas(betas, name)


def check_update_period(name: str, update_period) -> None:
    if isinstance(update_period, bool) or not isinstance(update_period, int) or update_period < 1:
        raise ValueError(f"{name}: update_period must be an int >= 1, got {update_period!r}")


def choose_path(params: Sequence[torch.Tensor], op: str, foreach: bool | None, fused: bool | None, *,
                devices: set[torch.device] | None = None) -> str:
    """"fused", "foreach" or "single", as optim.AdamW chooses: with neither flag set, fused when the compiled
    kernel exists for every parameter's device, else foreach; ``fused=False, foreach=False`` is the single-tensor
    loop (the reference implementation of the op). ``devices``: the parameters' devices, where the caller has
    them."""
    if fused is None and foreach is None:
        # per device, not per parameter: the dispatcher query costs ~10 µs, paid on every step
        if devices is None:
            devices = {p.device for p in params}
        return "fused" if all(has_kernel(op, device) for device in devices) else "foreach"
    return "fused" if fused else "foreach" if foreach else "single"


def _global_norm(tensors: list[torch.Tensor]) -> float:
    """‖(t_1, ..., t_n)‖ in float64; a DTensor's shards summed over the mesh dimension that shards it (replicas, as
    in HSDP, are not counted twice)."""
    import torch.distributed as dist

    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        local = t.detach().to_local() if is_dtensor(t) else t.detach()
        square = local.double().square().sum().cpu()
        if is_dtensor(t):
            shard_dims = [i for i, placement in enumerate(t.placements) if placement.is_shard()]
            if shard_dims:
                dist.all_reduce(square, op=dist.ReduceOp.SUM, group=t.device_mesh.get_group(shard_dims[0]))
        total += square
    return float(total.sqrt())


def _all_finite_on_every_rank(tensors: list[torch.Tensor], sharded: bool) -> bool:
    """``all_finite`` of the local values; under FSDP2 agreed on by every rank (one all-reduce), so that all ranks
    raise or none does."""
    if not sharded:
        return all_finite(tensors)
    import torch.distributed as dist

    local = all_finite([t.to_local() if is_dtensor(t) else t for t in tensors])
    flag = torch.tensor([0 if local else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def _local_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A work entry with every DTensor replaced by its local shard (the elementwise steps write through it), the
    state dicts by views of theirs."""
    def local(t):
        return t.to_local() if is_dtensor(t) else t

    out = dict(entry)
    for key in ("params", "grads", "hessian_products", "probes", "diagonals"):
        out[key] = [local(t) for t in entry[key]]
    out["states"] = [{k: local(v) for k, v in state.items()} for state in entry["states"]]
    return out
