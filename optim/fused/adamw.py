"""``optim.AdamW``: a drop-in ``torch.optim.AdamW`` whose default path is the fused multi-tensor op.

The math is ``torch.optim.AdamW``'s (see ``optim/fused/_ops.py``). Differences a user can see:

* bfloat16/float16 parameters keep their moments in float32 and the update is computed in float32 and rounded once
  into the parameter (``torch.optim.AdamW`` keeps bf16 moments for bf16 params). Loading a ``torch.optim.AdamW``
  state dict upcasts its moments; our state dicts load into ``torch.optim.AdamW`` (it casts them down).
* ``state["step"]`` is a float32 tensor on the parameter's device, as in torch's ``fused=True`` path.
* ``amsgrad``, ``capturable`` and ``differentiable`` are accepted for signature compatibility but only ``False`` is
  supported.
* ``reset_moments(params)`` asks for a momentum reset that is folded into the next step (the op's ``reset`` flag);
  the request is kept in the parameter's state (``state["reset_pending"]``), so checkpoints carry it.
* Works under DDP (plain tensors) and FSDP2 (``fully_shard``: DTensor params, grads and moments): the fused op
  steps each parameter's local shard, which is exact for an elementwise step when the parameter, its gradient and
  its moments are sharded alike (checked; otherwise a ValueError suggests ``foreach=True``, which goes through
  DTensor's dispatch).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from .._library import has_kernel
from .._overlap import check_no_overlap_across_calls, list_operands
from .._step_wrapper import LeanStepMixin
from .._validate import (StateSpec, check_betas, check_grad, check_group_params, check_group_settings,
                         check_incoming_state_dict, check_lr, check_nonnegative, check_param_state,
                         fill_group_defaults, install_state_dict_hooks)
from ._ops import PARAM_DTYPES, check_adamw_hyperparameters, fused_adamw_, fused_adamw_reference, moment_dtype
from .distributed import local_tensors

__all__ = ["AdamW", "adamw"]

STATE_KEYS = ("exp_avg", "exp_avg_sq")
# Present (a 0-d bool tensor, True) in a parameter's state while a reset_moments() request waits for its next step.
# A tensor rather than a Python bool: torch.distributed.checkpoint round-trips tensors in optimizer state. It lives
# on the CPU and the step only tests the key's presence, so a pending reset costs no device read.
RESET_KEY = "reset_pending"


class AdamW(LeanStepMixin, Optimizer):
    r"""AdamW (Loshchilov & Hutter, 2019) with the signature and state of ``torch.optim.AdamW``.

    For each parameter p with gradient g (negated if ``maximize``), step count t, moments m and v::

        p ← p·(1 − lr·λ);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
        p ← p − lr/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + eps)

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate (>= 0): a Python float or, as in torch.optim.AdamW, a 1-element Tensor (read as a float at
            each step: one host read). betas: (β1, β2), each in [0, 1), floats or 1-element Tensors. eps: >= 0.
            weight_decay: λ >= 0. Out-of-range values raise torch's own ValueError message, then ours.
        maximize: ascend instead of descend.
        fused: use the ``optim::fused_adamw_`` op (one multi-tensor kernel per device and dtype).
        foreach: use ``torch._foreach_*`` ops. With neither set, ``fused`` is chosen when the compiled kernel
            exists for every parameter's device, else ``foreach``. ``fused=False, foreach=False`` runs the
            single-tensor loop, which is the reference implementation of the op.
        amsgrad, capturable, differentiable: only ``False`` is supported; a state dict saved with one of them
            set (``torch.optim.AdamW(amsgrad=True)``) is refused at load rather than silently stepped without it.

    Validation: ``add_param_group`` checks the whole group before adding it, ``step`` checks every group, gradient
    and state before it changes anything, and ``load_state_dict`` checks the whole incoming state (torch's load
    pre hook) before it replaces anything; a state dict of another optimizer class is refused naming both.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ):
        for name, value in (("amsgrad", amsgrad), ("capturable", capturable), ("differentiable", differentiable)):
            if value:
                raise ValueError(f"optim.AdamW: {name}=True is not supported; use torch.optim.AdamW for it")
        if fused and foreach:
            raise ValueError("optim.AdamW: fused=True and foreach=True cannot be set together; choose one")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        fused=fused)
        _check_group(defaults, defaults)
        super().__init__(params, defaults)
        install_state_dict_hooks(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` after checking the whole group (its parameters' dtypes, duplicates and its
        hyperparameters), so a group that could not be stepped is never added."""
        check_group_params(param_group, "optim.AdamW", dtype_ok=lambda p: _real_dtype(p) in PARAM_DTYPES,
                           dtypes_text="float64, float32, bfloat16, float16 (and complex)")
        _check_group({**self.defaults, **param_group}, self.defaults)
        super().add_param_group(param_group)

    def reset_moments(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Restart AdamW for ``params`` (default: every parameter) at their next step, as if newly added.

        The moments ``exp_avg``, ``exp_avg_sq`` and ``step`` of each parameter are treated as zero by its next
        ``step()`` (bias correction restarts at t = 1), which the fused kernel does in its normal pass (the op's
        ``reset`` flag) instead of a pass of its own. Until that step the state keeps its old values and a flag
        ``state["reset_pending"]`` (a 0-d bool tensor), which ``state_dict()`` / ``load_state_dict()`` carry like any
        state. A parameter without state yet is skipped: its first step starts from zero anyway. Unknown
        parameters raise ``ValueError``.
        """
        if isinstance(params, torch.Tensor):  # iterating it would give its rows
            raise ValueError(f"optim.AdamW.reset_moments: params must be an iterable of parameters, got a single "
                             f"tensor of shape {tuple(params.shape)}; wrap it as [param]")
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        chosen = [p for group in self.param_groups for p in group["params"]] if params is None else list(params)
        for p in chosen:
            if id(p) not in owned:
                raise ValueError(f"optim.AdamW.reset_moments: a tensor of shape {tuple(p.shape)} is not a parameter "
                                 "of this optimizer")
        for p in chosen:
            state = self.state.get(p)
            if state:
                state[RESET_KEY] = torch.ones((), dtype=torch.bool)

    def pending_resets(self) -> list[torch.Tensor]:
        """The parameters whose moments their next step restarts (see ``reset_moments``), in parameter order."""
        return [p for group in self.param_groups for p in group["params"] if RESET_KEY in self.state.get(p, ())]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickles from before the flag lived in the state keep their requests in a dict of parameters.
        legacy = state.pop("_reset_pending", None) or {}
        super().__setstate__(state)
        for p in legacy.values():
            if self.state.get(p):
                self.state[p][RESET_KEY] = torch.ones((), dtype=torch.bool)
        fill_group_defaults(self)
        install_state_dict_hooks(self)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, steps) -> bool:
        """Append the group's tensors that have a gradient to the lists, creating their state on first use.

        The signature (lists filled in place) is torch.optim's: torch.compile special-cases ``_init_group``.
        Returns whether the group has complex parameters.
        """
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= p.is_complex()
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in STATE_KEYS:
                    state[key] = torch.zeros_like(p, dtype=_moment_dtype_of(p), memory_format=torch.preserve_format)
            grad = p.grad
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            if p.is_complex():
                p, grad = torch.view_as_real(p), torch.view_as_real(grad)
                exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
            params.append(p)
            grads.append(grad)
            exp_avgs.append(exp_avg)
            exp_avg_sqs.append(exp_avg_sq)
            steps.append(state["step"])
        return has_complex

    def _check_step(self) -> list[dict[str, float]]:
        """Everything the step will touch, before it touches anything: every group's hyperparameters (returned as
        floats), every gradient (dense, the parameter's shape and dtype) and every existing state (its keys, the
        moments' shapes and working dtypes, a one-element float32 ``step`` on the parameter's device)."""
        hyper = [_check_group(group, self.defaults, g) for g, group in enumerate(self.param_groups)]
        if torch.compiler.is_compiling():
            # Dynamo creates the state in _init_group while tracing (it special-cases that method), so a check of
            # the state before it would take another path on the trace's restart; the op checks the tensors.
            return hyper
        # The fast pass reads a few attributes per parameter (torch's grad setter already guarantees a gradient's
        # shape, dtype and device); anything unusual goes to _check_parameter, which raises with the details.
        moment_of = {}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._checked_state(g, i, p, moment_of)
        return hyper

    def _checked_state(self, g: int, i: int, p: torch.Tensor, moment_of: dict) -> dict | None:
        """The fast check of parameter i of group g (which has a gradient) and its state, which it returns (None
        before the first step); anything unusual goes to :meth:`_check_parameter`, which raises with the details."""
        grad = p.grad
        # torch's grad setter checks shape and dtype, but grad.set_() or a grad replaced in place does not
        if grad.layout is not torch.strided or grad.shape != p.shape or grad.dtype is not p.dtype:
            self._check_parameter(g, i, p)
        state = self.state.get(p)
        if state and not _state_looks_right(p, state, moment_of):
            self._check_parameter(g, i, p)
        return state

    def _check_parameter(self, g: int, i: int, p: torch.Tensor) -> None:
        """Raise ``ValueError`` naming what is wrong with parameter i of group g, its gradient or its state."""
        where = f"parameter {i} of param group {g}"
        check_grad("optim.AdamW", where, p, sparse_hint="; use torch.optim.SparseAdam")
        state = self.state.get(p)
        if not state:
            return
        check_param_state("optim.AdamW.step", f"the state of {where}", p, state, STATE_SPEC, values=False)
        moment = _moment_dtype_of(p)
        for key in STATE_KEYS:
            if state[key].dtype != moment or state[key].device != p.device:
                raise ValueError(f"optim.AdamW.step: the state {key!r} of {where} is {state[key].dtype} on "
                                 f"{state[key].device}; for a {p.dtype} parameter on {p.device} it must be "
                                 f"{moment} there (optim.AdamW.load_state_dict converts it)")
        step = state["step"]
        if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.numel() == 1
                and step.device == p.device):
            raise ValueError(f"optim.AdamW.step: the state 'step' of {where} is {step!r}; it must be a "
                             f"float32 tensor with one element on {p.device}")

    def _gather_checked(self) -> list[tuple] | None:
        """The eager step's check and gathering in one pass: for every group, its hyperparameters (as floats) and
        the lists ``_init_group`` would build, with every gradient and state checked as ``_check_step`` checks
        them (anything unusual goes to ``_check_parameter``, which raises with the details). Returns None, having
        changed nothing, when a parameter with a gradient has no state yet (the first step): the caller then takes
        ``_check_step`` + ``_init_group``, which create it after the checks."""
        hyper = [_check_group(group, self.defaults, g) for g, group in enumerate(self.param_groups)]
        moment_of = {}
        gathered = []
        for g, group in enumerate(self.param_groups):
            stepped, params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                state = self._checked_state(g, i, p, moment_of)
                if not state:
                    return None
                m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
                stepped.append(p)
                if p.is_complex():
                    p, grad, m, v = (torch.view_as_real(t) for t in (p, grad, m, v))
                params.append(p)
                grads.append(grad)
                exp_avgs.append(m)
                exp_avg_sqs.append(v)
                steps.append(step)
            gathered.append((group, hyper[g], stepped, params, grads, exp_avgs, exp_avg_sqs, steps))
        return gathered

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every group, gradient and state is checked before anything is created or written
        gathered = None if torch.compiler.is_compiling() else self._gather_checked()
        if gathered is None:
            hyper = self._check_step()
            gathered = []
            for group, h in zip(self.param_groups, hyper):
                params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
                self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
                stepped = [p for p in group["params"] if p.grad is not None]
                gathered.append((group, h, stepped, params, grads, exp_avgs, exp_avg_sqs, steps))
        if len(gathered) > 1 and not torch.compiler.is_compiling():
            _check_groups_apart(gathered)
        for group, h, stepped, params, grads, exp_avgs, exp_avg_sqs, steps in gathered:
            # The pending resets of the parameters this step touches are consumed once the op has run (the others
            # keep theirs; an op that raises has written nothing, and the requests stay).
            reset = [RESET_KEY in self.state[p] for p in stepped]
            adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"],
                  weight_decay=h["weight_decay"], eps=h["eps"], maximize=group["maximize"],
                  foreach=group["foreach"], fused=group["fused"], reset=reset)
            for p, restarted in zip(stepped, reset):
                if restarted:
                    del self.state[p][RESET_KEY]
        return loss

    # ---------------------------------------------------------------------------------- state dicts (torch's hooks)

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The load pre hook: the whole incoming state dict is checked before anything is replaced (the class that
        saved it, every group's values, every parameter's state keys, moment shapes and step counts)."""
        check_incoming_state_dict(self, state_dict, "optim.AdamW",
                                  check_group=lambda group, params: _check_group(group, self.defaults),
                                  spec_of=lambda group: STATE_SPEC)

    def _after_state_dict_loaded(self, state_dict: dict[str, Any]) -> None:
        """The load post hook: torch casts every float state tensor to its parameter's dtype; restore the working
        dtypes from the source (float32 moments for bf16/fp16 params) and ``step`` as float32 on the param's
        device."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, current):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            for key in STATE_KEYS:
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=_moment_dtype_of(p), copy=True)
            if "step" in saved:
                step = saved["step"]
                step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
                state["step"] = step.to(device=p.device, dtype=torch.float32, copy=True).reshape(())
            # torch cast the flag to the parameter's dtype and device: back to a CPU bool, kept only if set.
            if RESET_KEY in state:
                if bool(state[RESET_KEY].reshape(()).item()):
                    state[RESET_KEY] = torch.ones((), dtype=torch.bool)
                else:
                    del state[RESET_KEY]


STATE_SPEC = StateSpec({"step": "count", "exp_avg": "param", "exp_avg_sq": "param"}, {RESET_KEY: "flag"})


def _hyperparameters(group: dict[str, Any], caller: str) -> dict[str, float]:
    """A group's (or the defaults') hyperparameters checked with torch's messages, as Python floats."""
    beta1, beta2 = check_betas(group["betas"], caller)
    return dict(lr=check_lr(group["lr"], caller), beta1=beta1, beta2=beta2,
                weight_decay=check_nonnegative(group["weight_decay"], "weight_decay", caller),
                eps=check_nonnegative(group["eps"], "eps", caller))


def _check_group(group: dict[str, Any], defaults: dict[str, Any], index: int | None = None) -> dict[str, float]:
    """Everything a step reads from a param group (or the defaults), in one place for construction,
    ``add_param_group``, ``load_state_dict`` and every step: the settings (present, bools where bools belong), the
    options only ``False`` of which is implemented (a group edited or loaded with ``amsgrad=True`` would be stepped
    without it), and the hyperparameters, returned as Python floats."""
    where = "the param group" if index is None else f"param group {index}"
    check_group_settings(group, defaults, "optim.AdamW", where=where)
    for name in ("amsgrad", "capturable", "differentiable"):
        # torch.compile traces every optimizer step with group["capturable"] set to True (dynamo's
        # OptimizerVariable), whatever the device: only a real group's value means the user asked for it.
        if group.get(name) and not (name == "capturable" and torch.compiler.is_compiling()):
            extra = (" (its max_exp_avg_sq would be ignored and the step would differ from the run that saved "
                     "it)") if name == "amsgrad" else ""
            raise ValueError(f"{name}=True, which optim.AdamW does not implement{extra}; resume that run with "
                             f"torch.optim.AdamW({name}=True)")
    if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
        raise ValueError("decoupled_weight_decay=False (a torch.optim.Adam checkpoint with L2 weight decay); "
                         "optim.AdamW always decouples it: resume with torch.optim.Adam")
    return _hyperparameters(group, "optim.AdamW")


def _real_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype the kernels see: complex parameters are stepped as their real view."""
    return torch.view_as_real(p).dtype if p.is_complex() else p.dtype


def _moment_dtype_of(p: torch.Tensor) -> torch.dtype:
    """The dtype of p's moments: float32/float64 (complex64/complex128 for complex p), see ``moment_dtype``."""
    real_dtype = moment_dtype(_real_dtype(p))
    if not p.is_complex():
        return real_dtype
    return torch.complex128 if real_dtype == torch.float64 else torch.complex64


def adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    reset: Sequence[bool] | None = None,
) -> None:
    """Functional AdamW step over lists (one entry per parameter), updating params, moments and steps in place.

    ``reset[i]``: treat ``exp_avgs[i]``, ``exp_avg_sqs[i]`` and ``state_steps[i]`` as zero before this step (fused
    into the kernel's pass on the fused path; zeroed in place first on the others).
    """
    groups = _group_by_device_and_dtype(params)
    if fused is None and foreach is None:
        # per device, not per parameter: the dispatcher query is paid on every step
        fused = all(has_kernel("fused_adamw_", device) for device, _ in groups)
        foreach = not fused
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize)
    check_adamw_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, caller="adamw")
    if reset is not None and len(reset) != len(params):
        raise ValueError(f"adamw: reset has {len(reset)} flags but params has {len(params)}")
    if reset is not None and not any(reset):
        reset = None
    step_one_device_and_dtype = fused_adamw_ if fused else _multi_tensor_adamw if foreach else fused_adamw_reference
    all_lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    for index in groups.values():
        lists = all_lists if len(index) == len(params) else _select(all_lists, index)
        if fused:
            # FSDP2 (DTensor) parameters: the op has no sharding rule, and the step is elementwise, so it runs on
            # the local shards (the foreach and single-tensor paths go through DTensor's own dispatch).
            lists = local_tensors(lists, caller="optim.AdamW")
        if reset is None:
            step_one_device_and_dtype(*lists, **hyper)
        elif fused or not foreach:
            step_one_device_and_dtype(*lists, **hyper, reset=[bool(reset[i]) for i in index])
        else:
            restarted = [i for i in index if reset[i]]
            if restarted:
                for tensors in (exp_avgs, exp_avg_sqs, state_steps):
                    torch._foreach_zero_([tensors[i] for i in restarted])
            step_one_device_and_dtype(*lists, **hyper)


def _check_groups_apart(gathered: list[tuple]) -> None:
    """The op checks the tensors of its own call before it writes, but a step makes one call per group: the tensors
    of every group are checked together first (the op's rule, ``optim._overlap``), so that a gradient of a later
    group sharing memory with a parameter of an earlier one (which the op of neither group sees) is refused before
    the earlier group is stepped, and so is a later group whose own op would refuse it."""
    lists = [(g, entry[3:]) for g, entry in enumerate(gathered)]  # params, grads, exp_avgs, exp_avg_sqs, steps
    names = (("params", True), ("grads", False), ("exp_avgs", True), ("exp_avg_sqs", True), ("state_steps", True))

    def operands():
        return [operand for g, tensors in lists for (name, written), group_tensors in zip(names, tensors)
                for operand in list_operands(f"param group {g}: {name}", group_tensors, written)]
    check_no_overlap_across_calls(
        "optim.AdamW.step",
        written=[t for _, tensors in lists for (_, written), ts in zip(names, tensors) if written for t in ts],
        read=[t for _, tensors in lists for t in tensors[1]], operands=operands)


def _state_looks_right(p: torch.Tensor, state: dict, moment_of: dict) -> bool:
    """The step's fast check of one parameter's state (a few attribute reads; ``moment_of`` caches the moment dtype
    per parameter dtype): False sends the parameter to ``AdamW._check_parameter``, which raises with the details."""
    moment = moment_of.get(p.dtype)
    if moment is None:
        moment = moment_of[p.dtype] = _moment_dtype_of(p)
    m, v, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
    device = p.device
    return not (len(state) - (RESET_KEY in state) != 3 or m is None or v is None or type(step) is not torch.Tensor
                or m.shape != p.shape or v.shape != p.shape or m.dtype is not moment or v.dtype is not moment
                or step.dtype is not torch.float32 or step.numel() != 1 or m.device != device
                or v.device != device or step.device != device)


def _group_by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    if tensors:  # the usual case, one device and dtype, without a key per tensor
        device, dtype = tensors[0].device, tensors[0].dtype
        if all(t.dtype is dtype for t in tensors) and all(t.device == device for t in tensors):
            return {(device, dtype): list(range(len(tensors)))}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups


def _select(lists: Sequence[Sequence[torch.Tensor]], index: list[int]) -> list[list[torch.Tensor]]:
    return [[tensors[i] for i in index] for tensors in lists]


def _multi_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, weight_decay, eps,
                        maximize):
    """The foreach path: the same step as the op, with ``torch._foreach_*`` ops over one device and dtype."""
    torch._foreach_add_(state_steps, 1)
    # One device-to-host transfer per group for the bias corrections, computed in float64 like the op's kernels.
    steps = torch.stack(state_steps).tolist()
    work_dtype = exp_avgs[0].dtype
    low_precision = params[0].dtype != work_dtype
    work_params = [p.to(work_dtype) for p in params] if low_precision else params
    work_grads = [g.to(work_dtype) for g in grads] if low_precision else grads
    if maximize:
        work_grads = torch._foreach_neg(work_grads)
    torch._foreach_mul_(work_params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, work_grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, work_grads, work_grads, 1.0 - beta2)
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    bias_corrections2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_corrections2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work_params, exp_avgs, denom, step_sizes)
    if low_precision:
        torch._foreach_copy_(params, work_params)
