"""The cases of issue 16, each a test that failed before the change: a call that raises has changed nothing, and a
wrong input is refused instead of giving a wrong result silently."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import optim
from optim.stiefel import orthogonal_, riemannian_gradient
from optim.stiefel.manifold import distance_to_manifold, project_tangent

from .._models import TanhMLP
from ._infos import INFO_IDS, INFOS, assert_same, snapshot


def two_group_adamw():
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))
    opt = optim.AdamW([{"params": [a]}, {"params": [b], "lr": 1e-2}], lr=1e-3)
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, a, b


# ----------------------------------------------------------------------------------------------- add_param_group

def test_adamw_add_param_group_refuses_an_int32_tensor_before_adding_it():
    opt, a, b = two_group_adamw()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"torch.int32.*only float64"):
        opt.add_param_group({"params": [torch.ones(3, dtype=torch.int32)]})
    assert_same(before, snapshot(opt))
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("info", INFOS, ids=INFO_IDS)
def test_the_same_parameter_twice_in_a_group_is_refused(info):
    """torch only warns (and the parameter would be stepped twice; the fused CPU path raced on it)."""
    params = info.params()
    opt = info.make(params)
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    before = snapshot(opt)
    with pytest.raises(ValueError, match="duplicate parameters.*parameter 1 of the param group is parameter 0"):
        opt.add_param_group({"params": [extra, extra], **({"manifold": None} if info.manifold else {})})
    assert_same(before, snapshot(opt))


def test_adahessian_refuses_eps_zero():
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        optim.AdaHessian([nn.Parameter(torch.randn(3))], eps=0.0)


# ----------------------------------------------------------------------------------------------- load_state_dict

def test_adamw_load_refuses_a_later_group_missing_exp_avg_sq_and_changes_nothing():
    opt, a, b = two_group_adamw()
    saved = copy.deepcopy(opt.state_dict())
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt)
    del saved["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"state\[1\] \(parameter 0 of param group 1\) lacks \['exp_avg_sq'\]"):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt))


def test_adamw_load_refuses_a_two_element_step():
    opt, a, b = two_group_adamw()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["step"] = torch.tensor([1.0, 1.0])
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"state\[1\].*\['step'\].*step count"):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt))


def test_adamw_load_refuses_a_moment_of_another_shape():
    opt, a, b = two_group_adamw()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["exp_avg"] = torch.zeros(4)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"\['exp_avg'\] has shape \(4,\) but parameter 1 has shape \(5,\)"):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt))


def trained(info):
    params = info.params()
    opt = info.make(params)
    info.step(opt, params)
    return opt


@pytest.mark.parametrize("source, target", [("SophiaH", "AdamW"), ("AdamW", "SophiaH"), ("RSDM", "RiemannianAdam"),
                                            ("AdaHessian", "SophiaH"), ("RiemannianSGD", "RSDM")])
def test_a_checkpoint_of_another_class_is_refused_naming_both(source, target):
    infos = {info.name: info for info in INFOS}
    saved = trained(infos[source]).state_dict()
    opt = trained(infos[target])
    before = snapshot(opt)
    with pytest.raises(ValueError, match=f"saved by optim.{source}, not optim.{target}"):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt))
    # Without the record (a checkpoint of an older version), the state keys give it away.
    del saved["optim_class"]
    with pytest.raises(ValueError, match="another optimizer class"):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt))


def test_torch_adamw_amsgrad_state_is_refused_not_ignored():
    model = nn.Linear(3, 2)
    torch_opt = torch.optim.AdamW(model.parameters(), amsgrad=True)
    model(torch.randn(4, 3)).sum().backward()
    torch_opt.step()
    opt = optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"param group 0.*amsgrad=True.*torch.optim.AdamW\(amsgrad=True\)"):
        opt.load_state_dict(torch_opt.state_dict())
    assert not opt.state
    # Without amsgrad a torch.optim.AdamW checkpoint loads (and is stepped on in the working dtypes).
    plain = torch.optim.AdamW(model.parameters())
    plain.step()
    opt.load_state_dict(plain.state_dict())
    assert set(opt.state[model.weight]) == {"step", "exp_avg", "exp_avg_sq"}


# ------------------------------------------------------------------------------- settings edited after construction

def edited_last_group(info, edit):
    """A trained optimizer whose last param group (stepped after the first) was edited by ``edit(group)``, with the
    gradients in place and a snapshot taken: a step that reads the edit late has already stepped group 0."""
    params = info.params()
    opt = info.make(params)
    info.step(opt, params)
    edit(opt.param_groups[-1])
    info.set_grads(params)
    return opt, snapshot(opt)


def settings_edits(info):
    """(label, edit, what the message names) for every setting the step reads that is not a number."""
    edits = [("maximize='no'", lambda g: g.__setitem__("maximize", "no"), "maximize"),
             ("del lr", lambda g: g.pop("lr"), "lacks \\['lr'\\]")]
    if "foreach" in info.cls([torch.nn.Parameter(torch.zeros(1))], **info.kwargs,
                             **({"manifold": None} if info.manifold else {})).defaults:
        edits.append(("foreach='x'", lambda g: g.__setitem__("foreach", "x"), "foreach"))
    if info.manifold:
        edits.append(("manifold='sphere'", lambda g: g.__setitem__("manifold", "sphere"), "manifold"))
        edits.append(("check_finite='x'", lambda g: g.__setitem__("check_finite", "x"), "check_finite"))
    if info.second_order:
        edits.append(("seed='x'", lambda g: g.__setitem__("seed", "x"), "seed"))
    if info.name == "AdamW":
        edits.append(("amsgrad=True", lambda g: g.__setitem__("amsgrad", True), "amsgrad"))
    return edits


@pytest.mark.parametrize("info", INFOS, ids=INFO_IDS)
def test_a_setting_edited_after_construction_is_refused_before_any_write(info):
    """Issue 16 sweep: a string where a bool belongs reached the op (RuntimeError after group 0 stepped, or
    silently truthy), a deleted key raised KeyError after group 0 stepped, an unknown manifold raised from
    riemannian_gradient after group 0 stepped, amsgrad=True was ignored: the step now checks every setting of every
    group, as add_param_group does, before it writes."""
    for label, edit, named in settings_edits(info):
        opt, before = edited_last_group(info, edit)
        with pytest.raises(ValueError, match=named):
            opt.step()
        assert_same(before, snapshot(opt))


@pytest.mark.parametrize("info", INFOS, ids=INFO_IDS)
def test_a_bool_setting_given_as_a_string_is_refused_at_construction(info):
    with pytest.raises(ValueError, match="maximize.*must be True or False"):
        info.make(info.params(), maximize="no")


# ------------------------------------------------------------------------------------------- checkpoints (sweep)

def checkpoint_edits(info, p_is_real=True):
    """(label, edit of a saved state dict, what the message names): malformations the first sweep did not try."""
    def moments(saved):
        state = saved["state"][1]
        return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim()]

    def complex_moment(saved):
        key = moments(saved)[0]
        saved["state"][1][key] = saved["state"][1][key].to(torch.complex128)

    def meta_moment(saved):
        key = moments(saved)[0]
        saved["state"][1][key] = torch.empty_like(saved["state"][1][key], device="meta")

    edits = [("state is a list", lambda saved: saved.__setitem__("state", []), "must be a dict"),
             ("complex moment of a real parameter", complex_moment, "must be a real floating-point tensor"),
             ("meta moment", meta_moment, "meta tensor")]
    if not info.manifold:  # their step is a Python int (refused as a float already)
        edits.append(("fractional step", lambda saved: saved["state"][1].__setitem__("step", torch.tensor(2.5)),
                      "whole number"))
    return edits


@pytest.mark.parametrize("info", INFOS, ids=INFO_IDS)
def test_a_malformed_checkpoint_of_the_sweep_is_refused_at_load(info):
    """Issue 16 sweep: a list for 'state' raised AttributeError; a complex moment of a real parameter loaded (torch
    dropped its imaginary part with a warning); a meta moment raised NotImplementedError from torch's cast, after
    the hook had recorded the load; a step of 2.5 loaded."""
    params = info.params()
    opt = info.make(params)
    for _ in range(2):
        info.step(opt, params)
    for label, edit, named in checkpoint_edits(info):
        saved = copy.deepcopy(opt.state_dict())
        edit(saved)
        before = snapshot(opt)
        with pytest.raises(ValueError, match=named):
            opt.load_state_dict(saved)
        assert_same(before, snapshot(opt))
        assert "_state_dict_being_loaded" not in opt.__dict__, label


@pytest.mark.parametrize("info", [i for i in INFOS if i.manifold], ids=[i.name for i in INFOS if i.manifold])
def test_a_checkpoint_may_not_change_the_manifold_of_a_group(info):
    """Issue 16 sweep: a torch.optim.SGD checkpoint (no momentum, so no state) loaded into RiemannianSGD and left
    its groups without 'manifold' (KeyError at the next step); a group's manifold is checked against its parameters
    when they are added, so a checkpoint cannot change it."""
    params = info.params()
    opt = info.make(params)
    info.step(opt, params)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][1]["manifold"] = "stiefel"  # the bias, a vector, as a point of the manifold
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 1 of the state dict has manifold='stiefel'.*manifold=None"):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt))
    torch_sgd = torch.optim.SGD([{"params": [nn.Parameter(p.detach().clone())]} for p in params], lr=0.1)
    with pytest.raises(ValueError, match="manifold|another optimizer class"):  # RSDM has no 'dampening'
        opt.load_state_dict(torch_sgd.state_dict())
    assert_same(before, snapshot(opt))


def test_a_saved_group_without_a_setting_takes_the_default_as_it_was_checked():
    """What the load check validated is what the step reads: a setting the saved group lacks (an older version's
    checkpoint) takes the class's default, as add_param_group does for a new group."""
    opt, a, b = two_group_adamw()
    saved = copy.deepcopy(opt.state_dict())
    del saved["param_groups"][1]["lr"]
    opt.load_state_dict(saved)
    assert opt.param_groups[1]["lr"] == opt.defaults["lr"]
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()


@pytest.mark.parametrize("info", [i for i in INFOS if i.manifold], ids=[i.name for i in INFOS if i.manifold])
def test_reorthonormalize_every_refuses_a_bool(info):
    """Issue 16 sweep: reorthonormalize_every=True was taken as the int 1 (a QR at every step)."""
    with pytest.raises(ValueError, match="reorthonormalize_every must be None or an int"):
        info.make(info.params(), reorthonormalize_every=True)


@pytest.mark.parametrize("info", [i for i in INFOS if i.manifold], ids=[i.name for i in INFOS if i.manifold])
def test_a_meta_parameter_in_a_constrained_group_is_a_clear_error(info):
    """Issue 16 sweep: RuntimeError "Tensor.item() cannot be called on meta tensors" from the manifold check."""
    w = nn.Parameter(torch.empty(6, 3, device="meta"))
    with pytest.raises(ValueError, match="meta tensor.*materialize"):
        info.cls([{"params": [w], "manifold": "stiefel"}], **info.kwargs)


# ------------------------------------------------------------------------------------------------------- stiefel

@pytest.mark.parametrize("shape", [(3, 6), (6, 1)], ids=["transposed", "n-by-1"])
def test_riemannian_gradient_refuses_a_gradient_not_of_x_shape(shape):
    x = orthogonal_(torch.empty(6, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"grad has shape .* but X has shape \(6, 3\)"):
        riemannian_gradient(x, torch.randn(shape, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z has shape"):
        project_tangent(x, torch.randn(shape, dtype=torch.float64))


def test_rsdm_reference_and_kernel_reject_duplicate_rows_alike():
    from optim.stiefel._ops import rsdm_step_reference

    messages = []
    for step in (rsdm_step_reference, torch.ops.optim.rsdm_step_):
        x = orthogonal_(torch.empty(2, 6, 3, dtype=torch.float64))
        g, before = torch.randn_like(x), x.clone()
        with pytest.raises(ValueError) as error:
            step(x, g, torch.tensor([[0, 2], [4, 4]]), rank=2, seed=0, offset=0, lr=0.1, core="qr", transport=False)
        assert torch.equal(x, before)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "holds row 4 twice" in messages[0]


def test_rsdm_float32_default_keeps_the_documented_orthogonality():
    """Issue 16: the default re-orthonormalization let ‖XᵀX − I‖ reach 2.7e-5 in 1000 float32 steps on 64×256."""
    generator = torch.Generator().manual_seed(0)
    w = nn.Parameter(orthogonal_(torch.empty(64, 256), generator=generator))
    a = torch.randn(256, 256, generator=generator)
    a = a @ a.T / 256
    opt = optim.RSDM([w], lr=0.05, rank=64, seed=0)
    worst = 0.0
    for _ in range(1000):
        w.grad = -2 * (w @ a)
        opt.step()
        worst = max(worst, float(distance_to_manifold(w)))
    assert worst <= 1e-5


def test_riemannian_adam_matrix_second_moment_is_one_value_per_matrix():
    """second_moment="matrix" (the paper's, geoopt's): v ← β2·v + (1 − β2)·‖ξ‖²_F per matrix; its first step from
    zero state moves X along −lr·ξ/(‖ξ‖_F + eps) (bias-corrected), i.e. by lr in Frobenius norm before the
    retraction."""
    x = nn.Parameter(orthogonal_(torch.empty(2, 6, 3, dtype=torch.float64)))
    g = torch.randn_like(x)
    x.grad = g.clone()
    opt = optim.RiemannianAdam([x], lr=1e-3, eps=0.0, second_moment="matrix", retraction="polar")
    start = x.detach().clone()
    opt.step()
    state = opt.state[x]
    assert state["exp_avg_sq"].shape == (2, 1, 1)
    xi = riemannian_gradient(start, g)
    torch.testing.assert_close(state["exp_avg_sq"], 0.001 * xi.square().sum(dim=(-2, -1), keepdim=True))
    expected = start - 1e-3 * xi / xi.square().sum(dim=(-2, -1), keepdim=True).sqrt()
    torch.testing.assert_close(x.detach(), optim.stiefel.project_to_manifold(expected), atol=1e-9, rtol=0)
    element = nn.Parameter(start.clone())
    element.grad = g.clone()
    optim.RiemannianAdam([element], lr=1e-3, eps=0.0, retraction="polar").step()
    assert (element - x).abs().max() > 1e-6  # "element" is another method
    with pytest.raises(ValueError, match="second_moment must be one of"):
        optim.RiemannianAdam([x], second_moment="row")


# -------------------------------------------------------------------------------------------------- second order

@pytest.mark.parametrize("cls", [optim.SophiaH, optim.AdaHessian])
def test_second_order_sparse_gradient_is_a_clear_error(cls):
    """Issue 16: a NotImplementedError from an aten op. Both the closure path and a sparse p.grad."""
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = cls(embedding.parameters(), seed=0)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="does not support sparse gradients.*parameter 0 of param group 0"):
        opt.step(lambda: embedding(torch.tensor([1, 2])).pow(2).sum())
    assert_same(before, snapshot(opt))
    embedding(torch.tensor([1, 2])).sum().backward()
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):  # torch.optim's type too
        opt.step(hessian_diagonal=[torch.ones(10, 3)])
    assert_same(before, snapshot(opt))


def test_sharpness_monitor_refuses_bad_settings_at_construction():
    model = TanhMLP()
    loss_fn = nn.functional.cross_entropy
    for kwargs, message in ((dict(tol=-1), "tol"), (dict(trace_method="exact"), "trace_method"),
                            (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=f"SharpnessMonitor: {message}"):
            optim.SharpnessMonitor(model, loss_fn, **kwargs)


# -------------------------------------------------------------------------------------------------------- lowrank

def test_lowrank_refactorize_refuses_aliased_factors_alike_in_reference_and_kernel():
    from optim.lowrank._ops import lowrank_refactorize_reference

    messages = []
    for refactorize in (lowrank_refactorize_reference, torch.ops.optim.lowrank_refactorize_):
        b, a = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        product = b @ a
        with pytest.raises(ValueError) as error:
            refactorize([b, b], [a, a.clone()])
        assert torch.equal(b @ a, product)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "B[0] and B[1] share memory" in messages[0]


def low_rank_setup():
    model = TanhMLP()
    optim.to_low_rank(model, 2, target=["fc1", "fc2"])
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def test_two_refactorizers_on_one_optimizer_are_refused():
    model, opt = low_rank_setup()
    first = optim.Refactorizer(model, opt, every=2)
    with pytest.raises(ValueError, match="already has a Refactorizer"):
        optim.Refactorizer(model, opt, every=2)
    first.remove()
    optim.Refactorizer(model, opt, every=2)  # after remove() a new one is fine


def test_refactorizer_load_refuses_a_negative_step_count():
    model, opt = low_rank_setup()
    refactorizer = optim.Refactorizer(model, opt, every=2)
    saved = refactorizer.state_dict()
    saved["step_count"] = -3
    with pytest.raises(ValueError, match="step_count must be an int >= 0"):
        refactorizer.load_state_dict(saved)
    assert refactorizer.step_count == 0


@pytest.mark.parametrize("scheduler_first", [False, True], ids=["scheduler-after", "scheduler-before"])
def test_a_step_failing_during_lr_recovery_leaves_the_scheduled_lr(scheduler_first):
    """The Refactorizer restores the lr when the step raises, and composes with an LR scheduler built before or
    after it (torch's schedulers rewrap optimizer.step)."""
    model, opt = low_rank_setup()
    if scheduler_first:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    refactorizer = optim.Refactorizer(model, opt, every=1, recovery_steps=5)
    if not scheduler_first:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    x = torch.randn(4, 6)
    model(x).sum().backward()
    opt.step()
    scheduler.step()
    refactorizer.step()  # refactorized: the next steps ramp the lr
    assert refactorizer.lr_factor() < 1.0
    opt.param_groups[0]["eps"] = -1.0  # this step raises, after the ramp's pre hook scaled the lr
    with pytest.raises(ValueError, match="Invalid epsilon value"):
        opt.step()
    assert opt.param_groups[0]["lr"] == 5e-3
    assert opt.state_dict()["param_groups"][0]["lr"] == 5e-3


def test_refactorizer_checks_every_factor_before_refactorizing_any():
    model, opt = low_rank_setup()
    refactorizer = optim.Refactorizer(model, opt, every=1)
    with torch.no_grad():
        model.fc2.A[0, 0] = float("inf")
    fc1 = (model.fc1.B.detach().clone(), model.fc1.A.detach().clone())
    with pytest.raises(ValueError, match="A factor of LowRankLinear layer 1 holds NaN or inf; no layer was "
                                         "refactorized"):
        refactorizer.refactorize_now()
    assert torch.equal(model.fc1.B, fc1[0]) and torch.equal(model.fc1.A, fc1[1])
    assert not opt.pending_resets()


@pytest.mark.parametrize("bad", ["inf", "shared"], ids=["inf in a later layer", "a factor shared by two layers"])
def test_refactorize_checks_every_layer_before_rewriting_any(bad):
    """Issue 16 sweep: ``optim.lowrank.refactorize`` (the public function the Refactorizer calls) makes one op call
    per group of layers of one shape; with an inf in a later group it rewrote the earlier group, then raised
    "nothing was changed". Factors shared by two layers of different groups were each rewritten by another call."""
    from optim.lowrank import refactorize

    model, _ = low_rank_setup()
    with torch.no_grad():
        if bad == "inf":
            model.fc2.A[0, 0] = float("inf")
        else:  # fc2's B (3x2) made a view of fc1's A (2x6): the two layers' calls would both write that memory
            model.fc2.B = nn.Parameter(model.fc1.A.detach().t()[:3])
    layers = [model.fc1.B, model.fc1.A, model.fc2.B, model.fc2.A]
    before = [t.detach().clone() for t in layers]
    with pytest.raises(ValueError, match="NaN or inf; no layer was refactorized" if bad == "inf" else "share memory"):
        refactorize(model)
    assert all(torch.equal(t, b) for t, b in zip(layers, before))


def test_low_rank_adamw_checks_every_parameter_before_converting():
    model = TanhMLP()
    model.register_parameter("codes", nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False))
    with pytest.raises(ValueError, match="parameter 'codes'.*torch.int8 and frozen.*Nothing was converted"):
        optim.LowRankAdamW(model, rank=2, target=["fc1", "fc2"])
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear)


def test_to_low_rank_svd_builds_every_layer_before_replacing_any():
    model = TanhMLP()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"to_low_rank \(fc2\).*NaN or inf.*Nothing was converted"):
        optim.to_low_rank(model, 2, target=["fc1", "fc2"], init="svd")
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear)


def test_low_rank_adamw_checks_the_refactorizer_state_before_loading_either_part():
    model = TanhMLP()
    opt = optim.LowRankAdamW(model, rank=2, target=["fc1", "fc2"], every=2)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["refactorizer"]["step_count"] = -1
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="step_count must be an int >= 0"):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt))


def _two_group_second_order(cls):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, update_period=1000)
    for _ in range(2):
        opt.zero_grad()
        opt.step(lambda: (a ** 4).sum() + (b ** 4).sum())
    return opt, a, b


@pytest.mark.parametrize("cls", [optim.SophiaH, optim.AdaHessian])
def test_second_order_step_refuses_a_count_past_float32_before_any_write(cls):
    """A float32 step count of 2**24 cannot count one more step: the step refuses it before group 0 moves."""
    opt, a, b = _two_group_second_order(cls)
    opt.state[b]["step"].fill_(2.0**24)
    if cls is optim.AdaHessian:
        opt.state[b]["hessian_step"].fill_(1.0)
    before = [a.detach().clone(), b.detach().clone(), opt.state[a]["step"].clone()]
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 .*2\*\*24"):
        opt.step(lambda: (a ** 4).sum() + (b ** 4).sum())
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert torch.equal(opt.state[a]["step"], before[2])


def test_adahessian_load_refuses_more_refreshes_than_steps():
    opt, a, b = _two_group_second_order(optim.AdaHessian)
    saved = opt.state_dict()
    saved["state"][1]["hessian_step"] = torch.tensor(5.0)
    before = {k: v.clone() for k, v in opt.state[b].items()}
    with pytest.raises(ValueError, match="hessian_step 5 > step 2"):
        opt.load_state_dict(saved)
    assert all(torch.equal(opt.state[b][k], v) for k, v in before.items())


@pytest.mark.parametrize("foreach", [True, False])
def test_functional_adahessian_checks_the_counts_of_every_call_before_the_first(foreach):
    """Two parameters of different dtypes are two op calls: a bad count pair of the second refuses both."""
    from optim.hessian.adahessian import adahessian

    torch.manual_seed(0)
    params = [torch.randn(3, dtype=torch.float64), torch.randn(4, dtype=torch.float32)]
    grads = [torch.randn_like(p) for p in params]
    moments = [[torch.rand_like(p) for p in params] for _ in range(2)]
    before = [t.clone() for t in params + moments[0] + moments[1]]
    with pytest.raises(ValueError, match=r"hessian_steps\[1\]=4"):
        adahessian(params, grads, moments[0], moments[1], [None, None], [3, 3], [1, 4], lr=0.1, beta1=0.9,
                   beta2=0.999, weight_decay=0.0, eps=1e-8, hessian_power=1.0, foreach=foreach,
                   fused=None if foreach else False)
    assert all(torch.equal(a, b) for a, b in zip(params + moments[0] + moments[1], before))
