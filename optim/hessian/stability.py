"""The stability limit of an optimizer's step, and the matrix whose top eigenvalue it bounds.

On a quadratic with Hessian H each of these steps is a linear recurrence, which diverges along an eigenvector whose
eigenvalue passes the limit (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability"; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"):

| ``lr_from`` | matrix | limit |
|---|---|---|
| a number η (gradient descent) | H | 2/η |
| ``torch.optim.SGD``, momentum β, dampening τ | H | (2 + 2β) / (η(1 − τ)) |
| ``torch.optim.SGD``, Nesterov momentum β | H | (2 + 2β) / (η(1 + 2β)) |
| ``torch.optim.Adam``/``AdamW``, ``optim.AdamW``: betas (β1, β2), eps ε | P⁻¹H, P = diag(√v̂ + ε) | (2 + 2β1) / (η(1 − β1)) |
| any other optimizer with ``lr`` (and ``momentum``) | H | (2 + 2β)/η, a reference only |

η, β, τ are those of ``param_groups[0]``; η is the lr the next step takes, the group's times the recovery factor
of an ``optim.Refactorizer`` on the optimizer while its LR ramp runs (it scales every group's lr inside the step).
The SGD rows come from the recurrence's characteristic polynomial at −1 (heavy ball: x ← x − η b,
b ← βb + (1 − τ)g; Nesterov: x ← x − η(g + βb)). For Adam the preconditioner is frozen
at its current value, v̂ = v/(1 − β2^t) the bias-corrected second moment Adam divides by (``max_exp_avg_sq`` with
``amsgrad``); the first moment's bias correction, which tends to 1, and AdamW's decoupled weight decay (a
contraction of η·λ per step) are left out, as in Cohen et al. 2022, and so are the entries whose v is exactly 0
(never reached by a gradient, such as embedding rows of unseen tokens: their first gradient resets P there), and
with them the moments reset since the last step (an ``optim.Refactorizer``'s reset, in place or pending in
``optim.AdamW``). A parameter whose group has another lr η_g steps as if its P were scaled by η/η_g, so P
carries that factor too. P⁻¹H is measured as its symmetric similar
matrix P^(-1/2) H P^(-1/2) (:class:`ScaledOperator`): the same eigenvalues and trace.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

from ..fused.adamw import RESET_KEY
from ..lowrank.refactorizer import recovery_factor

__all__ = ["ScaledOperator", "adam_preconditioner", "check_lr_from", "is_adam", "learning_rate_and_limit"]


def _rate(value: Any) -> float | None:
    """``value`` as a float if it is a real number (a bool is not) or a 1-element real tensor, else None."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool and value.device.type != "meta"
        return float(value.detach().reshape(())) if ok else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def is_adam(optimizer: Any) -> bool:
    """Whether ``optimizer`` is Adam or AdamW (torch's or ours): its limit is of the preconditioned Hessian."""
    from ..fused.adamw import AdamW

    return isinstance(optimizer, (torch.optim.Adam, AdamW))


def _check_setting(group: dict, key: str, low: float, high: float | None, meaning: str) -> float:
    value = _rate(group.get(key, 0.0) or 0.0)
    if value is None or not (math.isfinite(value) and value >= low and (high is None or value < high)):
        bound = f"in [{low:g}, {high:g})" if high is not None else f">= {low:g}"
        raise ValueError(f"SharpnessMonitor: lr_from's param_groups[0]['{key}'] must be a finite number {bound} "
                         f"({meaning}), got {group.get(key)!r}")
    return value


def check_lr_from(lr_from: Any) -> None:
    """None, a learning rate (a finite number >= 0), or an optimizer whose first param group holds one and the
    settings its limit reads (momentum >= 0, dampening in [0, 1), Adam's beta1 in [0, 1))."""
    if lr_from is None:
        return
    if isinstance(lr_from, torch.optim.Optimizer):
        groups = lr_from.param_groups
        if not groups or "lr" not in groups[0]:
            raise ValueError("SharpnessMonitor: lr_from is an optimizer without a param group holding 'lr'; the "
                             "stability limit is read from param_groups[0]['lr']")
        lr = _rate(groups[0]["lr"])
        if lr is None or not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"SharpnessMonitor: lr_from's param_groups[0]['lr'] must be a finite number >= 0, got "
                             f"{groups[0]['lr']!r}")
        _limit_settings(lr_from)
        return
    lr = None if isinstance(lr_from, torch.Tensor) else _rate(lr_from)
    if lr is None:
        raise ValueError(f"SharpnessMonitor: lr_from must be an optimizer or a number (the learning rate), got a "
                         f"{type(lr_from).__name__}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"SharpnessMonitor: lr_from, the learning rate, must be a finite number >= 0, got "
                         f"{lr_from!r}")


def _limit_settings(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """``(numerator, denominator factor)`` of the limit (numerator / (η · factor)) from ``param_groups[0]``."""
    group = optimizer.param_groups[0]
    if is_adam(optimizer):
        betas = group.get("betas")
        beta1 = _rate(betas[0]) if isinstance(betas, (tuple, list)) and len(betas) == 2 else None
        if beta1 is None or not (0 <= beta1 < 1):
            raise ValueError(f"SharpnessMonitor: lr_from's param_groups[0]['betas'] must be (beta1, beta2) with "
                             f"beta1 in [0, 1) (the limit is (2 + 2*beta1)/(lr*(1 - beta1))), got {betas!r}")
        return 2.0 + 2.0 * beta1, 1.0 - beta1
    beta = _check_setting(group, "momentum", 0.0, None, "the limit is (2 + 2*momentum)/lr")
    if isinstance(optimizer, torch.optim.SGD):
        if group.get("nesterov", False):
            return 2.0 + 2.0 * beta, 1.0 + 2.0 * beta
        dampening = _check_setting(group, "dampening", 0.0, 1.0, "the limit is (2 + 2*momentum)/(lr*(1 - dampening))")
        return 2.0 + 2.0 * beta, 1.0 - dampening
    return 2.0 + 2.0 * beta, 1.0


def learning_rate_and_limit(lr_from: Any) -> tuple[float, float]:
    """The current lr (``param_groups[0]``'s) and the stability limit of the table above; NaN without lr_from."""
    if lr_from is None:
        return math.nan, math.nan
    if isinstance(lr_from, torch.optim.Optimizer):
        lr = float(_rate(lr_from.param_groups[0]["lr"])) * recovery_factor(lr_from)
        numerator, factor = _limit_settings(lr_from)
    else:
        lr, numerator, factor = float(lr_from), 2.0, 1.0
    return lr, numerator / (lr * factor) if lr > 0 else math.inf


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], names: Sequence[str],
                        dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The flat (n,) diagonal of P^(-1/2) over ``params`` (in order), P_i = (√v̂_i + ε_g) · η/η_g: see the module
    docstring. Raises ValueError naming the parameter when it is not in ``optimizer`` or has no second moment yet
    (before its first step), or when its group's beta1 is not param_groups[0]'s (no single limit then)."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    lr = float(_rate(optimizer.param_groups[0]["lr"]))
    beta1 = float(_rate(optimizer.param_groups[0]["betas"][0]))
    pieces = []
    for p, name in zip(params, names):
        group = groups.get(id(p))
        if group is None:
            raise ValueError(f"SharpnessMonitor: parameter {name!r} is measured but is not one of lr_from's "
                             "parameters, so it has no Adam preconditioner; restrict the measurement to the "
                             "optimizer's parameters with param_filter")
        if float(_rate(group["betas"][0])) != beta1:
            raise ValueError(f"SharpnessMonitor: parameter {name!r} is in a param group with beta1 "
                             f"{group['betas'][0]} but param_groups[0] has {beta1}; the stability limit is one number "
                             "for one beta1: restrict the measurement to one group with param_filter")
        state = optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        second, step = state.get(key), state.get("step")
        if not isinstance(second, torch.Tensor) or step is None:
            raise ValueError(f"SharpnessMonitor: lr_from has no {key!r} for parameter {name!r} yet: Adam's "
                             "preconditioner exists after its first step, so call monitor.step(...) after "
                             "optimizer.step()")
        pending = state.get(RESET_KEY)
        if isinstance(pending, torch.Tensor) and bool(pending):
            # optim.AdamW restarts these moments inside its next step (a Refactorizer's reset): left out, as the
            # zeroed moments of an in-place reset are (v = 0 below)
            pieces.append(torch.zeros(p.numel(), dtype=torch.float64, device=device))
            continue
        group_lr = float(_rate(group["lr"]))
        beta2 = float(_rate(group["betas"][1]))
        correction = 1.0 - beta2 ** float(_rate(step))
        second = second.detach().to(device=device, dtype=torch.float64)
        denominator = second.div(correction).sqrt_().add_(float(group["eps"]))
        # P^(-1/2) = sqrt(η_g / (η (√v̂ + ε))): a group with lr 0 beside a moving one does not move (its rows are
        # 0); with η = 0 (the end of a schedule) the limit is infinite and P⁻¹H is measured as it is
        scale = group_lr / lr if lr > 0 else 1.0
        inverse_root = denominator.reciprocal_().mul_(scale).sqrt_()
        # v = 0 exactly: no gradient has reached the entry yet (an embedding row of an unseen token). Its first one
        # resets P there (Adam's first step on it is ±η), so the frozen-P model does not apply: it is left out
        # rather than weighted by 1/ε, which would make λ_max that of the unseen rows.
        pieces.append(inverse_root.masked_fill_(second == 0, 0.0).reshape(-1))
    return torch.cat(pieces).to(dtype) if pieces else torch.empty(0, dtype=dtype, device=device)


class ScaledOperator:
    """``D H D`` for a symmetric operator H and a diagonal D = diag(d): symmetric, with the eigenvalues and trace of
    D²H (for D = P^(-1/2): those of P⁻¹H). ``d`` is flat (n,), in H's dtype and device."""

    def __init__(self, operator, d: torch.Tensor):
        self.operator, self.d = operator, d
        self.shape, self.dtype, self.device = operator.shape, operator.dtype, operator.device

    @property
    def num_matvecs(self) -> int:
        return self.operator.num_matvecs

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return (self.operator @ (v * self.d)) * self.d
