"""``optim.SophiaH``: Sophia (Liu et al. 2023) with the Hutchinson estimate of the Hessian diagonal.

The elementwise step is the op ``optim::fused_sophia_`` (math and the choice of max(ρ·h, eps) over the official
code's ``ρ·bs·h + 1e-15``: ``optim/hessian/_ops.py``); this module adds the optimizer class, its foreach path and the
curvature refresh schedule. The closure protocol and the probes are ``second_order.py``'s.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ._ops import check_sophia_hyperparameters, fused_sophia_, fused_sophia_reference
from .second_order import SecondOrderOptimizer, check_betas, check_update_period, choose_path, group_indices, select

__all__ = ["SophiaH", "sophia"]


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
        lr: learning rate (>= 0), the largest change of a coordinate per step.
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
        foreach, fused: implementation, as in ``optim.AdamW`` (fused: the ``optim::fused_sophia_`` kernel).
        process_group: data-parallel training: a ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD``) over which the gradients the optimizer computes and the
            Hessian-vector products are averaged, since ``torch.autograd.grad`` bypasses DDP's all-reduce; the
            ranks' probe seeds are made equal at construction. None (default): no communication. DDP recipe and
            FSDP2 (not supported): ``optim.hessian.second_order``.

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
    ):
        if isinstance(lr, torch.Tensor):
            raise ValueError("SophiaH: lr must be a Python float; a Tensor lr is not supported")
        if fused and foreach:
            raise ValueError("SophiaH: fused=True and foreach=True cannot be set together; choose one")
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, update_period=update_period,
                        eps=eps, maximize=maximize, seed=seed, check_finite=check_finite, foreach=foreach,
                        fused=fused)
        super().__init__(params, defaults, process_group=process_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = check_betas("SophiaH", group["betas"])
        check_sophia_hyperparameters(lr=group["lr"], beta1=beta1, beta2=beta2, rho=group["rho"],
                                     weight_decay=group["weight_decay"], eps=group["eps"], caller="SophiaH")
        check_update_period("SophiaH", group["update_period"])

    def _update(self, work: list[dict[str, Any]]) -> None:
        for entry in work:
            group = entry["group"]
            products, probes = [], []
            for hz, z, diagonal in zip(entry["hessian_products"], entry["probes"], entry["diagonals"]):
                # an external diagonal wins over a Hutchinson estimate of the same step
                products.append(diagonal if diagonal is not None else hz)
                probes.append(None if diagonal is not None else z)
            # one multi-tensor call rather than one tiny op per parameter (a measurable share of a small step)
            torch._foreach_add_([state["step"] for state in entry["states"]], 1.0)
            beta1, beta2 = group["betas"]
            sophia(entry["params"], entry["grads"], [s["exp_avg"] for s in entry["states"]],
                   [s["hessian"] for s in entry["states"]], products, probes, lr=group["lr"], beta1=beta1,
                   beta2=beta2, rho=group["rho"], weight_decay=group["weight_decay"], eps=group["eps"],
                   maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"])


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
) -> None:
    """Functional Sophia step over lists, in place. ``hessian_products[i]`` is None for a parameter whose curvature
    is not refreshed this step; with ``probes[i]`` the estimate is ``probes[i]·hessian_products[i]``, without it
    ``hessian_products[i]`` is the estimate itself."""
    check_sophia_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, rho=rho, weight_decay=weight_decay, eps=eps,
                                 caller="sophia")
    path = choose_path(params, "fused_sophia_", foreach, fused)
    implementation = {"fused": fused_sophia_, "foreach": _multi_tensor_sophia, "single": fused_sophia_reference}[path]
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, rho=rho, weight_decay=weight_decay, eps=eps, maximize=maximize)
    keys = [(p.device, p.dtype, None if hz is None else hz.dtype, z is not None)
            for p, hz, z in zip(params, hessian_products, probes)]
    for (_, _, product_dtype, with_probes), index in group_indices(keys).items():
        implementation(select(params, index), select(grads, index), select(exp_avgs, index),
                       select(hessians, index), select(hessian_products, index) if product_dtype is not None else [],
                       select(probes, index) if with_probes else [], **hyper)


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
