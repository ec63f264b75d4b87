"""Property test over the public entry points (``step``, ``load_state_dict``, ``add_param_group``) of every optimizer
class: for a malformed input of each kind from issue 16, placed in a random param group, the call raises a
ValueError or TypeError and every parameter, gradient, state value and param-group value is bit-identical to its
snapshot from before the call."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ._infos import INFOS, assert_same, snapshot

CHECKS_FINITE = ("SophiaH", "AdaHessian", "RSDM", "RiemannianSGD", "RiemannianAdam", "RiemannianAdam-matrix")


def trained(info):
    params = info.params()
    opt = info.make(params)
    for _ in range(2):
        info.step(opt, params)
    info.set_grads(params)
    return params, opt


def bad_group_value(info, opt, params, group, draw):
    key, value = draw(st.sampled_from(
        [("lr", -1.0), ("lr", float("nan")), ("lr", "0.1"), ("lr", torch.tensor([1e-3, 1e-3]))]
        + ([("betas", 0.9), ("betas", (0.9,)), ("betas", (1.5, 0.9))] if info.has_betas else [])
        + ([("eps", -1.0)] if "eps" in opt.defaults else [])
        + ([("momentum", 1.5)] if "momentum" in opt.defaults else [])))
    opt.param_groups[group][key] = value
    return opt.step


def sparse_gradient(info, opt, params, group, draw):
    if group == 0 and info.manifold:
        group = 1  # a constrained matrix has no sparse form worth testing; the bias has
    p = opt.param_groups[group]["params"][0]
    p.grad = torch.randn_like(p).to_sparse()
    return opt.step


def non_finite_gradient(info, opt, params, group, draw):
    if info.name not in CHECKS_FINITE:
        return None
    p = opt.param_groups[group]["params"][0]
    grad = p.grad.detach().clone()
    grad.view(-1)[draw(st.integers(0, grad.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    p.grad = grad
    return opt.step


def corrupted_state(info, opt, params, group, draw):
    """The state of a parameter of ``group`` edited in place: a key removed or replaced by a wrong shape."""
    state = opt.state[opt.param_groups[group]["params"][0]]
    key = draw(st.sampled_from(sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim())
                               or sorted(state)))
    if draw(st.booleans()):
        if key == "momentum_buffer" and not (info.name == "RSDM" and group == 0):
            return None  # created on first use by SGD-style updates: optional, not malformed when missing
        del state[key]
    else:
        state[key] = torch.zeros(7, dtype=torch.float64)
    return opt.step


def malformed_checkpoint(info, opt, params, group, draw):
    saved = copy.deepcopy(opt.state_dict())
    ids = saved["param_groups"][group]["params"]
    state = saved["state"][ids[0]]
    kind = draw(st.sampled_from(["missing key", "wrong shape", "two-element step", "bad group value",
                                 "another class", "unmarked other class"]))
    if kind == "missing key":
        key = draw(st.sampled_from(sorted(state)))
        if key == "momentum_buffer" and not (info.name == "RSDM" and group == 0):
            return None  # optional (created on first use)
        del state[key]
    elif kind == "wrong shape":
        key = draw(st.sampled_from(sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim())
                                   or ["step"]))
        state[key] = torch.zeros(7, dtype=torch.float64)
    elif kind == "two-element step":
        state["step"] = torch.tensor([1.0, 2.0])
    elif kind == "bad group value":
        saved["param_groups"][group]["lr"] = -1.0
    else:
        other = draw(st.sampled_from([i for i in INFOS if i.cls is not info.cls]))
        other_params = other.params()
        other_opt = other.make(other_params)
        other.step(other_opt, other_params)
        saved = copy.deepcopy(other_opt.state_dict())
        if kind == "unmarked other class":
            del saved["optim_class"]
    return lambda: opt.load_state_dict(saved)


def bad_new_group(info, opt, params, group, draw):
    kind = draw(st.sampled_from(["integer", "duplicate", "bad lr", "not a tensor"]))
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    new = {"params": [extra], **({"manifold": None} if info.manifold else {})}
    if kind == "integer":
        new["params"] = [torch.ones(3, dtype=torch.int32)]
    elif kind == "duplicate":
        new["params"] = [extra, extra]
    elif kind == "bad lr":
        new["lr"] = -1.0
    else:
        new["params"] = [extra, 3.0]
    return lambda: opt.add_param_group(new)


MALFORMATIONS = [bad_group_value, sparse_gradient, non_finite_gradient, corrupted_state, malformed_checkpoint,
                 bad_new_group]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(info=st.sampled_from(INFOS), malformation=st.sampled_from(MALFORMATIONS), group=st.integers(0, 1),
       data=st.data())
def test_a_malformed_call_changes_nothing(info, malformation, group, data):
    params, opt = trained(info)
    call = malformation(info, opt, params, group, data.draw)
    if call is None:
        return
    before = snapshot(opt)
    with pytest.raises((ValueError, TypeError)):
        call()
    assert_same(before, snapshot(opt))
