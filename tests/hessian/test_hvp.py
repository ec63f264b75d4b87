"""optim.hessian.hvp: every mode against the exact Hessian of small float64 models, k probes, gradients, bad input.

The exact Hessian comes from ``torch.autograd.functional.hessian``, flattened to an (n, n) matrix in params order.
The models (shared with test_operator.py): an MLP 5→7→3 (tanh), a conv net (conv 1→2 channels 3×3 on 6×6, tanh,
linear) and a pre-norm transformer block with math attention (d=8, 2 heads, seq 4, written with matmuls/softmax).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from optim.hessian.hvp import AUTO_ORDER, auto_choice, fd_rtol, hvp

from ..conftest import DEVICES

EXACT_RTOL = 1e-10
MODEL_NAMES = ["mlp", "conv", "attention"]


# ----------------------------------------------------------------------------------------------------------------
# Models and the exact Hessian


class TinyAttentionBlock(nn.Module):
    """Pre-norm block: ``x + W_o·attn(LN(x))`` then ``x + MLP(LN(x))``, attention as ``softmax(QKᵀ/√d_h)·V``."""

    def __init__(self, d: int = 8, heads: int = 2, hidden: int = 4):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.norm_weight = nn.Parameter(1.0 + 0.3 * torch.randn(d))
        self.norm_bias = nn.Parameter(0.3 * torch.randn(d))
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def norm(self, x):
        centered = x - x.mean(-1, keepdim=True)
        normalized = centered / torch.sqrt(centered.square().mean(-1, keepdim=True) + 1e-5)
        return normalized * self.norm_weight + self.norm_bias

    def forward(self, x):  # (batch, seq, d)
        batch, seq, d = x.shape
        head_dim = d // self.heads

        def split_heads(t):  # (batch, seq, d) -> (batch, heads, seq, head_dim)
            return t.view(batch, seq, self.heads, head_dim).transpose(1, 2)

        h = self.norm(x)
        q, k, v = split_heads(self.query(h)), split_heads(self.key(h)), split_heads(self.value(h))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(batch, seq, d)
        x = x + self.out(context)
        return x + self.down(torch.tanh(self.up(self.norm(x))))


def mean_squared_error(output, target):
    # Not F.mse_loss: its reduction="mean" double backward writes into a ZeroTensor under forward-over-reverse
    # (pytorch/pytorch#123996), so mode="fr" cannot differentiate it; test_auto_handles_f_mse_loss covers that case.
    return (output - target).square().mean()


class Case:
    """A model, one batch and a criterion; ``f(*params)`` is the batch loss as a function of the parameters."""

    def __init__(self, model, inputs, targets, loss_fn):
        self.model, self.inputs, self.targets, self.loss_fn = model, inputs, targets, loss_fn
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p.detach() for p in model.parameters()]
        self.n = sum(p.numel() for p in self.params)

    def f(self, *params):
        output = torch.func.functional_call(self.model, dict(zip(self.names, params)), (self.inputs,))
        return self.loss_fn(output, self.targets)


def build_case(name: str, device: str = "cpu", dtype: torch.dtype = torch.float64, rows: int = 4) -> Case:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed({"mlp": 1, "conv": 2, "attention": 3}[name])
        if name == "mlp":
            model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
            inputs, targets, loss_fn = torch.randn(rows, 5), torch.randint(0, 3, (rows,)), F.cross_entropy
        elif name == "conv":
            model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
            inputs, targets, loss_fn = torch.randn(rows, 1, 6, 6), torch.randint(0, 3, (rows,)), F.cross_entropy
        elif name == "attention":
            model = TinyAttentionBlock()
            inputs, targets, loss_fn = torch.randn(rows, 4, 8), torch.randn(rows, 4, 8), mean_squared_error
        else:
            raise KeyError(name)
    model = model.to(device=device, dtype=dtype)
    inputs = inputs.to(device=device, dtype=dtype)
    targets = targets.to(device) if not targets.dtype.is_floating_point else targets.to(device=device, dtype=dtype)
    return Case(model, inputs, targets, loss_fn)


def dense_hessian(f, params) -> torch.Tensor:
    """The (n, n) Hessian of ``f(*params)``, blocks in params order, each param row-major."""
    blocks = torch.autograd.functional.hessian(f, tuple(params), vectorize=True)
    numels = [p.numel() for p in params]
    return torch.cat(
        [torch.cat([blocks[i][j].reshape(numels[i], numels[j]) for j in range(len(params))], dim=1)
         for i in range(len(params))]
    )


@functools.lru_cache(maxsize=None)
def cached_case(name: str, device: str = "cpu") -> tuple[Case, torch.Tensor]:
    case = build_case(name, device)
    return case, dense_hessian(case.f, case.params)


def flatten(tensors, k=None) -> torch.Tensor:
    if k is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.cat([t.reshape(k, -1) for t in tensors], dim=1)


def random_like(params, k=None):
    return [torch.randn(((k,) if k is not None else ()) + tuple(p.shape), dtype=p.dtype, device=p.device)
            for p in params]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


# ----------------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("mode", ["rr", "fr", "auto"])
@pytest.mark.parametrize("k", [None, 3], ids=["one-probe", "k3"])
def test_exact_modes_match_dense_hessian(device, model_name, mode, k):
    case, hessian = cached_case(model_name, device)
    v = random_like(case.params, k)
    hv = hvp(case.f, case.params, v, mode=mode)
    assert [t.shape for t in hv] == [t.shape for t in v]
    expected = flatten(v, k) @ hessian  # H symmetric: row i of V·H is H v_i
    assert relative_error(flatten(hv, k), expected) <= EXACT_RTOL


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["rr", "fr"])
def test_exact_modes_in_low_precision_within_documented_tolerance(model_name, dtype, mode):
    """The hvp module docstring's mixed-precision bound: 8·eps(dtype) relative to the float64 product."""
    case = build_case(model_name, dtype=dtype)
    case64 = build_case(model_name)
    # The float64 product at the same rounded point (params and float inputs); float64 rr is exact to 1e-10 (above).
    case64.params = [p.double() for p in case.params]
    case64.inputs = case.inputs.double()
    case64.targets = case.targets.double() if case.targets.dtype.is_floating_point else case.targets
    v = [t.to(dtype) for t in random_like(case64.params)]
    hv = hvp(case.f, case.params, v, mode=mode)
    assert all(t.dtype == dtype for t in hv)
    expected = flatten(hvp(case64.f, case64.params, [t.double() for t in v], mode="rr"))
    assert relative_error(flatten([t.double() for t in hv]), expected) <= 8 * torch.finfo(dtype).eps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_fd_within_documented_tolerance_float64(device, model_name):
    case, hessian = cached_case(model_name, device)
    v = random_like(case.params, 2)
    hv = hvp(case.f, case.params, v, mode="fd")
    for row, expected in zip(flatten(hv, 2), flatten(v, 2) @ hessian):
        assert relative_error(row, expected) <= fd_rtol(torch.float64)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_fd_within_documented_tolerance_float32(model_name):
    case64, hessian = cached_case(model_name)
    case32 = build_case(model_name, dtype=torch.float32)
    v = random_like(case64.params)
    hv = hvp(case32.f, case32.params, [t.float() for t in v], mode="fd")
    assert relative_error(flatten(hv).double(), hessian @ flatten(v)) <= fd_rtol(torch.float32)


def test_fd_rtol_values():
    eps64, eps32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps
    assert fd_rtol(torch.float64) == pytest.approx(100 * eps64 ** (2 / 3))
    assert fd_rtol(torch.float32) == pytest.approx(100 * eps32 ** (2 / 3))
    with pytest.raises(ValueError, match="floating-point dtype"):
        fd_rtol(torch.int64)


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_k_probes_equal_k_single_calls(mode, model_name):
    case, _ = cached_case(model_name)
    v = random_like(case.params, 3)
    batched = hvp(case.f, case.params, v, mode=mode)
    for j in range(3):
        single = hvp(case.f, case.params, [t[j] for t in v], mode=mode)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[j], s, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
@pytest.mark.parametrize("k", [None, 2], ids=["one-probe", "k2"])
def test_return_grad_matches_autograd(mode, k):
    case, _ = cached_case("attention")
    leaves = [p.clone().requires_grad_(True) for p in case.params]
    expected = torch.autograd.grad(case.f(*leaves), leaves)
    hv, grad = hvp(case.f, case.params, random_like(case.params, k), mode=mode, return_grad=True)
    assert len(grad) == len(case.params)
    for g, e, p in zip(grad, expected, case.params):
        assert g.shape == p.shape
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_tuple_v_gives_tuple_and_grad_context_does_not_matter(mode):
    case, hessian = cached_case("mlp")
    v = tuple(random_like(case.params))
    with torch.no_grad():
        hv = hvp(case.f, tuple(case.params), v, mode=mode)
    assert isinstance(hv, tuple)
    tol = EXACT_RTOL if mode != "fd" else fd_rtol(torch.float64)
    assert relative_error(flatten(hv), hessian @ flatten(v)) <= tol


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_unused_and_linear_params(mode):
    # f is quadratic in a, linear in b (constant gradient, no graph) and ignores c: H = diag(2, ..., 0, ..., 0).
    a, b, c = (torch.randn(3, dtype=torch.float64) for _ in range(3))
    va, vb, vc = (torch.randn(3, dtype=torch.float64) for _ in range(3))

    def f(a, b, c):
        return (a * a).sum() + (3.0 * b).sum()

    hv, grad = hvp(f, [a, b, c], [va, vb, vc], mode=mode, return_grad=True)
    tol = dict(rtol=1e-6, atol=1e-9) if mode == "fd" else dict(rtol=1e-14, atol=0.0)
    torch.testing.assert_close(hv[0], 2 * va, **tol)
    torch.testing.assert_close(hv[1], torch.zeros(3, dtype=torch.float64), **tol)
    torch.testing.assert_close(hv[2], torch.zeros(3, dtype=torch.float64), **tol)
    torch.testing.assert_close(grad[0], 2 * a, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(grad[1], torch.full((3,), 3.0, dtype=torch.float64), rtol=0.0, atol=0.0)
    assert torch.equal(grad[2], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_unused_and_linear_params_with_k_probes(mode):
    # As above with a block of 3 probes: the rows of leaves no second backward reaches are zeros in the block.
    a, b, c = (torch.randn(3, dtype=torch.float64) for _ in range(3))
    va, vb, vc = (torch.randn(3, 3, dtype=torch.float64) for _ in range(3))

    def f(a, b, c):
        return (a * a).sum() + (3.0 * b).sum()

    hv = hvp(f, [a, b, c], [va, vb, vc], mode=mode)
    tol = dict(rtol=1e-6, atol=1e-9) if mode == "fd" else dict(rtol=1e-14, atol=0.0)
    torch.testing.assert_close(hv[0], 2 * va, **tol)
    torch.testing.assert_close(hv[1], torch.zeros(3, 3, dtype=torch.float64), **tol)
    torch.testing.assert_close(hv[2], torch.zeros(3, 3, dtype=torch.float64), **tol)


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_zero_probes(mode):
    case, _ = cached_case("mlp")
    hv, grad = hvp(case.f, case.params, random_like(case.params, 0), mode=mode, return_grad=True)
    assert [t.shape for t in hv] == [(0,) + tuple(p.shape) for p in case.params]
    assert [g.shape for g in grad] == [p.shape for p in case.params]


# ----------------------------------------------------------------------------------------------------------------
# The parameters are left alone


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_params_unchanged(device, mode):
    case = build_case("conv", device)
    params = list(case.model.parameters())  # the live tensors, requires_grad=True
    before = [p.detach().clone() for p in params]
    hvp(case.f, params, random_like(params, 2), mode=mode, return_grad=True)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        assert p.grad is None


def test_fd_params_unchanged_when_f_raises():
    case = build_case("mlp")
    params = list(case.model.parameters())
    before = [p.detach().clone() for p in params]
    calls = []

    def failing(*xs):
        calls.append(1)
        if len(calls) == 2:  # after the first perturbed gradient, during the second
            raise RuntimeError("boom")
        return case.f(*xs)

    with pytest.raises(RuntimeError, match="boom"):
        hvp(failing, params, random_like(params), mode="fd")
    assert len(calls) == 2
    for p, b in zip(params, before):
        assert torch.equal(p, b)


# ----------------------------------------------------------------------------------------------------------------
# auto and the fall-backs


def test_auto_prefers_rr_on_the_test_models():
    assert AUTO_ORDER[0] == "rr"
    for name in MODEL_NAMES:
        case, _ = cached_case(name)
        f = case.f  # a bound method is a new object at each access: keep one to key the cache
        hvp(f, case.params, random_like(case.params), mode="auto")
        assert auto_choice(f) == "rr"


class _CubeGrad(torch.autograd.Function):
    """3x²g with a forward-mode rule but no backward: differentiable by "fr", not by "rr"."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, g):
        return 3 * x * x * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("_CubeGrad: double backward is not implemented")

    @staticmethod
    def jvp(ctx, x_tangent, g_tangent):
        x, g = ctx.saved_tensors
        return 6 * x * g * x_tangent + 3 * x * x * g_tangent


class _Cube(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(x, grad)

    @staticmethod
    def jvp(ctx, x_tangent):
        (x,) = ctx.saved_tensors
        return 3 * x * x * x_tangent


@pytest.mark.parametrize("k", [None, 3], ids=["one-probe", "k3"])
def test_auto_falls_back_to_fr_and_remembers(k):
    x = torch.randn(4, dtype=torch.float64)
    v = torch.randn(((k,) if k else ()) + (4,), dtype=torch.float64)

    def f(x):
        return _Cube.apply(x).sum()

    with pytest.raises(RuntimeError, match="double backward is not implemented"):
        hvp(f, [x], [v], mode="rr")
    (hv,) = hvp(f, [x], [v], mode="auto")
    torch.testing.assert_close(hv, 6 * x * v, rtol=1e-14, atol=0.0)
    assert auto_choice(f) == "fr"
    (hv,) = hvp(f, [x], [v], mode="auto")  # straight to "fr" now
    torch.testing.assert_close(hv, 6 * x * v, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("k", [None, 2], ids=["one-probe", "k2"])
def test_auto_handles_f_mse_loss(k):
    case, hessian = cached_case("attention")
    f = functools.partial(_loss_with_criterion, case, F.mse_loss)
    v = random_like(case.params, k)
    hv = hvp(f, case.params, v, mode="auto")
    assert relative_error(flatten(hv, k), flatten(v, k) @ hessian) <= EXACT_RTOL


def _loss_with_criterion(case, criterion, *params):
    output = torch.func.functional_call(case.model, dict(zip(case.names, params)), (case.inputs,))
    return criterion(output, case.targets)


def test_auto_raises_when_no_mode_works():
    def f(x):
        raise RuntimeError("broken model")

    with pytest.raises(RuntimeError, match="broken model"):
        hvp(f, [torch.randn(3, dtype=torch.float64)], [torch.randn(3, dtype=torch.float64)], mode="auto")
    assert auto_choice(f) is None


class _SquareNoVmapBackward(torch.autograd.Function):
    """x² whose second-level backward calls .item(), which vmap (the batched second backward) cannot run."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _DoubleNoVmap.apply(x, grad)


class _DoubleNoVmap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad):
        ctx.save_for_backward(x, grad)
        return 2 * x * grad

    @staticmethod
    def backward(ctx, grad_grad):
        x, grad = ctx.saved_tensors
        scale = 2.0 * (grad_grad.sum().item() * 0.0 + 1.0)
        return scale * grad * grad_grad, scale * x * grad_grad


def test_rr_k_probes_fall_back_to_a_loop_when_vmap_fails():
    from optim.hessian.hvp import MEASURE_MIN_PROBES, batching_choice

    x = torch.randn(5, dtype=torch.float64)
    k = MEASURE_MIN_PROBES + 2  # a block that tries vmap first

    def f(x):
        return _SquareNoVmapBackward.apply(x).sum() + x.sin().sum()

    v = torch.randn(k, 5, dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)
    with pytest.raises(RuntimeError):  # the batched path really fails here
        torch.autograd.grad(grad, leaf, v, is_grads_batched=True)
    (hv,) = hvp(f, [x], [v], mode="rr")
    torch.testing.assert_close(hv, (2.0 - x.sin()) * v, rtol=1e-14, atol=1e-15)
    assert batching_choice(f, k) == "loop"  # remembered: the next block goes straight to the loop
    (hv,) = hvp(f, [x], [v], mode="rr")
    torch.testing.assert_close(hv, (2.0 - x.sin()) * v, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_a_large_first_block_measures_on_a_few_probes_then_runs_the_rest_the_faster_way(model_name, monkeypatch):
    import importlib

    from optim.hessian.hvp import MEASURE_PROBES, batching_choice

    hvp_module = importlib.import_module("optim.hessian.hvp")
    case, hessian = cached_case(model_name)
    k = 2 * MEASURE_PROBES + 3
    v = random_like(case.params, k)
    ways = []
    for name in ("_vmapped_backward", "_looped_backward"):
        real = getattr(hvp_module, name)
        monkeypatch.setattr(hvp_module, name,
                            lambda o, l, d, *a, real=real, name=name, **kw: ways.append((name, d[0].shape[0])) or
                            real(o, l, d, *a, **kw))

    def f(*params):
        return case.f(*params)

    hv = hvp(f, case.params, v, mode="rr")
    choice = batching_choice(f, k)
    winner = "_vmapped_backward" if choice == "vmap" else "_looped_backward"
    assert ways == [("_vmapped_backward", MEASURE_PROBES), ("_looped_backward", MEASURE_PROBES), (winner, 3)]
    flat_v = torch.cat([t.reshape(k, -1) for t in v], dim=1)
    assert relative_error(torch.cat([t.reshape(k, -1) for t in hv], dim=1), flat_v @ hessian) <= EXACT_RTOL


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_a_probe_block_measures_vmap_against_a_loop_once_and_both_are_exact(model_name, monkeypatch):
    import importlib

    from optim.hessian.hvp import MEASURE_MIN_PROBES, batching_choice

    hvp_module = importlib.import_module("optim.hessian.hvp")  # the attribute optim.hessian.hvp is the function
    case, hessian = cached_case(model_name)
    k = 8
    v = random_like(case.params, k)
    flat_v = torch.cat([t.reshape(k, -1) for t in v], dim=1)
    ways = []
    for name in ("_vmapped_backward", "_looped_backward"):
        real = getattr(hvp_module, name)
        monkeypatch.setattr(hvp_module, name, lambda *a, real=real, name=name, **kw: ways.append(name) or real(*a, **kw))

    def f(*params):  # a new function object: nothing remembered for it yet
        return case.f(*params)

    expected = flat_v @ hessian
    for call in range(3):
        ways.clear()
        hv = hvp(f, case.params, v, mode="rr")
        flat = torch.cat([t.reshape(k, -1) for t in hv], dim=1)
        assert relative_error(flat, expected) <= EXACT_RTOL
        if call == 0:  # half the probes each way, timed
            assert ways == ["_vmapped_backward", "_looped_backward"]
            choice = batching_choice(f, k)
            assert choice in ("vmap", "loop")
        else:  # then only the faster way
            assert ways == ["_vmapped_backward" if choice == "vmap" else "_looped_backward"]
    for forced in ("vmap", "loop"):  # each way alone gives the same products
        hvp_module._batching_choice.set(f, k, forced)
        hv = hvp(f, case.params, v, mode="rr")
        assert relative_error(torch.cat([t.reshape(k, -1) for t in hv], dim=1), expected) <= EXACT_RTOL
    ways.clear()
    hvp(f, case.params, random_like(case.params, MEASURE_MIN_PROBES - 1), mode="rr")
    assert ways == ["_looped_backward"] and batching_choice(f, MEASURE_MIN_PROBES - 1) is None


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _simple():
    x = torch.randn(3, dtype=torch.float64)
    y = torch.randn(2, 2, dtype=torch.float64)
    return (lambda a, b: (a.sin().sum() * b.cos()).sum()), [x, y]


def test_unknown_mode():
    f, params = _simple()
    with pytest.raises(ValueError, match="unknown mode 'exact'.*'auto', 'rr', 'fr', 'fd'"):
        hvp(f, params, random_like(params), mode="exact")


def test_empty_params():
    with pytest.raises(ValueError, match="params is empty"):
        hvp(lambda: torch.tensor(0.0), [], [])


def test_single_tensor_params_or_v():
    f, params = _simple()
    with pytest.raises(ValueError, match="params must be a list or tuple of tensors.*wrap it"):
        hvp(lambda a: a.sum(), params[0], [params[0]])
    with pytest.raises(ValueError, match="v must be a list of tensors shaped like params"):
        hvp(lambda a: a.sum(), [params[0]], params[0])


def test_non_floating_params():
    with pytest.raises(ValueError, match=r"params\[1\] has dtype torch.int64.*floating-point"):
        hvp(lambda a, b: a.sum(), [torch.randn(2), torch.arange(3)], [torch.randn(2), torch.ones(3)])


def test_v_length_mismatch():
    f, params = _simple()
    with pytest.raises(ValueError, match="v has 1 tensors but params has 2"):
        hvp(f, params, random_like(params)[:1])


def test_v_shape_mismatch_names_index_and_shapes():
    f, params = _simple()
    v = random_like(params)
    v[1] = torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v\[1\] has shape \(4,\) but params\[1\] has shape \(2, 2\); expected "
                                         r"\(2, 2\) for one probe or \(k, 2, 2\) for k probes"):
        hvp(f, params, v)


def test_inconsistent_probe_dimension():
    f, params = _simple()
    v = random_like(params, 2)
    v[1] = torch.randn(3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v\[1\] has a probe dimension of k=3 .* but v\[0\] has a probe dimension "
                                         r"of k=2"):
        hvp(f, params, v)
    v[1] = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v\[1\] has no probe dimension .* but v\[0\] has a probe dimension of k=2"):
        hvp(f, params, v)


def test_v_dtype_mismatch():
    f, params = _simple()
    v = random_like(params)
    v[0] = v[0].float()
    with pytest.raises(ValueError, match=r"v\[0\] is torch.float32 on cpu but params\[0\] is torch.float64"):
        hvp(f, params, v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_v(bad):
    f, params = _simple()
    v = random_like(params, 2)
    v[1][1, 0, 1] = bad
    with pytest.raises(ValueError, match=r"v\[1\] contains non-finite values"):
        hvp(f, params, v)


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_non_scalar_loss_names_its_shape(mode):
    _, params = _simple()
    with pytest.raises(ValueError, match=r"scalar loss .* got shape \(3,\)"):
        hvp(lambda a, b: a.sin() * b.sum(), params, random_like(params), mode=mode)


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_loss_not_a_tensor(mode):
    _, params = _simple()
    with pytest.raises(ValueError, match="f must return the loss as a tensor with one element, got a float"):
        hvp(lambda a, b: 1.0, params, random_like(params), mode=mode)


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss(mode, bad):
    _, params = _simple()
    with pytest.raises(ValueError, match="non-finite loss"):
        hvp(lambda a, b: (a * a).sum() * bad, params, random_like(params), mode=mode)


def test_one_element_loss_is_accepted():
    _, params = _simple()
    hv = hvp(lambda a, b: (a * a).sum().reshape(1, 1) + b.sum(), params, random_like(params), mode="rr")
    assert [t.shape for t in hv] == [p.shape for p in params]


def test_f_may_be_any_callable_a_slotted_object_or_a_bound_method():
    # hvp remembers per f that its first call was checked for reentrant checkpoints: an f without weak references
    # must still work, and a bound method (a new object at each attribute access) is remembered by its instance.
    from optim.hessian import routing

    class Slotted:
        __slots__ = ()

        def __call__(self, w):
            return (w ** 3).sum()

    class Holder:
        def loss(self, w):
            return (w ** 3).sum()

    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64)
    expected = 6 * w.detach() * v
    holder = Holder()
    for f in (Slotted(), holder.loss, holder.loss):
        torch.testing.assert_close(hvp(f, [w], [v])[0], expected)
    assert [key[0] for key in routing._WATCHED[holder]] == [Holder.loss]
