"""Weight refactorization, momentum reset and LR recovery for low-rank training (Glentis et al. 2025).

Every ``every`` optimizer steps, :class:`Refactorizer`

1. rewrites the factors of every ``LowRankLinear`` into balanced form (``optim::lowrank_refactorize_``, one batched
   call per group of layers with the same shapes, dtype and device; B·A is unchanged),
2. resets the optimizer state of the chosen parameters (their moments refer to the old coordinates of B and A),
3. scales the learning rate of the next ``recovery_steps`` optimizer steps by a factor that ramps linearly from
   ``recovery_start`` (0.1%) back to 1.
"""

from __future__ import annotations

import functools
import time
import types
import weakref
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import nn

from .._finite import all_finite
from .._overlap import check_no_overlap_across_calls
from .._wrappers import unwrap_optimizer
from ..fused.distributed import check_row_sharded, gather_whole, is_dtensor, write_whole_
from ._ops import check_refactorize_args, lowrank_refactorize_
from .layers import LowRankLinear, low_rank_modules

__all__ = ["RESET_SCOPES", "Refactorizer", "refactorize", "reset_moments"]

RESET_SCOPES = ("factors", "all", "none")


@torch.no_grad()
def refactorize(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Balance the factors of every ``LowRankLinear`` in ``modules`` in place (B·A unchanged); returns the op calls.

    Layers with the same (B shape, A shape, dtype, device) go to one batched ``optim::lowrank_refactorize_`` call.
    Factors that FSDP2 shards (DTensors, ``Shard(0)``) are gathered and refactorized one layer at a time, every rank
    computing the whole and keeping its rows.
    """
    groups: dict[tuple, list[LowRankLinear]] = defaultdict(list)
    sharded: list[LowRankLinear] = []
    layers_found = low_rank_modules(modules)
    for layer in layers_found:
        if is_dtensor(layer.B) or is_dtensor(layer.A):
            sharded.append(layer)
        else:
            groups[(tuple(layer.B.shape), tuple(layer.A.shape), layer.B.dtype, layer.B.device)].append(layer)
    # Each op call checks its own factors before it writes, but one refactorization makes a call per group of
    # layers: all of them are checked first (the schema, finiteness, factors shared between layers), so that a
    # bad later layer is refused before an earlier one is rewritten.
    for layers in groups.values():
        check_refactorize_args([layer.B for layer in layers], [layer.A for layer in layers])
    check_factors_finite(layers_found, "refactorize", "no layer was refactorized")
    plain = [layer for layers in groups.values() for layer in layers]
    check_no_overlap_across_calls(
        "refactorize", written=[t for layer in plain for t in (layer.B, layer.A)], read=[],
        operands=lambda: [(f"the {name} factor of LowRankLinear layer {i}", t, True)
                          for i, layer in enumerate(plain) for name, t in (("B", layer.B), ("A", layer.A))])
    for layers in groups.values():
        lowrank_refactorize_([layer.B for layer in layers], [layer.A for layer in layers])
    # FSDP2 shards B (m×r) and A (r×n) by rows. One layer at a time: all-gather its factors (the memory FSDP needs
    # for that layer's forward anyway), refactorize the whole on every rank (the same inputs and the same
    # deterministic QR/SVD give every rank the same factors, as DDP replicas compute the same step), and write back
    # the rows each rank owns. Not TSQR on B (QR of the local rows, all-gather of the r×r R factors): measured 0.5-1.0x
    # of this per layer on 2 gloo ranks, a tenth of a 0.16% share of training at every=200, and its factors differ
    # from one process's by up to 2e-3 in float32 where these equal them (benchmarks/refactorize_tsqr.py, RESULTS.md).
    for layer in sharded:
        B, A = gather_whole(layer.B), gather_whole(layer.A)
        lowrank_refactorize_([B], [A])
        write_whole_(layer.B, B)
        write_whole_(layer.A, A)
    return len(groups) + len(sharded)


def check_factors_finite(layers: list[LowRankLinear], caller: str, consequence: str) -> None:
    """Raise ``ValueError`` naming the first factor of ``layers`` with a NaN or inf (one reduction when all are
    finite): a diverged run cannot be refactorized."""
    factors = [t for layer in layers for t in (layer.B, layer.A)]
    if factors and not all_finite(factors):
        bad = next(i for i, t in enumerate(factors) if not bool(torch.isfinite(t).all()))
        raise ValueError(f"{caller}: the {'B' if bad % 2 == 0 else 'A'} factor of LowRankLinear layer {bad // 2} "
                         f"holds NaN or inf; {consequence}. The run has diverged: restore a checkpoint or lower the "
                         "learning rate")


@torch.no_grad()
def reset_moments(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> None:
    """Restart the optimizer for ``params`` (default: all of its parameters) as if they were new.

    * ``optim.AdamW`` (and anything with a ``reset_moments(params)`` method): the reset is folded into the next
      step, whose fused kernel treats exp_avg, exp_avg_sq and step as zero (no pass of its own).
    * any other optimizer (``torch.optim.AdamW``, Adam, SGD with momentum, ``optim.SophiaH``, ...): in place, now.
      For each parameter, every tensor in ``optimizer.state[p]`` with the parameter's shape is zeroed (``exp_avg``,
      ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ...), and so is a per-matrix moment of shape
      ``p.shape[:-2] + (1, 1)`` (``optim.RiemannianAdam(second_moment="matrix")``); ``step`` and the package's
      other step counts (``optim.AdaHessian``'s ``hessian_step``) are set to 0 (a tensor is zeroed in place, a
      number replaced), so bias corrections restart at t = 1. State of other shapes (factored second moments such
      as Adafactor's, which its bias correction at t = 1 discards) and other scalars (RSDM's sampling counters)
      are left alone.
    """
    owned = [p for group in optimizer.param_groups for p in group["params"]]
    chosen = owned if params is None else list(params)
    owned_ids = {id(p) for p in owned}
    for p in chosen:
        if id(p) not in owned_ids:
            raise ValueError(f"reset_moments: a tensor of shape {tuple(p.shape)} is not a parameter of the optimizer")
    deferred = getattr(optimizer, "reset_moments", None)
    if callable(deferred):
        deferred(chosen)
        return
    counts = {"step", *getattr(optimizer, "_count_keys", ())}
    for p in chosen:
        state = optimizer.state.get(p)
        if not state:
            continue
        moment_shapes = {tuple(p.shape)} | ({tuple(p.shape[:-2]) + (1, 1)} if p.dim() >= 2 else set())
        for key, value in state.items():
            if key in counts:
                if isinstance(value, torch.Tensor):
                    value.zero_()
                else:
                    state[key] = 0
            elif isinstance(value, torch.Tensor) and tuple(value.shape) in moment_shapes:
                value.zero_()


class Refactorizer:
    r"""Refactorize the low-rank layers, reset the moments and ramp the LR back, every ``every`` optimizer steps.

    Call ``step()`` once after every ``optimizer.step()`` (a call after a step the optimizer did not take, one a
    ``GradScaler`` skipped, is not counted). After the every-th, 2·every-th, ... step it

    * refactorizes every ``LowRankLinear`` of ``model_or_modules`` (B ← Q_B U √Σ, A ← √Σ Vᵀ Q_Aᵀ; B·A unchanged;
      see ``optim/lowrank/_ops.py``),
    * resets the optimizer state (``reset_moments``) of the B and A parameters (``reset="factors"``, the default),
      of every parameter of the optimizer (``"all"``, what the paper's code does by rebuilding the optimizer) or of
      none (``"none"``),
    * multiplies each group's LR, during the next ``recovery_steps`` optimizer steps k = 0, 1, ..., by
      ``recovery_start + (1 − recovery_start)·k/recovery_steps`` (0.1% of the scheduled LR at first).

    The LR factor is applied by optimizer step hooks only while ``optimizer.step()`` runs, and the group's ``lr`` is
    restored right after it, so ``param_groups[i]["lr"]`` always holds the scheduled value: any
    ``torch.optim.lr_scheduler`` composes with the recovery, in any order of ``scheduler.step()`` and
    ``refactorizer.step()``. ``remove()`` takes the hooks off.

    Works with ``optim.AdamW`` (the reset is the fused kernel's reset flag on the next step) and in place with any
    optimizer whose per-parameter state is tensors of the parameter's shape plus ``step`` (``torch.optim.AdamW``,
    Adam, SGD with momentum, ...). ``state_dict()`` / ``load_state_dict()`` carry the step count and the pending
    resets, so a resumed run refactorizes on the same steps and continues bit for bit. The optimizer's own
    ``state_dict()`` holds that state too (under ``"refactorizer"``), and its ``load_state_dict()`` restores it: a
    framework that checkpoints only the optimizer (the Hugging Face Trainer with a callback calling ``step()``,
    Lightning, ``torch.distributed.checkpoint``) resumes the schedule with it.

    Args:
        model_or_modules: a model, or an iterable of modules, holding ``LowRankLinear`` layers.
        optimizer: the optimizer stepping their parameters.
        every: refactorize after every ``every``-th call of ``step()`` (>= 1; the paper uses 200).
        reset: ``"factors"``, ``"all"`` or ``"none"``.
        recovery_steps: optimizer steps of LR ramp after each refactorization (>= 0; 0 turns it off; paper: 10).
        recovery_start: the ramp's first factor, in (0, 1].
    """

    def __init__(self, model_or_modules: nn.Module | Iterable[nn.Module], optimizer: torch.optim.Optimizer, *,
                 every: int = 200, reset: str = "factors", recovery_steps: int = 10, recovery_start: float = 1e-3):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Refactorizer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # Accelerate's wrapper keeps no step hooks of its own: the recovery hooks go on the optimizer it steps
        optimizer = unwrap_optimizer(optimizer)
        _check_settings(every, reset, recovery_steps, recovery_start)
        other = optimizer.__dict__.get("_optim_refactorizer")
        if other is not None and other() is not None and other()._hooks:
            raise ValueError(f"Refactorizer: this optimizer already has a Refactorizer ({other()!r}); two would "
                             "scale the learning rate twice and restore it out of order. Call .remove() on the "
                             "first one, or use one Refactorizer for all the layers")
        modules = low_rank_modules(model_or_modules)
        if not modules:
            raise ValueError("Refactorizer: no LowRankLinear layer found; convert the model first with "
                             "optim.to_low_rank(model, rank) and build the optimizer after that")
        check_row_sharded([p for layer in modules for p in (layer.B, layer.A)], caller="Refactorizer",
                          why="refactorization gathers each layer's factors B and A to refactorize them whole")
        self.modules = modules
        self.optimizer = optimizer
        self.every = every
        self.reset = reset
        self.recovery_steps = recovery_steps
        self.recovery_start = float(recovery_start)
        self.step_count = 0
        self.refactorizations = 0
        self.seconds = 0.0  # wall time spent in refactorize + reset (for the "<= 1% of training time" figure)
        owned = {id(p) for p in self._optimizer_params()}
        missing = [i for i, layer in enumerate(modules) for p in (layer.B, layer.A) if id(p) not in owned]
        if missing and reset == "factors":
            raise ValueError(f"Refactorizer: the factors of {len(set(missing))} LowRankLinear layer(s) are not "
                             "parameters of the optimizer, so their moments cannot be reset; build the optimizer "
                             "after optim.to_low_rank(...) from model.parameters()")
        self._saved_lrs: list[Any] | None = None
        self._stepped = False  # an optimizer step ran since the last step() (set by the step post hook)
        self._state_being_loaded: dict[str, Any] | None = None
        # The checkpoint hooks put this refactorizer's state into optimizer.state_dict() and take it back out of
        # load_state_dict(): frameworks that checkpoint only the optimizer (the HF Trainer, Lightning) then resume
        # the schedule too. The load pre hook goes first, before an optimizer's own checks see the extra entry.
        self._hooks = [optimizer.register_step_pre_hook(self._before_optimizer_step),
                       optimizer.register_step_post_hook(self._after_optimizer_step),
                       optimizer.register_state_dict_post_hook(self._add_to_optimizer_state_dict),
                       optimizer.register_load_state_dict_pre_hook(self._take_from_optimizer_state_dict,
                                                                   prepend=True),
                       optimizer.register_load_state_dict_post_hook(self._load_taken_state)]
        optimizer.__dict__["_optim_refactorizer"] = weakref.ref(self)
        # A step that raises skips the post hook: restore the scheduled lr there too, so that neither the param
        # groups nor the next checkpoint keep the ramp's scaled value.
        # A bound method (not a plain function), because torch's LR schedulers rewrap optimizer.step through its
        # __func__.
        step = optimizer.step
        refactorizer = weakref.ref(self)

        @functools.wraps(step)
        def step_restoring_lr(opt, *args, **kwargs):
            try:
                return step(*args, **kwargs)
            finally:
                owner = refactorizer()
                if owner is not None and owner._saved_lrs is not None:
                    owner._restore_lrs()

        optimizer.step = types.MethodType(step_restoring_lr, optimizer)

    # ---------------------------------------------------------------------------------------------- the schedule

    def lr_factor(self) -> float:
        """The factor the LR of the next optimizer step is multiplied by (1.0 outside the recovery ramps)."""
        last = (self.step_count // self.every) * self.every
        since = self.step_count - last
        if last == 0 or since >= self.recovery_steps:
            return 1.0
        return self.recovery_start + (1.0 - self.recovery_start) * since / self.recovery_steps

    def step(self) -> bool:
        """Count one optimizer step; refactorize and reset after every ``every``-th. Returns whether it acted.

        Only a step the optimizer took counts: a call with no ``optimizer.step()`` since the last one (a
        ``GradScaler`` that skipped a step whose gradients overflowed, as the Hugging Face Trainer's callbacks
        still see it) changes nothing, so the schedule and the LR ramp follow the steps taken."""
        if self._hooks and not self._stepped:
            return False
        self._stepped = False
        self.step_count += 1
        if self.step_count % self.every:
            return False
        self.refactorize_now()
        return True

    @torch.no_grad()
    def refactorize_now(self) -> None:
        """Refactorize every layer and reset the chosen moments now (``step()`` calls this on schedule).

        Every factor is checked first: if one holds NaN or inf, no layer is refactorized and no moment reset."""
        check_factors_finite(self.modules, "Refactorizer", "no layer was refactorized and no moment was reset (the "
                             "optimizer step that ran before this refactorization was applied)")
        start = time.perf_counter()
        refactorize(self.modules)
        if self.reset == "factors":
            reset_moments(self.optimizer, [p for layer in self.modules for p in (layer.B, layer.A)])
        elif self.reset == "all":
            reset_moments(self.optimizer)
        if self.modules[0].B.device.type == "cuda":
            torch.cuda.synchronize(self.modules[0].B.device)
        self.seconds += time.perf_counter() - start
        self.refactorizations += 1

    # ----------------------------------------------------------------------------------------------------- hooks

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._saved_lrs is not None:  # the previous step raised before its post hook could restore the LR
            self._restore_lrs()
        factor = self.lr_factor()
        if factor != 1.0:
            self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        # An optimizer that takes GradScaler's overflow flag (SophiaH, AdaHessian) is called on a skipped step too
        found_inf = getattr(optimizer, "found_inf", None)
        self._stepped = not (isinstance(found_inf, torch.Tensor) and bool(found_inf))
        if self._saved_lrs is not None:
            self._restore_lrs()

    def _restore_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self._saved_lrs):
            group["lr"] = lr
        self._saved_lrs = None

    def remove(self) -> None:
        """Take the LR hooks off the optimizer (the refactorizer stops scaling the LR)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._saved_lrs is not None:
            self._restore_lrs()
        if self.optimizer.__dict__.get("_optim_refactorizer") is not None and \
                self.optimizer.__dict__["_optim_refactorizer"]() is self:
            del self.optimizer.__dict__["_optim_refactorizer"]

    # ---------------------------------------------------------------------------------------------- checkpoints

    def _add_to_optimizer_state_dict(self, optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state = self.state_dict()
        state_dict["refactorizer"] = state
        # Also inside the first param group: torch.distributed.checkpoint's get/set_state_dict keep only "state" and
        # "param_groups" of an optimizer's state dict (and carry every key of a group).
        if state_dict.get("param_groups"):
            state_dict["param_groups"] = [{**state_dict["param_groups"][0], "refactorizer": state},
                                          *state_dict["param_groups"][1:]]
        return state_dict

    def _take_from_optimizer_state_dict(self, optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Remove this refactorizer's entries (top level and param groups; the caller's dict is not changed) and
        check them before the optimizer loads anything; a dict without them leaves the refactorizer as it is."""
        state = saved_refactorizer_state(state_dict)
        if "param_groups" in state_dict:
            state_dict["param_groups"] = [{key: value for key, value in group.items() if key != "refactorizer"}
                                          for group in state_dict["param_groups"]]
        state_dict.pop("refactorizer", None)
        if state is not None:
            self.check_state_dict(state)
        self._state_being_loaded = state
        return state_dict

    def _load_taken_state(self, optimizer) -> None:
        state, self._state_being_loaded = self._state_being_loaded, None
        if state is not None:
            self.load_state_dict(state)  # after the optimizer's state: legacy pending resets apply to it

    def _optimizer_params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (``torch.load(weights_only=True)`` loads them): the settings and the step count. The
        resets the optimizer has not applied yet are in the optimizer's own state (``optim.AdamW`` keeps them per
        parameter), so they travel with ``optimizer.state_dict()``."""
        return {
            "every": self.every,
            "reset": self.reset,
            "recovery_steps": self.recovery_steps,
            "recovery_start": self.recovery_start,
            "step_count": self.step_count,
            "refactorizations": self.refactorizations,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the settings must equal this refactorizer's (checked before anything changes).

        A checkpoint from before the optimizer kept its pending resets has them here as ``pending_resets``
        (positions in the optimizer's parameter order); they are requested again, so load the optimizer first."""
        pending = self.check_state_dict(state_dict)
        params = self._optimizer_params()
        self.step_count = int(state_dict["step_count"])
        self.refactorizations = int(state_dict.get("refactorizations", 0))
        if pending:
            self.optimizer.reset_moments([params[i] for i in pending])

    def check_state_dict(self, state_dict: dict[str, Any]) -> list[int]:
        """Raise ``ValueError`` unless ``state_dict`` can be loaded (changes nothing); returns the pending resets."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"Refactorizer.load_state_dict: expected the dict of Refactorizer.state_dict(), got "
                             f"{type(state_dict).__name__}")
        required = ("every", "reset", "recovery_steps", "recovery_start", "step_count")
        missing = [key for key in required if key not in state_dict]
        if missing:
            raise ValueError(f"Refactorizer.load_state_dict: the state dict lacks {missing}; it was not produced by "
                             "Refactorizer.state_dict()")
        for key in ("every", "reset", "recovery_steps", "recovery_start"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(f"Refactorizer.load_state_dict: the checkpoint has {key}={state_dict[key]!r} but "
                                 f"this refactorizer has {key}={getattr(self, key)!r}; construct it with the settings "
                                 "of the run being resumed")
        for key in ("step_count", "refactorizations"):
            value = state_dict.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Refactorizer.load_state_dict: {key} must be an int >= 0, got {value!r}; the "
                                 "checkpoint is corrupt or was not produced by Refactorizer.state_dict()")
        params = self._optimizer_params()
        legacy = state_dict.get("pending_resets", [])  # only in checkpoints of the older format
        if not isinstance(legacy, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in legacy):
            raise ValueError(f"Refactorizer.load_state_dict: pending_resets must be a list of ints, got {legacy!r}")
        pending = [int(i) for i in legacy]
        if any(not 0 <= i < len(params) for i in pending):
            raise ValueError(f"Refactorizer.load_state_dict: pending reset positions {pending} do not fit an optimizer "
                             f"with {len(params)} parameters; the checkpoint belongs to another model")
        if pending and not callable(getattr(self.optimizer, "reset_moments", None)):
            raise ValueError("Refactorizer.load_state_dict: the checkpoint has pending fused resets but this optimizer "
                             f"({type(self.optimizer).__name__}) has no reset_moments(); resume with the optimizer "
                             "class the run was saved with")
        return pending

    def __repr__(self) -> str:
        return (f"Refactorizer(layers={len(self.modules)}, every={self.every}, reset={self.reset!r}, "
                f"recovery_steps={self.recovery_steps}, recovery_start={self.recovery_start:g}, "
                f"step_count={self.step_count})")


def recovery_factor(optimizer: torch.optim.Optimizer) -> float:
    """The factor an attached :class:`Refactorizer` multiplies the next step's learning rate by (1.0 without one, or
    outside its ramps): what that step's lr is, for a stability limit."""
    owner = unwrap_optimizer(optimizer).__dict__.get("_optim_refactorizer")
    refactorizer = owner() if owner is not None else None
    return refactorizer.lr_factor() if refactorizer is not None and refactorizer._hooks else 1.0


def saved_refactorizer_state(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The refactorizer state an optimizer's state dict carries (top level, or in a param group after
    torch.distributed.checkpoint), or None."""
    if "refactorizer" in state_dict:
        return state_dict["refactorizer"]
    for group in state_dict.get("param_groups", ()):
        if isinstance(group, dict) and "refactorizer" in group:
            return group["refactorizer"]
    return None


def _check_settings(every, reset, recovery_steps, recovery_start) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"Refactorizer: every must be an int >= 1, got {every!r}")
    if reset not in RESET_SCOPES:
        raise ValueError(f"Refactorizer: reset must be one of {RESET_SCOPES}, got {reset!r}")
    if isinstance(recovery_steps, bool) or not isinstance(recovery_steps, int) or recovery_steps < 0:
        raise ValueError(f"Refactorizer: recovery_steps must be an int >= 0, got {recovery_steps!r}")
    if not (isinstance(recovery_start, (int, float)) and 0.0 < recovery_start <= 1.0):
        raise ValueError(f"Refactorizer: recovery_start must be in (0, 1], got {recovery_start!r}")
