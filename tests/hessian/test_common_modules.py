"""The Hessian, GGN and empirical Fisher of models built from torch's common modules, against first derivatives only.

Torch's second derivatives are not always right (the fused weight norm's double backward) or not there (SDPA's fused
kernels, an LSTM under vmap, nn.TransformerEncoderLayer's fast path), and those are what a curvature product
differentiates. The oracles here use torch's gradients alone, in float64: H v by central differences of the
gradient, Jᵀ H_loss J v with J v by central differences of the outputs and Jᵀ w by one backward, the Fisher from a
loop of per-sample gradients. Central differences with h = 1e-5 are good to about 1e-9 relative here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import optim

H_STEP = 1e-5
RTOL = 1e-6


class _Last(nn.Module):
    """An RNN's outputs (not its state)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


class _Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x):
        return F.normalize(self.linear(x), dim=-1)


def _linear_then(module):
    return nn.Sequential(nn.Linear(6, 6), module)


# name: (body, input shape per row, features after flattening the body's output)
BODIES = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 7), 15),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 4, 4), 48),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 2, 3), (2, 3, 3), 50),
    "group_norm": (lambda: nn.Sequential(nn.Conv1d(4, 4, 1), nn.GroupNorm(2, 4)), (4, 5), 20),
    "instance_norm": (lambda: nn.Sequential(nn.Conv1d(4, 4, 1), nn.InstanceNorm1d(4, affine=True)), (4, 5), 20),
    "layer_norm": (lambda: _linear_then(nn.LayerNorm(6)), (6,), 6),
    "rms_norm": (lambda: _linear_then(nn.RMSNorm(6)), (6,), 6),
    "batch_norm_eval": (lambda: _linear_then(nn.BatchNorm1d(6)), (6,), 6),
    "gelu_tanh": (lambda: _linear_then(nn.GELU("tanh")), (6,), 6),
    "silu": (lambda: _linear_then(nn.SiLU()), (6,), 6),
    "mish": (lambda: _linear_then(nn.Mish()), (6,), 6),
    "elu": (lambda: _linear_then(nn.ELU()), (6,), 6),
    "softplus": (lambda: _linear_then(nn.Softplus()), (6,), 6),
    "prelu": (lambda: _linear_then(nn.PReLU()), (6,), 6),
    "normalize": (_Normalized, (6,), 6),
    "lstm": (lambda: _Last(nn.LSTM(3, 4, batch_first=True)), (5, 3), 20),
    "gru": (lambda: _Last(nn.GRU(3, 4, batch_first=True)), (5, 3), 20),
    "multihead_attention": (_SelfAttention, (5, 8), 40),
    "transformer_encoder_layer": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                  (5, 8), 40),
    "weight_norm": (lambda: parametrizations.weight_norm(nn.Linear(6, 6)), (6,), 6),
    "spectral_norm": (lambda: parametrizations.spectral_norm(nn.Linear(6, 6)), (6,), 6),
    "orthogonal": (lambda: parametrizations.orthogonal(nn.Linear(6, 6)), (6,), 6),
}


class _Classifier(nn.Module):
    def __init__(self, body, features):
        super().__init__()
        self.body = body
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).flatten(1))


def _problem(name):
    make, shape, features = BODIES[name]
    torch.manual_seed(0)
    model = _Classifier(make(), features).double()
    inputs = torch.randn(4, *shape, dtype=torch.float64)
    if name == "batch_norm_eval":
        model(inputs)  # running statistics that are not the initial ones
    return model.eval(), (inputs, torch.randint(0, 3, (4,)))


def _functional(model):
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]

    def outputs(ps, x):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    return params, outputs


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _finite_difference_hvp(model, batch, v):
    params, outputs = _functional(model)

    def gradient(sign):
        shifted = [(p + sign * H_STEP * t).requires_grad_() for p, t in zip(params, v)]
        return _flat(torch.autograd.grad(F.cross_entropy(outputs(shifted, batch[0]), batch[1]), shifted))

    return (gradient(1.0) - gradient(-1.0)) / (2 * H_STEP)


def _first_order_ggn(model, batch, v):
    params, outputs = _functional(model)
    x, y = batch
    jv = (outputs([p + H_STEP * t for p, t in zip(params, v)], x)
          - outputs([p - H_STEP * t for p, t in zip(params, v)], x)) / (2 * H_STEP)
    z = outputs(params, x).detach()
    p = z.softmax(-1)
    w = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / z.shape[0]  # the mean cross-entropy's Hessian in z
    leaves = [q.requires_grad_() for q in params]
    return _flat(torch.autograd.grad(outputs(leaves, x), leaves, w))


def _looped_fisher(model, batch, v):
    params, outputs = _functional(model)
    x, y = batch
    rows = []
    for i in range(y.shape[0]):
        leaves = [p.clone().requires_grad_() for p in params]
        loss = F.cross_entropy(outputs(leaves, x[i:i + 1]), y[i:i + 1])
        rows.append(_flat(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)))
    G = torch.stack(rows)
    return G.T @ (G @ _flat(v)) / y.shape[0]


def _relative(got, expected):
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("name", list(BODIES))
def test_hessian_products_match_central_differences_of_the_gradient(name):
    model, batch = _problem(name)
    H = optim.HessianOperator(model, F.cross_entropy, batch)
    v = torch.randn(H.n, dtype=torch.float64)
    assert _relative(H @ v, _finite_difference_hvp(model, batch, H.unflatten(v))) <= RTOL


@pytest.mark.parametrize("name", list(BODIES))
def test_ggn_and_fisher_products_match_their_first_order_forms(name):
    model, batch = _problem(name)
    G = optim.GGNOperator(model, F.cross_entropy, batch)
    Fi = optim.EmpiricalFisherOperator(model, F.cross_entropy, batch)
    v = torch.randn(G.n, dtype=torch.float64)
    assert _relative(G @ v, _first_order_ggn(model, batch, G.unflatten(v))) <= RTOL
    assert _relative(Fi @ v, _looped_fisher(model, batch, Fi.unflatten(v))) <= 1e-12
