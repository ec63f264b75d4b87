"""The attention op family (optim/hessian/_attention_ops.py) and its autograd and routing layer (attention.py).

Oracles: the ``*_reference`` functions (every T×T matrix at once), and autograd through plain softmax attention
(:func:`math_attention`). Sizes: T not a multiple of the tile (37 rows, tiles of 16 for the Python kernels and of the
compiled kernel's 64 × 256 tiles), causal and masked, grouped-query (Hkv < Hq).
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import optim
from optim.hessian import _attention_ops as ops
from optim.hessian import attention as attention_module
from optim.hessian import sdpa_curvature
from optim.hessian.attention import scaled_dot_product_attention as attention

from .._models import gpt2_twins

OPS = {
    "forward": (ops.sdpa_forward, ops.sdpa_forward_blocked, ops.sdpa_forward_reference),
    "backward": (ops.sdpa_backward, ops.sdpa_backward_blocked, ops.sdpa_backward_reference),
    "forward_jvp": (ops.sdpa_forward_jvp, ops.sdpa_forward_jvp_blocked, ops.sdpa_forward_jvp_reference),
    "backward_jvp": (ops.sdpa_backward_jvp, ops.sdpa_backward_jvp_blocked, ops.sdpa_backward_jvp_reference),
}

# (name, Hq, Hkv, Tq, Tk, mask kind, is_causal)
CASES = [
    ("causal-gqa", 4, 2, 37, 37, None, True),
    ("bool-mask-cross", 2, 2, 37, 29, "bool", False),
    ("additive-mask-causal-mqa", 4, 1, 37, 37, "additive", True),
    # past the compiled kernel's tiles (64 query rows, 256 keys): partial tiles on both sides
    ("long-causal-gqa", 4, 2, 150, 150, None, True),
    ("long-bool-mask-cross", 2, 1, 150, 300, "bool", False),
    ("head-mask-causal-gqa", 4, 2, 37, 37, "bool-heads", True),  # a mask per (batch, head)
]
CASE_IDS = [case[0] for case in CASES]


@pytest.fixture(autouse=True)
def _small_python_tiles(monkeypatch):
    # 37 rows in tiles of 16: two full tiles and a partial one
    monkeypatch.setattr(ops, "QUERY_TILE", 16)


def make_case(case, dtype=torch.float64, batch=2, dim=5, value_dim=3):
    _, heads, kv_heads, tq, tk, mask_kind, causal = case
    q = torch.randn(batch, heads, tq, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, tk, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, tk, value_dim, dtype=dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, tq, tk) > 0.4
        mask[0, 0, 3] = False  # a row with no allowed key: O = 0, lse = -inf, zero derivatives
    elif mask_kind == "bool-heads":
        mask = torch.rand(batch, heads, tq, tk) > 0.3
        mask[..., 0] = True  # causal too: every row keeps key 0
    elif mask_kind == "additive":
        mask = torch.randn(tq, tk, dtype=dtype)
    return q, k, v, mask, causal, 0.7


def math_attention(q, k, v, mask, causal, scale):
    """Plain softmax attention, differentiable by autograd to any order (rows with no allowed key give 0): the
    package's composite, which compiled products differentiate."""
    return attention_module.composite_attention(q, k, v, mask, causal, scale)


def tangents(*tensors):
    return tuple(torch.randn_like(t) for t in tensors)


def saved(q, k, v, mask, causal, scale):
    out, lse = ops.sdpa_forward_reference(q, k, v, mask, causal, scale)
    return out, lse


def op_args(name, q, k, v, mask, causal, scale):
    out, lse = saved(q, k, v, mask, causal, scale)
    d_out = torch.randn_like(out)
    if name == "forward":
        return (q, k, v)
    if name == "backward":
        return (d_out, q, k, v, out, lse)
    if name == "forward_jvp":
        return (q, k, v, out, lse, *tangents(q, k, v))
    return (d_out, q, k, v, out, lse, torch.randn_like(d_out), *tangents(q, k, v))


# --- the ops against the references --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("implementation", ["op", "python-blocked"])
def test_op_matches_reference(case, name, implementation):
    q, k, v, mask, causal, scale = make_case(case)
    args = op_args(name, q, k, v, mask, causal, scale)
    op, blocked, reference = OPS[name]
    call = op if implementation == "op" else blocked
    got = call(*args, mask, causal, scale)
    expected = reference(*args, mask, causal, scale)
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(OPS))
def test_op_uses_the_compiled_cpu_kernel(name):
    if not optim._library.extension_loaded():
        pytest.skip("the compiled extension is not loaded")
    assert optim.has_kernel(f"sdpa_{name}", "cpu")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_references_match_autograd_of_plain_attention(case):
    q, k, v, mask, causal, scale = make_case(case)
    fn = lambda q, k, v: math_attention(q, k, v, mask, causal, scale)  # noqa: E731
    out, lse = saved(q, k, v, mask, causal, scale)
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-12, atol=1e-12)
    d_out = torch.randn_like(out)
    _, vjp = torch.func.vjp(fn, q, k, v)
    for got, expected in zip(ops.sdpa_backward_reference(d_out, q, k, v, out, lse, mask, causal, scale), vjp(d_out)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    dots = tangents(q, k, v)
    _, out_dot = torch.func.jvp(fn, (q, k, v), dots)
    torch.testing.assert_close(ops.sdpa_forward_jvp_reference(q, k, v, out, lse, *dots, mask, causal, scale), out_dot,
                               rtol=1e-12, atol=1e-12)
    d_out_dot = torch.randn_like(out)
    backward = lambda d_out, q, k, v: torch.func.vjp(fn, q, k, v)[1](d_out)  # noqa: E731
    _, expected = torch.func.jvp(backward, (d_out, q, k, v), (d_out_dot, *dots))
    got = ops.sdpa_backward_jvp_reference(d_out, q, k, v, out, lse, d_out_dot, *dots, mask, causal, scale)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 2, 0, 5), (0, 2, 3, 3), (1, 2, 3, 0), (1, 1, 4097, 3)],
                         ids=["one-token", "no-queries", "no-batch", "no-keys", "4097-queries"])
@pytest.mark.parametrize("causal", [False, True])
def test_edge_sizes_match_the_reference(shape, causal):
    batch, heads, tq, tk = shape
    q = torch.randn(batch, heads, tq, 4, dtype=torch.float64)
    k, v = torch.randn(batch, heads, tk, 4, dtype=torch.float64), torch.randn(batch, heads, tk, 3, dtype=torch.float64)
    for name in OPS:
        args = op_args(name, q, k, v, None, causal, 0.5)
        got, expected = OPS[name][0](*args, None, causal, 0.5), OPS[name][2](*args, None, causal, 0.5)
        got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_a_row_with_no_allowed_key_gives_zero_output_and_minus_inf_lse():
    q, k, v, mask, causal, scale = make_case(CASES[1])
    out, lse = ops.sdpa_forward(q, k, v, mask, causal, scale)
    assert torch.isneginf(lse[0, 0, 3]) and bool((out[0, 0, 3] == 0).all())
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", list(OPS))
def test_opcheck(name):
    q, k, v, mask, causal, scale = make_case(CASES[0], batch=1)
    torch.library.opcheck(OPS[name][0].default, args=op_args(name, q, k, v, mask, causal, scale),
                          kwargs={"is_causal": causal, "scale": scale})
    q, k, v, mask, causal, scale = make_case(CASES[1], batch=1)
    torch.library.opcheck(OPS[name][0].default, args=op_args(name, q, k, v, mask, causal, scale) + (mask,),
                          kwargs={"scale": scale})
    # (B, T, h, d) in memory, as a model's heads split from one projection: the fake's strides are the kernel's.
    q, k, v, mask, causal, scale = make_case(CASES[0], batch=2)
    heads_last = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in op_args(name, q, k, v, mask, causal, scale)]
    assert not heads_last[0].is_contiguous()
    torch.library.opcheck(OPS[name][0].default, args=tuple(heads_last), kwargs={"is_causal": causal, "scale": scale})


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", list(OPS))
def test_op_vmap_over_a_leading_dimension(case, name):
    # The vmap rule folds the vmapped dimension into the heads; unbatched operands (the primals) are shared.
    q, k, v, mask, causal, scale = make_case(case, batch=1)
    args = list(op_args(name, q, k, v, mask, causal, scale))
    batched = [i for i in range(len(args)) if i not in (0,) or name in ("backward", "backward_jvp")][-3:]
    stacked = {i: torch.stack([args[i], torch.randn_like(args[i]), torch.randn_like(args[i])]) for i in batched}
    in_dims = tuple(0 if i in stacked else None for i in range(len(args)))

    def call(*xs):
        return OPS[name][0](*xs, mask, causal, scale)

    got = torch.func.vmap(call, in_dims=in_dims)(*[stacked.get(i, a) for i, a in enumerate(args)])
    got = got if isinstance(got, tuple) else (got,)
    for j in range(3):
        expected = OPS[name][2](*[stacked[i][j] if i in stacked else a for i, a in enumerate(args)], mask, causal,
                                scale)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g[j], e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(OPS))
def test_op_vmap_with_every_trailing_argument_at_its_default(name):
    # No mask, not causal, scale 1.0 (Whisper scales its queries itself): the dispatcher leaves those arguments
    # out, and the vmap rule, which unpacked exactly three, raised inside the Fisher's per-sample vmap.
    q, k, v, _, _, _ = make_case(CASES[0], batch=1)
    args = list(op_args(name, q, k, v, None, False, 1.0))
    stacked = torch.stack([args[-1], torch.randn_like(args[-1])])
    in_dims = (None,) * (len(args) - 1) + (0,)
    got = torch.func.vmap(lambda *xs: OPS[name][0](*xs), in_dims=in_dims)(*args[:-1], stacked)
    got = got if isinstance(got, tuple) else (got,)
    for j in range(2):
        expected = OPS[name][2](*args[:-1], stacked[j], None, False, 1.0)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g[j], e, rtol=1e-12, atol=1e-12)
    # and through the route, as a per-sample gradient takes it
    primal = torch.randn(3, 2, 5, 4, dtype=torch.float64)

    def per_sample(x):
        with sdpa_curvature():
            return F.scaled_dot_product_attention(x, x, x, scale=1.0).square().sum()

    torch.testing.assert_close(torch.func.vmap(torch.func.grad(per_sample))(primal),
                               torch.func.vmap(torch.func.grad(lambda x: math_attention(x, x, x, None, False,
                                                                                        1.0).square().sum()))(primal),
                               rtol=1e-11, atol=1e-12)


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made while ``fn`` runs, as the profiler records it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the profiler records the calling thread; parallel_for's workers would escape it
    try:
        with torch.profiler.profile(profile_memory=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    return max((event.self_cpu_memory_usage for event in prof.events()), default=0)


@pytest.mark.parametrize("name", list(OPS))
def test_no_allocation_is_tokens_by_tokens(name):
    # O(T) memory: at Tq = Tk = 512 no tensor holds the (Tq, Tk) matrix of one head, or a quarter of it; the T×T
    # reference does (which shows that the profiler sees the allocations)
    case = ("memory", 1, 1, 512, 512, None, True)
    q, k, v, mask, causal, scale = make_case(case, batch=1, dim=8, value_dim=8)
    args = op_args(name, q, k, v, mask, causal, scale)
    square = 512 * 512 * 4
    op, blocked, reference = OPS[name]
    assert _largest_allocation(lambda: reference(*args, mask, causal, scale)) >= square
    for implementation in (op, blocked):
        assert _largest_allocation(lambda: implementation(*args, mask, causal, scale)) <= square // 4


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(OPS))
def test_ops_on_cuda_match_the_cpu_reference(name):
    # no CUDA kernel yet: the query-tiled PyTorch default runs there
    case = CASES[1]
    q, k, v, mask, causal, scale = make_case(case)
    args = op_args(name, q, k, v, mask, causal, scale)
    expected = OPS[name][2](*args, mask, causal, scale)
    got = OPS[name][0](*[a.cuda() for a in args], mask.cuda(), causal, scale)
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-12, atol=1e-12)


# --- attention(): autograd, forward mode, double backward, vmap -----------------------------------------------------

def _both(case):
    q, k, v, mask, causal, scale = make_case(case)
    ours = lambda q, k, v: attention(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=True)  # noqa: E731
    plain = lambda q, k, v: math_attention(q, k, v, mask, causal, scale)  # noqa: E731
    return (q, k, v), ours, plain


def _close(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_attention_backward_and_double_backward_match_autograd(case):
    primals, ours, plain = _both(case)
    results = []
    for fn in (ours, plain):
        q, k, v = (t.clone().requires_grad_(True) for t in primals)
        torch.manual_seed(7)
        out = fn(q, k, v)
        d_out = torch.randn_like(out).requires_grad_(True)
        grads = torch.autograd.grad(out, (q, k, v), d_out, create_graph=True)
        cotangents = tangents(q, k, v)
        second = torch.autograd.grad(grads, (q, k, v, d_out), cotangents)
        results.append((out.detach(), [g.detach() for g in grads], second))
    (out, grads, second), (out_e, grads_e, second_e) = results
    torch.testing.assert_close(out, out_e, rtol=1e-12, atol=1e-12)
    _close(grads, grads_e)
    _close(second, second_e)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_attention_forward_mode_and_forward_over_reverse_match_autograd(case):
    primals, ours, plain = _both(case)
    dots = tangents(*primals)
    _close(torch.func.jvp(ours, primals, dots), torch.func.jvp(plain, primals, dots))
    d_out = torch.randn_like(plain(*primals))
    hessians = []
    for fn in (ours, plain):
        grad = torch.func.grad(lambda q, k, v: (fn(q, k, v) * d_out).sum(), argnums=(0, 1, 2))
        hessians.append(torch.func.jvp(grad, primals, dots)[1])
    _close(*hessians)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_attention_vmap_over_k_tangents_and_batched_cotangents(case):
    primals, ours, plain = _both(case)
    probes = [torch.randn(4, *t.shape, dtype=t.dtype) for t in primals]
    d_out = torch.randn_like(plain(*primals))
    products = []
    for fn in (ours, plain):
        grad = torch.func.grad(lambda q, k, v: (fn(q, k, v) * d_out).sum(), argnums=(0, 1, 2))
        products.append(torch.func.vmap(lambda *u: torch.func.jvp(grad, primals, u)[1])(*probes))
    _close(*products)
    # reverse-over-reverse with the k cotangents batched (what hvp's "rr" vmap path runs)
    q, k, v = (t.clone().requires_grad_(True) for t in primals)
    grads = torch.autograd.grad((ours(q, k, v) * d_out).sum(), (q, k, v), create_graph=True)
    _close(torch.autograd.grad(grads, (q, k, v), probes, is_grads_batched=True), products[1])
    _close(torch.func.vmap(lambda *u: torch.func.jvp(ours, primals, u)[1])(*probes),
           torch.func.vmap(lambda *u: torch.func.jvp(plain, primals, u)[1])(*probes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    q, k, v, mask, causal, scale = make_case(CASES[0], dtype=dtype)
    out, lse = ops.sdpa_forward(q, k, v, mask, causal, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    wide = [t.double() for t in (q, k, v)]
    out64, lse64 = ops.sdpa_forward_reference(*wide, mask, causal, scale)
    # one rounding of the result to the dtype (plus float32 accumulation)
    tolerance = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), out64, rtol=tolerance, atol=tolerance * float(out64.abs().max()))
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)
    d_out = torch.randn_like(out)
    grads = ops.sdpa_backward(d_out, q, k, v, out, lse, mask, causal, scale)
    expected = ops.sdpa_backward_reference(d_out.double(), *wide, out64, lse64, mask, causal, scale)
    for g, e, t in zip(grads, expected, (q, k, v)):
        assert g.dtype == dtype
        # inputs O and lse carry the dtype's rounding into D; a few eps of the largest entry
        torch.testing.assert_close(g.double(), e, rtol=0, atol=8 * torch.finfo(dtype).eps * float(e.abs().max()))


# --- bad input ------------------------------------------------------------------------------------------------------

def test_bad_input_raises_value_error_naming_the_argument():
    q, k, v, mask, causal, scale = make_case(CASES[0])
    for dropout_p in (-0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\]"):
            attention(q, k, v, dropout_p=dropout_p, enable_gqa=True)
    with pytest.raises(ValueError, match="query must be 3-D"):
        attention(q[0, 0, 0], k, v)
    with pytest.raises(ValueError, match="key has 3 dimensions"):
        attention(q, k[0], v)
    with pytest.raises(ValueError, match="key has 3 heads, which must divide the 4 heads"):
        attention(q, torch.randn(2, 3, 37, 5, dtype=q.dtype), torch.randn(2, 3, 37, 3, dtype=q.dtype),
                  enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="key is torch.float32"):
        attention(q, k.float(), v, enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask has shape"):
        attention(q, k, v, torch.ones(5, 5, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask must be boolean"):
        attention(q, k, v, torch.ones(37, 37, dtype=torch.int64), enable_gqa=True)
    with pytest.raises(ValueError, match="key has head_dim 4"):
        ops.sdpa_forward(q, k[..., :4], v, None, False, 1.0)
    out, lse = ops.sdpa_forward(q, k, v, None, False, 1.0)
    with pytest.raises(ValueError, match="lse must be torch.float64"):
        ops.sdpa_backward(out, q, k, v, out, lse.float(), None, False, 1.0)
    with pytest.raises(ValueError, match="grad_out has shape"):
        ops.sdpa_backward(out[:, :, :3], q, k, v, out, lse, None, False, 1.0)
    with pytest.raises(ValueError, match="q_dot is torch.float32"):
        ops.sdpa_forward_jvp(q, k, v, out, lse, q.float(), k, v, None, False, 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.sdpa_forward(q, k, v, None, False, math.inf)


# --- routing ----------------------------------------------------------------------------------------------------------

def test_sdpa_curvature_routes_scaled_dot_product_attention(monkeypatch):
    q, k, v, mask, causal, scale = make_case(CASES[0])
    calls = []
    original = attention_module.scaled_dot_product_attention
    monkeypatch.setattr(attention_module, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    with sdpa_curvature(), sdpa_curvature():  # nested entries are one entry
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with sdpa_curvature(enabled=False):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert len(calls) == 2


class _AttentionBlock(torch.nn.Module):
    """x + proj(SDPA(q, k, v)), causal, optionally under a non-reentrant checkpoint with ``context_fn``."""

    def __init__(self, width=8, heads=2, checkpointed=False, context_fn=None):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width), heads
        self.checkpointed, self.context_fn = checkpointed, context_fn

    def attend(self, x):
        batch, tokens, width = x.shape
        q, k, v = (t.reshape(batch, tokens, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(out.transpose(1, 2).reshape(batch, tokens, width))

    def forward(self, x):
        if not self.checkpointed:
            return self.attend(x)
        options = {} if self.context_fn is None else {"context_fn": self.context_fn}
        return torch.utils.checkpoint.checkpoint(self.attend, x, use_reentrant=False, **options)


def _checkpoint_twins(**options):
    torch.manual_seed(2)
    plain = _AttentionBlock().double()
    checkpointed = _AttentionBlock(checkpointed=True, **options).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    return plain, checkpointed, (x, torch.randn(2, 7, 8, dtype=torch.float64))


def _mse(output, target):
    return ((output - target) ** 2).mean()


def test_checkpointed_sdpa_module_with_curvature_context_fn_equals_its_plain_twin(monkeypatch):
    calls = []
    original = attention_module.scaled_dot_product_attention
    monkeypatch.setattr(attention_module, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    plain, checkpointed, batch = _checkpoint_twins(context_fn=optim.hessian.curvature_context_fn)
    ours, theirs = (optim.HessianOperator(model, _mse, batch) for model in (checkpointed, plain))
    v = torch.randn(3, ours.n, dtype=torch.float64)
    expected = theirs @ v
    plain_calls = len(calls)
    torch.testing.assert_close(ours @ v, expected, rtol=1e-10, atol=1e-12)
    assert len(calls) - plain_calls > plain_calls  # the checkpointed forward and its recomputations were routed
    calls.clear()
    # Outside the routes the forward and its recomputation are torch's SDPA, as without the context_fn.
    for model in (checkpointed, plain):
        model.zero_grad()
        _mse(model(batch[0]), batch[1]).backward()
    for p, q in zip(checkpointed.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    assert not calls


def test_checkpointed_sdpa_module_without_the_context_fn_is_an_error_that_names_it():
    _, checkpointed, batch = _checkpoint_twins()
    operator = optim.HessianOperator(checkpointed, _mse, batch)
    with pytest.raises(torch.utils.checkpoint.CheckpointError) as raised:
        operator @ torch.randn(operator.n, dtype=torch.float64)
    assert any("context_fn=optim.hessian.curvature_context_fn" in note for note in raised.value.__notes__)


class _ReentrantBlock(_AttentionBlock):
    """The attention under a reentrant checkpoint, its input a function of the parameters (a transformer's hidden
    states: the checkpoint is in the outer graph), or not (``detached``: the parameters inside are hidden from
    ``torch.autograd.grad``; only ``backward()`` reaches them)."""

    def __init__(self, detached=False):
        super().__init__()
        self.detached = detached

    def forward(self, x):
        hidden = x.detach().requires_grad_() if self.detached else self.proj(x)
        return torch.utils.checkpoint.checkpoint(self.attend, hidden, use_reentrant=True)


@pytest.mark.parametrize("optimizer", ["SophiaH", "AdaHessian"])
def test_a_refresh_through_a_checkpoint_without_the_context_fn_says_what_to_pass(optimizer):
    # The refresh differentiates outside the routes' block, so the note that names curvature_context_fn was
    # missing there (torch's bare "a different number of tensors was saved"), and the reentrant checkpoint's refusal
    # of autograd.grad said nothing of use_reentrant=False with it. Nothing is stepped.
    _, checkpointed, (x, target) = _checkpoint_twins()
    torch.manual_seed(2)
    reentrant = _ReentrantBlock().double()
    for model, error, words in ((checkpointed, torch.utils.checkpoint.CheckpointError, "context_fn=optim.hessian."
                                 "curvature_context_fn"), (reentrant, RuntimeError, "use_reentrant=False with "
                                                                                    "context_fn")):
        opt = getattr(optim, optimizer)(model.parameters(), lr=1e-2, seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(error) as raised:
            opt.step(lambda: _mse(model(x), target))
        assert sum(words in note for note in raised.value.__notes__) == 1
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.state
    # every parameter hidden inside the checkpoint: autograd.grad found none, and the steps silently did nothing
    torch.manual_seed(2)
    hidden = _ReentrantBlock(detached=True).double()
    opt = getattr(optim, optimizer)(hidden.parameters(), lr=1e-2, seed=0)
    with pytest.raises(ValueError, match="none of the optimizer's parameters is in its graph.*use_reentrant=False"):
        opt.step(lambda: _mse(hidden(x), target))


class _AttentionClassifier(torch.nn.Module):
    """torch's own attention module, then mean pooling and a linear head."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer
        if layer == "MultiheadAttention":
            self.inner = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        else:
            self.inner = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        hidden = self.inner(x, x, x, need_weights=False)[0] if self.layer == "MultiheadAttention" else self.inner(x)
        return self.head(hidden.mean(1))


@pytest.mark.parametrize("layer", ["MultiheadAttention", "TransformerEncoderLayer"])
def test_torchs_own_attention_modules_take_the_math_backend_inside_the_routes(layer):
    # F.multi_head_attention_forward calls SDPA inside itself, where the routing mode does not look: the flash CPU
    # kernel there has no double backward ("derivative ... not implemented") until the routes select the math one.
    torch.manual_seed(0)
    model = _AttentionClassifier(layer).double().eval()
    x, y = torch.randn(3, 5, 8, dtype=torch.float64), torch.randint(0, 3, (3,))
    names = [name for name, _ in model.named_parameters()]

    def loss(*params):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)

    params = [p.detach() for p in model.parameters()]
    v = [torch.randn_like(p) for p in params]
    got = torch.cat([h.reshape(-1) for h in optim.hvp(loss, params, v)])

    def gradient(sign, h=1e-5):  # central differences of torch's own gradients
        shifted = [(p + sign * h * t).requires_grad_() for p, t in zip(params, v)]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(*shifted), shifted)])

    expected = (gradient(1.0) - gradient(-1.0)) / 2e-5
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    H = optim.HessianOperator(model, F.cross_entropy, (x, y))
    torch.testing.assert_close(H @ torch.cat([t.reshape(-1) for t in v]), expected, rtol=1e-6, atol=1e-8)


def test_compiled_ggn_of_a_transformer_encoder_layer_does_not_take_its_fast_path():
    # Under torch.compile's functional transforms the layer saw no gradient being recorded and took its inference
    # fast path (aten::_transformer_encoder_layer_fwd, no derivative) until the routes turned that path off.
    torch.manual_seed(0)
    model = _AttentionClassifier("TransformerEncoderLayer").double().eval()
    batch = (torch.randn(3, 5, 8, dtype=torch.float64), torch.randint(0, 3, (3,)))
    eager = optim.GGNOperator(model, F.cross_entropy, batch)
    v = torch.randn(2, eager.n, dtype=torch.float64)
    compiled = optim.GGNOperator(model, F.cross_entropy, batch, compile=True)
    torch.testing.assert_close(compiled @ v, eager @ v, rtol=1e-10, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the product


def test_sophia_refresh_on_an_activation_checkpointed_gpt2_in_training_mode_equals_its_eager_twin():
    from optim.hessian import causal_lm_loss

    sdpa, eager, (input_ids, labels) = gpt2_twins(n_layer=2)
    kwargs = {"use_reentrant": False, "context_fn": optim.hessian.curvature_context_fn}
    if hasattr(sdpa, "activation_checkpointing_enable"):
        sdpa.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        sdpa.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    states = []
    for model in (sdpa, eager):
        model.train()  # Hugging Face checkpoints only in training mode; every dropout of the config is 0
        opt = optim.SophiaH(model.parameters(), lr=1e-3, update_period=1, seed=11)
        for _ in range(2):
            opt.step(lambda model=model: causal_lm_loss(model(input_ids).logits, labels))
        states.append([opt.state[p]["hessian"].clone() for p in model.parameters()])
    assert any(bool(h.abs().max() > 0) for h in states[0])
    for ours, theirs in zip(*states):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("operator", ["hessian", "ggn", "fisher"])
def test_gpt2_sdpa_curvature_products_equal_its_eager_twin(operator, monkeypatch):
    from optim.hessian import causal_lm_loss

    sdpa, eager, batch = gpt2_twins()
    calls = []
    original = attention_module.scaled_dot_product_attention
    monkeypatch.setattr(attention_module, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    # The Hugging Face model as it is: the GGN and the Fisher take its output's .logits as the outputs z.
    cls = {"hessian": optim.HessianOperator, "ggn": optim.GGNOperator, "fisher": optim.EmpiricalFisherOperator}
    ours, theirs = (cls[operator](model, causal_lm_loss, batch) for model in (sdpa, eager))
    v = torch.randn(2, ours.n, dtype=torch.float64)
    torch.testing.assert_close(ours @ v, theirs @ v, rtol=1e-10, atol=1e-12)
    assert len(calls) >= 2  # one per layer and forward: the SDPA model's attention went through the op family


@pytest.mark.parametrize("container", ["dict", "BatchEncoding"])
def test_gpt2_sdpa_with_a_padding_mask_matches_torchs_math_attention(container):
    # A Hugging Face batch as keyword arguments (its keys name parameters of forward), left-padded: the model's mask
    # handling branches on the mask's values, which vmap cannot follow (the Fisher's rows then go one by one).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import transformers

    from optim.hessian import causal_lm_loss

    model, _, (input_ids, _) = gpt2_twins()
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    labels = input_ids.masked_fill(mask == 0, -100)
    batch = (inputs if container == "dict" else transformers.BatchEncoding(inputs), labels)
    H = optim.HessianOperator(model, causal_lm_loss, batch)
    v = torch.randn(H.n, dtype=torch.float64)
    params = list(model.parameters())

    def math_product():  # torch's composite attention: double-differentiable, T×T
        with sdpa_kernel(SDPBackend.MATH):
            g = torch.autograd.grad(causal_lm_loss(model(**inputs), labels), params, create_graph=True)
            return torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, H.unflatten(v))])

    torch.testing.assert_close(H @ v, math_product(), rtol=1e-10, atol=1e-12)
    assert H._graph is not None  # the keyword batch is checked for changes, so its graph is kept
    mask[0, :3] = 0  # in place: the kept graph is stale and rebuilt
    torch.testing.assert_close(H @ v, math_product(), rtol=1e-10, atol=1e-12)
    ways = [optim.EmpiricalFisherOperator(model, causal_lm_loss, batch, **options)
            for options in (dict(), dict(reuse_graph=False), dict(max_kept_bytes=8))]
    block = torch.randn(2, H.n, dtype=torch.float64)
    products = [F_ @ block for F_ in ways]
    for product in products[1:]:
        torch.testing.assert_close(product, products[0], rtol=1e-10, atol=1e-12)
    G = optim.GGNOperator(model, causal_lm_loss, batch)
    assert G.output_hessian is None and bool(torch.isfinite(G @ block).all()) and G.output_hessian == "causal_lm"


@pytest.mark.parametrize("operator", ["hessian", "ggn", "fisher"])
def test_hugging_face_collator_batches_are_their_inputs_and_labels(operator):
    # A Hugging Face collator yields {"input_ids", "attention_mask", "labels"}: the labels are the targets and the
    # model is called with the rest, as the (inputs, labels) pair is; one batch, a list, a BatchEncoding, a loader
    import transformers

    from optim.hessian import causal_lm_loss

    model, _, (input_ids, labels) = gpt2_twins(n_layer=1)
    mask = torch.ones_like(input_ids)
    mask[1, 15:] = 0
    operator_class = {"hessian": optim.HessianOperator, "ggn": optim.GGNOperator,
                      "fisher": optim.EmpiricalFisherOperator}[operator]
    pair = ({"input_ids": input_ids, "attention_mask": mask}, labels)
    collated = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    expected_op = operator_class(model, causal_lm_loss, pair)
    v = torch.randn(2, expected_op.n, dtype=torch.float64)
    expected = expected_op @ v
    for data in (collated, [collated], transformers.BatchEncoding(collated)):
        torch.testing.assert_close(operator_class(model, causal_lm_loss, data) @ v, expected, rtol=1e-10, atol=1e-12)
    # several batches average by rows, whichever form they come in
    halves = [{key: value[i:i + 1] for key, value in collated.items()} for i in range(2)]
    loader = torch.utils.data.DataLoader([{key: value[i] for key, value in collated.items()} for i in range(2)],
                                         batch_size=1)
    pair_halves = [({"input_ids": h["input_ids"], "attention_mask": h["attention_mask"]}, h["labels"]) for h in halves]
    expected_halves = operator_class(model, causal_lm_loss, pair_halves) @ v
    for data in (halves, loader):
        got = operator_class(model, causal_lm_loss, data) @ v
        torch.testing.assert_close(got, expected_halves, rtol=1e-10, atol=1e-12)
    kept = operator_class(model, causal_lm_loss, collated)
    torch.testing.assert_close(kept @ v, expected, rtol=1e-10, atol=1e-12)
    labels[0, :4] = -100  # in place: a kept state is stale and rebuilt
    torch.testing.assert_close(kept @ v, operator_class(model, causal_lm_loss, pair) @ v, rtol=1e-10, atol=1e-12)
    unlabelled = {"input_ids": input_ids, "attention_mask": mask}
    with pytest.raises(ValueError, match="without a 'labels' tensor"):
        operator_class(model, causal_lm_loss, unlabelled)
    with pytest.raises(ValueError, match="data batch 0 is a dict without a 'labels' tensor"):
        operator_class(model, causal_lm_loss, [unlabelled])


def test_a_hugging_face_classifiers_logits_go_to_the_criterion_of_every_operator():
    # HessianOperator passed the SequenceClassifierOutput itself to F.cross_entropy (a TypeError) where the GGN and
    # the Fisher pass its .logits; all three now take the logits, equal to a model that returns them.
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3, max_position_embeddings=16,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    input_ids = torch.randint(0, 40, (4, 9))
    mask = torch.ones_like(input_ids)
    mask[2, 6:] = 0
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}
    for operator_class in (optim.HessianOperator, optim.GGNOperator, optim.EmpiricalFisherOperator):
        ours = operator_class(model, F.cross_entropy, batch)
        wrapped = operator_class(Logits(model), F.cross_entropy, batch)
        v = torch.randn(2, ours.n, dtype=torch.float64)
        torch.testing.assert_close(ours @ v, wrapped @ v, rtol=1e-10, atol=1e-12)
    monitor = optim.SharpnessMonitor(model, F.cross_entropy, lr_from=0.1, probes=2, lanczos_iters=5)
    assert math.isfinite(monitor.measure(0, batch)["lambda_max"])


@pytest.mark.parametrize("operator", ["hessian", "ggn", "fisher"])
def test_compiled_gpt2_sdpa_products_equal_its_eager_twin(operator):
    # Dynamo drops an autograd.Function's jvp (pytorch/pytorch#192985): compiled forward-mode products through the
    # op family gave zero attention tangents (the Fisher 18% off) until the route took the composite there.
    from optim.hessian import causal_lm_loss

    sdpa, eager, batch = gpt2_twins(n_layer=1)
    cls = {"hessian": optim.HessianOperator, "ggn": optim.GGNOperator, "fisher": optim.EmpiricalFisherOperator}
    compiled = cls[operator](sdpa, causal_lm_loss, batch, compile=True)
    twin = cls[operator](eager, causal_lm_loss, batch)
    v = torch.randn(compiled.n, dtype=torch.float64)
    torch.testing.assert_close(compiled @ v, twin @ v, rtol=1e-9, atol=1e-12)
    assert compiled.compile_seconds > 0  # the compiled function ran (it is timed at its first call)
    if operator != "hessian":
        assert getattr(compiled, {"ggn": "output_hessian", "fisher": "last_path"}[operator]) == "compiled"


@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_compiled_derivatives_of_the_attention_equal_the_ops(case):
    q, k, v, mask, causal, scale = make_case(case)
    fn = lambda q, k, v: attention(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=True)  # noqa: E731
    dots, d_out = tangents(q, k, v), torch.randn(q.shape[:3] + (v.shape[3],), dtype=q.dtype)

    def derivatives(q, k, v):
        _, out_dot = torch.func.jvp(fn, (q, k, v), dots)
        grads = torch.func.vjp(fn, q, k, v)[1](d_out)
        loss = lambda q, k, v: (fn(q, k, v) * d_out).sum()  # noqa: E731
        _, hvp = torch.func.jvp(torch.func.grad(loss, argnums=(0, 1, 2)), (q, k, v), dots)
        return (out_dot, *grads, *hvp)

    for got, expected in zip(torch.compile(derivatives, backend="aot_eager", fullgraph=True)(q, k, v),
                             derivatives(q, k, v)):
        assert bool(expected.abs().max() > 0)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gpt2_sdpa_hvp_in_forward_mode():
    from optim.hessian import causal_lm_loss

    sdpa, eager, (input_ids, labels) = gpt2_twins(n_layer=1)
    products = []
    for model in (sdpa, eager):
        names, params = zip(*[(n, p.detach()) for n, p in model.named_parameters() if ".h.0.attn." in n])

        def loss(*xs, model=model, names=names):
            logits = torch.func.functional_call(model, dict(zip(names, xs)), (input_ids,)).logits
            return causal_lm_loss(logits, labels)

        torch.manual_seed(5)
        v = [torch.randn_like(p) for p in params]
        products.append(optim.hvp(loss, list(params), v, mode="fr"))
    _close(*products)


def test_a_learned_additive_bias_gets_every_derivative_and_a_data_mask_stays_on_the_ops(monkeypatch):
    # T5 passes its relative position bias, a function of parameters, as the additive mask. The route detached
    # every mask, so the bias had no gradient and a zero Hessian block, silently. Its derivatives now come from
    # the composite in every mode; a mask that is data still takes the ops (no T×T matrix kept).
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    primals = (q, k, v, bias)

    def routed(q, k, v, bias):
        with sdpa_curvature():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)

    def plain(q, k, v, bias):
        return math_attention(q, k, v, bias, True, 1 / 2)

    d_out = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    dots = tangents(*primals)
    results = []
    for fn in (routed, plain):
        leaves = [t.clone().requires_grad_(True) for t in primals]
        grads = torch.autograd.grad((fn(*leaves) * d_out).sum(), leaves, create_graph=True)
        second = torch.autograd.grad(grads, leaves, dots)
        grad = torch.func.grad(lambda *p: (fn(*p) * d_out).sum(), argnums=(0, 1, 2, 3))
        probes = [torch.stack([t, -2 * t]) for t in dots]
        over = torch.func.vmap(lambda *u: torch.func.jvp(grad, primals, u)[1])(*probes)
        results.append((grads, second, torch.func.jvp(fn, primals, dots), over))
    for ours, expected in zip(*results):
        _close(ours, expected)
    assert bool(results[0][0][3].abs().max() > 0) and bool(results[0][1][3].abs().max() > 0)  # the bias's rows

    def no_composite(*args, **kwargs):
        raise AssertionError("a mask that is data took the T×T composite")

    data_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected = torch.autograd.grad((plain(*data_leaves, bias) * d_out).sum(), data_leaves)
    monkeypatch.setattr(attention_module, "composite_attention", no_composite)
    _close(torch.autograd.grad((routed(*data_leaves, bias) * d_out).sum(), data_leaves), expected)
    torch.func.jvp(lambda q: routed(q, k, v, bias), (q,), (dots[0],))  # a tangent on q only: the mask is data


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_drops_the_weights_as_torchs_math_attention_does(causal):
    # One seed, one mask: the same realization as torch's math SDPA, forward and gradients, and twice differentiable
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(11, 11) > 0.3
    grads = []
    for routed in (False, True):
        torch.manual_seed(5)
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_curvature() if routed else sdpa_kernel(SDPBackend.MATH))
            out = F.scaled_dot_product_attention(q, k, v, None if causal else mask, dropout_p=0.3, is_causal=causal)
            grads.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=routed)))
    for ours, torchs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, torchs, rtol=1e-12, atol=1e-12)
    undropped = attention(q, k, v, None if causal else mask, is_causal=causal)
    assert not torch.allclose(grads[1][0], undropped)  # some weights were dropped
    hessian_q = torch.autograd.grad(grads[1][1], q, torch.ones_like(q))[0]
    assert torch.isfinite(hessian_q).all() and bool(hessian_q.abs().max() > 0)


@pytest.mark.parametrize("hessian", ["exact", "ggn", "adahessian"])
def test_refresh_on_a_gpt2_training_with_dropout_equals_its_eager_twin(hessian):
    # GPT-2's default config trains with attention dropout 0.1: the refresh's attention drops weights as eager does
    from optim.hessian import causal_lm_loss

    sdpa, eager, (input_ids, labels) = gpt2_twins(n_layer=1, dropout=0.1)
    states = []
    for model in (sdpa, eager):
        model.train()
        if hessian == "adahessian":
            opt, key = optim.AdaHessian(model.parameters(), lr=1e-3, seed=11), "exp_hessian_diag_sq"
        else:
            opt, key = optim.SophiaH(model.parameters(), lr=1e-3, update_period=1, seed=11, hessian=hessian,
                                     loss_fn=causal_lm_loss if hessian == "ggn" else None), "hessian"
        torch.manual_seed(7)
        if hessian == "ggn":  # the closure returns the Hugging Face output itself: its .logits are the outputs
            opt.step(lambda model=model: (model(input_ids), labels))
        else:
            opt.step(lambda model=model: causal_lm_loss(model(input_ids).logits, labels))
        states.append([opt.state[p][key].clone() for p in model.parameters()])
    assert any(bool(h.abs().max() > 0) for h in states[0])
    for ours, theirs in zip(*states):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-14)


def test_sophia_refresh_on_a_float32_sdpa_model_equals_its_eager_twin():
    # float32 on CPU: torch's own SDPA takes its flash kernel here, which has no double backward
    from optim.hessian import causal_lm_loss

    sdpa, eager, (input_ids, labels) = gpt2_twins(dtype=torch.float32, n_layer=1)
    states = []
    for model in (sdpa, eager):
        opt = optim.SophiaH(model.parameters(), lr=1e-3, update_period=1, seed=11)
        opt.step(lambda model=model: causal_lm_loss(model(input_ids).logits, labels))
        states.append([opt.state[p]["hessian"].clone() for p in model.parameters()])
    assert any(bool(h.abs().max() > 0) for h in states[0])
    for ours, theirs in zip(*states):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def test_sharpness_monitor_on_an_sdpa_model_equals_its_eager_twin():
    from optim.hessian import causal_lm_loss

    sdpa, eager, batch = gpt2_twins(n_layer=1)
    records = []
    for model in (sdpa, eager):
        monitor = optim.SharpnessMonitor(model, causal_lm_loss, every=1, lr_from=0.1, probes=1, lanczos_iters=3,
                                         param_filter=lambda name, p: ".h.0.attn." in name)
        records.append(monitor.measure(0, batch))
    assert math.isfinite(records[0]["lambda_max"])
    for key in ("lambda_max", "trace"):
        assert records[0][key] == pytest.approx(records[1][key], rel=1e-9)


def test_llama_gqa_backward_with_create_graph_inside_sdpa_curvature_then_sophia_step():
    # The Trainer route (examples/hf_trainer.py): the refresh step's forward and backward(create_graph=True) run
    # inside sdpa_curvature(); the optimizer's step() then differentiates that graph outside it.
    transformers = pytest.importorskip("transformers")
    from optim.hessian import causal_lm_loss

    config = dict(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(4)
    sdpa = transformers.LlamaForCausalLM(transformers.LlamaConfig(attn_implementation="sdpa", **config)).double()
    eager = transformers.LlamaForCausalLM(transformers.LlamaConfig(attn_implementation="eager", **config)).double()
    eager.load_state_dict(sdpa.state_dict())
    input_ids = torch.randint(0, 29, (2, 11))
    diagonals = []
    for model in (sdpa, eager):
        opt = optim.SophiaH(model.parameters(), lr=1e-3, update_period=1, seed=2)
        with sdpa_curvature():
            causal_lm_loss(model(input_ids).logits, input_ids).backward(create_graph=True)
        opt.step()
        diagonals.append([opt.state[p]["hessian"] for p in model.parameters()])
    assert any(bool(h.abs().max() > 0) for h in diagonals[0])
    # HF's eager Llama attention takes its softmax in float32 (the logits differ by ~1e-8 in float64): the eager
    # twin is a float32-accurate oracle here; the attention ops themselves are checked to 1e-12 above
    for ours, theirs in zip(*diagonals):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-9)
