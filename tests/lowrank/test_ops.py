"""optim::lowrank_refactorize_: the compiled kernels against the float64 reference, the product kept, balance, opcheck,
bad input."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.lowrank._ops import lowrank_refactorize_reference

from ..conftest import DEVICES, REQUIRE_EXTENSION

OP = torch.ops.optim.lowrank_refactorize_
# (m, r, n): rank 1, m < n, m > n, r = min(m, n), a square layer, and a layer large enough to span many threads.
SHAPES = [(8, 1, 5), (16, 4, 40), (40, 4, 16), (6, 6, 9), (32, 8, 32), (300, 16, 120)]
LAYERS = [1, 3]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Kernel (in its dtype) against the float64 reference, relative to the largest entry of the factor.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2**-7, torch.float16: 2**-9}
GUARD = 3


def guarded(values: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``values`` inside a NaN-filled buffer (GUARD elements each side); ``transpose``: column-major."""
    rows, cols = values.shape
    buffer = torch.full((2 * GUARD + values.numel(),), float("nan"), dtype=values.dtype, device=values.device)
    inner = buffer[GUARD:GUARD + values.numel()]
    view = inner.view(cols, rows).t() if transpose else inner.view(rows, cols)
    view.copy_(values)
    return view, buffer


def make_factors(shape, layers, dtype, device, *, transpose=False):
    """Fresh Gaussian factors (never zeros), each inside a NaN-guarded buffer, and the buffers."""
    m, r, n = shape
    B, A, buffers = [], [], []
    for _ in range(layers):
        b, b_buffer = guarded(torch.randn(m, r, dtype=torch.float64, device=device).to(dtype), transpose)
        a, a_buffer = guarded(torch.randn(r, n, dtype=torch.float64, device=device).to(dtype), transpose)
        B.append(b)
        A.append(a)
        buffers += [b_buffer, a_buffer]
    return B, A, buffers


def assert_guards_intact(buffers):
    for buffer in buffers:
        assert buffer[:GUARD].isnan().all() and buffer[-GUARD:].isnan().all(), "a kernel wrote out of bounds"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernel_is_registered(device):
    if not REQUIRE_EXTENSION:
        pytest.skip("OPTIM_REQUIRE_EXTENSION is off: the reference kernel may be what runs")
    assert optim.has_kernel("lowrank_refactorize_", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layers", LAYERS)
def test_kernel_matches_float64_reference(device, dtype, shape, layers):
    B, A, buffers = make_factors(shape, layers, dtype, device, transpose=layers == 3)
    reference_B = [b.double().clone() for b in B]
    reference_A = [a.double().clone() for a in A]
    OP(B, A)
    lowrank_refactorize_reference(reference_B, reference_A)
    tolerance = TOLERANCES[dtype]
    for got, want in zip(B + A, reference_B + reference_A):
        assert not got.isnan().any(), "NaN written"
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=tolerance,
                                   atol=tolerance * scale)
    assert_guards_intact(buffers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_product_kept_and_factors_balanced_in_float32(device, shape):
    """B·A is kept to float32 rounding (relative Frobenius error <= 1e-5) and BᵀB = AAᵀ = Σ, diagonal."""
    B, A, _ = make_factors(shape, 3, torch.float32, device)
    before = [b.double() @ a.double() for b, a in zip(B, A)]
    OP(B, A)
    for b, a, product in zip(B, A, before):
        b, a = b.double(), a.double()
        assert ((b @ a - product).norm() / product.norm()).item() <= 1e-5
        sigma = torch.linalg.svdvals(product)[: b.shape[1]]
        atol = 1e-5 * sigma[0].item()
        torch.testing.assert_close(b.T @ b, torch.diag(sigma), rtol=0, atol=atol)
        torch.testing.assert_close(a @ a.T, torch.diag(sigma), rtol=0, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_refactorizing_twice_is_a_fixed_point(device):
    """Balanced factors are already in the op's canonical form: a second call changes them only by rounding."""
    B, A, _ = make_factors((24, 5, 18), 2, torch.float64, device)
    OP(B, A)
    once = [t.clone() for t in B + A]
    OP(B, A)
    for got, want in zip(B + A, once):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_deficient_factors_keep_their_product(device):
    B, A, _ = make_factors((12, 4, 10), 1, torch.float64, device)
    B[0][:, 3] = B[0][:, 0]  # rank 3 product from rank-4 factors
    product = B[0] @ A[0]
    OP(B, A)
    torch.testing.assert_close(B[0] @ A[0], product, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists(device):
    OP([], [])
    lowrank_refactorize_reference([], [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    B, A, _ = make_factors((16, 3, 10), 2, dtype, device)
    torch.library.opcheck(OP.default, args=(B, A))


# --- bad input: a clear error naming the argument, and nothing modified -------------------------------------------

def _set(name, index, make):
    def mutate(lists):
        lists[name][index] = make(lists[name][index])
    return mutate


def _poison(lists):
    lists["A"][1][0, 0] = float("inf")


BAD = {
    "short A": (ValueError, "B has 2 tensors but A has 1", lambda l: l["A"].pop()),
    "1-D factor": (ValueError, "factors must be 2-D", _set("B", 0, lambda t: t[:, 0])),
    "rank mismatch": (ValueError, "B's columns must equal A's rows", _set("A", 0, lambda t: t[:-1])),
    "rank too large": (ValueError, r"1 <= r <= min\(m, n\) = 2",
                       lambda l: l.update(B=[t[:2] for t in l["B"]])),
    "shape mix": (ValueError, r"A\[1\] has shape", _set("A", 1, lambda t: t[:, :-1])),
    "dtype mix": (ValueError, r"B\[1\] is torch.float64", _set("B", 1, lambda t: t.double())),
    "integer": (ValueError, "float64, float32, bfloat16 or float16",
                lambda l: l.update(B=[t.long() for t in l["B"]], A=[t.long() for t in l["A"]])),
    "non-finite": (ValueError, "NaN or inf; nothing was changed", _poison),
}
IMPLEMENTATIONS = {"kernel": OP, "reference": lowrank_refactorize_reference}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_and_changes_nothing(implementation, case):
    error, message, mutate = BAD[case]
    B, A, _ = make_factors((12, 3, 8), 2, torch.float32, "cpu")
    lists = {"B": B, "A": A}
    mutate(lists)
    snapshot = [t.clone() for t in lists["B"] + lists["A"]]
    with pytest.raises(error, match=message):
        IMPLEMENTATIONS[implementation](lists["B"], lists["A"])
    for now, before in zip(lists["B"] + lists["A"], snapshot):
        assert torch.equal(now, before) or (now.isinf().any() and torch.equal(now.isinf(), before.isinf()))
