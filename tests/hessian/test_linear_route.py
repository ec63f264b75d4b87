"""The linear route of the curvature products: weight gradients whose values are never read are placeholders (and,
in the GGN's and the empirical Fisher's transposed graphs, input gradients too).

Every product is checked against the explicit Hessian (``torch.autograd.functional.hessian``) in float64, on models
where the placeholder's graph is all that matters and on those where a gradient value is read (the route must then
not apply, or must give the real value).
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import optim
from optim.hessian import linear as linear_route
from optim.hessian.routing import sdpa_curvature

hvp_module = importlib.import_module("optim.hessian.hvp")


@pytest.fixture
def placeholders(monkeypatch):
    """Counts the placeholder weight gradients built (either node that makes one)."""
    calls = []
    for name in ("_PlaceholderWeightGradient", "_LinearGradients"):
        cls = getattr(linear_route, name)
        original = cls.apply
        monkeypatch.setattr(cls, "apply", staticmethod(lambda *a, _o=original: calls.append(1) or _o(*a)))
    return calls


def _shapes(case):
    torch.manual_seed(4)
    x = torch.randn(2, 5, 4, dtype=torch.float64)  # a sequence: the route's matrix products see (10, 4) rows
    target = torch.randint(0, 3, (10,))
    w1, b1 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w2 = torch.randn(6, 6, dtype=torch.float64)
    head = torch.randn(3, 6, dtype=torch.float64)
    if case == "plain":  # the first layer's input is data, the others' are activations; one layer has no bias
        def f(w1, b1, w2, head):
            h = torch.tanh(F.linear(x, w1, b1))
            h = torch.tanh(F.linear(h, w2))
            return F.cross_entropy(F.linear(h, head).reshape(10, 3), target)
        return f, [w1, b1, w2, head]
    if case == "tied":  # one weight in two layers, and in a penalty whose gradient is not linear in it
        def f(w1, b1, w2, head):
            h = torch.tanh(F.linear(x, w1, b1))
            h = torch.tanh(F.linear(torch.tanh(F.linear(h, w2)), w2))
            return F.cross_entropy(F.linear(h, head).reshape(10, 3), target) + 0.1 * (w2 ** 3).sum()
        return f, [w1, b1, w2, head]
    if case == "derived":  # a weight computed from the params: the route does not apply to it
        def f(w1, b1, w2, head):
            h = torch.tanh(F.linear(x, w1 * b1.unsqueeze(1), b1))
            h = torch.tanh(F.linear(h, w2 @ w2.T / 6))
            return F.cross_entropy(F.linear(h, head).reshape(10, 3), target)
        return f, [w1, b1, w2, head]
    if case == "input":  # one param both the input and the weight of a layer (and w1 unused)
        def f(w1, b1, w2, head):
            h = torch.tanh(F.linear(w2, w2, b1))
            return F.cross_entropy(F.linear(h, head), target[:6])
        return f, [w1, b1, w2, head]
    if case == "addmm":  # weights stored (in, out), as Hugging Face's Conv1D; a bias of a row and a full one
        full_bias = torch.randn(10, 6, dtype=torch.float64)

        def f(w1, b1, w2, head):
            h = torch.tanh(torch.addmm(b1, x.reshape(10, 4), w1.T.contiguous()))
            h = torch.tanh(torch.addmm(full_bias * b1, h, w2))
            return F.cross_entropy(torch.addmm(head[:, 0], h, head.T.contiguous()), target)
        return f, [w1, b1, w2, head]
    raise AssertionError(case)


def _dense(f, params):
    sizes = [p.numel() for p in params]

    def flat_f(flat):
        return f(*[piece.view_as(p) for piece, p in zip(flat.split(sizes), params)])

    return torch.autograd.functional.hessian(flat_f, torch.cat([p.reshape(-1) for p in params]))


def _flat(block, k=None):
    return torch.cat([t.reshape(k, -1) if k else t.reshape(-1) for t in block], dim=-1)


@pytest.mark.parametrize("case", ["plain", "tied", "derived", "input", "addmm"])
@pytest.mark.parametrize("way", ["one", "loop", "vmap"])
def test_products_without_the_gradient_equal_the_explicit_hessian(case, way, placeholders):
    f, params = _shapes(case)
    dense = _dense(f, params)
    k = None if way == "one" else 6
    torch.manual_seed(8)
    v = [torch.randn(((k,) if k else ()) + tuple(p.shape), dtype=torch.float64) for p in params]
    if k:
        hvp_module._batching_choice.set(f, k, way)
    hv = optim.hvp(f, params, v, mode="rr")
    expected = _flat(v, k) @ dense
    torch.testing.assert_close(_flat(hv, k), expected, rtol=1e-10, atol=1e-10)
    if k:
        assert hvp_module.batching_choice(f, k) == way  # a vmap that failed would have fallen back to the loop
    if case in ("plain", "tied"):
        assert placeholders, "the route did not apply"
    if case in ("derived", "addmm"):
        assert len(placeholders) == 1  # only one weight is a param itself (w2; the transposed copies are not)


@pytest.mark.parametrize("case", ["plain", "tied"])
def test_with_return_grad_the_gradient_is_torchs_and_no_placeholder_is_built(case, placeholders):
    f, params = _shapes(case)
    v = [torch.randn_like(p) for p in params]
    hv, grad = optim.hvp(f, params, v, mode="rr", return_grad=True)
    leaves = [p.detach().requires_grad_() for p in params]
    want = torch.autograd.grad(f(*leaves), leaves)
    for got, expected in zip(grad, want):
        assert torch.equal(got, expected)
    torch.testing.assert_close(_flat(hv), _flat(v) @ _dense(f, params), rtol=1e-10, atol=1e-10)
    assert not placeholders


def test_kept_operator_graph_gives_exact_products_and_its_gradient_from_a_new_graph(placeholders):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    batch = (torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,)))
    operator = optim.HessianOperator(model, F.cross_entropy, batch)
    params = [p.detach() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def f(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (batch[0],)), batch[1])

    dense = _dense(f, params)
    V = torch.randn(3, operator.n, dtype=torch.float64)
    torch.testing.assert_close(operator @ V, V @ dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(operator @ V[0], V[0] @ dense, rtol=1e-10, atol=1e-10)  # the kept graph again
    assert placeholders
    leaves = [p.detach().requires_grad_() for p in params]
    _, grad = operator.loss_and_grad()
    torch.testing.assert_close(grad, _flat(torch.autograd.grad(f(*leaves), leaves)), rtol=1e-12, atol=1e-14)


def test_outside_the_context_f_linear_is_torchs(placeholders):
    x = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with sdpa_curvature():
        (g,) = torch.autograd.grad(F.linear(x, w).square().sum(), w, create_graph=True)
    (want,) = torch.autograd.grad(F.linear(x, w).square().sum(), w, create_graph=True)
    assert torch.equal(g, want)
    assert not placeholders
    with sdpa_curvature(), linear_route.gradient_values_unused([w]):
        (g,) = torch.autograd.grad(F.linear(x, w).square().sum(), w, create_graph=True)
    assert placeholders and torch.equal(g, torch.zeros_like(w))  # a placeholder: its value is not the gradient
    u = torch.randn_like(w)
    torch.testing.assert_close(torch.autograd.grad(g, w, u)[0], torch.autograd.grad(want, w, u)[0], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("context_fn", [None, "curvature_context_fn"])
def test_checkpointed_layers_recompute_as_their_forward_ran(context_fn, placeholders):
    """A checkpoint's recomputation sees the module's own weights, not the leaves, so the route is not taken
    inside a checkpointed region (it would save other tensors than the recomputation): the products are exact,
    with or without curvature_context_fn."""
    torch.manual_seed(6)
    x, target = torch.randn(2, 5, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    params = [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64),
              torch.randn(3, 6, dtype=torch.float64)]
    options = {} if context_fn is None else {"context_fn": optim.hessian.curvature_context_fn}

    def block(x, w, b):
        return torch.tanh(F.linear(x, w, b))

    def f(w, b, head):
        h = torch.utils.checkpoint.checkpoint(block, x, w, b, use_reentrant=False, **options)
        return F.cross_entropy(F.linear(h, head).reshape(10, 3), target)

    v = [torch.randn(4, *p.shape, dtype=torch.float64) for p in params]
    hvp_module._batching_choice.set(f, 4, "loop")
    torch.testing.assert_close(_flat(optim.hvp(f, params, v, mode="rr"), 4), _flat(v, 4) @ _dense(f, params),
                               rtol=1e-10, atol=1e-10)
    assert len(placeholders) == 1  # the head's, outside the checkpoint


def test_hugging_face_gpt2_conv1d_takes_the_route_and_its_products_are_torchs(placeholders, monkeypatch):
    from optim.hessian import causal_lm_loss

    from .._models import gpt2_twins

    model, _, batch = gpt2_twins(n_layer=1)
    operator = optim.HessianOperator(model, causal_lm_loss, batch, reuse_graph=False, mode="rr")
    V = torch.randn(2, operator.n, dtype=torch.float64)
    ours = operator @ V
    assert len(placeholders) >= 4  # the attention's and the MLP's Conv1D weights (the head is tied to the embedding)
    monkeypatch.setattr(linear_route, "_values_unused", frozenset)  # no leaf is routed: torch's own backward
    torch.testing.assert_close(ours, operator @ V, rtol=1e-10, atol=1e-12)


# --- the transposed graph of the GGN and the empirical Fisher ---------------------------------------------------


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6, bias=False)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


@pytest.mark.parametrize("operator", ["ggn", "fisher"])
@pytest.mark.parametrize("reuse_graph", [True, False])
@pytest.mark.parametrize("k", [None, 4])
def test_transposed_placeholders_give_the_ggn_and_fisher_products_without_them(monkeypatch, operator, reuse_graph, k):
    torch.manual_seed(7)
    model = _Mlp().double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    cls = optim.GGNOperator if operator == "ggn" else optim.EmpiricalFisherOperator
    numel = sum(p.numel() for p in model.parameters())
    block = torch.randn(numel if k is None else (k, numel), dtype=torch.float64)
    calls = []
    original = linear_route._TransposedPlaceholders.apply
    monkeypatch.setattr(linear_route._TransposedPlaceholders, "apply",
                        staticmethod(lambda *a, _o=original: calls.append(1) or _o(*a)))
    criterion = F.cross_entropy
    got = cls(model, criterion, batch, reuse_graph=reuse_graph) @ block  # a first product builds the graph
    module = importlib.import_module(f"optim.hessian.{operator}")
    monkeypatch.setattr(module, "transposed_products_unused", lambda leaves: contextlib.nullcontext())
    want = cls(model, criterion, batch, reuse_graph=reuse_graph) @ block
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert calls, "the transposed placeholders were not built"


def test_under_autocast_the_products_are_torchs_own(placeholders):
    # Under autocast F.linear casts to bfloat16 and its gradients come back in it; the route's Functions mixed those
    # with the float32 tensors they had saved, and hvp(mode="rr") raised "self and mat2 must have the same dtype".
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    x, target = torch.randn(16, 6), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    probe = [torch.randn_like(p) for p in params]
    names = [name for name, _ in model.named_parameters()]

    def loss(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), target)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(loss(*params), params, create_graph=True)
        expected = torch.autograd.grad(grads, params, probe)
        ours = optim.hvp(loss, params, probe, mode="rr")
        operator = optim.HessianOperator(model, F.cross_entropy, (x, target), mode="rr")
        kept = operator @ operator.flatten(probe)
    assert not placeholders
    for a, b in zip(ours, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(kept, operator.flatten(list(expected)), rtol=0, atol=0)
