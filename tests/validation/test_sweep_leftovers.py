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
