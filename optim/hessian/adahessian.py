"""``optim.AdaHessian``: AdaHessian (Yao et al. 2021), Adam with the squared Hutchinson Hessian diagonal.

The elementwise step is the op ``optim::fused_adahessian_`` (math: ``optim/hessian/_ops.py``); this module adds the
optimizer class, the spatial averaging of the diagonal over convolution kernels, and its foreach path. The
closure protocol and the probes are ``second_order.py``'s.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .._validate import check_lr, check_nonnegative, scalar
from ._ops import check_adahessian_hyperparameters, fused_adahessian_, fused_adahessian_reference
from .second_order import SecondOrderOptimizer, check_betas, check_update_period, choose_path, group_indices, select

__all__ = ["AdaHessian", "adahessian", "spatially_averaged"]


def spatially_averaged(hessian_product: torch.Tensor) -> torch.Tensor:
    """D for a 4-D convolution kernel (out, in, kh, kw): the mean of |z⊙Hz| = |Hz| over (kh, kw), broadcast back
    to the kernel's shape (the paper's spatial averaging). Other shapes: Hz itself (only D² is used)."""
    if hessian_product.dim() != 4:
        return hessian_product
    return hessian_product.abs().mean(dim=(2, 3), keepdim=True).expand_as(hessian_product)


class AdaHessian(SecondOrderOptimizer):
    r"""AdaHessian: Adam whose second moment is the EMA of the squared Hessian-diagonal estimate.

    For each parameter p with gradient g (negated if ``maximize``), step count t, refresh count t_h, and
    D = |z⊙Hz| (averaged over the spatial dimensions of 4-D convolution kernels when ``spatial_average``)::

        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·D²                 on refresh steps (every ``update_period`` steps, from the first)
        p ← p·(1 − lr·weight_decay)
        p ← p − lr/(1 − β1ᵗ) · m / ((√v/√(1 − β2^t_h))ᵏ + eps)         k = hessian_power

    Since z = ±1, z⊙Hz has the magnitude of Hz, so the probe itself is not needed after the Hessian-vector product.
    The weight decay is decoupled, as in the authors' reference code (p − lr·(update + λ·p)).

    Closure protocol: as :class:`SophiaH` (``step(closure)``, the closure returns the loss without calling
    ``backward()``; ``hessian_diagonal=`` / :meth:`set_hessian_diagonal` for an external diagonal, used as D
    without spatial averaging).

    Example::

        opt = optim.AdaHessian(model.parameters(), lr=0.15, seed=0)
        for x, y in loader:
            loss = opt.step(lambda: F.cross_entropy(model(x), y))

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate (>= 0; a float or a 1-element Tensor). betas: (β1, β2) in [0, 1). eps: > 0 (added to the
            denominator; 0 would divide by zero where the curvature estimate is 0). The step of an entry is up to
            lr·|m|/eps where its estimate is 0, which a product computed under bfloat16 autocast gives wherever it
            cancels (measured: a first step 25× that of float32 on an MLP); raise eps there, or refresh in float32.
        weight_decay: decoupled weight decay λ >= 0.
        hessian_power: k in [0, 1].
        update_period: refresh the curvature every this many steps (int >= 1).
        spatial_average: average |Hz| over the spatial dimensions of 4-D (convolution) parameters.
        maximize, seed, check_finite, foreach, fused, process_group, hessian, loss_fn: as in :class:`SophiaH`
            (``process_group`` for data-parallel training: the optimizer averages its gradients and Hz over it;
            ``hessian="fd"``, the default under FSDP2: finite-difference Hz; ``"ggn"``/``"ggn-fd"`` with
            ``loss_fn``: the Gauss-Newton matrix instead of the Hessian, |z⊙Gz| averaged).

    State per parameter: ``step`` and ``hessian_step`` (CPU float32 counts), ``exp_avg`` (m) and
    ``exp_hessian_diag_sq`` (v), float32 for bf16/fp16 parameters.
    """

    _name = "AdaHessian"
    _state_dtype_keys = ("exp_avg", "exp_hessian_diag_sq")
    _count_keys = ("step", "hessian_step")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        *,
        update_period: int = 1,
        spatial_average: bool = True,
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
            raise ValueError("AdaHessian: fused=True and foreach=True cannot be set together; choose one")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
                        update_period=update_period, spatial_average=spatial_average, maximize=maximize, seed=seed,
                        check_finite=check_finite, foreach=foreach, fused=fused)
        super().__init__(params, defaults, process_group=process_group, hessian=hessian, loss_fn=loss_fn)

    def _check_group(self, group: dict[str, Any]) -> dict[str, float]:
        """The group's hyperparameters (numbers or 1-element Tensors; torch's messages first where torch has the
        same argument) as Python floats. eps must be > 0: with eps = 0 a parameter whose curvature estimate is 0
        divides by zero (the op refuses it too)."""
        beta1, beta2 = check_betas("AdaHessian", group["betas"])
        hyper = dict(lr=check_lr(group["lr"], "AdaHessian"), beta1=beta1, beta2=beta2,
                     weight_decay=check_nonnegative(group["weight_decay"], "weight_decay", "AdaHessian"),
                     eps=check_nonnegative(group["eps"], "eps", "AdaHessian", strict=True),
                     hessian_power=scalar(group["hessian_power"], "hessian_power", "AdaHessian"))
        check_adahessian_hyperparameters(**hyper, caller="AdaHessian")
        check_update_period("AdaHessian", group["update_period"])
        return hyper

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As every second-order optimizer checks a state dict, and each state's ``hessian_step`` (the refreshes)
        at most its ``step``: a step would refuse the pair after other groups had moved."""
        super()._check_state_dict(state_dict)
        for saved_id, saved in state_dict["state"].items():
            if isinstance(saved, dict) and "step" in saved and "hessian_step" in saved and \
                    float(saved["hessian_step"]) > float(saved["step"]):
                raise ValueError(f"AdaHessian.load_state_dict: the state of parameter {saved_id} has hessian_step "
                                 f"{float(saved['hessian_step']):g} > step {float(saved['step']):g}; the curvature "
                                 "is refreshed at most once per step: load a state dict AdaHessian saved")

    def _update(self, work: list[dict[str, Any]]) -> None:
        for entry in work:
            group = entry["group"]
            diagonals = []
            for hz, diagonal in zip(entry["hessian_products"], entry["diagonals"]):
                if diagonal is not None:
                    diagonals.append(diagonal)
                elif hz is not None:
                    diagonals.append(spatially_averaged(hz) if group["spatial_average"] else hz)
                else:
                    diagonals.append(None)
            states = entry["states"]
            step_counts = [state["step"] for state in states]
            refreshed = [state["hessian_step"] for state, diagonal in zip(states, diagonals) if diagonal is not None]
            if all(type(t) is torch.Tensor for t in step_counts + refreshed):
                # one op call per kind of count rather than an in-place add per parameter
                self._counts.add(step_counts, 1.0)
                if refreshed:
                    self._counts.add(refreshed, 1.0)
            else:
                for state, diagonal in zip(states, diagonals):
                    state["step"] += 1
                    if diagonal is not None:
                        state["hessian_step"] += 1
            read = self._counts.read  # the counts just written: no host read where the mirror knows them
            steps = [int(read(state["step"])) for state in states]
            hessian_steps = [int(read(state["hessian_step"])) for state in states]
            # the values step() checked (check_adahessian_hyperparameters among them), not checked again
            hyper = entry["hyper"] if entry.get("hyper") is not None else self._check_group(group)
            _adahessian(entry["params"], entry["grads"], [s["exp_avg"] for s in states],
                        [s["exp_hessian_diag_sq"] for s in states], diagonals, steps, hessian_steps, **hyper,
                        maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"])


def adahessian(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_hessian_diag_sqs: list[torch.Tensor],
    hessian_diagonals: list[torch.Tensor | None],
    steps: list[int],
    hessian_steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    hessian_power: float,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional AdaHessian step over lists, in place. ``hessian_diagonals[i]`` (D) is None for a parameter whose
    curvature is not refreshed; ``steps`` / ``hessian_steps`` are the counts after this step's increments."""
    check_adahessian_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                                     hessian_power=hessian_power, caller="adahessian")
    _adahessian(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, steps, hessian_steps, lr=lr,
                beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, hessian_power=hessian_power,
                maximize=maximize, foreach=foreach, fused=fused)


def _adahessian(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, steps, hessian_steps, *, lr, beta1,
                beta2, weight_decay, eps, hessian_power, maximize, foreach, fused) -> None:
    """:func:`adahessian` once its hyperparameters are checked (``AdaHessian`` checks them in ``_check_group``)."""
    # The counts of every call below, checked before the first: each call checks only its own.
    for i, (step, hessian_step) in enumerate(zip(steps, hessian_steps)):
        if not 1 <= hessian_step <= step:
            raise ValueError(f"adahessian: steps[{i}]={step} and hessian_steps[{i}]={hessian_step}: the counts after "
                             "this step's increments must satisfy 1 <= hessian_step <= step (the curvature is "
                             "refreshed at most once per step)")
    kinds = {(p.device, p.dtype) for p in params}
    path = choose_path(params, "fused_adahessian_", foreach, fused, devices={device for device, _ in kinds})
    implementation = {"fused": fused_adahessian_, "foreach": _multi_tensor_adahessian,
                      "single": fused_adahessian_reference}[path]
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, hessian_power=hessian_power,
                 maximize=maximize)
    if len(kinds) == 1 and _one_call(hessian_diagonals, steps, hessian_steps):
        # the usual case (one device and dtype, counts alike, no refresh): one call without a key per parameter
        implementation(params, grads, exp_avgs, exp_hessian_diag_sqs, [], step=steps[0],
                       hessian_step=hessian_steps[0], **hyper)
        return
    keys = [(p.device, p.dtype, None if d is None else d.dtype, t, t_h)
            for p, d, t, t_h in zip(params, hessian_diagonals, steps, hessian_steps)]
    for (_, _, diagonal_dtype, step, hessian_step), index in group_indices(keys).items():
        implementation(select(params, index), select(grads, index), select(exp_avgs, index),
                       select(exp_hessian_diag_sqs, index),
                       select(hessian_diagonals, index) if diagonal_dtype is not None else [], step=step,
                       hessian_step=hessian_step, **hyper)


def _one_call(hessian_diagonals, steps, hessian_steps) -> bool:
    """Whether every parameter falls in the same call of the loop in ``adahessian`` with no diagonal (given that
    they share one device and dtype)."""
    return (all(d is None for d in hessian_diagonals) and steps.count(steps[0]) == len(steps)
            and hessian_steps.count(hessian_steps[0]) == len(hessian_steps))


def _multi_tensor_adahessian(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, *, lr, beta1, beta2,
                             weight_decay, eps, hessian_power, step, hessian_step, maximize):
    """The foreach path: the op's step with ``torch._foreach_*`` ops over one device, dtype and pair of counts
    (checked by ``_adahessian``, its only caller)."""
    work_dtype = exp_avgs[0].dtype
    low_precision = params[0].dtype != work_dtype
    work_params = [p.to(work_dtype) for p in params] if low_precision else params
    work_grads = [g.to(work_dtype) for g in grads] if low_precision else grads
    if maximize:
        work_grads = torch._foreach_neg(work_grads)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, work_grads, alpha=1.0 - beta1)
    if hessian_diagonals:
        diagonals = [d.to(work_dtype) for d in hessian_diagonals]
        torch._foreach_mul_(exp_hessian_diag_sqs, beta2)
        torch._foreach_addcmul_(exp_hessian_diag_sqs, diagonals, diagonals, value=1.0 - beta2)
    torch._foreach_mul_(work_params, 1.0 - lr * weight_decay)
    denominators = torch._foreach_sqrt(exp_hessian_diag_sqs)
    torch._foreach_div_(denominators, math.sqrt(1.0 - beta2**hessian_step))
    if hessian_power != 1.0:
        torch._foreach_pow_(denominators, hessian_power)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(work_params, exp_avgs, denominators, value=-lr / (1.0 - beta1**step))
    if low_precision:
        torch._foreach_copy_(params, work_params)
