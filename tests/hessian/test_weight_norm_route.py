"""The weight-norm route (optim/hessian/weight_norm.py): torch's fused ``_weight_norm`` has a wrong double backward
(torch 2.13) and no forward-mode rule; inside the curvature routes the products use the composite formula.

Oracle: central differences of the fused op's own gradients in float64 (first derivatives, which torch gets right),
and the same model written with ``g * v / ‖v‖`` by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import optim
from optim.hessian import sdpa_curvature
from optim.hessian.weight_norm import weight_norm


@pytest.mark.parametrize("shape, dim", [((6, 5), 0), ((6, 5), 1), ((6, 5), -1), ((4, 3, 5), 1), ((4, 3, 5), 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_composite_is_torchs_weight_norm_and_its_gradient(shape, dim, dtype):
    torch.manual_seed(0)
    v = torch.randn(shape, dtype=dtype, requires_grad=True)
    g = torch.randn(torch.norm_except_dim(v.detach(), 2, dim).shape, dtype=dtype, requires_grad=True)
    expected = torch._weight_norm(v, g, dim)
    with sdpa_curvature():
        got = torch._weight_norm(v, g, dim)  # routed
    tolerance = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected, **tolerance)
    weights = torch.randn_like(expected)
    for ours, torchs in zip(torch.autograd.grad((got * weights).sum(), (v, g)),
                            torch.autograd.grad((expected * weights).sum(), (v, g))):
        torch.testing.assert_close(ours, torchs, **tolerance)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    if kind == "parametrizations":
        parametrizations.weight_norm(model[0])
    else:
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model[0])
    return model


def _finite_difference_hvp(model, batch, v, h=1e-5):
    """(∇L(θ + h v) − ∇L(θ − h v)) / 2h with torch's fused op and no route: its gradients are right."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def gradient(sign):
        shifted = [(p + sign * h * t).requires_grad_() for p, t in zip(params, v)]
        loss = F.cross_entropy(torch.func.functional_call(model, dict(zip(names, shifted)), (batch[0],)), batch[1])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shifted)])

    return (gradient(1.0) - gradient(-1.0)) / (2 * h)


@pytest.mark.parametrize("kind", ["parametrizations", "hook"])
def test_hessian_of_a_weight_normed_model_is_the_finite_difference_of_its_gradients(kind):
    model = _model(kind)
    batch = (torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
    H = optim.HessianOperator(model, F.cross_entropy, batch)
    v = torch.randn(2, H.n, dtype=torch.float64)
    expected = torch.stack([_finite_difference_hvp(model, batch, H.unflatten(row)) for row in v])
    torch.testing.assert_close(H @ v, expected, rtol=1e-7, atol=1e-8)
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def loss(*p):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, p)), (batch[0],)), batch[1])

    probes = [torch.stack(block) for block in zip(*(H.unflatten(row) for row in v))]
    for mode in ("rr", "fr"):  # "fr" had no forward-mode rule to run on
        products = optim.hvp(loss, params, probes, mode=mode)
        flat = torch.cat([p.reshape(2, -1) for p in products], dim=1)
        torch.testing.assert_close(flat, expected, rtol=1e-7, atol=1e-8)


def test_compiled_hessian_of_a_weight_normed_model():
    model = _model("parametrizations")
    batch = (torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
    H = optim.HessianOperator(model, F.cross_entropy, batch, compile=True)
    v = torch.randn(H.n, dtype=torch.float64)
    torch.testing.assert_close(H @ v, _finite_difference_hvp(model, batch, H.unflatten(v)), rtol=1e-7, atol=1e-8)


def test_sophia_refresh_on_a_weight_normed_model_equals_the_hand_written_one():
    model = _model("parametrizations")
    batch = (torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))

    class ByHand(nn.Module):
        def __init__(self, source):
            super().__init__()
            self.g = nn.Parameter(source[0].parametrizations.weight.original0.detach().clone())
            self.v = nn.Parameter(source[0].parametrizations.weight.original1.detach().clone())
            self.b0 = nn.Parameter(source[0].bias.detach().clone())
            self.out = nn.Linear(6, 3).double()
            self.out.load_state_dict(source[2].state_dict())

        def forward(self, x):
            w = self.g * self.v / self.v.norm(dim=1, keepdim=True)
            return self.out(torch.tanh(F.linear(x, w, self.b0)))

    twin = ByHand(model)
    ours = optim.SophiaH(model.parameters(), lr=1e-3, update_period=1, seed=4)
    theirs = optim.SophiaH([twin.b0, twin.g, twin.v, twin.out.weight, twin.out.bias], lr=1e-3, update_period=1,
                           seed=4)
    ours.step(lambda: F.cross_entropy(model(batch[0]), batch[1]))
    theirs.step(lambda: F.cross_entropy(twin(batch[0]), batch[1]))
    for p, q in zip(model.parameters(), [twin.b0, twin.g, twin.v, twin.out.weight, twin.out.bias]):
        torch.testing.assert_close(ours.state[p]["hessian"], theirs.state[q]["hessian"], rtol=1e-9, atol=1e-14)
