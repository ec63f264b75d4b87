"""torch.optim conformance of every optimizer class, in the style of torch's ``TestOptimRenewed`` (its
``test/test_optim.py`` is not shipped in the wheel): param groups, Tensor lr (and betas), step and state-dict hooks,
a step without gradients, closures, error types and torch's messages, and a state-dict round trip through
``torch.load(weights_only=True)`` that continues bit for bit."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

from ._infos import INFO_IDS, INFOS, TORCH_MESSAGES, assert_same, snapshot

pytestmark = pytest.mark.parametrize("info", INFOS, ids=INFO_IDS)


def run(info, opt, params, steps=3):
    for _ in range(steps):
        info.step(opt, params)


def test_param_groups_use_their_own_lr(info):
    """Two groups with different lr give the same trajectory as the groups run separately would give with those
    lrs: the group's value is read, not the default's."""
    params = info.params()
    opt = info.cls([{**info.groups(params)[0], "lr": 3e-2}, info.groups(params)[1]], **info.kwargs)
    assert [g["lr"] for g in opt.param_groups] == [3e-2, info.kwargs["lr"]]
    run(info, opt, params)
    reference = info.params()
    ref_opt = info.cls([{**info.groups(reference)[0]}, info.groups(reference)[1]], **{**info.kwargs, "lr": 3e-2})
    run(info, ref_opt, reference)
    assert torch.equal(params[0], reference[0])  # W's group: lr 3e-2 in both
    assert not torch.equal(params[1], reference[1])  # b's group: default lr vs 3e-2


def test_tensor_lr_equals_float_lr(info):
    """torch.optim accepts a Tensor lr (and Tensor betas); the trajectory equals the float one exactly."""
    kwargs = dict(info.kwargs, lr=torch.tensor(info.kwargs["lr"], dtype=torch.float64))
    if info.has_betas:
        betas = (0.9, 0.99)
        kwargs["betas"] = (torch.tensor(betas[0], dtype=torch.float64), torch.tensor(betas[1], dtype=torch.float64))
    params, reference = info.params(), info.params()
    opt = info.make(params, **kwargs)
    ref_opt = info.make(reference, **({"betas": (0.9, 0.99)} if info.has_betas else {}))
    run(info, opt, params)
    run(info, ref_opt, reference)
    for a, b in zip(params, reference):
        assert torch.equal(a, b)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # kept as given, as torch does


def test_tensor_lr_must_have_one_element(info):
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        info.make(info.params(), lr=torch.tensor([1e-3, 1e-3]))


def test_step_and_state_dict_hooks_run(info):
    params = info.params()
    opt = info.make(params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("state_dict pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    info.step(opt, params)
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert calls == ["step pre", "step post", "state_dict pre", "state_dict post", "load pre", "load post"]


def test_step_without_gradients_changes_nothing(info):
    """torch.optim: a step where no parameter has a gradient (or every parameter is frozen) is a no-op."""
    params = info.params()
    opt = info.make(params)
    before = snapshot(opt)
    assert opt.step() is None
    assert_same(before, snapshot(opt))
    for p in params:
        p.requires_grad_(False)
    info.step(opt, params)  # every parameter frozen, with a closure
    assert_same(before, snapshot(opt))


def test_closure_returns_the_loss(info):
    params = info.params()
    opt = info.make(params)
    expected = info.loss(params).item()
    loss = info.step(opt, params)
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(expected)
    assert not torch.equal(params[0], info.params()[0])


@pytest.mark.parametrize("name", list(TORCH_MESSAGES))
def test_torch_messages_for_what_torch_validates(info, name):
    """torch's own ValueError message comes first; ours may add words after it."""
    if name not in info.torch_validated:
        pytest.skip(f"{info.name} has no {name}")
    value, message = TORCH_MESSAGES[name]
    with pytest.raises(ValueError) as error:
        info.make(info.params(), **{name: value})
    assert str(error.value).startswith(message), str(error.value)
    torch_cls = torch.optim.SGD if name == "momentum" else torch.optim.AdamW
    with pytest.raises(ValueError, match=re.escape(message)):
        torch_cls([torch.nn.Parameter(torch.zeros(1))], **{name: value})


def test_bad_hyperparameter_in_a_group_is_refused_before_any_write(info):
    """A group edited to an invalid value after construction: the step raises before changing anything."""
    params = info.params()
    opt = info.make(params)
    info.step(opt, params)
    lr, betas = opt.param_groups[1]["lr"], opt.param_groups[1].get("betas")
    opt.param_groups[1]["lr"] = -1.0
    info.set_grads(params)  # gradients set before the snapshot (a closure would recompute them)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step()
    assert_same(before, snapshot(opt))
    opt.param_groups[1]["lr"] = lr
    if info.has_betas:
        opt.param_groups[1]["betas"] = 0.9  # issue 16: was "TypeError: cannot unpack" after group 0 stepped
        before = snapshot(opt)
        with pytest.raises(ValueError, match="betas must be a pair"):
            opt.step()
        assert_same(before, snapshot(opt))
        opt.param_groups[1]["betas"] = betas
    before = snapshot(opt)
    info.step(opt, params)  # restored: steps again
    with pytest.raises(AssertionError):
        assert_same(before, snapshot(opt))


def test_errors_are_value_or_type_errors(info):
    params = info.params()
    with pytest.raises(TypeError):
        info.make(params, lr="0.1")
    with pytest.raises(ValueError, match="duplicate parameters"):
        info.cls([{"params": [params[0], params[0]], **({"manifold": "stiefel"} if info.manifold else {})}],
                 **info.kwargs)
    with pytest.raises(TypeError, match="ordered collections"):
        info.cls([{"params": {params[1]}, **({"manifold": None} if info.manifold else {})}], **info.kwargs)


def test_state_dict_round_trip_weights_only(info):
    """Save after 3 steps, load into a fresh optimizer through torch.load(weights_only=True): the next 3 steps are
    bit-identical to the uninterrupted run, and the class is recorded."""
    params = info.params()
    opt = info.make(params)
    run(info, opt, params)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict()}, buffer)
    assert opt.state_dict()["optim_class"] == f"optim.{info.cls.__name__}"
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(p.clone()) for p in checkpoint["params"]]
    resumed_opt = info.make(resumed)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    run(info, opt, params)
    run(info, resumed_opt, resumed)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_deepcopy_keeps_the_load_checks(info):
    """Hooks do not survive pickling in torch; the classes install theirs again."""
    params = info.params()
    opt = info.make(params)
    info.step(opt, params)
    clone = copy.deepcopy(opt)
    saved = opt.state_dict()
    saved["optim_class"] = "optim.SomethingElse"
    with pytest.raises(ValueError, match="saved by optim.SomethingElse"):
        clone.load_state_dict(saved)


def test_named_parameters_step_and_round_trip_as_plain_ones(info):
    """torch.optim takes ``model.named_parameters()``, (name, tensor) pairs (torch >= 2.6), and keeps the names as
    each group's ``param_names`` in the state dict: the same steps as unnamed parameters, a state dict that loads
    into a fresh named optimizer and continues bit for bit, and errors that name the parameter."""
    try:
        torch.optim.SGD([("w", torch.nn.Parameter(torch.zeros(1)))])
    except TypeError:
        pytest.skip("this torch has no named parameters in optimizers (torch < 2.6)")
    names = ["weight", "bias"]

    def named(groups):
        return [{**group, "params": [(names[i], p) for i, p in zip(indices, group["params"])]}
                for group, indices in zip(groups, ([0], [1]))]

    params, reference = info.params(), info.params()
    opt = info.cls(named(info.groups(params)), **info.kwargs)
    run(info, opt, params)
    run(info, info.make(reference), reference)
    for a, b in zip(params, reference):
        assert torch.equal(a, b)
    saved = opt.state_dict()
    assert [group["param_names"] for group in saved["param_groups"]] == [["weight"], ["bias"]]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed_opt = info.cls(named(info.groups(resumed)), **info.kwargs)
    resumed_opt.load_state_dict(torch.load(buffer, weights_only=True))
    run(info, opt, params)
    run(info, resumed_opt, resumed)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    if info.manifold:  # a 1-D tensor in a constrained group: the error names it
        with pytest.raises(ValueError, match=r"parameter 0 \('bias'\) of the group has shape \(3,\)"):
            info.cls([{"params": [("bias", info.params()[1])], "manifold": "stiefel"}], **info.kwargs)
