"""Validation shared by every optimizer class: check everything a call will touch, then write.

* Hyperparameters: ``lr``, ``eps``, ``weight_decay``, ``betas`` and ``momentum`` accept a Python number or a
  1-element Tensor (as ``torch.optim`` does) and are refused with torch's own message, followed by ours in
  parentheses (``Invalid learning rate: -1.0 (optim.AdamW: lr must be a finite number >= 0)``). The optimizers
  read them as Python floats at each step (``float(tensor)``: one host read per Tensor value and step).
* ``add_param_group``: every parameter of a new group is checked (a Tensor, a supported dtype, not twice in the
  group: torch only warns about that, and the parameter would be stepped twice) before torch appends the group.
* State dicts: ``install_state_dict_hooks`` registers torch's state-dict hooks. ``state_dict()`` records the class
  under ``"optim_class"``; ``load_state_dict`` first checks the whole incoming state (the class that saved it,
  every param group's values, and every parameter's state keys, shapes and counts) and only then lets torch replace
  anything. A checkpoint of another class is refused naming both classes; one without the record (saved by
  ``torch.optim`` or an older version) is judged by its state keys.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "CLASS_KEY", "StateSpec", "check_betas", "check_group_params", "check_group_settings", "check_lr",
    "check_nonnegative", "check_param_state", "check_unit_interval", "install_state_dict_hooks", "scalar",
]

CLASS_KEY = "optim_class"

# Param-group settings that identify the optimizer class that saved a state dict without the class record (the
# state keys alone cannot tell RiemannianAdam's moments from AdamW's). Other unknown keys (a scheduler's
# "initial_lr", a user's own labels) are left alone.
IDENTIFYING_GROUP_KEYS = {
    "manifold": "optim.RSDM / RiemannianSGD / RiemannianAdam", "retraction": "optim.RiemannianSGD / RiemannianAdam",
    "rank": "optim.RSDM", "sampling": "optim.RSDM", "core": "optim.RSDM", "rho": "optim.SophiaH",
    "hessian_power": "optim.AdaHessian", "update_period": "optim.SophiaH / AdaHessian",
    "second_moment": "optim.RiemannianAdam", "dampening": "torch.optim.SGD / optim.RiemannianSGD",
    "nesterov": "torch.optim.SGD / optim.RiemannianSGD",
}

# Param-group settings checked against the parameters when they were added (a point of the Stiefel manifold must
# be a matrix on it): a state dict may change a group's numbers, not these.
STRUCTURAL_GROUP_KEYS = ("manifold",)

TORCH_DUPLICATE_MESSAGE = ("optimizer contains a parameter group with duplicate parameters; in future, this will "
                           "cause an error; see github.com/pytorch/pytorch/issues/40967 for more information")


# ------------------------------------------------------------------------------------------------ hyperparameters

def scalar(value: Any, name: str, caller: str) -> float:
    """``value`` (a real number or a 1-element real Tensor) as a Python float; TypeError/ValueError otherwise."""
    kind = type(value)
    if kind is float or kind is int:  # the usual case, without the numbers.Real check (an ABC: ~1 us)
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element ({caller}: {name} has shape {tuple(value.shape)})")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{caller}: {name} must be a real number, got a {value.dtype} Tensor")
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a number or a 1-element Tensor, got {type(value).__name__} "
                        f"{value!r}")
    return float(value)


def check_lr(value: Any, caller: str) -> float:
    lr = scalar(value, "lr", caller)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {value} ({caller}: lr must be a finite number >= 0)")
    return lr


_TORCH_WORDING = {"eps": "Invalid epsilon value", "weight_decay": "Invalid weight_decay value",
                  "momentum": "Invalid momentum value"}


def check_nonnegative(value: Any, name: str, caller: str, *, strict: bool = False) -> float:
    """A finite number >= 0 (> 0 with ``strict``), with torch's wording where torch validates ``name``."""
    number = scalar(value, name, caller)
    if not (math.isfinite(number) and (number > 0.0 if strict else number >= 0.0)):
        prefix = f"{_TORCH_WORDING[name]}: {value} (" if name in _TORCH_WORDING else ""
        suffix = ")" if prefix else ""
        raise ValueError(f"{prefix}{caller}: {name} must be a finite number {'>' if strict else '>='} 0{suffix}")
    return number


def check_unit_interval(value: Any, name: str, caller: str) -> float:
    """A number in [0, 1) (momentum, dampening), with torch's wording for momentum."""
    number = scalar(value, name, caller)
    if not (0.0 <= number < 1.0):
        prefix = f"{_TORCH_WORDING[name]}: {value} (" if name in _TORCH_WORDING else ""
        suffix = ")" if prefix else ""
        raise ValueError(f"{prefix}{caller}: {name} must be in [0, 1), got {value!r}{suffix}")
    return number


def check_betas(betas: Any, caller: str) -> tuple[float, float]:
    """(beta1, beta2), each a number or 1-element Tensor in [0, 1), as Python floats."""
    if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)):
        raise ValueError(f"{caller}: betas must be a pair (beta1, beta2), got {type(betas).__name__} {betas!r}")
    if len(betas) != 2:
        raise ValueError(f"{caller}: betas must be a pair (beta1, beta2), got {betas!r}")
    out = []
    for index, value in enumerate(betas):
        beta = scalar(value, f"betas[{index}]", caller)
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {index}: {value} ({caller}: beta{index + 1} must "
                             f"be in [0, 1); it is betas[{index}])")
        out.append(beta)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------- param groups

def group_tensors(param_group: dict[str, Any]) -> list[Any]:
    """The parameters of a param group as torch's add_param_group reads them (a Tensor, or an ordered collection
    of Tensors or of (name, Tensor) pairs). A one-shot iterable (``module.parameters()``) is stored back in the
    group as a list, as torch does, so that it can be read twice."""
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs. Please use a list instead.")
    params = param_group["params"] = list(params)
    return [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]


def param_label(param_group: dict[str, Any], i: int) -> str:
    """``parameter i``, with its name when the group was given named parameters (``model.named_parameters()``)."""
    entries = param_group.get("params")
    entry = entries[i] if isinstance(entries, list) and i < len(entries) else None
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
        return f"parameter {i} ({entry[0]!r})"
    names = param_group.get("param_names")
    if isinstance(names, list) and i < len(names) and isinstance(names[i], str):
        return f"parameter {i} ({names[i]!r})"
    return f"parameter {i}"


def check_group_params(param_group: dict[str, Any], caller: str, *,
                       dtype_ok: Callable[[torch.Tensor], bool] | None = None,
                       dtypes_text: str = "") -> list[torch.Tensor]:
    """Check the parameters of a new param group before torch appends it; returns them as a list.

    Refuses a non-Tensor (torch's TypeError), a parameter listed twice (torch's warning, raised as a ValueError: it
    would be stepped twice per step, and a fused kernel would write it from two threads) and, with ``dtype_ok``, a
    parameter of an unsupported dtype."""
    tensors = group_tensors(param_group)
    seen: dict[int, int] = {}
    for i, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)} "
                            f"({caller}: parameter {i} of the param group)")
        if id(p) in seen:
            raise ValueError(f"{TORCH_DUPLICATE_MESSAGE} ({caller}: parameter {i} of the param group is parameter "
                             f"{seen[id(p)]} again; list each parameter once)")
        seen[id(p)] = i
        if dtype_ok is not None and not dtype_ok(p):
            raise ValueError(f"{caller}: a parameter of shape {tuple(p.shape)} is {p.dtype}; only {dtypes_text} "
                             f"parameters can be optimized (parameter {i} of the param group)")
    return tensors


# Settings that choose a code path rather than a number: None (decide per step) or a bool.
PATH_KEYS = ("foreach", "fused")
# The on/off settings of the classes (the defaults passed to a constructor are the user's values, so the kind
# cannot be read from them).
FLAG_KEYS = ("maximize", "check_finite", "nesterov", "spatial_average")


def check_group_settings(group: Mapping[str, Any], defaults: Mapping[str, Any], caller: str, *,
                         where: str = "the param group") -> None:
    """The settings every group of a class holds, as the step reads them: every key of ``defaults`` present (a
    group edited after construction, ``del group["lr"]``, would raise KeyError halfway through a step), a bool
    for the on/off settings (``FLAG_KEYS``: a string such as ``"no"`` is truthy), and None or a bool for
    ``foreach``/``fused``. The numbers are the classes' own checks."""
    missing = [key for key in defaults if key not in group]
    if missing:
        raise ValueError(f"{caller}: {where} lacks {missing}; every param group holds {sorted(defaults)} "
                         f"(add_param_group fills a missing one from the defaults): set group[{missing[0]!r}] "
                         f"again, e.g. to the default {defaults[missing[0]]!r}")
    for key in defaults:
        value = group[key]
        if key in PATH_KEYS:
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{caller}: {key} must be None, True or False, got {value!r} (in {where})")
        elif key in FLAG_KEYS and not isinstance(value, bool):
            raise ValueError(f"{caller}: {key} must be True or False, got {value!r} (in {where})")


_IMMUTABLE_SCALARS = (float, int, bool, str, type(None))


def _is_immutable_value(value) -> bool:
    """A plain Python scalar, or a tuple of them: a value that the same object always holds."""
    kind = type(value)
    return kind in _IMMUTABLE_SCALARS or (kind is tuple and all(type(v) in _IMMUTABLE_SCALARS for v in value))


def checked_groups(optimizer: torch.optim.Optimizer, check: Callable[[dict[str, Any], int], Any], *,
                   shapes: bool = False) -> list:
    """``check(group, index)`` of every param group of ``optimizer``, in order: what a step uses from each group
    after validating it. A group whose values (params aside) are all immutable Python scalars or tuples of them,
    and are the very objects checked at an earlier step, under the same keys, with the same params list object
    (and with ``shapes``, for a check that compares settings with the parameters' shapes, the same shapes), is
    not checked again: the same objects hold the same values (an LR scheduler's new ``lr`` is a new float, so
    that group is checked again; a Tensor or a list value is checked at every step)."""
    groups = optimizer.param_groups
    cache = optimizer.__dict__.get("_checked_groups")  # not state: torch's pickling leaves it out
    if cache is None or len(cache) != len(groups):
        cache = optimizer.__dict__["_checked_groups"] = [None] * len(groups)
    results = []
    for i, group in enumerate(groups):
        entry = cache[i]
        values = list(group.values())
        if entry is not None and entry[0] is group and len(entry[2]) == len(values) and \
                all(map(operator.is_, values, entry[2])) and list(group) == entry[1] and \
                (not shapes or [p.shape for p in group["params"]] == entry[3]):
            results.append(entry[4])
            continue
        result = check(group, i)
        results.append(result)
        immutable = all(_is_immutable_value(v) for k, v in group.items() if k != "params")
        watched = [p.shape for p in group["params"]] if shapes else None
        cache[i] = (group, list(group), values, watched, result) if immutable else None
    return results


# ---------------------------------------------------------------------------------------------------------- state

class StateSpec:
    """The per-parameter state a class keeps: ``required`` keys (present whenever the state is not empty) and
    ``optional`` ones, each of a kind: ``"param"`` (a floating tensor of the parameter's shape), ``"matrix"`` (one
    value per matrix of the parameter, shape ``p.shape[:-2] + (1, 1)``), ``"count"`` (a
    finite number >= 0, or such a 1-element tensor), ``"int"`` (a Python int >= 0), ``"flag"`` (a 1-element real
    tensor holding 0 or 1: torch's load casts a saved bool tensor to the parameter's dtype) or ``"any"``."""

    def __init__(self, required: Mapping[str, str], optional: Mapping[str, str] | None = None):
        self.required = dict(required)
        self.optional = dict(optional or {})


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def check_param_state(caller: str, where: str, p: torch.Tensor, state: Mapping[str, Any], spec: StateSpec,
                      *, hint: str = "", values: bool = True, param_name: str = "its parameter") -> None:
    """Raise ValueError naming ``where`` (e.g. "state[3] (parameter 1 of param group 0)") and the key when ``state``
    does not fit ``spec`` for parameter ``p``. An empty state is fine (it is created at the parameter's first step).
    ``values=False`` (at each step) checks keys, types and shapes but reads no tensor value (no host sync).
    """
    if not state:
        return
    keys = set(state)
    missing = sorted(set(spec.required) - keys)
    unknown = sorted(keys - set(spec.required) - set(spec.optional))
    if missing or unknown:
        parts = ([f"lacks {missing}"] if missing else []) + ([f"has unknown keys {unknown}"] if unknown else [])
        optional = f" (optional: {sorted(spec.optional)})" if spec.optional else ""
        hint = hint or "The state was saved by another optimizer class or model; load it into the class that saved it"
        raise ValueError(f"{caller}: {where} {' and '.join(parts)}; {caller} keeps {sorted(spec.required)}{optional}. "
                         f"{hint}")
    kinds = {**spec.optional, **spec.required}
    for key, value in state.items():
        kind = kinds[key]
        if kind == "param":
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(f"{caller}: {where}[{key!r}] has shape {tuple(value.shape)} but {param_name} has "
                                 f"shape {tuple(p.shape)}; the state dict was saved for a different model or "
                                 "parameter order")
            # complex exactly when the parameter is (torch's load would drop the imaginary part of a complex
            # moment of a real parameter with a warning); a meta tensor holds no values to resume from
            if not (isinstance(value, torch.Tensor) and (value.is_complex() if p.is_complex()
                                                         else value.is_floating_point())):
                kind_text = "complex" if p.is_complex() else "real floating-point"
                raise ValueError(f"{caller}: {where}[{key!r}] is {_describe(value)}; it must be a {kind_text} "
                                 f"tensor of {param_name}'s shape {tuple(p.shape)}")
            if value.device.type == "meta" and p.device.type != "meta":
                raise ValueError(f"{caller}: {where}[{key!r}] is a meta tensor (no values); the checkpoint was "
                                 "saved without its data: save it from the materialized optimizer")
        elif kind == "matrix":
            want = tuple(p.shape[:-2]) + (1, 1)
            if not (isinstance(value, torch.Tensor) and tuple(value.shape) == want and value.is_floating_point()):
                raise ValueError(f"{caller}: {where}[{key!r}] is {_describe(value)}; for a parameter of shape "
                                 f"{tuple(p.shape)} it must be one value per matrix, shape {want}")
        elif kind == "count":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
                and value >= 0
            if isinstance(value, torch.Tensor):
                ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
                ok = ok and value.device.type != "meta"
                if ok and values:
                    count = float(value.reshape(()).item())
                    ok = math.isfinite(count) and count >= 0 and count == math.floor(count)
            elif ok and values:
                ok = value == math.floor(value)
            if not ok:
                raise ValueError(f"{caller}: {where}[{key!r}] is {_describe(value)}; it must be a step count (a "
                                 "whole number >= 0, or a tensor with one such element)")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{caller}: {where}[{key!r}] is {_describe(value)}; it must be a Python int >= 0")
        elif kind == "flag":
            ok = isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()
            if ok and values:
                ok = float(value.reshape(()).item()) in (0.0, 1.0)
            if not ok:
                raise ValueError(f"{caller}: {where}[{key!r}] is {_describe(value)}; it must be a flag (a tensor "
                                 "with one element, 0 or 1)")


def check_incoming_state_dict(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], caller: str,
                              *, check_group: Callable[[dict[str, Any], list[torch.Tensor]], None],
                              spec_of: Callable[[dict[str, Any]], StateSpec], hint: str = "") -> None:
    """Validate the whole of ``state_dict`` against ``optimizer`` before anything is loaded (module docstring)."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{caller}.load_state_dict: expected a dict with 'state' and 'param_groups' (from "
                         "optimizer.state_dict()), got " + (f"keys {sorted(map(str, state_dict))}"
                                                           if isinstance(state_dict, Mapping) else
                                                           type(state_dict).__name__))
    saved_class = state_dict.get(CLASS_KEY)
    mine = checkpoint_name(optimizer)
    if saved_class is not None and saved_class != mine:
        raise ValueError(f"{caller}.load_state_dict: the state dict was saved by {saved_class}, not {mine}; load it "
                         f"into {saved_class} (the state of one optimizer class means nothing to another)")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"loaded state dict has a different number of parameter groups ({caller}.load_state_dict: "
                         f"{len(saved_groups)} saved, {len(optimizer.param_groups)} here)")
    for g, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             f"optimizer's group ({caller}.load_state_dict: param group {g} has "
                             f"{len(saved['params'])} parameters saved, {len(group['params'])} here)")
    states = state_dict["state"]
    if not isinstance(states, Mapping):
        raise ValueError(f"{caller}.load_state_dict: state_dict['state'] is {type(states).__name__}; it must be a "
                         "dict from parameter ids to their state (as optimizer.state_dict() gives)")
    for g, saved in enumerate(saved_groups):
        foreign = sorted(key for key in saved if key in IDENTIFYING_GROUP_KEYS and key not in optimizer.defaults)
        if foreign:
            key = foreign[0]
            raise ValueError(f"{caller}.load_state_dict: param group {g} of the state dict has {key!r}, a setting of "
                             f"{IDENTIFYING_GROUP_KEYS[key]} that {caller} does not have: the state dict was saved by "
                             "another optimizer class; load it into the class that saved it")
    flat = 0
    for g, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        # the group as it will be after loading: _after_load fills a setting the saved group lacks from the
        # defaults, as add_param_group does for a new group
        merged = {**optimizer.defaults, **{k: v for k, v in saved.items() if k != "params"}}
        for key in STRUCTURAL_GROUP_KEYS:
            if key in group and merged.get(key) != group[key]:
                raise ValueError(f"{caller}.load_state_dict: param group {g} of the state dict has {key}="
                                 f"{merged.get(key)!r} but its parameters here are in a group with {key}="
                                 f"{group[key]!r}; {key} fixes what the parameters are (checked when they were "
                                 "added), so build the optimizer with the groups of the run being resumed")
        try:
            check_group(merged, group["params"])
        except (ValueError, TypeError) as error:
            raise type(error)(f"{caller}.load_state_dict: param group {g} of the state dict: {error}") from None
        spec = spec_of(merged)
        for i, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            state = states.get(saved_id, {})
            if not isinstance(state, Mapping):
                raise ValueError(f"{caller}.load_state_dict: state[{saved_id!r}] is {type(state).__name__}; it "
                                 "must be a dict of the parameter's state")
            check_param_state(f"{caller}.load_state_dict", f"state[{saved_id!r}] (parameter {i} of param group {g})",
                              p, state, spec, hint=hint, param_name=f"parameter {flat}")
            flat += 1


def checkpoint_name(optimizer: torch.optim.Optimizer) -> str:
    return getattr(optimizer, "_checkpoint_name", None) or f"optim.{type(optimizer).__name__}"


def _record_class(optimizer, state_dict):
    state_dict[CLASS_KEY] = checkpoint_name(optimizer)
    return state_dict


def _before_load(optimizer, state_dict):
    optimizer._check_state_dict(state_dict)
    optimizer.__dict__["_state_dict_being_loaded"] = state_dict


def _after_load(optimizer):
    source = optimizer.__dict__.pop("_state_dict_being_loaded", None)
    fill_group_defaults(optimizer)  # what _check_state_dict checked
    if source is not None:
        optimizer._after_state_dict_loaded(source)


def fill_group_defaults(optimizer: torch.optim.Optimizer) -> None:
    """A setting a param group lacks takes the default, as ``add_param_group`` does for a new group: torch's load
    takes the saved groups as they are (an older version's or torch.optim's lack the newer settings), and torch's
    ``__setstate__`` adds keys to the defaults (``differentiable``) but not to the groups. Called from the load post
    hook and from ``__setstate__`` (unpickling), so that every group holds every setting the step checks."""
    for group in optimizer.param_groups:
        for key, value in optimizer.defaults.items():
            group.setdefault(key, value)


def install_state_dict_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Register the class record, the validation pre hook and the post hook (``optimizer._check_state_dict(sd)``,
    ``optimizer._after_state_dict_loaded(sd)``) with torch's state-dict hook API, once per optimizer object (also
    after unpickling, which drops hooks: call this from ``__setstate__`` too)."""
    if optimizer.__dict__.get("_optim_state_dict_hooks_installed"):
        return
    optimizer.register_state_dict_post_hook(_record_class)
    optimizer.register_load_state_dict_pre_hook(_before_load)
    optimizer.register_load_state_dict_post_hook(_after_load)
    optimizer.__dict__["_optim_state_dict_hooks_installed"] = True


class SparseGradientError(RuntimeError, ValueError):
    """A sparse gradient given to an optimizer that needs dense ones: a RuntimeError as in torch.optim (Adam, SGD
    with momentum raise RuntimeError), and a ValueError as every other bad input of this package."""


def check_grad(caller: str, where: str, p: torch.Tensor, *, sparse_hint: str = "") -> None:
    """A parameter's gradient must be a dense tensor of its shape, dtype and device."""
    g = p.grad
    if g is None:
        return
    if g.is_sparse or g.layout != torch.strided:
        raise SparseGradientError(f"{caller} does not support sparse gradients: the gradient of {where} is "
                                  f"{g.layout}{sparse_hint}")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise ValueError(f"{caller}: the gradient of {where} is {g.dtype} {tuple(g.shape)} on {g.device} but the "
                         f"parameter is {p.dtype} {tuple(p.shape)} on {p.device}; they must match")
