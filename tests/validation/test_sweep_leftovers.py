"""What a hostile-input sweep still found after issue 16's re-sweep: arguments accepted at construction and refused
(or misused) much later, products of kept graphs gone stale when a parameter is replaced, and errors of the wrong
type. Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optim
from optim.hessian import SharpnessMonitor


def mse_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype).eval()
    batch = (torch.randn(6, 3, dtype=dtype), torch.randn(6, 2, dtype=dtype))
    return model, batch


# ---------------------------------------------------------------------------------------------- SharpnessMonitor

class Unwritable:
    pass


@pytest.mark.parametrize("kwargs, message", [
    (dict(probes=True), "probes must be an integer >= 0"),
    (dict(probes=-1), "probes must be an integer >= 0"),
    (dict(every=True), "every must be an integer >= 1"),
    (dict(top_k=True), "top_k must be an integer >= 1"),
    (dict(lr_from=-1), "lr_from, the learning rate, must be a finite number >= 0"),
    (dict(lr_from=float("inf")), "lr_from, the learning rate, must be a finite number >= 0"),
    (dict(lr_from=True), "lr_from must be an optimizer or a number"),
    (dict(lr_from=torch.tensor(0.1)), "lr_from must be an optimizer or a number"),
    (dict(eval_mode="x"), "eval_mode must be True or False"),
    (dict(eval_mode=1), "eval_mode must be True or False"),
    (dict(writer=3), "writer must be None or an object with add_scalar"),
    (dict(writer=Unwritable()), "writer must be None or an object with add_scalar"),
    (dict(param_filter=3), "param_filter must be None or callable"),
    (dict(param_filter=lambda name, p: False), "param_filter selects no parameter"),
    (dict(seed=2**70), r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(seed=1.0), r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(seed=None), r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(curvature=["hessian"]), "curvature must be one of"),
    (dict(trace_method=None), "trace_method must be one of"),
    (dict(compile="yes"), "compile must be True or False"),
])
def test_monitor_refuses_a_bad_argument_at_construction(kwargs, message):
    model, _ = mse_problem()
    with pytest.raises(ValueError, match=message):
        SharpnessMonitor(model, nn.MSELoss(), **kwargs)


@pytest.mark.parametrize("model, loss_fn, message", [
    ("not a model", nn.MSELoss(), "model must be a torch.nn.Module"),
    (None, 3, "loss_fn must be callable"),
])
def test_monitor_refuses_a_bad_model_or_loss(model, loss_fn, message):
    model = mse_problem()[0] if model is None else model
    with pytest.raises(ValueError, match=message):
        SharpnessMonitor(model, loss_fn)


def test_monitor_lanczos_iters_of_the_wrong_type_is_a_type_error_not_a_comparison_failure():
    model, _ = mse_problem()
    with pytest.raises(TypeError, match="lanczos_iters must be an int"):
        SharpnessMonitor(model, nn.MSELoss(), lanczos_iters="30")


def test_monitor_refuses_an_optimizer_whose_lr_cannot_give_a_limit():
    model, _ = mse_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    SharpnessMonitor(model, nn.MSELoss(), lr_from=optimizer)  # fine
    optimizer.param_groups[0]["lr"] = "fast"
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be a finite number"):
        SharpnessMonitor(model, nn.MSELoss(), lr_from=optimizer)
    optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["momentum"] = 0.1, -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['momentum'\] must be a finite number >= 0"):
        SharpnessMonitor(model, nn.MSELoss(), lr_from=optimizer)


@pytest.mark.parametrize("step", [-1, 1.0, True, 2])
def test_monitor_refuses_a_step_that_gives_no_seed_before_measuring(step):
    model, batch = mse_problem()
    monitor = SharpnessMonitor(model, nn.MSELoss(), every=1, probes=0, seed=2**64 - 2)
    with pytest.raises(ValueError, match="step must be an int >= 0 with seed \\+ step < 2\\*\\*64"):
        monitor.step(step, batch)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        monitor.measure(step, batch)
    assert monitor.records == []
    assert monitor.measure(1, batch)["step"] == 1  # seed + 1 = 2**64 - 1: the last seed there is


# ----------------------------------------------------------------------------------- curvature operators: freshness

OPERATORS = [optim.HessianOperator, optim.GGNOperator, optim.EmpiricalFisherOperator]
OPERATOR_IDS = [cls.__name__ for cls in OPERATORS]


def bn_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    model[1].running_mean.normal_()
    batch = (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    return model, batch


@pytest.mark.parametrize("reuse_graph", [None, True, False])
@pytest.mark.parametrize("cls", OPERATORS, ids=OPERATOR_IDS)
def test_a_replaced_parameter_is_differentiated_not_the_old_one(cls, reuse_graph):
    """The kept graph was proven fresh by the versions and bits of the captured tensors, and the products were
    taken at the parameter list of the construction: after ``model[0].weight = nn.Parameter(w)`` the operator kept
    returning the old weight's products."""
    model, batch = mse_problem()
    H = cls(model, nn.MSELoss(), batch, reuse_graph=reuse_graph)
    v = torch.randn(3, H.n, dtype=torch.float64)
    H @ v  # builds (and with reuse, keeps) the state at the old weight
    H.quadratic_forms(v)
    model[0].weight = nn.Parameter(3.0 * torch.randn(4, 3, dtype=torch.float64))
    fresh = cls(model, nn.MSELoss(), batch)
    torch.testing.assert_close(H @ v, fresh @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H @ v[0], fresh @ v[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H.quadratic_forms(v), fresh.quadratic_forms(v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H.loss_and_grad()[1], fresh.loss_and_grad()[1], rtol=1e-12, atol=1e-12)
    assert H.params[0] is model[0].weight


@pytest.mark.parametrize("cls", OPERATORS, ids=OPERATOR_IDS)
def test_a_replaced_out_of_scope_parameter_or_buffer_rebuilds_the_kept_state(cls):
    model, batch = bn_problem()
    H = cls(model, nn.MSELoss(), batch, param_filter=lambda name, p: name.startswith("3."))
    v = torch.randn(2, H.n, dtype=torch.float64)
    H @ v
    model[0].weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))  # held fixed, but not at its old value
    model[1].running_var = torch.rand(4, dtype=torch.float64) + 0.5  # a buffer replaced
    fresh = cls(model, nn.MSELoss(), batch, param_filter=lambda name, p: name.startswith("3."))
    torch.testing.assert_close(H @ v, fresh @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", OPERATORS, ids=OPERATOR_IDS)
def test_a_parameter_gone_or_reshaped_is_refused_naming_it(cls):
    model, batch = mse_problem()
    H = cls(model, nn.MSELoss(), batch)
    v = torch.randn(H.n, dtype=torch.float64)
    H @ v
    model[2].bias = nn.Parameter(torch.zeros(2))  # float32: not the operator's layout
    with pytest.raises(ValueError, match=r"parameter '2.bias' is now torch.float32 .*build a new operator"):
        H @ v
    del model[2].bias
    model[2].register_parameter("bias", None)
    with pytest.raises(ValueError, match=r"no longer has the parameter '2.bias'.*build a new operator"):
        H @ v


# ---------------------------------------------------------------------------------------------------------- hvp

def cubic(a, b):
    return (a ** 3).sum() + (a.sum() * b).sum() + (b ** 2).sum()


@pytest.mark.parametrize("mode", ["auto", "rr", "fr", "fd"])
@pytest.mark.parametrize("k", [None, 0, 1, 5])
def test_hvp_of_a_parameter_with_no_elements_is_an_empty_product(mode, k):
    """A 0-element parameter is handled, not refused: its block of H is empty. (The sweep's IndexError came from
    its own f indexing the empty tensor, raised through the curvature routes' __torch_function__ frame.)"""
    a = torch.randn(3, dtype=torch.float64)
    b = torch.randn(0, 2, dtype=torch.float64)
    lead = () if k is None else (k,)
    v = [torch.randn(lead + (3,), dtype=torch.float64), torch.randn(lead + (0, 2), dtype=torch.float64)]
    hv, grad = optim.hvp(cubic, [a, b], v, mode=mode, return_grad=True)
    assert hv[1].shape == lead + (0, 2) and grad[1].shape == (0, 2)
    expected = 6 * a * v[0]  # H of Σa³ + 0 (the b terms are empty sums)
    torch.testing.assert_close(hv[0], expected, rtol=1e-6 if mode == "fd" else 1e-12, atol=1e-9)


@pytest.mark.parametrize("cls", OPERATORS, ids=OPERATOR_IDS)
def test_operators_on_a_model_with_an_empty_parameter(cls):
    model, batch = mse_problem()
    model.register_parameter("empty", nn.Parameter(torch.zeros(0, dtype=torch.float64)))
    H = cls(model, nn.MSELoss(), batch)
    plain = cls(model, nn.MSELoss(), batch, param_filter=lambda name, p: name != "empty")
    v = torch.randn(2, plain.n, dtype=torch.float64)
    assert H.n == plain.n
    torch.testing.assert_close(H @ v, plain @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("params, v, message", [
    ([torch.randn(3, device="meta")], [torch.ones(3, device="meta")], r"params\[0\] is a meta tensor"),
    ([torch.randn(3).to_sparse()], [torch.ones(3)], r"params\[0\] is a torch.sparse_coo tensor"),
    ([torch.randn(3)], [torch.ones(3).to_sparse()], r"v\[0\] is a torch.sparse_coo tensor"),
])
def test_hvp_refuses_meta_and_sparse_tensors_clearly(params, v, message):
    with pytest.raises(ValueError, match=message):
        optim.hvp(lambda a: (a ** 3).sum(), params, v)


def test_hvp_refuses_an_uncallable_f_and_a_non_bool_return_grad():
    with pytest.raises(TypeError, match="f must be callable"):
        optim.hvp(3, [torch.randn(3)], [torch.ones(3)])
    with pytest.raises(TypeError, match="return_grad must be True or False"):
        optim.hvp(lambda a: (a ** 3).sum(), [torch.randn(3)], [torch.ones(3)], return_grad="yes")


@pytest.mark.parametrize("cls", OPERATORS, ids=OPERATOR_IDS)
def test_operators_refuse_a_meta_model_at_construction_naming_the_parameter(cls):
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match="parameter 'weight' is a meta tensor"):
        cls(model, nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)))


# ------------------------------------------------------------------------------------------------------ lowrank

def module_snapshot(model: nn.Module):
    return [(name, type(m)) for name, m in model.named_modules()], \
        {k: v.detach().clone() for k, v in model.state_dict().items() if v.device.type != "meta"}


def assert_module_unchanged(before, model):
    structure, tensors = module_snapshot(model)
    assert structure == before[0]
    assert tensors.keys() == before[1].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[1][key]), key


def two_low_rank_layers():
    torch.manual_seed(0)
    model = nn.Sequential(optim.LowRankLinear(8, 6, 2), nn.Tanh(), optim.LowRankLinear(6, 5, 2))
    return model


@pytest.mark.parametrize("breakage, message", [
    (lambda layer: setattr(layer, "B", nn.Parameter(torch.randn(5, 3))), r"B \(5, 3\) and A \(2, 6\).*one rank r"),
    (lambda layer: setattr(layer, "A", nn.Parameter(torch.randn(2, 7))), r"B \(5, 2\) and A \(2, 7\)"),
    (lambda layer: setattr(layer, "A", nn.Parameter(torch.randn(2, 6, dtype=torch.float64))),
     "factor B is torch.float32 on cpu but A is torch.float64"),
    (lambda layer: setattr(layer, "A", nn.Parameter(torch.randn(2, 6, 1))), "factor A must be a 2-D floating"),
    (lambda layer: setattr(layer, "bias", nn.Parameter(torch.randn(4))), r"bias must be None or of shape \(5,\)"),
])
def test_merge_refuses_factors_that_do_not_fit_before_replacing_any_layer(breakage, message):
    model = two_low_rank_layers()
    breakage(model[2])  # the second layer: the first would have been merged before the failure
    before = module_snapshot(model)
    with pytest.raises(ValueError, match=r"merge \(2\): .*" + message):
        optim.lowrank.merge(model)
    assert_module_unchanged(before, model)
    with pytest.raises(ValueError, match="merge: "):
        optim.lowrank.merge(model[2])


def test_merge_refuses_a_non_module():
    with pytest.raises(TypeError, match="merge: model must be an nn.Module"):
        optim.lowrank.merge([optim.LowRankLinear(8, 6, 2)])


def test_to_low_rank_with_svd_init_refuses_a_meta_model_before_converting_a_layer():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(8, 8))
    model.add_module("fc2", nn.Linear(8, 8, device="meta"))
    before = module_snapshot(model)
    with pytest.raises(ValueError, match=r"to_low_rank \(fc2\): the weight is a meta tensor.*init='svd'"):
        optim.lowrank.to_low_rank(model, 2, init="svd")
    assert_module_unchanged(before, model)
    with pytest.raises(ValueError, match="from_linear: the weight is a meta tensor"):
        optim.LowRankLinear.from_linear(model.fc2, 2, init="svd")
    optim.lowrank.to_low_rank(model, 2)  # init="random" needs no values
    assert isinstance(model.fc2, optim.LowRankLinear) and model.fc2.B.device.type == "meta"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(scale=True), ValueError, "to_low_rank: scale must be a finite number > 0, got True"),
    (dict(scale=float("nan")), ValueError, "to_low_rank: scale must be a finite number > 0"),
    (dict(target=3), TypeError, "target must be a non-empty list of name patterns or a predicate, got 3"),
    (dict(target={"fc1": 1}), TypeError, "target must be a non-empty list of name patterns"),
])
def test_to_low_rank_refuses_bad_arguments_before_converting(kwargs, error, message):
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(8, 8))
    before = module_snapshot(model)
    with pytest.raises(error, match=message):
        optim.lowrank.to_low_rank(model, 2, **kwargs)
    assert_module_unchanged(before, model)


def test_low_rank_linear_refuses_a_bool_scale():
    with pytest.raises(ValueError, match="LowRankLinear: scale must be a finite number > 0, got True"):
        optim.LowRankLinear(8, 6, 2, scale=True)


# ------------------------------------------------------------------------------------- the same entry points, more

@pytest.mark.parametrize("args, kwargs, error, message", [
    ((3, [torch.ones(3)]), {}, ValueError, "params must be a list or tuple of tensors, got a int"),
    (([torch.randn(3)], None), {}, ValueError, "v must be a list or tuple of tensors shaped like params"),
    (([torch.randn(3)], [torch.ones(3)]), dict(strict=1), TypeError, "strict must be None, True or False"),
])
def test_hvp_refuses_non_lists_and_an_int_for_a_flag(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        optim.hvp(lambda a: (a ** 3).sum(), *args, **kwargs)


def test_hvp_still_takes_one_shot_iterables():
    a = torch.randn(3, dtype=torch.float64)
    (hv,) = optim.hvp(lambda x: (x ** 3).sum(), iter([a]), iter([torch.ones(3, dtype=torch.float64)]))
    torch.testing.assert_close(hv, 6 * a)


@pytest.mark.parametrize("cls", OPERATORS, ids=OPERATOR_IDS)
def test_operators_refuse_an_int_reuse_graph_and_a_malformed_batch_of_a_list_at_construction(cls):
    model, batch = mse_problem()
    with pytest.raises(ValueError, match="reuse_graph must be None, True or False, got 1"):
        cls(model, nn.MSELoss(), batch, reuse_graph=1)
    with pytest.raises(ValueError, match="data batch 1 is a tuple of length 1"):
        cls(model, nn.MSELoss(), [batch, (batch[0],)])
