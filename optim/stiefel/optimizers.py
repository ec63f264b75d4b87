r"""Optimizers with orthogonality constraints: ``RSDM``, ``RiemannianSGD``, ``RiemannianAdam``.

Constrained parameters are marked by their param group, no Parameter subclass needed::

    opt = optim.RSDM([{"params": [W], "manifold": "stiefel"},          # or "grassmann"
                      {"params": [b], "manifold": None}], lr=1e-2, rank=64)

``manifold`` defaults to ``"stiefel"``; groups with ``manifold=None`` get the unconstrained update (SGD with
momentum for RSDM / RiemannianSGD, Adam for RiemannianAdam). geoopt's ``ManifoldParameter`` s place themselves, as
with geoopt's optimizers: ``optim.RiemannianAdam(model.parameters())`` constrains those on ``geoopt.Stiefel`` /
``EuclideanStiefel`` and steps every other tensor unconstrained (``manifold_groups``; the metric is the embedded
one whatever geoopt's class says, so trajectories differ from geoopt's canonical ``Stiefel``). A constrained tensor of shape (..., n, p) is a batch of
matrices with orthonormal columns (n >= p) or rows (n < p, the ``nn.Linear`` layout); it must be on the manifold
when the optimizer is built (``optim.stiefel.orthogonal_`` initializes one). Every step checks all gradients for
NaN/inf first (one host sync) and raises without touching any parameter or state.

State dicts hold tensors and Python ints only, so they round-trip through ``torch.load(weights_only=True)``; RSDM's
random row sets are a pure function of the per-parameter (seed, offset) kept in the state, so a resumed run draws
the same rows. ``lr`` is read from the group at every step, so ``torch.optim.lr_scheduler`` works.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from .._finite import first_nonfinite
from .._library import has_kernel, outside_autocast
from .._step_wrapper import LeanStepMixin
from .._validate import (StateSpec, check_betas, check_grad, check_group_params, check_group_settings,
                         check_incoming_state_dict, check_lr, check_nonnegative, check_param_state,
                         checked_groups, fill_group_defaults, install_state_dict_hooks, param_label, scalar)
from .._validate import check_unit_interval as _unit_interval
from ..fused.distributed import agree_over_mesh, check_row_sharded, gather_whole, is_dtensor
from ._ops import (CORES, FLOAT64_ROTATION_MIN_RANK, _core_reference, rotates_in_float64, rsdm_step_,
                   rsdm_step_reference)
from .sharded import rsdm_permutation_step_sharded_, whole_matrix_update_
from .manifold import (MANIFOLDS, RETRACTIONS, check_manifold_name, check_on_manifold, orient, project_tangent,
                       qr_sign_fixed_near_orthonormal, retract, riemannian_gradient)

__all__ = ["RSDM", "RiemannianAdam", "RiemannianSGD"]

SAMPLINGS = ("permutation", "orthogonal")
_RSDM_STEP_OP = rsdm_step_.default
SECOND_MOMENTS = ("element", "matrix")
_SEED_MODULUS = 1 << 63


def _check_lr(lr, caller: str) -> None:
    """A number or 1-element Tensor, finite and >= 0 (torch's message first)."""
    check_lr(lr, caller)


def _check_unit_interval(value, name: str, caller: str) -> None:
    _unit_interval(value, name, caller)


# The hyperparameters a step reads as Python floats (a Tensor lr or beta is read once per group and step).
_FLOAT_KEYS = ("lr", "momentum", "dampening", "eps")


def _check_reorthonormalize_every(value, caller: str) -> None:
    # a bool is an int to Python: True would mean "every step"
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{caller}: reorthonormalize_every must be None or an int >= 0 (0 = never), got {value!r}")


def _matrix_count(p: torch.Tensor) -> int:
    if p.dim() == 2:
        return 1 if p.numel() else 0
    return p.numel() // max(p.shape[-2] * p.shape[-1], 1) if p.shape[-2] * p.shape[-1] else 0


# float32 RSDM with the default period: every DEFECT_CHECK_EVERY steps the defect ‖X̃ᵀX̃ − I‖_F is estimated with
# DEFECT_PROBES Gaussian probes (about 4·N·P multiply-adds, against the N·P² of the QR) and X re-orthonormalized
# when the estimate passes DEFECT_ESTIMATE_LIMIT. The estimate is √(mean ‖(X̃ᵀX̃ − I)v‖²): its square is the
# squared defect times χ²₈/8, below a third of it with probability < 1e-3, so the defect stays under 1e-5.
DEFECT_CHECK_EVERY = 10
DEFECT_PROBES = 8
DEFECT_ESTIMATE_LIMIT = 3e-6


def float32_storage_defect(rows: int, columns: int) -> float:
    """‖X̃ᵀX̃ − I‖_F of an exactly orthonormal N×P matrix (N = rows >= P = columns) rounded to float32: each entry's
    rounding error is ~u·|x|/√3 (u = 2⁻²⁴) and independent, so the defect is ≈ 0.6·u·P/√N (measured 0.600–0.625
    from 64×256 to 1536×1536). No re-orthonormalization of a float32 matrix gets below it."""
    return 0.6 * 2.0 ** -24 * columns / max(rows, 1) ** 0.5


def defect_estimate_limit(x: torch.Tensor) -> float:
    """The estimate above which float32 X is re-orthonormalized: DEFECT_ESTIMATE_LIMIT, or twice X's storage
    floor where that is larger (square matrices beyond ~1700 columns), as a limit below the floor would run the QR at
    every check without lowering the defect. The defect then stays below max(1e-5, 6·floor)."""
    rows, columns = max(x.shape[-2:]), min(x.shape[-2:])
    return max(DEFECT_ESTIMATE_LIMIT, 2.0 * float32_storage_defect(rows, columns))


def defect_estimate(x: torch.Tensor, generator: torch.Generator) -> float:
    """An estimate of ‖X̃ᵀX̃ − I‖_F (the largest over a batch of matrices) from DEFECT_PROBES Gaussian probes, in
    float64."""
    xo = orient(x).double()
    probes = torch.randn(xo.shape[-1], DEFECT_PROBES, dtype=torch.float64, generator=generator).to(xo.device)
    residual = xo.mT @ (xo @ probes) - probes
    per_matrix = residual.square().sum(dim=(-2, -1)) / DEFECT_PROBES
    return float(per_matrix.max().sqrt()) if per_matrix.numel() else 0.0


def polar_step_max_defect(dtype: torch.dtype) -> float:
    """The defect ‖X̃ᵀX̃ − I‖_F below which the periodic re-orthonormalization takes one Newton–Schulz step toward the
    polar factor: 0.3·√ε of the dtype (float32 1.0e-4, float64 4.5e-9), so that what the step leaves, (3/4)·defect²,
    is a tenth of ε, below the parameter's rounding. The drift it removes is ~1e-6–1e-5 in float32 and ~1e-13 in
    float64 after the default periods. Larger defects take the Q factor."""
    return 0.3 * torch.finfo(dtype).eps ** 0.5


def _reorthonormalize_(p: torch.Tensor) -> None:
    """Remove p's accumulated drift off the manifold. Near it (defect E = X̃ᵀX̃ − I with ‖E‖_F at most
    ``polar_step_max_defect`` for every matrix, E formed in float64) by one Newton–Schulz step toward the polar
    factor, the nearest orthonormal matrix: X̃ ← X̃(3I − X̃ᵀX̃)/2 = X̃ − X̃E/2, with X̃E in p's dtype (E is tiny, so
    that product's rounding is ‖E‖ times X̃'s own); it costs the Gram matrix and one product, about half the CholeskyQR
    below (float32 on one CPU thread: 11 against 20 ms at 512×512, 1.3 against 2.4 ms at 1024×128, 1.7 against
    4.1 ms at 8×128×128). Otherwise by the sign-fixed Q factor of X̃ in float64 (CholeskyQR where X̃ is near the
    manifold, Householder where it is not)."""
    target = orient(p)
    wide = target.to(torch.float64)
    defect = wide.mT @ wide
    defect.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    if target.numel() and float(torch.linalg.matrix_norm(defect).max()) <= polar_step_max_defect(p.dtype):
        target.sub_(target @ defect.to(target.dtype), alpha=0.5)
        return
    target.copy_(qr_sign_fixed_near_orthonormal(wide))


# geoopt's manifolds by class name (geoopt.Stiefel is CanonicalStiefel): the Stiefel ones, and the unconstrained one
_GEOOPT_STIEFEL = ("CanonicalStiefel", "EuclideanStiefel", "EuclideanStiefelExact")
_NO_MANIFOLD = object()  # a tensor geoopt marks with nothing


def _geoopt_manifold(p: torch.Tensor, caller: str, index: int):
    """The group ``manifold`` a geoopt ``ManifoldParameter`` belongs to (``"stiefel"``, or None for
    ``geoopt.Euclidean``), or ``_NO_MANIFOLD`` for any other tensor."""
    manifold = getattr(p, "manifold", None)
    if manifold is None or not type(manifold).__module__.startswith("geoopt"):
        return _NO_MANIFOLD
    name = type(manifold).__name__
    if name in _GEOOPT_STIEFEL:
        return "stiefel"
    if name == "Euclidean":
        return None
    raise ValueError(f"{caller}: parameter {index} is a geoopt ManifoldParameter on {name}; these optimizers "
                     "handle the Stiefel manifold (geoopt.Stiefel, geoopt.EuclideanStiefel), Grassmann (a group "
                     "with manifold='grassmann') and unconstrained tensors: use geoopt's optimizer for it")


def manifold_groups(params, caller: str):
    """``params`` as torch's constructor takes them, with geoopt's ``ManifoldParameter`` s placed as geoopt's own
    optimizers place them: a group (or the plain list) without a ``"manifold"`` key that holds any is split by
    manifold, its Stiefel tensors constrained and every other tensor unconstrained (``manifold=None``), the
    group's other settings kept. Anything without geoopt tensors is returned as it is."""
    if isinstance(params, torch.Tensor):  # torch's own error names the mistake
        return params
    params = list(params)
    plain = not params or not isinstance(params[0], dict)
    split, changed = [], False
    for group in ([{"params": params}] if plain else params):
        tensors = group.get("params") if isinstance(group, dict) else None
        if not isinstance(group, dict) or "manifold" in group or tensors is None:
            split.append(group)
            continue
        # read once: a group's params may be a generator (model.parameters()), which the group must keep as a list
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        kinds = [_geoopt_manifold(p, caller, i) for i, p in enumerate(tensors)]
        if all(kind is _NO_MANIFOLD for kind in kinds):
            group["params"] = tensors  # in place, as torch's add_param_group stores the caller's dict
            split.append(group)
            continue
        changed = True
        by_manifold: dict[str | None, list[torch.Tensor]] = {}
        for p, kind in zip(tensors, kinds):
            by_manifold.setdefault(None if kind is _NO_MANIFOLD else kind, []).append(p)
        split.extend({**group, "params": members, "manifold": manifold} for manifold, members in by_manifold.items())
    if plain and not changed:
        return params
    return split


class _ManifoldOptimizer(LeanStepMixin, Optimizer):
    """Param-group validation, the finite-gradient check and the step loop shared by the three optimizers."""

    _name = "optim.stiefel"

    def __init__(self, params, defaults: dict[str, Any]):
        super().__init__(manifold_groups(params, self._name), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` after checking the whole group: its manifold, hyperparameters and every
        parameter (a Tensor listed once, floating point, on the manifold for constrained groups)."""
        params = check_group_params(param_group, self._name, dtype_ok=lambda p: p.is_floating_point(),
                                    dtypes_text="floating-point")
        manifold = param_group.get("manifold", self.defaults.get("manifold", "stiefel"))
        if "manifold" not in param_group:  # geoopt tensors added later place themselves too, one kind per group
            placed = manifold_groups([{**param_group, "params": params}], self._name)
            if len(placed) > 1:
                raise ValueError(f"{self._name}: the param group mixes geoopt ManifoldParameters on a Stiefel "
                                 "manifold with unconstrained tensors; add_param_group adds one group: add them as "
                                 "two, or give the group a 'manifold'")
            manifold = placed[0].get("manifold", manifold)
        check_manifold_name(manifold, self._name)
        check_finite = param_group.get("check_finite", self.defaults.get("check_finite", True))
        if not isinstance(check_finite, bool):
            raise ValueError(f"{self._name}: check_finite must be True or False, got {check_finite!r}")
        self._check_whole_group({**self.defaults, **param_group, "manifold": manifold}, params)
        if manifold is not None:
            check_row_sharded(params, caller=self._name,
                              why="a constrained parameter under FSDP2 is stepped (optim.stiefel.sharded)")
            for i, p in enumerate(params):
                label = param_label(param_group, i)
                if p.device.type == "meta":  # no values: whether it is on the manifold cannot be checked
                    raise ValueError(f"{self._name}: {label} of the group is a meta tensor; a constrained "
                                     "parameter must be on the manifold when the optimizer is built: materialize "
                                     "it (model.to_empty(device=...), then optim.stiefel.orthogonal_) first")
                check_on_manifold(gather_whole(p.detach()), caller=self._name, name=f"{label} of the group")
        param_group.setdefault("manifold", manifold)
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Hyperparameters of a group (the keys may be missing: defaults are filled in afterwards)."""

    def _check_whole_group(self, group: dict[str, Any], params: list[torch.Tensor], index: int | None = None) -> None:
        """Everything a step reads from a group, in one place for ``add_param_group``, ``load_state_dict`` and every
        step: its settings (all present, bools where bools belong), its manifold's name and the class's
        hyperparameters."""
        defaults = self.__dict__.get("defaults", group)  # in __init__, before torch's constructor stores them
        check_group_settings(group, defaults, self._name,
                             where="the param group" if index is None else f"param group {index}")
        check_manifold_name(group["manifold"], self._name)
        self._check_group(group, params)

    def _state_spec(self, group: dict[str, Any]) -> StateSpec:
        """The per-parameter state a group's parameters keep (checked at load and at each step)."""
        return StateSpec({"step": "int"}, {"momentum_buffer": "param"})

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load pre hook: the whole incoming state (the class that saved it, every group's values, every
        parameter's state keys, shapes and counts) is checked before anything is replaced."""
        check_incoming_state_dict(self, state_dict, self._name, check_group=self._check_loaded_group,
                                  spec_of=self._state_spec)

    def _check_loaded_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_whole_group(group, params)

    def _after_state_dict_loaded(self, state_dict: dict[str, Any]) -> None:
        """torch's load post hook (nothing to convert: torch's casts keep this state's dtypes)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        fill_group_defaults(self)
        install_state_dict_hooks(self)

    def _check_gradients(self) -> list[dict[str, Any]]:
        """Everything a step touches, before it touches anything: every group's values, every gradient (dense, the
        parameter's shape and dtype, finite unless check_finite=False) and every existing state. Returns the groups
        as the update reads them (Tensor hyperparameters as floats)."""
        grads, where = [], []
        # every group's values (re-checked only where one changed) and the group as the update reads them
        work = checked_groups(self, self._checked_group, shapes=True)
        for g_index, group in enumerate(self.param_groups):
            spec = self._state_spec(group)
            checked = group.get("check_finite", True)  # groups of state dicts saved before the option: on
            for p_index, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                # check_grad's conditions inline (a single-matrix step is mostly this kind of Python); the call,
                # and the message naming the parameter, only when one of them fails
                if not (grad.layout == torch.strided and grad.shape == p.shape and grad.dtype == p.dtype
                        and grad.device == p.device):
                    check_grad(self._name, f"parameter {p_index} of param group {g_index}", p)
                state = self.state.get(p)
                if state:
                    check_param_state(f"{self._name}.step", f"the state of parameter {p_index} of param group "
                                      f"{g_index}", p, state, spec, values=False)
                if not checked:
                    continue
                grads.append(grad)
                where.append((g_index, p_index))
        if not grads:
            return work
        # One fused reduction per device and one host sync (optim._finite), instead of a boolean copy of every
        # gradient: the check was half of a small RSDM step's time.
        index = first_nonfinite(grads)
        if index is not None:
            g_index, p_index = where[index]
            shape = tuple(grads[index].shape)
            raise ValueError(
                f"{self._name}: the gradient of parameter {p_index} of param group {g_index} (shape {shape}) has NaN "
                "or inf entries; no parameter or state was changed. Skip this step (torch.amp.GradScaler does that "
                "for you), clip the gradients, or lower the learning rate")
        return work

    def _checked_group(self, group: dict[str, Any], index: int) -> dict[str, Any]:
        self._check_whole_group(group, group["params"], index)
        return self._float_group(group)

    @staticmethod
    def _float_group(group: dict[str, Any]) -> dict[str, Any]:
        """The group with Tensor hyperparameters read as Python floats (the ops take floats)."""
        if not any(isinstance(group.get(key), torch.Tensor) for key in _FLOAT_KEYS) and not (
                "betas" in group and any(isinstance(b, torch.Tensor) for b in group["betas"])):
            return group
        work = dict(group)
        for key in _FLOAT_KEYS:
            if isinstance(work.get(key), torch.Tensor):
                work[key] = scalar(work[key], key, "optim.stiefel")
        if "betas" in work:
            work["betas"] = tuple(scalar(b, f"betas[{i}]", "optim.stiefel") for i, b in enumerate(work["betas"]))
        return work

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with outside_autocast():  # the update in the parameters' precision, in or out of an autocast region
            self._update(self._check_gradients())  # everything is validated before anything changes
        return loss

    def _update(self, work) -> None:
        """Steps every parameter with a gradient of the checked groups ``work``."""
        for group in work:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(group, p, state)
                state["step"] += 1
                if group["manifold"] is None:
                    self._plain_update(group, p, state)
                else:
                    if is_dtensor(p):  # FSDP2: sharded by rows
                        self._sharded_manifold_update(group, p, state)
                    else:
                        self._manifold_update(group, p, state)
                    every = self._reorthonormalize_period(group, p)
                    if every and state["step"] % every == 0 and self._drifted(group, p, state):
                        whole_matrix_update_(p, {}, lambda x, _: _reorthonormalize_(x))

    def _reorthonormalize_period(self, group, p) -> int:
        return group["reorthonormalize_every"] or 0

    def _drifted(self, group, p, state) -> bool:
        """Whether a re-orthonormalization due by the period runs (always, unless a subclass measures)."""
        return True

    def _sharded_manifold_update(self, group, p, state) -> None:
        """The step of a row-sharded DTensor ``p``: by default on the all-gathered whole matrix (see
        :mod:`optim.stiefel.sharded`)."""
        whole_matrix_update_(p, state, lambda x, whole_state: self._manifold_update(group, x, whole_state))

    def _init_state(self, group, p, state) -> None:
        state["step"] = 0

    def _sgd_plain_update(self, group, p, state) -> None:
        """torch.optim.SGD's update (momentum, dampening, nesterov, maximize) for an unconstrained parameter."""
        grad = -p.grad if group["maximize"] else p.grad
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1.0 - group.get("dampening", 0.0))
            grad = grad.add(buf, alpha=momentum) if group.get("nesterov", False) else buf
        p.add_(grad, alpha=-group["lr"])


class RSDM(_ManifoldOptimizer):
    r"""Randomized Riemannian submanifold descent (Han, Poirion & Takeda, ICML 2025) on St(n, p) / Gr(n, p).

    Every step moves each constrained matrix X (oriented N×P, N >= P) by an orthogonal matrix that is the identity
    except on a random r-dimensional subspace spanned by the rows of P_r (r×N)::

        Ω = skew((P_r D)(P_r X)ᵀ) ∈ so(r),   Y = core(−lr·Ω) ∈ SO(r),   X ← X + P_rᵀ(Y − I)(P_r X)

    with D the Euclidean gradient (or the momentum buffer). ``sampling="permutation"``: P_r selects r random rows
    I (drawn without replacement from (seed, offset) by ``optim::rsdm_sample_rows_``) and the step is X_I ← Y X_I,
    one fused op (``optim::rsdm_step_``) costing O(r²P + r³) and touching r rows only. ``sampling="orthogonal"``:
    P_r has r Haar-random orthonormal rows (QR of an N×r Gaussian from a ``torch.Generator`` seeded by
    (seed, offset)), plain PyTorch, O(NPr). ``core``: ``"qr"`` (Q of I − lrΩ, diag(R) > 0, the paper's choice),
    ``"cayley"`` ((I + lrΩ/2)⁻¹(I − lrΩ/2)) or ``"exp"`` (e^{−lrΩ}).

    Momentum (``momentum`` = μ > 0): a buffer B in the ambient space, B ← μB + G, is used in place of G, and after
    each step it is *transported with X by the same rotation*: B ← B + P_rᵀ(Y − I)(P_r B) (B_I ← Y B_I for
    permutation sampling). The left action of O(N) maps tangent vectors at X to tangent vectors at the new X
    isometrically (XᵀB is unchanged), costs what the step costs, and keeps Ω equivariant: rotating the problem
    rotates the iterates.

    Grassmann groups take the same steps (the update X ← QX commutes with X → XR, so the quotient iterates agree);
    the manifold name only changes what the utilities of ``optim.stiefel`` measure.

    Drift: each step is an exact rotation in exact arithmetic; rounding makes ‖XᵀX − I‖ grow slowly, so every
    ``reorthonormalize_every`` steps (0 = never) X is re-orthonormalized: one Newton–Schulz step toward its polar factor
    (the nearest orthonormal matrix) where ‖XᵀX − I‖_F <= 0.3·√ε (float32: 1e-4), else the Q factor (sign-fixed,
    float64). The default (``None``) keeps the defect ‖XᵀX − I‖_F below 1e-5 in float32: the float32 drift grows with r
    (a step rounds r-term products into r rows; measured over 1000 PCA steps on 64×256, every 100 steps: 1.9e-6 at r =
    8, 8.3e-6 at r = 32, 2.9e-5 at r = 64, 5.6e-5 at r = 128), so for float32 matrices rotated in float32 the defect is
    estimated every 10 steps (8 Gaussian probes, ~8·N·P multiply-adds, far less than the QR's N·P²) and X is
    re-orthonormalized when the estimate passes 3e-6; float64 matrices, and float32 ones whose rotation is computed in
    float64 (r > 128; with permutation sampling on the CPU also r >= 24 for the qr and cayley cores, and matrices
    with 2·P >= N, whose float32 rotation drifts ~6e-6 in 10 steps at r = 64; see ``rotates_in_float64``), every
    100 steps. Storing an orthonormal N×P matrix in float32 alone leaves a defect of
    ≈ 0.6·2⁻²⁴·P/√N (8e-7 at 512×512, 2.3e-6 at 4096×4096): where twice that exceeds 3e-6 the limit is twice that, and
    the defect stays below 6 times it.

    Args:
        params: parameters or param groups (keys: any argument below, plus ``manifold``).
        lr: step size (>= 0). rank: r, 1 <= r <= N = max(n, p) of every constrained parameter of the group.
        sampling, core: see above. momentum: μ in [0, 1). seed: int >= 0 (None: drawn from torch's global RNG,
        so ``torch.manual_seed`` makes runs reproducible). maximize: ascend. check_finite: before anything changes,
        raise if a gradient has NaN or inf entries (one reduction and one host sync per step; ``False`` skips it,
        e.g. under ``torch.amp.GradScaler``, which skips such steps itself, or to keep a GPU loop free of syncs).
    Unconstrained groups (``manifold=None``) get SGD with the same lr and momentum.
    """

    _name = "optim.RSDM"

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-2, *,
                 rank: int, sampling: str = "permutation", core: str = "qr", momentum: float = 0.0,
                 reorthonormalize_every: int | None = None, seed: int | None = None, maximize: bool = False,
                 manifold: str | None = "stiefel", check_finite: bool = True):
        self._seed_drawn = seed is None
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        defaults = dict(lr=lr, rank=rank, sampling=sampling, core=core, momentum=momentum,
                        reorthonormalize_every=reorthonormalize_every, seed=seed, maximize=maximize,
                        manifold=manifold, check_finite=check_finite)
        self._check_whole_group(defaults, [])
        super().__init__(params, defaults)
        install_state_dict_hooks(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The base class's checks and, for a group with FSDP2-sharded (DTensor) constrained parameters, one seed on
        every rank of their mesh: the first rank's where it was drawn (``seed=None``), an error on every rank where
        given seeds differ. The ranks must sample the same rows and directions: each gathers and steps its part of
        the same ones (``optim.stiefel.sharded``)."""
        if not isinstance(param_group, dict) or not isinstance(self.defaults.get("seed"), int):
            super().add_param_group(param_group)  # the base class's errors
            return
        manifold = param_group.get("manifold", self.defaults.get("manifold", "stiefel"))
        params = param_group.get("params", [])
        if not isinstance(params, (torch.Tensor, list, tuple, set)):  # a generator is read once, here (as torch's
            param_group["params"] = params = list(params)              # add_param_group does, in place)
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        sharded = [p for p in params if is_dtensor(p)] if manifold is not None else []
        if sharded:
            if "seed" in param_group:
                self._check_group(param_group, [])  # a malformed seed raises its own message first
            given = "seed" in param_group or not self._seed_drawn
            seed = param_group.get("seed", self.defaults["seed"])
            (seed,) = agree_over_mesh([seed], sharded[0].device_mesh, sharded[0].to_local().device, given=given,
                                      caller=self._name, why="each rank would sample other rows of the sharded "
                                                             "matrices, and the rows gathered from the ranks would "
                                                             "not belong together")
            param_group["seed"] = seed
        super().add_param_group(param_group)

    def _check_group(self, group, params) -> None:
        name = self._name
        if "lr" in group:
            _check_lr(group["lr"], name)
        if "momentum" in group:
            _check_unit_interval(group["momentum"], "momentum", name)
        if "sampling" in group and group["sampling"] not in SAMPLINGS:
            raise ValueError(f"{name}: sampling must be one of {SAMPLINGS}, got {group['sampling']!r}")
        if "core" in group and group["core"] not in CORES:
            raise ValueError(f"{name}: core must be one of {CORES}, got {group['core']!r} (the core always runs in "
                             "the parameter's dtype, float32 or float64)")
        if "reorthonormalize_every" in group:
            _check_reorthonormalize_every(group["reorthonormalize_every"], name)
        if "seed" in group and not (isinstance(group["seed"], int) and group["seed"] >= 0):
            raise ValueError(f"{name}: seed must be an int >= 0 or None, got {group['seed']!r}")
        rank = group.get("rank", self.defaults.get("rank") if hasattr(self, "defaults") else None)
        if rank is None:
            return
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"{name}: rank must be an int >= 1, got {rank!r}")
        if group.get("manifold", "stiefel") is None:
            return
        for i, p in enumerate(params):
            if p.dim() >= 2 and rank > max(p.shape[-2:]):
                raise ValueError(f"{name}: rank={rank} is larger than N = max(n, p) = {max(p.shape[-2:])} of "
                                 f"parameter {i} (shape {tuple(p.shape)}); use 1 <= rank <= {max(p.shape[-2:])}")

    def _reorthonormalize_period(self, group, p) -> int:
        every = group["reorthonormalize_every"]
        if every is not None:
            return every
        return DEFECT_CHECK_EVERY if self._measures_drift(group, p) else 100

    @staticmethod
    def _measures_drift(group, p) -> bool:
        """float32 under the default period, where the rotation itself is float32 (see ``rotates_in_float64``)."""
        if group["reorthonormalize_every"] is not None or p.dtype != torch.float32:
            return False
        rows, columns = max(p.shape[-2:]), min(p.shape[-2:])
        if group["sampling"] == "permutation":
            return not rotates_in_float64(p.dtype, group["rank"], rows, columns, p.device, core=group["core"])
        return group["rank"] < FLOAT64_ROTATION_MIN_RANK

    def _drifted(self, group, p, state) -> bool:
        if not self._measures_drift(group, p):
            return True
        generator = torch.Generator().manual_seed((state["seed"] + state["step"]) % _SEED_MODULUS)
        return defect_estimate(gather_whole(p.detach()), generator) > defect_estimate_limit(p)

    def _state_spec(self, group: dict[str, Any]) -> StateSpec:
        if group.get("manifold", "stiefel") is None:
            return StateSpec({"step": "int"}, {"momentum_buffer": "param"})
        required = {"step": "int", "seed": "int", "offset": "int"}
        if group.get("momentum"):
            return StateSpec({**required, "momentum_buffer": "param"})
        return StateSpec(required, {"momentum_buffer": "param"})

    def _init_state(self, group, p, state) -> None:
        super()._init_state(group, p, state)
        if group["manifold"] is None:
            return
        ordinal = sum(1 for _ in self.state) - 1  # parameters with state so far: distinct streams per parameter
        state["seed"] = (group["seed"] + 0x9E3779B97F4A7C15 * (ordinal + 1)) % _SEED_MODULUS
        state["offset"] = 0
        if group["momentum"]:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _plain_update(self, group, p, state) -> None:
        self._sgd_plain_update(group, p, state)

    def _sharded_manifold_update(self, group, p, state) -> None:
        if group["sampling"] == "permutation":  # only the sampled rows move: gathered, not the matrix
            self._manifold_update(group, p, state)
        else:
            super()._sharded_manifold_update(group, p, state)

    def _manifold_update(self, group, p, state) -> None:
        lr = -group["lr"] if group["maximize"] else group["lr"]
        momentum = group["momentum"]
        if momentum:
            direction = state["momentum_buffer"]
            direction.mul_(momentum).add_(p.grad)
        else:
            direction = p.grad
        rank, core = group["rank"], group["core"]
        if group["sampling"] == "permutation" and is_dtensor(p):
            rsdm_permutation_step_sharded_(p, direction, rank=rank, seed=state["seed"], offset=state["offset"],
                                           lr=lr, core=core, transport=bool(momentum))
            state["offset"] += _matrix_count(p) * rank
        elif group["sampling"] == "permutation":
            # the overload itself: the packet's Python __call__ (fake-object and dispatch checks) cost more than
            # the checks of the step on a small matrix
            step = _RSDM_STEP_OP if has_kernel("rsdm_step_", p.device) else rsdm_step_reference
            step(p, direction, None, rank=rank, seed=state["seed"], offset=state["offset"], lr=lr, core=core,
                 transport=bool(momentum))
            state["offset"] += _matrix_count(p) * rank
        else:
            generator = torch.Generator(device=p.device)
            generator.manual_seed((state["seed"] + 0x9E3779B97F4A7C15 * state["offset"]) % _SEED_MODULUS)
            orthogonal_sampling_step_(p, direction, rank=rank, lr=lr, core=core, generator=generator,
                                      transport=bool(momentum))
            state["offset"] += 1


@torch.no_grad()
def orthogonal_sampling_step_(x: torch.Tensor, direction: torch.Tensor, *, rank: int, lr: float, core: str,
                              generator: torch.Generator | None = None, transport: bool = False) -> None:
    """One RSDM step with orthogonal sampling, in place: X ← X + P_rᵀ(Y − I)(P_r X), P_r Haar (r×N) per matrix.

    ``direction`` (G or a momentum buffer, shape of x) gets the same rotation when ``transport`` is set.
    """
    xo, do = orient(x), orient(direction)
    n_rows = xo.shape[-2]
    gaussian = torch.randn(*xo.shape[:-2], n_rows, rank, dtype=x.dtype, device=x.device, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    basis = q * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(-2)  # N×r, = P_rᵀ
    px = basis.mT @ xo
    pd = basis.mT @ do
    a = pd @ px.mT
    y = _core_reference(-lr * 0.5 * (a - a.mT), core)
    y.diagonal(dim1=-2, dim2=-1).sub_(1.0)  # Y − I
    xo.add_(basis @ (y @ px))
    if transport:
        do.add_(basis @ (y @ pd))


class RiemannianSGD(_ManifoldOptimizer):
    r"""Riemannian gradient descent with momentum and a full retraction, on St(n, p) or Gr(n, p).

    For a constrained X with Euclidean gradient G (negated if ``maximize``)::

        ξ = grad F(X)          Stiefel: G − X sym(XᵀG) (Euclidean metric); Grassmann: G − X XᵀG
        B ← μB + (1 − dampening)ξ     (B = ξ on the first step)
        D = ξ + μB if nesterov else B
        X ← R_X(−lr·D)                ``retraction``: "qr" | "cayley" | "polar" (see optim.stiefel.manifold)
        B ← P_X(B)                    momentum transported by projection onto the new tangent space

    QR and polar retractions re-normalize X at every step; the Cayley retraction is an exact rotation that keeps
    whatever drift X had, so with ``reorthonormalize_every=None`` (default) it is re-orthonormalized every 100 steps
    and the other two never. Unconstrained groups (``manifold=None``) get ``torch.optim.SGD``'s update.
    ``check_finite`` as in :class:`RSDM`.
    """

    _name = "optim.RiemannianSGD"

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, *, retraction: str = "qr", reorthonormalize_every: int | None = None,
                 maximize: bool = False, manifold: str | None = "stiefel", check_finite: bool = True):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, retraction=retraction,
                        reorthonormalize_every=reorthonormalize_every, maximize=maximize, manifold=manifold,
                        check_finite=check_finite)
        self._check_whole_group(defaults, [])
        super().__init__(params, defaults)
        install_state_dict_hooks(self)

    def _check_group(self, group, params) -> None:
        name = self._name
        if "lr" in group:
            _check_lr(group["lr"], name)
        if "momentum" in group:
            _check_unit_interval(group["momentum"], "momentum", name)
        if "dampening" in group:
            _check_unit_interval(group["dampening"], "dampening", name)
        if group.get("nesterov") and (group.get("momentum", 0.0) <= 0 or group.get("dampening", 0.0) != 0):
            raise ValueError(f"Nesterov momentum requires a momentum and zero dampening ({name}: nesterov=True "
                             "requires momentum > 0 and dampening = 0)")
        if "retraction" in group and group["retraction"] not in RETRACTIONS:
            raise ValueError(f"{name}: retraction must be one of {RETRACTIONS}, got {group['retraction']!r}")
        if "reorthonormalize_every" in group:
            _check_reorthonormalize_every(group["reorthonormalize_every"], name)

    def _reorthonormalize_period(self, group, p=None) -> int:
        every = group["reorthonormalize_every"]
        if every is None:
            return 100 if group["retraction"] == "cayley" else 0
        return every

    def _plain_update(self, group, p, state) -> None:
        self._sgd_plain_update(group, p, state)

    def _manifold_update(self, group, p, state) -> None:
        grad = -p.grad if group["maximize"] else p.grad
        manifold = group["manifold"]
        xi = riemannian_gradient(p, grad, manifold=manifold)
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = xi.clone(memory_format=torch.contiguous_format)
            else:
                buf.mul_(momentum).add_(xi, alpha=1.0 - group["dampening"])
            xi = xi.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.copy_(retract(p, -group["lr"] * xi, method=group["retraction"]))
        if momentum:
            buf.copy_(project_tangent(p, buf, manifold=manifold))


class RiemannianAdam(_ManifoldOptimizer):
    r"""Riemannian Adam (Bécigneul & Ganea, ICLR 2019) with a full retraction, on St(n, p) or Gr(n, p).

    For a constrained X with Euclidean gradient G (negated if ``maximize``) and step count t::

        ξ = grad F(X)                      (as in RiemannianSGD)
        m ← β1·m + (1 − β1)·ξ
        v ← β2·v + (1 − β2)·ξ⊙ξ            second_moment="element": one v per entry, in the ambient coordinates
        v ← β2·v + (1 − β2)·‖ξ‖²_F         second_moment="matrix": one v per matrix (the paper's, and geoopt's)
        D = P_X( m/(1 − β1ᵗ) / (√(v/(1 − β2ᵗ)) + eps) )     (elementwise scaling leaves the tangent space: project)
        X ← R_X(−lr·D);   m ← P_X(m)      (first moment transported by projection; v is not a tangent vector)

    ``second_moment``: ``"element"`` (the default) scales each entry like Adam; it is not invariant under
    rotations of the ambient space (the paper's point: on a manifold "coordinates" of the embedding have no
    intrinsic meaning) but adapts to entries of very different gradient scale, and it is what this optimizer did
    before the option existed, so earlier runs and checkpoints resume on the same trajectory. ``"matrix"`` is the
    paper's and geoopt's ``RiemannianAdam``: a scalar per matrix (state ``exp_avg_sq`` of shape (..., 1, 1)), which
    keeps D tangent and the method rotation-equivariant. The two can end far apart at the same lr (on a 200×20 PCA
    the trajectories differed by 5.3): choose one and tune lr for it. Unconstrained groups (``manifold=None``) get
    Adam's elementwise update (no weight decay) with either setting.

    Retraction and re-orthonormalization as in ``RiemannianSGD``. ``check_finite`` as in :class:`RSDM`.
    """

    _name = "optim.RiemannianAdam"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *,
                 retraction: str = "qr", reorthonormalize_every: int | None = None, maximize: bool = False,
                 manifold: str | None = "stiefel", check_finite: bool = True, second_moment: str = "element"):
        defaults = dict(lr=lr, betas=betas, eps=eps, retraction=retraction,
                        reorthonormalize_every=reorthonormalize_every, maximize=maximize, manifold=manifold,
                        check_finite=check_finite, second_moment=second_moment)
        self._check_whole_group(defaults, [])
        super().__init__(params, defaults)
        install_state_dict_hooks(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("second_moment", "element")  # state dicts saved before the option

    def _matrix_moment(self, group) -> bool:
        return group.get("manifold", "stiefel") is not None and group.get("second_moment", "element") == "matrix"

    def _state_spec(self, group: dict[str, Any]) -> StateSpec:
        return StateSpec({"step": "int", "exp_avg": "param",
                          "exp_avg_sq": "matrix" if self._matrix_moment(group) else "param"})

    def _check_group(self, group, params) -> None:
        name = self._name
        if "lr" in group:
            _check_lr(group["lr"], name)
        if "betas" in group:
            check_betas(group["betas"], name)
        if "eps" in group:
            check_nonnegative(group["eps"], "eps", name)
        if "second_moment" in group and group["second_moment"] not in SECOND_MOMENTS:
            raise ValueError(f"{name}: second_moment must be one of {SECOND_MOMENTS}, got "
                             f"{group['second_moment']!r}")
        if "retraction" in group and group["retraction"] not in RETRACTIONS:
            raise ValueError(f"{name}: retraction must be one of {RETRACTIONS}, got {group['retraction']!r}")
        if "reorthonormalize_every" in group:
            _check_reorthonormalize_every(group["reorthonormalize_every"], name)

    _reorthonormalize_period = RiemannianSGD._reorthonormalize_period

    def _init_state(self, group, p, state) -> None:
        super()._init_state(group, p, state)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if self._matrix_moment(group):
            state["exp_avg_sq"] = p.new_zeros(*p.shape[:-2], 1, 1)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _adam_direction(self, group, state, grad) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        t = state["step"]
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        if state["exp_avg_sq"].shape != grad.shape:  # second_moment="matrix": ‖ξ‖²_F per matrix
            squared_norm = grad.square().sum(dim=(-2, -1), keepdim=True)
            state["exp_avg_sq"].mul_(beta2).add_(squared_norm, alpha=1.0 - beta2)
        else:
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (state["exp_avg_sq"] / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1.0 - beta1**t) / denom

    def _plain_update(self, group, p, state) -> None:
        grad = -p.grad if group["maximize"] else p.grad
        p.add_(self._adam_direction(group, state, grad), alpha=-group["lr"])

    def _manifold_update(self, group, p, state) -> None:
        grad = -p.grad if group["maximize"] else p.grad
        manifold = group["manifold"]
        xi = riemannian_gradient(p, grad, manifold=manifold)
        direction = project_tangent(p, self._adam_direction(group, state, xi), manifold=manifold)
        p.copy_(retract(p, -group["lr"] * direction, method=group["retraction"]))
        state["exp_avg"].copy_(project_tangent(p, state["exp_avg"], manifold=manifold))
