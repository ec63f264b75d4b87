"""SophiaH / AdaHessian with hessian="ggn" and "ggn-fd": the Hutchinson estimate z⊙Gz of the Gauss-Newton matrix
G = Jᵀ H J (the closure returns (outputs, targets), the criterion is ``loss_fn``), checked against G built from the
explicit Jacobian and output Hessian in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import optim

from .._models import gpt2_twins


def quartic(z, t):
    """A criterion with no closed form: its output Hessian goes through autograd."""
    return ((z - t) ** 4).mean() + (z.sin() * t).sum()


CRITERIA = {
    "cross_entropy": (F.cross_entropy, lambda g, n: torch.randint(0, 3, (n,), generator=g)),
    "mse": (F.mse_loss, lambda g, n: torch.randn(n, 3, generator=g, dtype=torch.float64)),
    "sum_mse": (nn.MSELoss(reduction="sum"), lambda g, n: torch.randn(n, 3, generator=g, dtype=torch.float64)),
    "autograd": (quartic, lambda g, n: torch.randn(n, 3, generator=g, dtype=torch.float64)),
}


def _model_and_batch(criterion: str, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(13, 5, generator=g, dtype=torch.float64)
    return model, x, CRITERIA[criterion][1](g, 13)


def _explicit_ggn(model, x, y, loss_fn) -> torch.Tensor:
    """Jᵀ H J from the dense Jacobian of the outputs in the flat parameters and the dense output Hessian."""
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    flat = torch.cat([p.reshape(-1) for _, p in named])

    def outputs(v):
        values, i = {}, 0
        for name, p in named:
            values[name] = v[i:i + p.numel()].view_as(p)
            i += p.numel()
        return functional_call(model, values, (x,))

    z = outputs(flat).detach()
    jacobian = jacrev(outputs)(flat).reshape(z.numel(), flat.numel())
    output_hessian = hessian(lambda u: loss_fn(u.view_as(z), y))(z.reshape(-1))
    return jacobian.T @ output_hessian @ jacobian


def _refresh(cls, model, closure, **kwargs):
    """One refresh step; returns (z, Gz) flattened over the parameters, as the update received them."""
    optimizer = cls(model.parameters(), lr=1e-3, update_period=1, seed=5, **kwargs)
    seen = {}
    update = optimizer._update

    def spy(entries):
        if any(z is None for e in entries for z in e["probes"]):  # a step between refreshes
            return update(entries)
        seen["z"] = torch.cat([z.reshape(-1) for e in entries for z in e["probes"]])
        seen["gz"] = torch.cat([h.reshape(-1) for e in entries for h in e["hessian_products"]])
        return update(entries)

    optimizer._update = spy
    loss = optimizer.step(closure)
    return seen["z"], seen["gz"], loss, optimizer


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("mode, rtol", [("ggn", 1e-12), ("ggn-fd", 1e-7)])
@pytest.mark.parametrize("cls", [optim.SophiaH, optim.AdaHessian])
def test_refresh_takes_the_explicit_gauss_newton_product(cls, mode, rtol, criterion):
    model, x, y = _model_and_batch(criterion)
    loss_fn = CRITERIA[criterion][0]
    expected_matrix = _explicit_ggn(model, x, y, loss_fn)
    before = [p.detach().clone() for p in model.parameters()]
    z, gz, loss, _ = _refresh(cls, model, lambda: (model(x), y), hessian=mode, loss_fn=loss_fn)
    expected = expected_matrix @ z
    assert expected.abs().max() > 0
    torch.testing.assert_close(gz, expected, rtol=rtol, atol=rtol * expected.abs().max().item())
    with torch.no_grad():
        reference_loss = loss_fn(functional_call(model, {n: b for (n, _), b in zip(model.named_parameters(), before)},
                                                 (x,)), y)
    assert float(loss) == pytest.approx(float(reference_loss), rel=1e-14)
    assert not loss.requires_grad


def test_gauss_newton_is_positive_semidefinite_where_the_hessian_is_not():
    """The GGN of a convex criterion is PSD (z⊙Gz summed: zᵀGz ≥ 0 for every probe); the Hessian of the same
    model and batch has negative curvature along some probe."""
    model, x, y = _model_and_batch("cross_entropy", seed=4)
    matrix = _explicit_ggn(model, x, y, F.cross_entropy)
    assert torch.linalg.eigvalsh(matrix).min() > -1e-12
    for seed in range(4):
        optimizer = optim.SophiaH(model.parameters(), lr=0.0, update_period=1, seed=seed, hessian="ggn",
                                  loss_fn=F.cross_entropy)
        optimizer.step(lambda: (model(x), y))
        # with zero moments before, h = (1 − β2)·z⊙Gz: the sum over all coordinates is (1 − β2)·zᵀGz
        total = sum(float(optimizer.state[p]["hessian"].sum()) for p in model.parameters())
        assert total >= 0


def test_linear_least_squares_gauss_newton_steps_equal_the_exact_hessian_steps():
    """For a linear model and squared error the Hessian is the GGN (no residual term): 7 SophiaH steps with
    hessian="ggn", "ggn-fd" and "exact" agree."""
    final = {}
    for mode in ("exact", "ggn", "ggn-fd"):
        torch.manual_seed(2)
        model = nn.Linear(6, 4).double()
        g = torch.Generator().manual_seed(9)
        batches = [(torch.randn(10, 6, generator=g, dtype=torch.float64),
                    torch.randn(10, 4, generator=g, dtype=torch.float64)) for _ in range(7)]
        kwargs = {} if mode == "exact" else dict(loss_fn=F.mse_loss)
        optimizer = optim.SophiaH(model.parameters(), lr=1e-2, rho=0.05, update_period=2, seed=1, hessian=mode,
                                  **kwargs)
        for x, y in batches:
            if mode == "exact":
                optimizer.step(lambda: F.mse_loss(model(x), y))
            else:
                optimizer.step(lambda: (model(x), y))
        final[mode] = [p.detach().clone() for p in model.parameters()]
    for mode, rtol in (("ggn", 1e-12), ("ggn-fd", 1e-7)):
        for a, b in zip(final[mode], final["exact"]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


def test_sets_the_plain_gradient_and_leaves_no_graph():
    model, x, y = _model_and_batch("cross_entropy")
    _, _, _, optimizer = _refresh(optim.SophiaH, model, lambda: (model(x), y), hessian="ggn", loss_fn=F.cross_entropy)
    assert all(p.grad is not None and not p.grad.requires_grad for p in model.parameters())
    # between refreshes the same closure is a plain gradient step
    optimizer.param_groups[0]["update_period"] = 10
    loss = optimizer.step(lambda: (model(x), y))
    assert loss.shape == () and not loss.requires_grad


def test_gpt2_sdpa_gauss_newton_refresh_equals_its_eager_twin():
    """hessian="ggn" on a transformers GPT-2 with attn_implementation="sdpa": the double-backward JVP goes through
    the package's attention ops, and the curvature equals the eager-attention twin's."""
    from optim.hessian import causal_lm_loss

    sdpa, eager, (input_ids, labels) = gpt2_twins(n_layer=1)
    states = []
    for model in (sdpa, eager):
        optimizer = optim.SophiaH(model.parameters(), lr=1e-3, update_period=1, seed=3, hessian="ggn",
                                  loss_fn=causal_lm_loss)
        optimizer.step(lambda model=model: (model(input_ids).logits, labels))
        states.append([optimizer.state[p]["hessian"].clone() for p in model.parameters()])
    assert any(bool(h.abs().max() > 0) for h in states[0])
    for ours, theirs in zip(*states):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)


def _snapshot(model, optimizer):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()
             if p in optimizer.state})


def _assert_unchanged(model, optimizer, snapshot):
    params, grads, states = snapshot
    for p, before, grad in zip(model.parameters(), params, grads):
        assert torch.equal(p, before)
        assert (p.grad is None) == (grad is None) and (grad is None or torch.equal(p.grad, grad))
        for key, value in states.get(id(p), {}).items():
            assert torch.equal(optimizer.state[p][key], value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(hessian="ggn"), "needs loss_fn"),
    (dict(hessian="ggn-fd"), "needs loss_fn"),
    (dict(hessian="exact", loss_fn=F.mse_loss), "no loss_fn"),
    (dict(loss_fn=F.mse_loss), "no loss_fn"),
    (dict(hessian="ggn", loss_fn="mse"), "loss_fn must be callable"),
    (dict(hessian="gauss-newton", loss_fn=F.mse_loss), "hessian must be one of"),
])
def test_bad_curvature_arguments_raise_naming_them(kwargs, words):
    model, _, _ = _model_and_batch("mse")
    with pytest.raises(ValueError, match=words):
        optim.SophiaH(model.parameters(), **kwargs)


@pytest.mark.parametrize("period", [1, 2])  # the second step refreshes / is a plain step
@pytest.mark.parametrize("mode", ["ggn", "ggn-fd"])
@pytest.mark.parametrize("returns, words", [
    ("loss", "must return \\(outputs, targets\\)"),
    ("triple", "must return \\(outputs, targets\\)"),
    ("integer outputs", "outputs of dtype torch.int64"),
])
def test_a_closure_that_does_not_return_outputs_and_targets_raises_with_nothing_changed(mode, returns, words,
                                                                                         period):
    model, x, y = _model_and_batch("cross_entropy")
    optimizer = optim.AdaHessian(model.parameters(), lr=0.1, update_period=period, seed=0, hessian=mode,
                                 loss_fn=F.cross_entropy)
    optimizer.step(lambda: (model(x), y))
    snapshot = _snapshot(model, optimizer)
    closures = {"loss": lambda: F.cross_entropy(model(x), y), "triple": lambda: (model(x), y, None),
                "integer outputs": lambda: (model(x).argmax(1), y)}
    with pytest.raises(ValueError, match=words):
        optimizer.step(closures[returns])
    _assert_unchanged(model, optimizer, snapshot)


def test_a_refresh_without_closure_raises_with_nothing_changed():
    model, x, y = _model_and_batch("cross_entropy")
    optimizer = optim.SophiaH(model.parameters(), lr=0.1, update_period=1, seed=0, hessian="ggn",
                              loss_fn=F.cross_entropy)
    F.cross_entropy(model(x), y).backward()
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match="returns \\(outputs, targets\\)"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)
    for p in model.parameters():
        p.grad = None
