"""``optim.SophiaH``: Sophia (Liu et al. 2023) with the Hutchinson estimate of the Hessian diagonal.

The elementwise step is the op ``optim::fused_sophia_`` (math and the choice of max(ρ·h, eps) over the official
code's ``ρ·bs·h + 1e-15``: ``optim/hessian/_ops.py``); this module adds the optimizer class, its foreach path and the
curvature refresh schedule. The closure protocol and the probes are ``second_order.py``'s.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .._validate import check_lr, check_nonnegative
from ._ops import check_sophia_hyperparameters, fused_sophia_, fused_sophia_reference
from .probes import rademacher_like
from .second_order import SecondOrderOptimizer, check_betas, check_update_period, choose_path, group_indices, select

__all__ = ["SophiaH", "sophia"]

# Device types on which the fused kernel regenerates a probe from its counters instead of reading the tensor (see
# ``sophia``'s ``regenerate_probes``).
REGENERATE_PROBES_ON = ("cuda",)


class SophiaH(SecondOrderOptimizer):
    r"""Sophia-H: a clipped diagonal-Newton step with the curvature refreshed every ``update_period`` steps.

    For each parameter p with gradient g (g and the curvature negated if ``maximize``)::

        m ← β1·m + (1 − β1)·g
        h ← β2·h + (1 − β2)·(z⊙Hz)            on refresh steps: steps 1, 1 + k, 1 + 2k, … (k = update_period)
        p ← p·(1 − lr·weight_decay)
        p ← p − lr·clamp(m / max(ρ·h, eps), −1, 1)

    z is a Rademacher probe and Hz the Hessian-vector product of the loss (so E[z⊙Hz] = diag(H)); ρ is the paper's
    γ. Every coordinate moves by at most lr per step; where the curvature estimate is not positive the step is
    lr·sign(m). The paper tunes ρ so that a minority of coordinates is clipped (10–50% unclipped).

    Closure protocol: ``step(closure)`` with ``closure()`` returning the loss **without** calling ``backward()``;
    the optimizer differentiates it, with a second-order graph only on refresh steps, and sets ``p.grad`` to the
    plain gradient. Between refreshes a closure that calls ``backward()`` itself, or no closure after
    ``loss.backward()``, also works; ``loss.backward(create_graph=True)`` then ``step()`` works on every step. An
    externally computed diagonal can replace the estimate: ``step(closure, hessian_diagonal=[...])`` or
    :meth:`set_hessian_diagonal`. Details: ``optim.hessian.second_order``.

    Example::

        opt = optim.SophiaH(model.parameters(), lr=1e-3, rho=0.04, update_period=10, seed=0)
        for x, y in loader:
            loss = opt.step(lambda: F.cross_entropy(model(x), y))   # no zero_grad/backward needed

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate (>= 0; a float or a 1-element Tensor), the largest change of a coordinate per step.
        betas: (β1, β2) in [0, 1): momentum and curvature EMA coefficients.
        rho: ρ >= 0, scales the curvature in the denominator (larger: fewer coordinates clipped, smaller steps).
        weight_decay: decoupled weight decay λ >= 0.
        update_period: refresh the curvature every this many steps (int >= 1).
        eps: the smallest denominator (> 0).
        maximize: ascend the loss instead.
        seed: seed of the probes (int); None draws one from torch's default generator. Same seed on every rank.
        check_finite: check the gradient (and the curvature on refresh steps) for non-finite values before
            stepping, and raise with parameters and state unchanged; costs one reduction over the gradients and
            one host synchronization per step.
        foreach, fused: implementation, as in ``optim.AdamW`` (fused: the ``optim::fused_sophia_`` kernel, which on
            CUDA regenerates each probe from its seed and counters instead of reading it: 32 B per float32 element
            on a refresh step instead of 36).
        process_group: data-parallel training: a ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD``) over which the gradients the optimizer computes and the
            Hessian-vector products are averaged, since ``torch.autograd.grad`` bypasses DDP's all-reduce; the
            ranks' probe seeds are made equal at construction. None (default): no communication. DDP and FSDP2
            recipes: ``optim.hessian.second_order``.
        hessian: how the refresh steps take Hz: ``"exact"`` (double backward of the closure's loss), ``"fd"``
            (central finite differences of two more ``backward()`` passes at θ ± hz, h = ε^{1/3}·max(1, ‖θ‖)/‖z‖:
            approximate, what works under FSDP2, whose sharded gradients exist only in ``backward()``), or
            ``"auto"`` (default: ``"fd"`` for FSDP2's DTensor parameters, else ``"exact"``); or the Gauss-Newton
            matrix G = JᵀHJ instead of the Hessian (Sophia-G's curvature, positive semi-definite): ``"ggn"`` (exact)
            or ``"ggn-fd"`` (Jz by finite differences of two forwards: what works under FSDP2), with ``loss_fn``.
        loss_fn: with ``hessian="ggn"``/``"ggn-fd"`` only: the criterion ``loss_fn(outputs, targets)``; the closure
            then returns ``(outputs, targets)`` (see ``optim.hessian.second_order``, *Gauss-Newton curvature*).

    State per parameter: ``step`` (CPU float32 count), ``exp_avg`` (m) and ``hessian`` (h), float32 for
    bf16/fp16 parameters.
    """

    _name = "SophiaH"
    _state_dtype_keys = ("exp_avg", "hessian")
    _count_keys = ("step",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        update_period: int = 10,
        eps: float = 1e-12,
        maximize: bool = False,
        seed: int | None = None,
        check_finite: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        process_group=None,
        hessian: str = "auto",
        loss_fn=None,
    ):
        if fused and foreach:
            raise ValueError("SophiaH: fused=True and foreach=True cannot be set together; choose one")
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, update_period=update_period,
                        eps=eps, maximize=maximize, seed=seed, check_finite=check_finite, foreach=foreach,
                        fused=fused)
        super().__init__(params, defaults, process_group=process_group, hessian=hessian, loss_fn=loss_fn)

    def _check_group(self, group: dict[str, Any]) -> dict[str, float]:
        """The group's hyperparameters (numbers or 1-element Tensors; torch's messages first where torch has the
        same argument) as Python floats."""
        beta1, beta2 = check_betas("SophiaH", group["betas"])
        hyper = dict(lr=check_lr(group["lr"], "SophiaH"), beta1=beta1, beta2=beta2,
                     rho=check_nonnegative(group["rho"], "rho", "SophiaH"),
                     weight_decay=check_nonnegative(group["weight_decay"], "weight_decay", "SophiaH"),
                     eps=check_nonnegative(group["eps"], "eps", "SophiaH", strict=True))
        check_sophia_hyperparameters(**hyper, caller="SophiaH")
        check_update_period("SophiaH", group["update_period"])
        return hyper

    def _update(self, work: list[dict[str, Any]]) -> None:
        for entry in work:
            group = entry["group"]
            products, probes, counters = entry["hessian_products"], entry["probes"], entry["probe_counters"]
            if any(diagonal is not None for diagonal in entry["diagonals"]):
                products, probes, counters = [], [], []
                for hz, z, counter, diagonal in zip(entry["hessian_products"], entry["probes"],
                                                    entry["probe_counters"], entry["diagonals"]):
                    # an external diagonal wins over a Hutchinson estimate of the same step
                    products.append(diagonal if diagonal is not None else hz)
                    probes.append(None if diagonal is not None else z)
                    counters.append(None if diagonal is not None else counter)
            # the values step() checked (check_sophia_hyperparameters among them), not checked again
            hyper = entry["hyper"] if entry.get("hyper") is not None else self._check_group(group)
            states = entry["states"]
            # one op call rather than one tiny op per parameter (a measurable share of a small step)
            self._counts.add([state["step"] for state in states], 1.0)
            _sophia(entry["params"], entry["grads"], [s["exp_avg"] for s in states], [s["hessian"] for s in states],
                    products, probes, **hyper, maximize=group["maximize"], foreach=group["foreach"],
                    fused=group["fused"], probe_counters=counters)


def sophia(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    hessian_products: list[torch.Tensor | None],
    probes: list[torch.Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    probe_counters: list[tuple[int, int] | None] | None = None,
    regenerate_probes: bool | None = None,
) -> None:
    """Functional Sophia step over lists, in place. ``hessian_products[i]`` is None for a parameter whose curvature
    is not refreshed this step; with a probe z the estimate is ``z·hessian_products[i]``, without one
    ``hessian_products[i]`` is the estimate itself.

    The probe of parameter i is ``probes[i]``, or, when ``probe_counters[i] = (seed, offset)`` is given, the
    ``rademacher_`` probe of that seed and first counter, i.e. ``rademacher_like([params[i]], seed=seed,
    offset=offset)[0]`` (``probes[i]`` may then be None; when both are given they must be that same probe). The
    fused kernel regenerates a probe from its counters instead of reading it where ``regenerate_probes`` says so:
    None (default) on CUDA, where the step is memory-bound, so that a refresh step moves 32 B per float32 element
    instead of 36 (the hash's integer work should hide under the loads; not yet timed on a GPU); on CPU the hash
    costs more than the read (4M float32 on 2 threads: 5.5 ms against 3.7 ms), so it reads the tensor there.
    """
    check_sophia_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, rho=rho, weight_decay=weight_decay, eps=eps,
                                 caller="sophia")
    _sophia(params, grads, exp_avgs, hessians, hessian_products, probes, lr=lr, beta1=beta1, beta2=beta2, rho=rho,
            weight_decay=weight_decay, eps=eps, maximize=maximize, foreach=foreach, fused=fused,
            probe_counters=probe_counters, regenerate_probes=regenerate_probes)


def _sophia(params, grads, exp_avgs, hessians, hessian_products, probes, *, lr, beta1, beta2, rho, weight_decay, eps,
            maximize, foreach, fused, probe_counters, regenerate_probes=None) -> None:
    """:func:`sophia` once its hyperparameters are checked (``SophiaH`` checks them in ``_check_group``)."""
    kinds = {(p.device, p.dtype) for p in params}
    devices = {device for device, _ in kinds}
    path = choose_path(params, "fused_sophia_", foreach, fused, devices=devices)
    implementation = {"fused": fused_sophia_, "foreach": _multi_tensor_sophia, "single": fused_sophia_reference}[path]
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, rho=rho, weight_decay=weight_decay, eps=eps, maximize=maximize)
    counters = probe_counters if probe_counters is not None else [None] * len(params)
    if len(counters) != len(params):
        raise ValueError(f"sophia: probe_counters has {len(counters)} entries but params has {len(params)}")

    def probe_source(p: torch.Tensor, hz, z, counter) -> str | None:
        if hz is None or (z is None and counter is None):
            return None
        regenerate = regenerate_probes if regenerate_probes is not None else p.device.type in REGENERATE_PROBES_ON
        # only the fused kernel gains from regenerating; the foreach path has no op that does it
        if counter is not None and path != "foreach" and (z is None or (path == "fused" and regenerate)):
            return "counter"
        return "tensor"

    if len(kinds) == 1 and all(hz is None for hz in hessian_products):
        # between refreshes on one device and dtype: the loop below would make one call of all of them
        implementation(params, grads, exp_avgs, hessians, [], [], **hyper)
        return
    sources = [probe_source(p, hz, z, c) for p, hz, z, c in zip(params, hessian_products, probes, counters)]
    keys = [(p.device, p.dtype, None if hz is None else hz.dtype, source)
            for p, hz, source in zip(params, hessian_products, sources)]
    for (_, _, product_dtype, source), index in group_indices(keys).items():
        selected_probes, seeds, offsets = [], [], []
        if source == "counter":
            seeds = [counters[i][0] for i in index]
            offsets = [counters[i][1] for i in index]
        elif source == "tensor":
            selected_probes = [probes[i] if probes[i] is not None
                               else rademacher_like([hessian_products[i]], seed=counters[i][0],
                                                    offset=counters[i][1])[0] for i in index]
        extra = dict(probe_seeds=seeds, probe_offsets=offsets) if seeds else {}
        implementation(select(params, index), select(grads, index), select(exp_avgs, index),
                       select(hessians, index), select(hessian_products, index) if product_dtype is not None else [],
                       selected_probes, **hyper, **extra)


def _multi_tensor_sophia(params, grads, exp_avgs, hessians, hessian_products, probes, *, lr, beta1, beta2, rho,
                         weight_decay, eps, maximize):
    """The foreach path: the op's step with ``torch._foreach_*`` ops over one device and dtype."""
    work_dtype = exp_avgs[0].dtype
    low_precision = params[0].dtype != work_dtype
    work_params = [p.to(work_dtype) for p in params] if low_precision else params
    work_grads = [g.to(work_dtype) for g in grads] if low_precision else grads
    if maximize:
        work_grads = torch._foreach_neg(work_grads)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, work_grads, alpha=1.0 - beta1)
    if hessian_products:
        estimates = [hz.to(work_dtype) for hz in hessian_products]
        if probes:
            estimates = torch._foreach_mul(estimates, [z.to(work_dtype) for z in probes])
        torch._foreach_mul_(hessians, beta2)
        torch._foreach_add_(hessians, estimates, alpha=(-1.0 if maximize else 1.0) * (1.0 - beta2))
    torch._foreach_mul_(work_params, 1.0 - lr * weight_decay)
    denominators = torch._foreach_mul(hessians, rho)
    torch._foreach_clamp_min_(denominators, eps)
    ratios = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_clamp_min_(ratios, -1.0)
    torch._foreach_clamp_max_(ratios, 1.0)
    torch._foreach_add_(work_params, ratios, alpha=-lr)
    if low_precision:
        torch._foreach_copy_(params, work_params)
