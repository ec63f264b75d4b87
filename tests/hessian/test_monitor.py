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
