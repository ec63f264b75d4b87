"""``compile=True``: the compiled products of hvp, HessianOperator, GGNOperator, EmpiricalFisherOperator and
SharpnessMonitor.

Exact in float64 against the dense Hessian; compiled once per function/model and signature (the second call adds
no compile time); refused with the modes that cannot be compiled. Each compilation takes seconds: the models are
tiny and the tests few.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optim
from optim.hessian.hvp import compile_seconds

from .test_ggn import attention_problem, explicit_fisher, mean_squared_error, mlp_problem, sequence_problem

pytestmark = pytest.mark.slow

# the module (``optim.hessian.hvp`` as an attribute is the function)
hvp_module = importlib.import_module("optim.hessian.hvp")


def _tiny():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    inputs, targets = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    return model, inputs, targets


def _dense(model, inputs, targets):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def f(flat):
        pieces = [piece.reshape(p.shape) for piece, p in zip(flat.split(sizes), params)]
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, pieces)), (inputs,)), targets)

    return torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in params]))


def test_hvp_compiled_is_exact_for_one_and_k_probes_and_compiles_once():
    model, inputs, targets = _tiny()
    params = [p.detach() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def f(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (inputs,)), targets)

    hessian = _dense(model, inputs, targets)
    for k in (None, 3):
        v = [torch.randn(((k,) if k else ()) + p.shape, dtype=torch.float64) for p in params]
        hv, grad = optim.hvp(f, params, v, compile=True, return_grad=True)
        flat_v = torch.cat([t.reshape(k or 1, -1) for t in v], dim=1)
        flat_hv = torch.cat([t.reshape(k or 1, -1) for t in hv], dim=1)
        torch.testing.assert_close(flat_hv, flat_v @ hessian, rtol=1e-10, atol=1e-12)
        eager_grad = optim.hvp(f, params, v, mode="rr", return_grad=True)[1]
        for a, b in zip(grad, eager_grad):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        spent = compile_seconds(f)
        assert spent > 0
        optim.hvp(f, params, v, compile=True, return_grad=True)  # the same signature: reused, nothing compiled
        assert compile_seconds(f) == spent
        # Without the gradient: its own variant (the weight-gradient products dropped), as exact, compiled once.
        hv = optim.hvp(f, params, v, compile=True)
        torch.testing.assert_close(torch.cat([t.reshape(k or 1, -1) for t in hv], dim=1), flat_v @ hessian,
                                   rtol=1e-10, atol=1e-12)
        spent_without = compile_seconds(f)
        assert spent_without > spent if k is None else spent_without == spent  # one probe's signature serves k
        optim.hvp(f, params, v, compile=True)
        assert compile_seconds(f) == spent_without


def test_hvp_compile_refuses_what_cannot_be_compiled():
    model, inputs, targets = _tiny()
    params = [p.detach() for p in model.parameters()]
    v = [torch.randn_like(p) for p in params]
    f = lambda *ps: sum(p.square().sum() for p in ps)  # noqa: E731
    for mode in ("rr", "fd"):
        with pytest.raises(ValueError, match=f"compile=True computes forward-over-reverse products.*mode='{mode}'"):
            optim.hvp(f, params, v, mode=mode, compile=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        optim.hvp(f, params, v, compile="yes")
    with pytest.raises(ValueError, match="no graph to reuse"):
        optim.HessianOperator(model, F.cross_entropy, (inputs, targets), compile=True, reuse_graph=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        optim.SharpnessMonitor(model, F.cross_entropy, compile=1)


def test_operator_and_monitor_compile_once_per_model_and_follow_parameter_updates():
    model, inputs, targets = _tiny()
    H = optim.HessianOperator(model, F.cross_entropy, (inputs, targets), compile=True)
    v = torch.randn(4, H.n, dtype=torch.float64)
    torch.testing.assert_close(H @ v, v @ _dense(model, inputs, targets), rtol=1e-10, atol=1e-12)
    spent = H.compile_seconds
    assert spent > 0
    with torch.no_grad():  # the compiled product reads the current parameters: no stale result
        model[0].weight.mul_(1.3)
    torch.testing.assert_close(H @ v, v @ _dense(model, inputs, targets), rtol=1e-10, atol=1e-12)
    assert H.compile_seconds == spent
    _assert_monitor_compiles_once(model, inputs, targets, lr_from=torch.optim.SGD(model.parameters(), lr=0.1))


def _assert_monitor_compiles_once(model, inputs, targets, **options):
    """A monitor builds a new operator at each measurement: the model's compiled product serves all of them, and
    the measurements equal the eager monitor's."""
    settings = dict(every=1, probes=4, lanczos_iters=12, top_k=1, **options)
    monitor = optim.SharpnessMonitor(model, F.cross_entropy, compile=True, **settings)
    eager = optim.SharpnessMonitor(model, F.cross_entropy, **settings)
    for step in range(2):
        record = monitor.measure(step, (inputs, targets))
        reference = eager.measure(step, (inputs, targets))
        assert record["lambda_max"] == pytest.approx(reference["lambda_max"], rel=1e-8)
        assert record["trace"] == pytest.approx(reference["trace"], rel=1e-8)
        if step == 0:
            after_first = monitor.compile_seconds
            assert after_first > 0
    assert monitor.compile_seconds == after_first  # the second measurement compiled nothing


def _dense_ggn(model, inputs, targets, loss_fn):
    """``Jᵀ H_z J`` from the explicit Jacobian of the outputs and Hessian of the criterion in them (float64)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def outputs(flat_params):
        pieces = [piece.reshape(p.shape) for piece, p in zip(flat_params.split(sizes), params)]
        return torch.func.functional_call(model, dict(zip(names, pieces)), (inputs,))

    z = outputs(flat)
    jacobian = torch.autograd.functional.jacobian(outputs, flat).reshape(z.numel(), -1)
    h_z = torch.autograd.functional.hessian(lambda w: loss_fn(w.reshape(z.shape), targets), z.reshape(-1))
    return jacobian.T @ h_z @ jacobian


def test_ggn_compiled_matches_the_explicit_matrix_for_one_and_k_probes_and_compiles_once():
    model, inputs, targets = _tiny()
    mse_targets = torch.randn(7, 3, dtype=torch.float64)
    cases = [(F.cross_entropy, targets), (nn.CrossEntropyLoss(reduction="sum"), targets), (nn.MSELoss(), mse_targets)]
    for loss_fn, y in cases:
        G = optim.GGNOperator(model, loss_fn, (inputs, y), compile=True)
        dense = _dense_ggn(model, inputs, y, loss_fn)
        v = torch.randn(3, G.n, dtype=torch.float64)
        torch.testing.assert_close(G @ v, v @ dense, rtol=1e-10, atol=1e-12)
        assert G.output_hessian == "compiled"
        spent = G.compile_seconds
        assert spent > 0
        torch.testing.assert_close(G @ v[0], dense @ v[0], rtol=1e-10, atol=1e-12)  # one probe: the same compiled code
        with torch.no_grad():  # the compiled product reads the current parameters
            model[2].weight.mul_(0.7)
        torch.testing.assert_close(G @ v, v @ _dense_ggn(model, inputs, y, loss_fn), rtol=1e-10, atol=1e-12)
        assert G.compile_seconds == spent


def test_ggn_compile_falls_back_to_eager_without_a_closed_form_and_refuses_a_kept_graph(monkeypatch):
    model, inputs, targets = _tiny()

    def log_sum_exp_loss(z, t):  # no closed form: computed eagerly, by autograd in the outputs
        return torch.logsumexp(z, dim=1).mean()

    for loss_fn, kind in ((log_sum_exp_loss, "autograd"), (nn.CrossEntropyLoss(ignore_index=1), "autograd")):
        G = optim.GGNOperator(model, loss_fn, (inputs, targets), compile=True)
        v = torch.randn(2, G.n, dtype=torch.float64)
        torch.testing.assert_close(G @ v, v @ _dense_ggn(model, inputs, targets, loss_fn), rtol=1e-10, atol=1e-12)
        assert G.output_hessian == kind
    # Outputs that do not fit the closed form's shapes (a broadcast MSE target): eager, and remembered, so that
    # later products do not run the compiled forward again before leaving it.
    wide = torch.randn(7, 1, dtype=torch.float64)
    G = optim.GGNOperator(model, torch.nn.MSELoss(), (inputs, wide), compile=True)
    calls = []
    real = hvp_module.compiled
    monkeypatch.setattr(hvp_module, "compiled", lambda fn: (calls.append(fn), real(fn))[1])
    v = torch.randn(2, G.n, dtype=torch.float64)
    with pytest.warns(UserWarning, match="target size"):
        dense = _dense_ggn(model, inputs, wide, torch.nn.MSELoss())
        first = G @ v
        torch.testing.assert_close(first, v @ dense, rtol=1e-10, atol=1e-12)
        assert G.output_hessian == "autograd" and len(calls) == 1
        torch.testing.assert_close(G @ v, first, rtol=0, atol=0)
    assert len(calls) == 1, "a signature known not to fit must not enter the compiled function again"
    with pytest.raises(ValueError, match="no graph to reuse"):
        optim.GGNOperator(model, F.cross_entropy, (inputs, targets), compile=True, reuse_graph=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        optim.GGNOperator(model, F.cross_entropy, (inputs, targets), compile="yes")


def test_ggn_monitor_compiles_once_and_equals_eager():
    model, inputs, targets = _tiny()
    _assert_monitor_compiles_once(model, inputs, targets, curvature="ggn")


def _dropout_model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double().train()


def test_ggn_compile_in_training_mode_is_eager_on_one_forward():
    """The compiled function runs the forward twice (jvp, vjp): in training mode dropout would give J and Jᵀ two
    masks, a product that is not symmetric. Training mode is computed eagerly, one mask per product."""
    model = _dropout_model()
    inputs, targets = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    compiled_operator = optim.GGNOperator(model, F.cross_entropy, (inputs, targets), compile=True)
    eager = optim.GGNOperator(model, F.cross_entropy, (inputs, targets))
    v, w = torch.randn(2, compiled_operator.n, dtype=torch.float64)
    torch.manual_seed(5)
    gv = compiled_operator @ v
    assert compiled_operator.output_hessian == "cross_entropy"
    torch.manual_seed(5)
    torch.testing.assert_close(gv, eager @ v, rtol=0, atol=0)
    torch.manual_seed(5)
    gw = compiled_operator @ w
    torch.testing.assert_close(w @ gv, v @ gw, rtol=1e-12, atol=1e-14)  # one mask: symmetric


def test_fisher_compiled_matches_explicit_per_sample_gradients_and_compiles_once():
    mlp, mlp_inputs, mlp_targets = mlp_problem(rows=5)
    block, block_inputs, block_targets = attention_problem(rows=3)
    sequence, sequence_inputs, labels = sequence_problem()
    cases = [(mlp, F.cross_entropy, mlp_inputs, mlp_targets),
             (sequence, optim.hessian.causal_lm_loss, sequence_inputs, labels),
             (mlp, lambda z, y: F.cross_entropy(z, y, reduction="sum") + z.square().mean(), mlp_inputs, mlp_targets),
             (block, mean_squared_error, block_inputs, block_targets)]
    for model, loss_fn, inputs, targets in cases:
        Fi = optim.EmpiricalFisherOperator(model, loss_fn, (inputs, targets), compile=True)
        expected, _ = explicit_fisher(model, loss_fn, inputs, targets)
        v = torch.randn(3, Fi.n, dtype=torch.float64)
        torch.testing.assert_close(Fi @ v, v @ expected, rtol=1e-10, atol=1e-13)
        assert Fi.last_path == "compiled" and Fi._graph is None
        spent = Fi.compile_seconds
        assert spent > 0
        torch.testing.assert_close(Fi @ v[0], expected @ v[0], rtol=1e-10, atol=1e-13)
        with torch.no_grad():  # the compiled product reads the current parameters
            next(model.parameters()).mul_(0.7)
        torch.testing.assert_close(Fi @ v, v @ explicit_fisher(model, loss_fn, inputs, targets)[0], rtol=1e-10,
                                   atol=1e-13)
        assert Fi.compile_seconds == spent


class _ColumnsOut(nn.Module):
    """Outputs (classes, rows): dim 0 is not the rows, so the compiled product cannot read per-row outputs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.linear(x)).T


def test_fisher_compile_falls_back_to_eager_and_refuses_a_kept_g(monkeypatch):
    model = _dropout_model()
    inputs, targets = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    compiled_operator = optim.EmpiricalFisherOperator(model, F.cross_entropy, (inputs, targets), compile=True)
    eager = optim.EmpiricalFisherOperator(model, F.cross_entropy, (inputs, targets), reuse_graph=False)
    v = torch.randn(2, compiled_operator.n, dtype=torch.float64)
    torch.manual_seed(6)
    product = compiled_operator @ v
    assert compiled_operator.last_path == "outputs"  # training mode: eager, on one forward
    torch.manual_seed(6)
    # The same mask and the same product; `eager` takes whichever way the first product timed faster for this
    # model (one forward, or the per-sample gradients), which agree to rounding, not bit for bit.
    torch.testing.assert_close(product, eager @ v, rtol=1e-12, atol=1e-15)

    torch.manual_seed(7)
    columns = _ColumnsOut().double().eval()
    loss_fn = lambda z, y: (z.sum(0) - y).square().mean()  # noqa: E731  (z: classes × rows)
    float_targets = torch.randn(7, dtype=torch.float64)
    Fi = optim.EmpiricalFisherOperator(columns, loss_fn, (inputs, float_targets), compile=True)
    calls = []
    real = hvp_module.compiled
    monkeypatch.setattr(hvp_module, "compiled", lambda fn: (calls.append(fn), real(fn))[1])
    v = torch.randn(2, Fi.n, dtype=torch.float64)
    expected, _ = explicit_fisher(columns, loss_fn, inputs, float_targets)
    torch.testing.assert_close(Fi @ v, v @ expected, rtol=1e-10, atol=1e-13)
    assert Fi.last_path == "per-sample" and len(calls) == 1
    Fi @ v
    assert len(calls) == 1, "a signature known not to fit must not enter the compiled function again"
    with pytest.raises(ValueError, match="no graph to reuse"):
        optim.EmpiricalFisherOperator(columns, loss_fn, (inputs, float_targets), compile=True, reuse_graph=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        optim.EmpiricalFisherOperator(columns, loss_fn, (inputs, float_targets), compile=1)


def test_fisher_monitor_compiles_once_and_equals_eager():
    model, inputs, targets = _tiny()
    _assert_monitor_compiles_once(model, inputs, targets, curvature="fisher")
