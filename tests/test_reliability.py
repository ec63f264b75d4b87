"""Reliability sweep across the families: property tests (hypothesis) of the ops that had none, bad input at the
public entry points that lacked a test, 1,000 steps of every optimizer without memory growth.

Already covered elsewhere, not repeated here: hypothesis tests of ``fused_adamw_`` (tests/fused/test_ops.py) and of
``fused_sophia_`` / ``fused_adahessian_`` (tests/hessian/test_second_order_ops.py); bit-exact checkpoint/resume
through ``torch.save`` + ``torch.load(weights_only=True)`` for AdamW (tests/fused/test_adamw.py), SophiaH and
AdaHessian (tests/hessian/test_sophia.py), RSDM with both samplings (tests/stiefel/test_rsdm.py), RiemannianSGD
with and without momentum / Nesterov and RiemannianAdam (tests/stiefel/test_riemannian.py), and optim.AdamW or
torch.optim.AdamW + Refactorizer and LowRankAdamW mid-cycle (tests/lowrank/test_refactorizer.py).
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import optim
from optim.hessian._ops import cross_entropy_hvp_reference, krylov_dots_reference, rademacher_reference
from optim.lowrank._ops import lowrank_refactorize_reference
from optim.stiefel import distance_to_manifold, orthogonal_
from optim.stiefel._ops import rsdm_sample_rows_reference, rsdm_step_reference

from ._models import TanhMLP

PROPERTY = settings(max_examples=15, deadline=None)
FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative accuracy of one rounding to the dtype (the kernels compute in float32/float64 and round once).
ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}

shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
seeds = st.integers(-(2**63), 2**63 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- hessian-family ops

@PROPERTY
@given(shape_list=st.lists(shapes, min_size=0, max_size=4), dtype=st.sampled_from(FLOAT_DTYPES), seed=seeds,
       offset=st.integers(0, 2**40))
def test_rademacher_kernel_is_the_reference_and_a_split_flat_vector(shape_list, dtype, seed, offset):
    got = [torch.full(s, float("nan"), dtype=dtype) for s in shape_list]
    want = [torch.full(s, float("nan"), dtype=dtype) for s in shape_list]
    torch.ops.optim.rademacher_(got, seed, offset)
    rademacher_reference(want, seed, offset)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
        assert bool(((g == 1) | (g == -1)).all())
    total = sum(t.numel() for t in got)
    flat = torch.empty(total, dtype=dtype)
    torch.ops.optim.rademacher_([flat], seed, offset)
    assert torch.equal(torch.cat([g.flatten() for g in got]) if got else flat, flat)


@PROPERTY
@given(lead=st.lists(st.integers(0, 5), max_size=2), classes=st.integers(1, 70),
       dtype=st.sampled_from(FLOAT_DTYPES), scale=st.floats(-4, 4), seed=st.integers(0, 2**31))
def test_cross_entropy_hvp_matches_float64_and_rows_sum_to_zero(lead, classes, dtype, scale, seed):
    shape = (*lead, classes)
    logits = (torch.randn(shape, generator=generator(seed), dtype=torch.float64) * 3).to(dtype)
    tangent = torch.randn(shape, generator=generator(seed + 1), dtype=torch.float64).to(dtype)
    got = torch.ops.optim.cross_entropy_hvp(logits, tangent, scale)
    assert got.shape == logits.shape and got.dtype == dtype
    want = cross_entropy_hvp_reference(logits.double(), tangent.double(), scale)
    # |out| <= |scale|·max|u| per element; one rounding of that to the dtype, plus float32 arithmetic
    bound = abs(scale) * (tangent.double().abs().max().item() if tangent.numel() else 0.0)
    # and values below the dtype's smallest normal number lose their relative accuracy (or flush to zero)
    tolerance = max(ROUNDING[dtype], 1e-6 if dtype != torch.float64 else 0.0) * 4 * bound + torch.finfo(dtype).tiny
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance)
    if dtype == torch.float64 and got.numel():  # (diag(p) − ppᵀ)u sums to ⟨p,u⟩ − ⟨p,u⟩ = 0 in every row
        assert got.sum(-1).abs().max().item() <= 1e-12 * (bound + 1) * classes


@PROPERTY
@given(batch=st.integers(0, 3), rows=st.integers(0, 5), n=st.integers(0, 300), dtype=st.sampled_from(FLOAT_DTYPES),
       seed=st.integers(0, 2**31))
def test_krylov_dots_matches_float64(batch, rows, n, dtype, seed):
    basis = torch.randn(batch, rows, n, generator=generator(seed)).to(dtype)
    w = torch.randn(batch, n, generator=generator(seed + 1)).to(dtype)
    got = torch.ops.optim.krylov_dots(basis, w)
    assert got.dtype == torch.float64 and got.shape == (batch, rows)
    exact = torch.einsum("bij,bj->bi", basis.double(), w.double())
    magnitude = torch.einsum("bij,bj->bi", basis.double().abs(), w.double().abs())
    assert bool(((got - exact).abs() <= 1e-13 * magnitude + 1e-300).all())
    torch.testing.assert_close(krylov_dots_reference(basis, w), got, rtol=0, atol=1e-12 * max(n, 1))


# ------------------------------------------------------------------------------------------- stiefel-family ops

@PROPERTY
@given(batch=st.lists(st.integers(0, 3), max_size=2), n=st.integers(1, 60), data=st.data(), seed=seeds,
       offset=st.integers(0, 2**40))
def test_sampled_rows_are_the_reference_and_distinct_sorted_in_range(batch, n, data, seed, offset):
    r = data.draw(st.integers(1, n))
    got = torch.full((*batch, r), -1, dtype=torch.int64)
    want = torch.full((*batch, r), -1, dtype=torch.int64)
    torch.ops.optim.rsdm_sample_rows_(got, n, seed, offset)
    rsdm_sample_rows_reference(want, n, seed, offset)
    assert torch.equal(got, want)
    flat = got.reshape(-1, r)
    assert bool((flat >= 0).all() and (flat < n).all() and (flat[:, 1:] > flat[:, :-1]).all())


@PROPERTY
@given(batch=st.lists(st.integers(1, 3), max_size=1), n=st.integers(1, 24), p=st.integers(1, 24), data=st.data(),
       dtype=st.sampled_from([torch.float64, torch.float32]), core=st.sampled_from(["qr", "cayley", "exp"]),
       lr=st.floats(-0.5, 0.5), transport=st.booleans(), seed=st.integers(0, 2**31))
def test_rsdm_step_matches_reference_stays_on_the_manifold_and_moves_r_rows(batch, n, p, data, dtype, core, lr,
                                                                          transport, seed):
    rank = data.draw(st.integers(1, max(n, p)))
    x0 = orthogonal_(torch.empty(*batch, n, p, dtype=torch.float64), generator=generator(seed)).to(dtype)
    g0 = torch.randn(*batch, n, p, generator=generator(seed + 1), dtype=torch.float64).to(dtype)
    x, g = x0.clone(), g0.clone()
    want_x, want_g = x0.double(), g0.double()
    torch.ops.optim.rsdm_step_(x, g, None, rank=rank, seed=seed, offset=3, lr=lr, core=core, transport=transport)
    rsdm_step_reference(want_x, want_g, None, rank=rank, seed=seed, offset=3, lr=lr, core=core, transport=transport)
    tolerance = (1e-10 if dtype == torch.float64 else 5e-5) * max(1.0, abs(lr) * g0.abs().max().item() * rank)
    torch.testing.assert_close(x.double(), want_x, rtol=0, atol=tolerance)
    if transport:
        torch.testing.assert_close(g.double(), want_g, rtol=0, atol=tolerance * max(1.0, g0.abs().max().item()))
    else:
        assert torch.equal(g, g0)
    assert distance_to_manifold(x).max().item() <= (1e-12 if dtype == torch.float64 else 1e-5) * 10 * rank**0.5
    oriented, before = (x, x0) if n >= p else (x.mT, x0.mT)
    moved = (oriented != before).any(-1).reshape(-1, max(n, p)).sum(-1)
    assert bool((moved <= rank).all()), "only the r sampled rows (of the oriented matrix) may change"


# ------------------------------------------------------------------------------------------- low-rank-family op

@PROPERTY
@given(layers=st.integers(0, 3), m=st.integers(1, 20), n=st.integers(1, 20), data=st.data(),
       dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**31))
def test_refactorize_keeps_the_product_and_balances(layers, m, n, data, dtype, seed):
    r = data.draw(st.integers(1, min(m, n)))
    B = [torch.randn(m, r, generator=generator(seed + 2 * l), dtype=torch.float64).to(dtype) for l in range(layers)]
    A = [torch.randn(r, n, generator=generator(seed + 2 * l + 1), dtype=torch.float64).to(dtype)
         for l in range(layers)]
    products = [b.double() @ a.double() for b, a in zip(B, A)]
    reference_B, reference_A = [b.double() for b in B], [a.double() for a in A]
    torch.ops.optim.lowrank_refactorize_(B, A)
    lowrank_refactorize_reference(reference_B, reference_A)
    # Gaussian factors: the singular values are distinct and well separated with overwhelming probability, but
    # not always; the product and the balance are well conditioned, so those are the properties checked.
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for b, a, product, ref_b, ref_a in zip(B, A, products, reference_B, reference_A):
        assert b.dtype == dtype and b.shape == (m, r) and a.shape == (r, n)
        b, a = b.double(), a.double()
        norm = product.norm().item()
        assert (b @ a - product).norm().item() <= tolerance * norm
        assert (ref_b @ ref_a - product).norm().item() <= 1e-10 * norm
        gram_b, gram_a = b.T @ b, a @ a.T
        assert (gram_b - gram_a).abs().max().item() <= 4 * tolerance * norm
        off_diagonal = gram_b - torch.diag(torch.diagonal(gram_b))
        assert off_diagonal.abs().max().item() <= 4 * tolerance * norm


# ------------------------------------------------------------------------------------ bad input, nothing changed

@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "lr must be a finite number >= 0"),
    (dict(betas=(1.5, 0.9)), "beta1 must be in"),
    (dict(fused=True, foreach=True), "cannot be set together"),
    (dict(amsgrad=True), "amsgrad=True is not supported"),
    (dict(every=0), "every must be an int >= 1"),
    (dict(reset="moments"), "reset must be one of"),
    (dict(recovery_start=2.0), "recovery_start must be in"),
    (dict(rank=8), "rank"),
])
def test_low_rank_adamw_validates_before_converting_the_model(kwargs, message):
    model = TanhMLP()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        optim.LowRankAdamW(model, **{"rank": 2, "target": ["fc1", "fc2"], **kwargs})
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear), "the model was converted"
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


def test_to_low_rank_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        optim.to_low_rank({"fc1": nn.Linear(4, 4)}, 2)


def test_orthogonal_rejects_vectors_and_integer_tensors():
    vector, integers = torch.zeros(5), torch.zeros(5, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        orthogonal_(vector)
    with pytest.raises(ValueError, match="floating point"):
        orthogonal_(integers)
    assert not vector.any() and not integers.any()


def _stiefel_optimizer(cls, x):
    options = {optim.RSDM: dict(rank=2, momentum=0.5, seed=0), optim.RiemannianSGD: dict(momentum=0.5),
               optim.RiemannianAdam: {}}[cls]
    return cls([x], lr=0.1, **options)


@pytest.mark.parametrize("cls", [optim.RSDM, optim.RiemannianSGD, optim.RiemannianAdam])
def test_stiefel_state_dict_of_another_model_is_rejected_and_changes_nothing(cls):
    """torch's loader checks only parameter counts: a (8, 3) momentum loaded for a (10, 4) parameter used to fail
    at the next step with a broadcasting error, after the optimizer state had been replaced."""
    x = orthogonal_(torch.empty(8, 3, dtype=torch.float64)).requires_grad_()
    y = orthogonal_(torch.empty(10, 4, dtype=torch.float64)).requires_grad_()
    source, target = _stiefel_optimizer(cls, x), _stiefel_optimizer(cls, y)
    x.grad, y.grad = torch.randn(8, 3, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    source.step()
    target.step()
    kept = {key: value.clone() if torch.is_tensor(value) else value for key, value in target.state[y].items()}
    with pytest.raises(ValueError, match=r"has shape \(8, 3\) but parameter 0 has shape \(10, 4\)"):
        target.load_state_dict(source.state_dict())
    assert target.state[y].keys() == kept.keys()
    for key, value in kept.items():
        assert torch.equal(target.state[y][key], value) if torch.is_tensor(value) else target.state[y][key] == value
    target.load_state_dict(target.state_dict())  # a matching state dict still loads


# ------------------------------------------------------------------------------- 1,000 steps without growth

def live_tensors() -> tuple[int, int]:
    """(number of live tensor objects, bytes of their distinct storages) among the objects the gc tracks."""
    count, storages = 0, {}
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op object warns
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        count += 1
        # A functorch wrapper (kept by a torch.compile'd torch.func product's caches) has no storage of its own.
        if obj.layout == torch.strided and obj.device.type != "meta" \
                and not torch._C._functorch.is_functorch_wrapped_tensor(obj):
            storage = obj.untyped_storage()
            try:
                pointer = storage.data_ptr()
            except RuntimeError:  # a FakeTensor / FunctionalTensor left by torch.compile: no memory of its own
                continue
            storages[(pointer, storage.nbytes())] = storage.nbytes()
    del objects
    return count, sum(storages.values())


def _mlp():
    torch.manual_seed(0)
    return TanhMLP()


def _stiefel_mlp(cls, **options):
    model = _mlp()
    with torch.no_grad():
        orthogonal_(model.fc1.weight)
        orthogonal_(model.fc2.weight)
    groups = [{"params": [model.fc1.weight, model.fc2.weight]},
              {"params": [model.fc1.bias, model.fc2.bias], "manifold": None}]
    return model, cls(groups, **options)


def _second_order(cls, **options):
    model = _mlp()
    return model, cls(model.parameters(), seed=0, update_period=2, **options)


def _low_rank():
    model = _mlp()
    return model, optim.LowRankAdamW(model, lr=1e-2, rank=2, target=["fc1", "fc2"], every=50, recovery_steps=5)


# The closure protocol of each optimizer: second-order ones differentiate the returned loss themselves.
LONG_RUNS = {
    "AdamW": (lambda: (lambda m: (m, optim.AdamW(m.parameters(), lr=1e-3)))(_mlp()), False),
    "SophiaH": (lambda: _second_order(optim.SophiaH, lr=1e-3), True),
    "AdaHessian": (lambda: _second_order(optim.AdaHessian, lr=1e-2), True),
    "RSDM": (lambda: _stiefel_mlp(optim.RSDM, lr=1e-2, rank=3, momentum=0.9, seed=0,
                                  reorthonormalize_every=100), False),
    "RiemannianSGD": (lambda: _stiefel_mlp(optim.RiemannianSGD, lr=1e-2, momentum=0.9, retraction="cayley"), False),
    "RiemannianAdam": (lambda: _stiefel_mlp(optim.RiemannianAdam, lr=1e-3, retraction="polar"), False),
    "LowRankAdamW": (_low_rank, False),
}


@pytest.mark.parametrize("name", list(LONG_RUNS))
def test_1000_steps_without_memory_growth(name):
    """After a 100-step warm-up (state created), 900 more steps with the cyclic collector off leave exactly as many
    live tensors and storage bytes: nothing accumulates per step, and no reference cycle holds a tensor (the
    create_graph cycle of other second-order optimizers shows up here)."""
    make, second_order = LONG_RUNS[name]
    model, opt = make()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=generator), torch.randn(32, 3, generator=generator)

    def step():
        if second_order:
            opt.step(lambda: F.mse_loss(model(x), y))
        else:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds contention on a busy CI machine
    try:
        for _ in range(100):
            step()
        before, after = _count_around(step, 900)
    finally:
        torch.set_num_threads(threads)
    assert after == before, f"{name}: live tensors / storage bytes went from {before} to {after} in 900 steps"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _count_around(step, steps: int):
    """``live_tensors()`` before and after ``steps`` calls of ``step``, with the cyclic collector off between."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        before = live_tensors()
        for _ in range(steps):
            step()
        after = live_tensors()
    finally:
        if was_enabled:
            gc.enable()
    return before, after
