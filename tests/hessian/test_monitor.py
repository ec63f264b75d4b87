"""SharpnessMonitor: λ_max and trace against the exact Hessian of a small model, records and their files."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from optim.hessian.monitor import SharpnessMonitor


def small_problem():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64))
    return model, batch


def exact_hessian(model, batch):
    params = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.flatten() for p in params])

    def loss(vector):
        tensors, start = {}, 0
        for (name, _), shape in zip(model.named_parameters(), shapes):
            tensors[name] = vector[start:start + shape.numel()].view(shape)
            start += shape.numel()
        output = torch.func.functional_call(model, tensors, (batch[0],))
        return ((output - batch[1]) ** 2).mean()

    return torch.autograd.functional.hessian(loss, flat)


def mse(output, target):
    return ((output - target) ** 2).mean()


def test_measures_lambda_max_trace_and_the_stability_limit(tmp_path):
    model, batch = small_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = SharpnessMonitor(model, mse, every=5, lr_from=optimizer, probes=200, lanczos_iters=60, tol=1e-8)
    assert monitor.step(3, batch) is None
    record = monitor.step(5, batch)
    hessian = exact_hessian(model, batch)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert record["lambda_max"] == pytest.approx(eigenvalues[-1].item(), rel=1e-6)
    assert abs(record["trace"] - hessian.trace().item()) <= 4 * record["trace_std_error"]
    assert record["stability_limit"] == pytest.approx((2 + 2 * 0.9) / 0.05)
    assert model.training, "the model's mode is restored"
    monitor.to_csv(tmp_path / "s.csv")
    monitor.to_json(tmp_path / "s.json")
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert float(rows[0]["lambda_max"]) == pytest.approx(record["lambda_max"])
    assert json.load(open(tmp_path / "s.json"))["records"][0]["step"] == 5
    restored = SharpnessMonitor(model, mse, every=5)
    restored.load_state_dict(monitor.state_dict())
    assert restored.records == monitor.records


def test_without_lr_the_limit_is_nan_and_probes_zero_skips_the_trace():
    model, batch = small_problem()
    record = SharpnessMonitor(model, mse, every=1, probes=0).measure(0, batch)
    assert math.isnan(record["stability_limit"]) and math.isnan(record["trace"])
    assert math.isfinite(record["lambda_max"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(every=0), "every must be"), (dict(probes=-1), "probes must be"), (dict(top_k=0), "top_k must be"),
    (dict(top_k=5, lanczos_iters=3), "lanczos_iters"), (dict(lr_from="fast"), "lr_from must be"),
])
def test_bad_arguments(kwargs, message):
    model, _ = small_problem()
    with pytest.raises(ValueError, match=message):
        SharpnessMonitor(model, mse, **kwargs)


def test_load_state_dict_rejects_garbage():
    model, _ = small_problem()
    with pytest.raises(ValueError, match="expected"):
        SharpnessMonitor(model, mse).load_state_dict({"records": [1, 2]})


# --------------------------------------------------------------------------- the optimizer's stability limit


def _diverges(step_fn, curvature: float) -> bool:
    """Whether a 1-D quadratic f(x) = curvature·x²/2 blows up under ``step_fn(x, g, state) -> x``."""
    x, state = torch.tensor(1.0, dtype=torch.float64), {}
    for _ in range(4000):
        x = step_fn(x, curvature * x, state)
    return bool(x.abs() > 1.0)


def _torch_step(optimizer_class, **settings):
    """A step of the real torch optimizer on one scalar parameter, as a function of (x, g)."""
    def step(x, g, state):
        if "opt" not in state:
            state["p"] = nn.Parameter(x.clone())
            state["opt"] = optimizer_class([state["p"]], **settings)
        state["p"].grad = g.reshape(()).clone()
        state["opt"].step()
        return state["p"].detach().clone()
    return step


@pytest.mark.parametrize("settings", [dict(), dict(momentum=0.9), dict(momentum=0.8, dampening=0.5),
                                      dict(momentum=0.9, nesterov=True), dict(momentum=0.5, nesterov=True)])
def test_sgd_limit_is_where_torchs_sgd_starts_to_diverge(settings):
    # The oracle is torch.optim.SGD itself on a quadratic: stable just below the recorded limit, divergent above.
    model, _ = small_problem()
    lr = 0.1
    limit = SharpnessMonitor(model, mse, lr_from=torch.optim.SGD(model.parameters(), lr=lr, **settings)
                             ).learning_rate_and_limit()[1]
    assert not _diverges(_torch_step(torch.optim.SGD, lr=lr, **settings), 0.99 * limit)
    assert _diverges(_torch_step(torch.optim.SGD, lr=lr, **settings), 1.01 * limit)


def test_adam_limit_is_where_its_frozen_preconditioned_step_starts_to_diverge():
    # Adam with its preconditioner frozen at P: m ← β1 m + (1 − β1) g, x ← x − η m / P, diverges once λ/P passes
    # (2 + 2β1)/(η(1 − β1)).
    model, _ = small_problem()
    lr, beta1, P = 0.01, 0.9, 3.0
    limit = SharpnessMonitor(model, mse, lr_from=torch.optim.Adam(model.parameters(), lr=lr, betas=(beta1, 0.99))
                             ).learning_rate_and_limit()[1]
    assert limit == pytest.approx((2 + 2 * beta1) / (lr * (1 - beta1)))

    def frozen_adam(x, g, state):
        state["m"] = beta1 * state.get("m", 0.0) + (1 - beta1) * g
        return x - lr * state["m"] / P

    assert not _diverges(frozen_adam, 0.99 * limit * P)
    assert _diverges(frozen_adam, 1.01 * limit * P)


@pytest.mark.parametrize("adam", ["torch.optim.AdamW", "optim.AdamW", "torch.optim.Adam amsgrad"])
def test_with_adam_the_monitor_measures_the_preconditioned_hessian(adam):
    import optim

    model, batch = small_problem()
    first = [p for name, p in model.named_parameters() if name.startswith("0.")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("0.")]
    groups = [{"params": first, "lr": 0.01}, {"params": rest, "lr": 0.004}]  # another lr: P carries η/η_g
    make = {"torch.optim.AdamW": lambda: torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-3),
            "optim.AdamW": lambda: optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-3),
            "torch.optim.Adam amsgrad": lambda: torch.optim.Adam(groups, betas=(0.9, 0.95), eps=1e-3, amsgrad=True)}
    optimizer = make[adam]()
    monitor = SharpnessMonitor(model, mse, lr_from=optimizer, probes=300, lanczos_iters=80, tol=1e-10)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="exists after its first step"):
        monitor.measure(0, batch)
    assert monitor.records == [] and model.training  # nothing recorded, the mode as it was (training)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for _ in range(3):
        optimizer.zero_grad()
        mse(model(batch[0]), batch[1]).backward()
        optimizer.step()
    for key in ("exp_avg_sq", "max_exp_avg_sq"):  # an entry no gradient has reached (v = 0) is left out
        if key in optimizer.state[first[0]]:
            optimizer.state[first[0]][key][0, :2] = 0.0
    record = monitor.measure(3, batch)
    # P_i = (sqrt(v_i / (1 - beta2^t)) + eps) * (lr_0 / lr_g), read from the state by hand; 1/P_i = 0 where v_i = 0
    scales = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            second = state["max_exp_avg_sq"] if "max_exp_avg_sq" in state else state["exp_avg_sq"]
            denominator = (second / (1 - 0.95 ** float(state["step"]))).sqrt() + 1e-3
            inverse = (denominator * 0.01 / group["lr"]).reciprocal().masked_fill(second == 0, 0.0)
            scales.append(inverse.reshape(-1))
    inverse_p = torch.cat(scales).double()
    hessian = exact_hessian(model, batch)
    root = inverse_p.sqrt()
    expected = torch.linalg.eigvalsh(root[:, None] * hessian * root[None, :])
    assert record["preconditioned"] is True
    assert record["lambda_max"] == pytest.approx(expected[-1].item(), rel=1e-6)
    assert abs(record["trace"] - (inverse_p * hessian.diagonal()).sum().item()) <= 4 * record["trace_std_error"]
    assert record["stability_limit"] == pytest.approx((2 + 2 * 0.9) / (0.01 * 0.1))
    assert not SharpnessMonitor(model, mse, lr_from=0.01).measure(3, batch)["preconditioned"]


def test_a_frameworks_optimizer_wrapper_is_read_as_the_optimizer_it_wraps():
    # The Hugging Face Trainer hands its callbacks Accelerate's AcceleratedOptimizer: Adam went undetected behind it
    # (the limit 2/lr and raw λ_max instead of P⁻¹H against Adam's), and Nesterov's limit was heavy ball's.
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        model, batch = small_problem()
        for make in (lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.95)),
                     lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True)):
            optimizer = make(model.parameters())
            optimizer.zero_grad()
            mse(model(batch[0]), batch[1]).backward()
            optimizer.step()
            wrapped = accelerator.prepare_optimizer(optimizer)
            records = [SharpnessMonitor(model, mse, lr_from=o, probes=0, lanczos_iters=40,
                                        tol=1e-10).measure(1, batch) for o in (optimizer, wrapped)]
            assert records[1] == records[0]
            assert records[0]["preconditioned"] == isinstance(optimizer, torch.optim.AdamW)
    finally:  # Accelerate's process state is a singleton: leave none for the Trainer tests to find
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def test_adam_preconditioner_refuses_what_it_cannot_read():
    model, batch = small_problem()
    optimizer = torch.optim.AdamW(list(model.parameters())[:2], lr=0.01)  # the last layer is not in it
    mse(model(batch[0]), batch[1]).backward()
    optimizer.step()
    with pytest.raises(ValueError, match="parameter '2.weight' is measured but is not one of lr_from's parameters"):
        SharpnessMonitor(model, mse, lr_from=optimizer).measure(1, batch)
    first_layer = SharpnessMonitor(model, mse, lr_from=optimizer, param_filter=lambda name, p: name.startswith("0."))
    assert first_layer.measure(1, batch)["preconditioned"]
    two = torch.optim.AdamW([{"params": list(model.parameters())[:2]},
                             {"params": list(model.parameters())[2:], "betas": (0.5, 0.99)}], lr=0.01)
    mse(model(batch[0]), batch[1]).backward()
    two.step()
    with pytest.raises(ValueError, match="beta1 0.5 but param_groups\\[0\\] has 0.9"):
        SharpnessMonitor(model, mse, lr_from=two).measure(1, batch)
    with pytest.raises(ValueError, match="dampening"):
        SharpnessMonitor(model, mse, lr_from=torch.optim.SGD(model.parameters(), lr=0.1, dampening=1.0))


def test_the_limit_follows_a_refactorizers_lr_ramp():
    # After a refactorization the Refactorizer scales the lr of the next recovery_steps steps inside step() (the
    # group keeps the scheduled value): the monitor read the scheduled lr, a limit 1000x too low on the ramp's
    # first step. It now takes the lr the next step takes.
    import optim

    torch.manual_seed(0)
    model = optim.to_low_rank(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double(), 2,
                              target=["0"])
    batch = (torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    refactorizer = optim.Refactorizer(model, sgd, every=2, recovery_steps=4, recovery_start=0.01, reset="none")
    monitor = SharpnessMonitor(model, mse, lr_from=sgd, probes=0, lanczos_iters=10)
    seen = []
    sgd.register_step_pre_hook(lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    limits = []
    for _ in range(5):
        limits.append(monitor.learning_rate_and_limit())  # what the next step will use
        sgd.zero_grad()
        mse(model(batch[0]), batch[1]).backward()
        sgd.step()
        refactorizer.step()
    assert seen == pytest.approx([0.1, 0.1, 0.001, 0.02575, 0.001])  # refactorized after steps 2 and 4
    assert [lr for lr, _ in limits] == pytest.approx(seen)
    assert [limit for _, limit in limits] == pytest.approx([2 / lr for lr in seen])
    refactorizer.remove()
    assert monitor.learning_rate_and_limit() == pytest.approx((0.1, 20.0))


def test_moments_reset_by_a_refactorizer_are_left_out_pending_or_in_place():
    # optim.AdamW folds a reset into its next step, so right after a refactorization its state still held the old
    # second moments: the monitor weighted the new factors by them (lambda_max 120.1), where torch.optim.AdamW's
    # in-place reset left them out (109.9). Both now leave them out, as entries with v = 0.
    import optim

    batch = (torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,)))
    records = {}
    for cls in (optim.AdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        model = optim.to_low_rank(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double(), 2,
                                  target=["0"])
        adam = cls(model.parameters(), lr=1e-2)
        refactorizer = optim.Refactorizer(model, adam, every=2, recovery_steps=2)
        monitor = SharpnessMonitor(model, torch.nn.functional.cross_entropy, lr_from=adam, probes=0,
                                   lanczos_iters=40, tol=1e-10)
        records[cls] = []
        for step in range(1, 5):
            adam.zero_grad()
            torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
            adam.step()
            refactorizer.step()
            records[cls].append(monitor.measure(step, batch)["lambda_max"])
    assert records[optim.AdamW] == pytest.approx(records[torch.optim.AdamW], rel=1e-9)
