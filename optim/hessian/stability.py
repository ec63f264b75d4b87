"""The stability limit of an optimizer's step, and the matrix whose top eigenvalue it bounds.

On a quadratic with Hessian H each of these steps is a linear recurrence, which diverges along an eigenvector whose
eigenvalue passes the limit (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability"; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"). An adaptive method divides
the gradient by a diagonal P from its state, which changes slowly next to the iterate: frozen at its current
value, the step is a fixed linear recurrence on P⁻¹H, so the limit is one for λ_max(P⁻¹H):

| ``lr_from`` | matrix | P | limit |
|---|---|---|---|
| a number η (gradient descent) | H | | 2/η |
| ``torch.optim.SGD``, ``optim.RiemannianSGD``, momentum β, dampening τ | H | | (2 + 2β) / (η(1 − τ)) |
| the same, Nesterov momentum β | H | | (2 + 2β) / (η(1 + 2β)) |
| ``torch.optim.Adam``/``AdamW``, ``optim.AdamW``, betas (β1, β2) | P⁻¹H | √v̂ + ε | (2 + 2β1) / (η(1 − β1)) |
| ``torch.optim.NAdam`` | P⁻¹H | √v̂ + ε | 2(1 + β1) / (η(a(1 + β1) + b(1 − β1))) |
| ``torch.optim.RAdam`` (rectified steps) | P⁻¹H | (√v + ε)/√(1 − β2ᵗ) | (2 + 2β1) / (η r (1 − β1)) |
| ``torch.optim.Adamax`` | P⁻¹H | u (its ∞-norm) | (2 + 2β1) / (η(1 − β1)) |
| ``torch.optim.RMSprop``, momentum μ | P⁻¹H | √(v − ḡ²) + ε | (2 + 2μ) / η |
| ``torch.optim.Adagrad``, lr_decay δ | P⁻¹H | √Σg² + ε | 2(1 + tδ)/η |
| ``optim.AdaHessian``, hessian_power k | P⁻¹H | (√v̂)ᵏ + ε | (2 + 2β1) / (η(1 − β1)) |
| ``optim.SophiaH`` (unclipped entries) | P⁻¹H | max(ρh, ε) | (2 + 2β1) / (η(1 − β1)) |
| any other optimizer with ``lr`` (and ``momentum``) | H | | (2 + 2β)/η, a reference only |

η, β, τ are those of ``param_groups[0]``; η is the lr the next step takes, the group's times the recovery factor of
an ``optim.Refactorizer`` on the optimizer while its LR ramp runs (it scales every group's lr inside the step). The
SGD rows come from the recurrence's characteristic polynomial at −1 (heavy ball: x ← x − η b, b ← βb + (1 − τ)g;
Nesterov: x ← x − η(g + βb)). The adaptive rows likewise, with g = Hx and P frozen: Adam's first moment m ← β1 m +
(1 − β1) g is heavy ball with dampening β1 on P⁻¹H, RMSprop's momentum buffer heavy ball without. NAdam's step η(a g
+ b m)/P takes a = (1 − μ_{t+1})/(1 − Π_{t+1}) and b = μ_{t+2}/(1 − Π_{t+1}μ_{t+2}) (μ its momentum schedule, Π the
product of the μ so far) of the next step t + 1; RAdam's the rectification r of the next step (its first steps,
while ρ_t ≤ 5, are unrectified SGD with Adam's momentum: P = 1 and r = 1 there); Adagrad's the decayed lr η/(1 + tδ)
of the next step (t steps taken). v̂ = v/(1 − β2^t) is the bias-corrected second moment (``max_exp_avg_sq`` with
``amsgrad``; AdaHessian's counts its curvature refreshes); the first moment's bias correction, which tends to 1, and
decoupled weight decay (a contraction of η·λ per step) are left out, as in Cohen et al. 2022. Left out too (their
entries of P⁻¹ are 0) are the entries no gradient has reached (v exactly 0, such as embedding rows of unseen tokens,
or whole parameters without state, an unused head: their first gradient resets P there), the moments reset since the
last step (an ``optim.Refactorizer``'s reset, in place or pending in ``optim.AdamW``), and SophiaH's clipped
entries, which move by ±η whatever H is. A parameter whose group (or whose own step count) gives it another step
size steps as if its P were scaled by the ratio, so P carries that factor too. P⁻¹H is measured as its symmetric
similar matrix P^(-1/2) H P^(-1/2) (:class:`ScaledOperator`): the same eigenvalues and trace.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

from ..fused.adamw import RESET_KEY
from ..lowrank.refactorizer import recovery_factor

__all__ = ["ScaledOperator", "check_lr_from", "is_preconditioned", "learning_rate_and_limit", "preconditioner"]


def _rate(value: Any) -> float | None:
    """``value`` as a float if it is a real number (a bool is not) or a 1-element real tensor, else None."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool and value.device.type != "meta"
        return float(value.detach().reshape(())) if ok else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


# The adaptive methods of the table: their limit is of P⁻¹H, P read from their state (see _denominator).
def _adaptive_kind(optimizer: Any) -> str | None:
    """Which row of the table ``optimizer`` is, for the optimizers that divide by a diagonal P; None for others."""
    from ..fused.adamw import AdamW
    from .adahessian import AdaHessian
    from .sophia import SophiaH

    kinds = (((torch.optim.Adam, AdamW), "adam"), (torch.optim.NAdam, "nadam"), (torch.optim.RAdam, "radam"),
             (torch.optim.Adamax, "adamax"), (torch.optim.RMSprop, "rmsprop"), (torch.optim.Adagrad, "adagrad"),
             (AdaHessian, "adahessian"), (SophiaH, "sophia"))
    return next((kind for classes, kind in kinds if isinstance(optimizer, classes)), None)


def is_preconditioned(optimizer: Any) -> bool:
    """Whether ``optimizer``'s limit is of the preconditioned P⁻¹H (an adaptive method of the table)."""
    return _adaptive_kind(optimizer) is not None


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


def _beta1(group: dict) -> float:
    betas = group.get("betas")
    beta1 = _rate(betas[0]) if isinstance(betas, (tuple, list)) and len(betas) == 2 else None
    if beta1 is None or not (0 <= beta1 < 1):
        raise ValueError(f"SharpnessMonitor: lr_from's param_groups[0]['betas'] must be (beta1, beta2) with "
                         f"beta1 in [0, 1) (the limit is (2 + 2*beta1)/(lr*(1 - beta1))), got {betas!r}")
    return beta1


def _momentum(kind: str, group: dict) -> float:
    """The setting that makes the recurrence, which every measured group must share: β1, or RMSprop's momentum."""
    if kind == "rmsprop":
        return _check_setting(group, "momentum", 0.0, None, "the limit is (2 + 2*momentum)/lr")
    return 0.0 if kind == "adagrad" else _beta1(group)


def _count(state: dict, key: str) -> float:
    value = state.get(key, 0.0)
    return float(_rate(value) or 0.0)


def _step_rate(kind: str, group: dict, state: dict) -> float:
    """The factor the next step of a parameter with ``state`` multiplies η by, as the limit's denominator reads it:
    η·rate·λ(P⁻¹H) < numerator. A parameter without state takes its first step next."""
    if kind in ("adam", "adamax", "adahessian", "sophia"):
        return 1.0 - _beta1(group)
    if kind == "rmsprop":
        return 1.0
    step = _count(state, "step")
    if kind == "adagrad":
        return 1.0 / (1.0 + step * float(_rate(group.get("lr_decay", 0.0)) or 0.0))
    beta1, beta2 = _beta1(group), float(_rate(group["betas"][1]))
    if kind == "nadam":
        decay = float(_rate(group.get("momentum_decay", 0.0)) or 0.0)
        mu = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * decay))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 2) * decay))
        product = _count(state, "mu_product") if "mu_product" in state else 1.0
        a = (1.0 - mu) / (1.0 - product * mu)
        b = mu_next / (1.0 - product * mu * mu_next)
        return (a * (1.0 + beta1) + b * (1.0 - beta1)) / (1.0 + beta1)
    rectification = _radam_rectification(beta2, step + 1)  # radam
    return (1.0 - beta1) * (rectification if rectification is not None else 1.0)


def _radam_rectification(beta2: float, step: float) -> float | None:
    """RAdam's r at ``step``, or None on its unrectified steps (ρ_t ≤ 5: an SGD step with Adam's momentum)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho = rho_inf - 2.0 * step * beta2 ** step / (1.0 - beta2 ** step)
    if rho <= 5.0:
        return None
    return math.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))


def _first_state(optimizer: torch.optim.Optimizer) -> dict:
    """The state of ``param_groups[0]``'s first parameter that has one ({} before the first step)."""
    return next((optimizer.state[p] for p in optimizer.param_groups[0]["params"] if optimizer.state.get(p)), {})


def _limit_settings(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """``(numerator, denominator factor)`` of the limit (numerator / (η · factor)) from ``param_groups[0]``."""
    group = optimizer.param_groups[0]
    kind = _adaptive_kind(optimizer)
    if kind is not None:
        momentum = _momentum(kind, group)
        numerator = 2.0 + 2.0 * momentum if kind != "nadam" else 2.0
        return numerator, _step_rate(kind, group, _first_state(optimizer))
    from ..stiefel.optimizers import RiemannianSGD

    beta = _check_setting(group, "momentum", 0.0, None, "the limit is (2 + 2*momentum)/lr")
    if isinstance(optimizer, (torch.optim.SGD, RiemannianSGD)):  # the same momentum, dampening and Nesterov
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


def _state_tensor(state: dict, key: str, name: str, owner: str) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"SharpnessMonitor: lr_from has no {key!r} for parameter {name!r} yet: {owner}'s "
                         "preconditioner exists after its first step, so call monitor.step(...) after "
                         "optimizer.step()")
    return value


def _denominator(kind: str, group: dict, state: dict, name: str, owner: str,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """P of the table for one parameter (float64 on ``device``) and the mask of its entries left out (or None)."""
    def read(key):  # a copy: P is computed in place, never in the optimizer's state
        return _state_tensor(state, key, name, owner).detach().to(device=device, dtype=torch.float64, copy=True)


    eps = float(_rate(group.get("eps", 0.0)) or 0.0)
    if kind in ("adam", "nadam", "radam"):
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        second, step = read(key), _state_tensor(state, "step", name, owner)
        beta2 = float(_rate(group["betas"][1]))
        correction = 1.0 - beta2 ** float(_rate(step))
        if kind == "radam":
            if _radam_rectification(beta2, float(_rate(step)) + 1.0) is None:
                return torch.ones_like(second), None
            return (second.sqrt() + eps) / math.sqrt(correction), second == 0
        return second.div(correction).sqrt_().add_(eps), second == 0
    if kind == "adamax":
        average = read("exp_avg")
        return read("exp_inf"), average == 0
    if kind == "rmsprop":
        second = read("square_avg")
        centered = second - read("grad_avg").square() if group.get("centered", False) else second
        return centered.clamp_min_(0.0).sqrt_().add_(eps), second == 0
    if kind == "adagrad":
        total = read("sum")
        return total.sqrt().add_(eps), total == 0
    if kind == "adahessian":
        second = read("exp_hessian_diag_sq")
        refreshes = float(_rate(_state_tensor(state, "hessian_step", name, owner)))
        if refreshes == 0:
            raise ValueError(f"SharpnessMonitor: lr_from has no curvature for parameter {name!r} yet: AdaHessian's "
                             "preconditioner exists after its first refresh, so call monitor.step(...) after "
                             "optimizer.step()")
        beta2 = float(_rate(group["betas"][1]))
        corrected = second.div(1.0 - beta2 ** refreshes).sqrt_()
        return corrected.pow_(float(_rate(group["hessian_power"]))).add_(eps), second == 0
    # sophia: p ← p − η clip(m / max(ρh, ε), 1); a clipped entry moves by ±η whatever H is
    denominator = read("hessian").mul_(float(_rate(group["rho"]))).clamp_min_(eps)
    return denominator, read("exp_avg").abs() >= denominator


def preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], names: Sequence[str],
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The flat (n,) diagonal of P^(-1/2) over ``params`` (in order) for an adaptive ``optimizer`` of the table,
    P_i carrying the ratio of parameter i's step size to param_groups[0]'s (``(η_g·rate_i)/(η·rate_0)``): see the
    module docstring. Raises ValueError naming the parameter when it is not in ``optimizer``, when there is no
    preconditioner yet (before the optimizer's first step; a parameter no gradient has reached since is left out),
    or when its group's β1 (RMSprop: momentum) is not param_groups[0]'s (no single limit then)."""
    kind = _adaptive_kind(optimizer)
    owner = type(optimizer).__name__
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    first = optimizer.param_groups[0]
    lr = float(_rate(first["lr"]))
    momentum = _momentum(kind, first)
    _, rate = _limit_settings(optimizer)
    setting = "momentum" if kind == "rmsprop" else "beta1"
    pieces, stepped = [], False
    for p, name in zip(params, names):
        group = groups.get(id(p))
        if group is None:
            raise ValueError(f"SharpnessMonitor: parameter {name!r} is measured but is not one of lr_from's "
                             "parameters, so it has no preconditioner; restrict the measurement to the "
                             "optimizer's parameters with param_filter")
        if _momentum(kind, group) != momentum:
            raise ValueError(f"SharpnessMonitor: parameter {name!r} is in a param group with {setting} "
                             f"{_momentum(kind, group):g} but param_groups[0] has {momentum:g}; the stability limit "
                             f"is one number for one {setting}: restrict the measurement to one group with "
                             "param_filter")
        state = optimizer.state.get(p, {})
        # Adagrad's state exists from the start, with step 0 and no gradient in it
        stepped = stepped or (bool(state) and (kind != "adagrad" or bool(_count(state, "step"))))
        pending = state.get(RESET_KEY)
        if not state or (isinstance(pending, torch.Tensor) and bool(pending)):
            # No state: no gradient has reached the parameter (an unused head, an expert never routed to); its first
            # one starts P there, as for an entry with v = 0. Before the optimizer's first step nothing has state:
            # that is refused below.
            # A pending reset: optim.AdamW restarts these moments inside its next step (a Refactorizer's reset).
            # Both are left out, as the zeroed moments of an in-place reset are (v = 0 below).
            pieces.append(torch.zeros(p.numel(), dtype=torch.float64, device=device))
            continue
        denominator, left_out = _denominator(kind, group, state, name, owner, device)
        # P^(-1/2) = sqrt(η_g rate_i / (η rate_0 P)): a group with lr 0 beside a moving one does not move (its rows
        # are 0); with η = 0 (the end of a schedule) the limit is infinite and P⁻¹H is measured as it is
        scale = (float(_rate(group["lr"])) / lr if lr > 0 else 1.0) * _step_rate(kind, group, state) / rate
        inverse_root = denominator.reciprocal_().mul_(scale).sqrt_()
        # left out (v = 0: no gradient has reached the entry yet, such as an embedding row of an unseen token, whose
        # first one resets P there; SophiaH's clipped entries): rather than weighted by 1/ε, which would make λ_max
        # that of the unseen rows
        if left_out is not None:
            inverse_root.masked_fill_(left_out, 0.0)
        pieces.append(inverse_root.reshape(-1))
    if names and not stepped:
        _state_tensor({}, "step", names[0], owner)
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
