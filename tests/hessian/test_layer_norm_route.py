"""``optim::layer_norm_double_backward`` and the layer-norm route of the curvature products.

The op is checked against its reference and against torch's own double backward of ``F.layer_norm`` (autograd, an
independent oracle) in float64 on fresh random inputs; the route against torch's products (the same model with the
route off), torch's first-order values bit for bit, a third derivative, a vmapped second backward and functorch.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import optim
from optim.hessian import layer_norm as layer_norm_route
from optim.hessian._ops import layer_norm_double_backward_reference
from optim.hessian.routing import sdpa_curvature

from ..conftest import DEVICES

routing = importlib.import_module("optim.hessian.routing")
OP = torch.ops.optim.layer_norm_double_backward


def _inputs(rows, features, dtype=torch.float64, device="cpu", weight=True, u_weight=True, u_bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    randn = (lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype))
    x = randn(rows, features) * 2 + 0.5
    gamma = randn(features) if weight else None
    _, mean, rstd = torch.native_layer_norm(x, (features,), gamma, None, 1e-5)
    return dict(input=x, mean=mean.reshape(-1), rstd=rstd.reshape(-1), weight=gamma, grad_out=randn(rows, features),
                u_input=randn(rows, features), u_weight=randn(features) if u_weight else None,
                u_bias=randn(features) if u_bias else None)


def _torch_double_backward(inputs):
    """The derivatives of Σ u dx + Σ u_γ dγ + Σ u_β dβ by torch's autograd through F.layer_norm's backward
    (dβ = Σ_rows g, whatever the normalization)."""
    x = inputs["input"].detach().requires_grad_()
    features = x.shape[-1]
    weight = None if inputs["weight"] is None else inputs["weight"].detach().requires_grad_()
    g = inputs["grad_out"].detach().requires_grad_()
    y = F.layer_norm(x, (features,), weight, None, 1e-5)
    wrt = [x] + ([weight] if weight is not None else [])
    first = torch.autograd.grad(y, wrt, g, create_graph=True)
    total = (inputs["u_input"] * first[0]).sum()
    if weight is not None and inputs["u_weight"] is not None:
        total = total + (inputs["u_weight"] * first[1]).sum()
    if inputs["u_bias"] is not None:
        total = total + (inputs["u_bias"] * g.sum(0)).sum()
    second = torch.autograd.grad(total, [g, x] + ([weight] if weight is not None else []), allow_unused=True)
    d_g, d_x = second[0], second[1]
    d_weight = second[2] if weight is not None else None
    return d_g, d_x, d_weight


CASES = [dict(), dict(weight=False, u_weight=False), dict(u_weight=False, u_bias=False), dict(u_bias=False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 19), (1, 1), (33, 64), (5, 257)], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_op_matches_torch_double_backward_and_the_reference_in_float64(device, shape, case):
    inputs = _inputs(*shape, device=device, seed=case, **CASES[case])
    got = OP(**inputs)
    reference = layer_norm_double_backward_reference(**inputs)
    want = _torch_double_backward(inputs)
    tolerance = dict(rtol=1e-10, atol=1e-11)
    for name, g, r, w in zip(("d_grad_out", "d_input", "d_weight"), got, reference, want):
        assert g.dtype == torch.float64 and not g.isnan().any(), name
        torch.testing.assert_close(g, r, **tolerance, msg=name)
        if w is not None:
            torch.testing.assert_close(r, w, **tolerance, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_op_in_float32_matches_float64(device):
    inputs = _inputs(40, 96, dtype=torch.float32, device=device, seed=3)
    got = OP(**inputs)
    want = layer_norm_double_backward_reference(**{k: None if v is None else v.double() for k, v in inputs.items()})
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def test_op_with_no_rows_gives_empty_gradients_and_a_zero_weight_gradient():
    d_g, d_x, d_weight = OP(**_inputs(0, 5))
    assert d_g.shape == d_x.shape == (0, 5) and torch.equal(d_weight, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_op_opcheck(device):
    torch.library.opcheck(OP.default, args=(), kwargs=_inputs(6, 11, dtype=torch.float32, device=device))
    # Column-major rows: the fake's strides are the kernel's (contiguous) whatever the inputs' layout.
    columns = {name: t if t is None or t.dim() < 2 else t.t().contiguous().t()
               for name, t in _inputs(6, 11, dtype=torch.float32, device=device).items()}
    assert not columns["input"].is_contiguous()
    torch.library.opcheck(OP.default, args=(), kwargs=columns)


@pytest.mark.parametrize("implementation", ["kernel", "reference"])
@pytest.mark.parametrize("change, message", [
    (dict(mean=torch.zeros(3, dtype=torch.float64)), "mean has shape"),
    (dict(u_weight=torch.zeros(4, dtype=torch.float64)), "u_weight has shape"),
    (dict(grad_out=torch.zeros(6, 5)), "grad_out is torch.float32"),
    (dict(input=torch.zeros(6, 5, dtype=torch.float16)), "float32 or float64"),
    (dict(input=torch.zeros(30, dtype=torch.float64)), r"\(N, D\) rows"),
])
def test_op_bad_input_names_the_argument(implementation, change, message):
    call = OP if implementation == "kernel" else layer_norm_double_backward_reference
    with pytest.raises(ValueError, match=message):
        call(**{**_inputs(6, 5), **change})


# --- the route -----------------------------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    """Layer norms over one and over two trailing dims, with and without an affine part, and one on an input that
    needs no gradient."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.LayerNorm(6)
        self.linear = torch.nn.Linear(6, 6)
        self.plane = torch.nn.LayerNorm((3, 6))
        self.bare = torch.nn.LayerNorm(6, elementwise_affine=False)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.linear(self.first(x)))
        h = self.bare(self.plane(h) * h)
        return self.head(h).sum(1)


def _net_and_batch():
    torch.manual_seed(5)
    model = _Net().double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.7)
    return model, (torch.randn(5, 3, 6, dtype=torch.float64), torch.randint(0, 4, (5,)))


@pytest.fixture
def counted(monkeypatch):
    calls = []
    original = layer_norm_route._LayerNorm.apply
    monkeypatch.setattr(layer_norm_route._LayerNorm, "apply",
                        staticmethod(lambda *a, _o=original: calls.append(1) or _o(*a)))
    return calls


def _without_route(monkeypatch):
    monkeypatch.delitem(routing._ROUTES, F.layer_norm)


def _loss_of_params(model, batch):
    names = [n for n, _ in model.named_parameters()]
    x, y = batch

    def f(*params):
        out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        return F.cross_entropy(out, y)
    return f


@pytest.mark.parametrize("k", [None, 4])
def test_route_gives_torchs_products_and_its_gradient_bit_for_bit(monkeypatch, counted, k):
    model, batch = _net_and_batch()
    f = _loss_of_params(model, batch)
    params = [p.detach() for p in model.parameters()]
    torch.manual_seed(1)
    v = [torch.randn(p.shape if k is None else (k, *p.shape), dtype=torch.float64) for p in params]
    hv, grad = optim.hvp(f, params, v, mode="rr", return_grad=True)
    assert counted, "the route was not taken"
    with monkeypatch.context() as patch:
        _without_route(patch)
        want_hv, want_grad = optim.hvp(f, params, v, mode="rr", return_grad=True)
    for got, want in zip(hv, want_hv):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    x = [p.clone().requires_grad_() for p in params]
    torch_grad = torch.autograd.grad(f(*x), x)
    for got, want, plain in zip(grad, want_grad, torch_grad):
        assert torch.equal(got, want) and torch.equal(got, plain)


def test_route_kept_operator_matches_the_explicit_hessian(counted):
    model, batch = _net_and_batch()
    f = _loss_of_params(model, batch)
    params = [p.detach() for p in model.parameters()]
    operator = optim.HessianOperator(model, lambda out, y: F.cross_entropy(out, y), batch)
    flat = torch.cat([p.reshape(-1) for p in params])
    sizes = [p.numel() for p in params]

    def flat_loss(z):
        return f(*[piece.view(p.shape) for piece, p in zip(z.split(sizes), params)])
    explicit = torch.autograd.functional.hessian(flat_loss, flat)
    torch.manual_seed(2)
    block = torch.randn(3, flat.numel(), dtype=torch.float64)
    product = operator @ block
    assert counted, "the route was not taken"
    torch.testing.assert_close(product, block @ explicit, rtol=1e-9, atol=1e-11)


def test_route_third_derivative_and_vmapped_second_backward_match_torch(counted):
    torch.manual_seed(3)
    x0 = torch.randn(4, 7, dtype=torch.float64)
    weight0, bias0 = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    c = torch.randn(4, 7, dtype=torch.float64)
    u = torch.randn(3, 4, 7, dtype=torch.float64)

    def derivatives():
        x, weight, bias = (t.clone().requires_grad_() for t in (x0, weight0, bias0))
        y = F.layer_norm(x, (7,), weight, bias)
        loss = (torch.sin(y) * c).sum()
        gx, gw = torch.autograd.grad(loss, (x, weight), create_graph=True)
        (batched,) = torch.autograd.grad(gx, x, u, is_grads_batched=True, retain_graph=True)
        (hx,) = torch.autograd.grad((gx * u[0]).sum() + gw.square().sum(), x, create_graph=True)
        (third,) = torch.autograd.grad(hx.pow(3).sum(), weight)
        return third, batched

    with sdpa_curvature():
        got = derivatives()
    assert counted, "the route was not taken"
    want = derivatives()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_route_not_taken_under_functorch_or_forward_ad_nor_for_half_precision(counted):
    torch.manual_seed(4)
    x, weight = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)

    def f(w):
        return F.layer_norm(x, (5,), w).square().sum()
    with sdpa_curvature():
        jvp = torch.func.jvp(torch.func.grad(f), (weight,), (torch.ones(5, dtype=torch.float64),))
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            tangent = torch.autograd.forward_ad.unpack_dual(F.layer_norm(dual, (5,))).tangent
        half = F.layer_norm(x.half().requires_grad_(), (5,))
    assert not counted
    want = torch.func.jvp(torch.func.grad(f), (weight,), (torch.ones(5, dtype=torch.float64),))
    torch.testing.assert_close(jvp, want)
    assert tangent is not None and half.dtype == torch.float16


def test_route_on_a_hugging_face_gpt2_gives_the_products_without_it(monkeypatch, counted):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 97, (2, 12))
    numel = sum(p.numel() for p in model.parameters())
    block = torch.randn(3, numel, dtype=torch.float64)
    got = optim.HessianOperator(model, optim.hessian.causal_lm_loss, (ids, ids)) @ block
    assert counted, "the route was not taken"
    _without_route(monkeypatch)
    want = optim.HessianOperator(model, optim.hessian.causal_lm_loss, (ids, ids)) @ block
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
