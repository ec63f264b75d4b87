"""Hessian-family ops (rademacher_, cross_entropy_hvp, krylov_dots): compiled kernels against the references, and bad input."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.hessian import rademacher, rademacher_like
from optim._counter_hash import GOLDEN_GAMMA, mix64_int
from optim.hessian._ops import rademacher_reference

from ..conftest import DEVICES, REQUIRE_EXTENSION, batch_split_sizes

OP = torch.ops.optim.rademacher_
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [[1], [4097], [3 * 65536 + 5], [0, 7, 4097, 1], [(33, 65)]]


def poisoned(shapes, dtype, device):
    """Output tensors full of NaN, so an element the kernel skips cannot pass for a probe value."""
    return [torch.full(s if isinstance(s, tuple) else (s,), float("nan"), dtype=dtype, device=device)
            for s in shapes]


def splitmix64_sign(seed: int, counter: int) -> float:
    """The probe value straight from the definition, in Python integers."""
    state = (mix64_int(seed) + (counter + 1) * GOLDEN_GAMMA) % (1 << 64)
    return -1.0 if mix64_int(state) >> 63 else 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rademacher_", "cross_entropy_hvp", "krylov_dots"])
def test_compiled_kernel_is_registered(device, op):
    if not REQUIRE_EXTENSION:
        pytest.skip("OPTIM_REQUIRE_EXTENSION is off")
    assert optim.has_kernel(op, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SIZES, ids=str)
def test_kernel_equals_reference_bitwise(device, dtype, shapes):
    seed, offset = int(torch.randint(-2**62, 2**62, ()).item()), int(torch.randint(0, 2**40, ()).item())
    got, want = poisoned(shapes, dtype, device), poisoned(shapes, dtype, device)
    OP(got, seed, offset)
    rademacher_reference(want, seed, offset)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_and_a_huge_one_split_into_launches(device):
    """61 outputs, one of 21M elements: on CUDA several launches of at most 56 tensors and 320 chunks, with the large
    tensor carried across a launch boundary (its counters continue there); on CPU the CPU kernel at that size."""
    seed, offset = int(torch.randint(-2**62, 2**62, ()).item()), int(torch.randint(0, 2**40, ()).item())
    sizes = batch_split_sizes()
    got, want = poisoned(sizes, torch.float32, device), poisoned(sizes, torch.float32, device)
    OP(got, seed, offset)
    rademacher_reference(want, seed, offset)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"out[{i}] ({g.numel()} elements) differs from the reference"


def test_reference_is_splitmix64():
    seed, offset = 20261123, 5
    values = rademacher(40, seed=seed, offset=offset, dtype=torch.float64)
    assert values.tolist() == [splitmix64_sign(seed, offset + j) for j in range(40)]


@pytest.mark.parametrize("device", DEVICES)
def test_probe_distribution(device):
    """Every value is ±1 and the signs are balanced (a peer's probe is constant −1)."""
    n = 1 << 20
    z = rademacher(n, seed=7, device=device)
    assert torch.all((z == 1) | (z == -1))
    # The mean of n fair signs has standard deviation 1/sqrt(n): allow 5 of them.
    assert abs(z.double().mean().item()) < 5 / n**0.5
    # Neighbouring values are uncorrelated, as for independent signs.
    assert abs((z[1:] * z[:-1]).double().mean().item()) < 5 / n**0.5


@pytest.mark.parametrize("device", DEVICES)
def test_list_equals_flat_vector_and_offsets_compose(device):
    shapes = [(3, 4), (0,), (5,), (2, 2, 2)]
    tensors = [torch.empty(s, device=device) for s in shapes]
    parts = rademacher_like(tensors, seed=3, offset=11)
    flat = rademacher(sum(t.numel() for t in tensors), seed=3, offset=11, device=device)
    assert torch.equal(torch.cat([p.flatten() for p in parts]), flat)
    block = rademacher((4, 25), seed=3, offset=0, device=device)
    assert torch.equal(block[2], rademacher(25, seed=3, offset=50, device=device))


def test_mixed_dtypes_keep_their_counters():
    tensors = [torch.empty(3), torch.empty(4, dtype=torch.float64), torch.empty(5)]
    parts = rademacher_like(tensors, seed=9)
    flat = rademacher(12, seed=9, dtype=torch.float64)
    assert torch.equal(torch.cat([p.double().flatten() for p in parts]), flat)


def test_seeds_give_different_probes():
    assert not torch.equal(rademacher(64, seed=0), rademacher(64, seed=1))
    assert torch.equal(rademacher(64, seed=5), rademacher(64, seed=5))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_output_follows_logical_order(device):
    out = torch.full((8, 5), float("nan"), device=device).t()
    OP([out], 4, 0)
    assert torch.equal(out.flatten(), rademacher(40, seed=4, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(OP.default, args=(poisoned([4097, 3], torch.float32, device), 1, 2))


@pytest.mark.parametrize("implementation", [OP, rademacher_reference], ids=["kernel", "reference"])
def test_bad_input(implementation):
    with pytest.raises(ValueError, match="offset must be >= 0"):
        implementation([torch.empty(3)], 0, -1)
    with pytest.raises(ValueError, match="floating point"):
        implementation([torch.empty(3, dtype=torch.int64)], 0, 0)
    out = [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"out\[1\] is torch.float64"):
        implementation(out, 0, 0)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in out), "a rejected call wrote its output"



@pytest.mark.parametrize("device", DEVICES)
def test_counters_up_to_two_to_the_63_and_no_further(device):
    """The last counter of a call is at most 2**63 − 1: the kernel and the reference draw the same values up to it
    and refuse, with one message and nothing written, an offset one past it (the kernel would wrap, the reference
    overflow)."""
    count = 3 + 4
    last_offset = 2**63 - count
    got = poisoned([3, 4], torch.float32, device)
    OP(got, 5, last_offset)
    want = [torch.empty(3), torch.empty(4)]
    rademacher_reference(want, 5, last_offset)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    messages = []
    for implementation in (OP, rademacher_reference):
        out = [torch.zeros(3, device=device), torch.zeros(4, device=device)]
        with pytest.raises(ValueError, match="leaves no room below 2\\*\\*63") as error:
            implementation(out, 5, last_offset + 1)
        messages.append(str(error.value).splitlines()[0])
        assert all(torch.equal(t, torch.zeros_like(t)) for t in out), "a rejected call wrote its output"
    assert messages[0] == messages[1]

# --- cross_entropy_hvp ---------------------------------------------------------------------------------------------

CE_OP = torch.ops.optim.cross_entropy_hvp
# atol covers the cancellation in u − ⟨p, u⟩ (|out| ≤ |u| · p, so absolute error ~ eps · |u|).
CE_TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-4),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}
CE_SHAPES = [(1, 1), (3, 4097), (70000, 3), (2, 5, 33), (0, 7)]


def exact_cross_entropy_hessian_product(logits, tangent, scale):
    """scale · H u per row with H = ∂²/∂z² logsumexp(z), from autograd in float64 (independent of the op)."""
    z = logits.double().reshape(-1, logits.shape[-1]).requires_grad_(True)
    u = tangent.double().reshape(z.shape)
    (grad,) = torch.autograd.grad(torch.logsumexp(z, dim=-1).sum(), z, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, z, grad_outputs=u) if z.numel() else (torch.zeros_like(z),)
    return (scale * hvp).reshape(logits.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
def test_cross_entropy_hvp_matches_float64_autograd(device, dtype, shape):
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    tangent = torch.randn(shape, device=device).to(dtype)
    scale = 0.37
    got = CE_OP(logits, tangent, scale)
    assert got.dtype == dtype and got.shape == logits.shape
    want = exact_cross_entropy_hessian_product(logits, tangent, scale)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want.to(dtype).double(), **CE_TOLERANCES[dtype])
    if dtype == torch.float64:
        from optim.hessian._ops import cross_entropy_hvp_reference
        torch.testing.assert_close(cross_entropy_hvp_reference(logits, tangent, scale), want,
                                   **CE_TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_hvp_float32_exp_over_its_whole_range(device):
    """z − max over [−87, 0] (the CPU kernel's own exp covers it): each normal output within a few float32 ulps."""
    logits = torch.linspace(0.0, -87.0, 40961, device=device).unsqueeze(0)
    tangent = 5.0 + 10.0 * torch.linspace(0.0, 1.0, 40961, device=device).unsqueeze(0)
    got = CE_OP(logits, tangent, 1.0).double()
    want = exact_cross_entropy_hessian_product(logits, tangent, 1.0)
    p = torch.softmax(logits.double(), dim=-1)
    clear = (tangent.double() - (p * tangent.double()).sum()).abs() > 1.0  # no cancellation in u − ⟨p, u⟩
    clear &= want.abs() > 1e-36  # normal float32 outputs (below ~1.2e-38 they are subnormal and lose digits)
    assert clear.sum() > 30000
    relative = ((got - want).abs() / want.abs())[clear]
    assert relative.max() < 8 * torch.finfo(torch.float32).eps, relative.max()


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_hvp_masked_classes_and_strides(device):
    """Classes at −inf (masked) get exactly 0 and do not disturb the others; non-contiguous inputs are fine."""
    logits = torch.randn(6, 40, device=device, dtype=torch.float64)
    logits[:, :3] = float("-inf")
    tangent = torch.randn(40, 6, device=device, dtype=torch.float64).t()
    got = CE_OP(logits, tangent, 1.0)
    assert torch.equal(got[:, :3], torch.zeros(6, 3, dtype=torch.float64, device=device))
    want = exact_cross_entropy_hessian_product(logits[:, 3:], tangent[:, 3:], 1.0)
    torch.testing.assert_close(got[:, 3:], want, **CE_TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_hvp_opcheck(device):
    logits = torch.randn(5, 300, device=device)
    torch.library.opcheck(CE_OP.default, args=(logits, torch.randn_like(logits), 0.5))


@pytest.mark.parametrize("implementation", ["kernel", "reference"])
def test_cross_entropy_hvp_bad_input(implementation):
    from optim.hessian._ops import cross_entropy_hvp_reference
    call = CE_OP if implementation == "kernel" else cross_entropy_hvp_reference
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="tangent has shape"):
        call(z, torch.randn(4, 6), 1.0)
    with pytest.raises(ValueError, match="non-empty class dimension"):
        call(torch.randn(4, 0), torch.randn(4, 0), 1.0)
    with pytest.raises(ValueError, match="tangent is torch.float64"):
        call(z, torch.randn(4, 5, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        call(z, torch.randn(4, 5), float("inf"))


# --- krylov_dots ---------------------------------------------------------------------------------------------------

KD_OP = torch.ops.optim.krylov_dots
# (B, m, n): one row, a block over 4097 columns, columns beyond one thread block and 64 CUDA slices, empties.
# Rows 9 = two groups of four plus one (the CPU kernel sums four rows per pass) and a remainder of 1 to 3 rows.
KD_SHAPES = [(1, 1, 1), (2, 3, 4097), (1, 2, 3 * 65536 + 5), (2, 9, 2051), (1, 6, 70000), (3, 0, 10), (2, 4, 0),
             (0, 3, 5)]


def exact_dots(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float64 dot products of the float64 values, computed by a different route from the reference (einsum)."""
    return torch.einsum("bij,bj->bi", basis.cpu().double(), w.cpu().double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KD_SHAPES, ids=str)
def test_krylov_dots_matches_float64(device, dtype, shape):
    B, m, n = shape
    basis = torch.randn(B, m, n, device=device).to(dtype)
    w = torch.randn(B, n, device=device).to(dtype)
    got = KD_OP(basis, w)
    assert got.dtype == torch.float64 and got.shape == (B, m) and got.device.type == device
    # Products of two floats are exact in float64, so only the float64 summation order differs: ~n·2⁻⁵³ relative.
    torch.testing.assert_close(got.cpu(), exact_dots(basis, w), rtol=1e-12, atol=1e-12 * max(n, 1) ** 0.5)
    from optim.hessian._ops import krylov_dots_reference
    torch.testing.assert_close(krylov_dots_reference(basis, w).cpu(), exact_dots(basis, w), rtol=1e-12,
                               atol=1e-12 * max(n, 1) ** 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_krylov_dots_keeps_cancelling_sums(device):
    """Float32 vectors whose dot product cancels to a tiny value next to its terms: still right to float64 rounding."""
    generator = torch.Generator().manual_seed(5)
    n = 1 << 20
    a = torch.randn(1, 1, n, generator=generator)
    b = torch.randn(1, n, generator=generator)
    b = b - (a[0, 0] @ b[0]) / (a[0, 0] @ a[0, 0]) * a[0, 0]  # nearly orthogonal
    exact = exact_dots(a, b)
    got = KD_OP(a.to(device), b.to(device)).cpu()
    assert (got - exact).abs().item() <= 1e-9 * (a.double().abs() * b.double().abs()).sum().item()


@pytest.mark.parametrize("device", DEVICES)
def test_krylov_dots_strided_basis(device):
    """A slice basis[:, :m] of a larger buffer (row stride ≠ n·m), and non-unit column strides (copied)."""
    buffer = torch.randn(2, 10, 300, device=device, dtype=torch.float64)
    w = torch.randn(300, 2, device=device, dtype=torch.float64).t()  # column stride 2
    got = KD_OP(buffer[:, :4], w)
    torch.testing.assert_close(got.cpu(), exact_dots(buffer[:, :4], w), rtol=1e-13, atol=1e-13)
    transposed = torch.randn(2, 300, 4, device=device, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(KD_OP(transposed, w).cpu(), exact_dots(transposed, w), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_krylov_dots_opcheck(device):
    torch.library.opcheck(KD_OP.default, args=(torch.randn(2, 3, 700, device=device), torch.randn(2, 700, device=device)))


@pytest.mark.parametrize("implementation", ["kernel", "reference"])
def test_krylov_dots_bad_input(implementation):
    from optim.hessian._ops import krylov_dots_reference
    call = KD_OP if implementation == "kernel" else krylov_dots_reference
    with pytest.raises(ValueError, match=r"basis must have shape \(B, m, n\)"):
        call(torch.randn(3, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"w must have shape \(B, n\) = \(2, 5\)"):
        call(torch.randn(2, 3, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="floating point"):
        call(torch.ones(1, 1, 3, dtype=torch.int64), torch.ones(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="w is torch.float64"):
        call(torch.randn(1, 2, 3), torch.randn(1, 3, dtype=torch.float64))


# --- cross_entropy_hvp with target / ignore_index -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 4097), (70000, 3), (2, 5, 33), (0, 7)], ids=str)
def test_cross_entropy_hvp_ignored_rows_are_zero_and_the_rest_unchanged(device, dtype, shape):
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    tangent = torch.randn(shape, device=device).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], device=device)
    ignored = torch.rand(shape[:-1], device=device) < 0.4
    ignore_index = -7
    target[ignored] = ignore_index
    logits[ignored] = float("nan")  # an ignored row is not read: NaN there must not leak
    got = CE_OP(logits, tangent, 0.37, target, ignore_index)
    assert got.dtype == dtype and got.shape == logits.shape
    assert torch.equal(got[ignored], torch.zeros_like(got[ignored]))
    kept = ~ignored
    want = exact_cross_entropy_hessian_product(logits[kept], tangent[kept], 0.37)
    # CE_TOLERANCES' atol is per unit of |u| (the cancellation in u − ⟨p, u⟩ loses ~eps·|u|)
    tolerance = dict(CE_TOLERANCES[dtype])
    tolerance["atol"] *= max(1.0, float(tangent.abs().max())) if tangent.numel() else 1.0
    torch.testing.assert_close(got[kept].double(), want.to(dtype).double(), **tolerance)
    from optim.hessian._ops import cross_entropy_hvp_reference
    reference = cross_entropy_hvp_reference(logits, tangent, 0.37, target, ignore_index)
    assert torch.equal(reference[ignored], torch.zeros_like(reference[ignored]))
    torch.testing.assert_close(reference[kept].double(), want.to(dtype).double(), **tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_hvp_with_target_opcheck_and_vmap(device):
    logits = torch.randn(5, 300, device=device)
    target = torch.tensor([3, -100, 0, 299, -100], device=device)
    torch.library.opcheck(CE_OP.default, args=(logits, torch.randn_like(logits), 0.5, target, -100))
    tangents = torch.randn(4, 5, 300, device=device)
    batched = torch.func.vmap(lambda u: CE_OP(logits, u, 0.5, target))(tangents)
    for i in range(4):
        torch.testing.assert_close(batched[i], CE_OP(logits, tangents[i], 0.5, target))


def test_cross_entropy_hvp_kernel_and_reference_refuse_the_same_way():
    """The C++ checks and the Python reference's are twins: the same error type and the same words."""
    from optim.hessian._ops import cross_entropy_hvp_reference
    z = torch.randn(4, 5)
    bad_calls = [
        (z, torch.randn(4, 6), 1.0),
        (torch.randn(4, 0), torch.randn(4, 0), 1.0),
        (z, torch.randn(4, 5), float("inf")),
        (z, torch.randn(4, 5), 1.0, torch.zeros(3, dtype=torch.int64)),
        (z, torch.randn(4, 5), 1.0, torch.zeros(4, dtype=torch.int32)),
    ]
    for args in bad_calls:
        errors = []
        for call in (CE_OP, cross_entropy_hvp_reference):
            with pytest.raises(ValueError) as caught:
                call(*args)
            errors.append(str(caught.value).splitlines()[0])
        assert errors[0] == errors[1], errors
    with pytest.raises(ValueError, match=r"target has shape \(3,\) but logits of shape \(4, 5\) need \(4,\)"):
        CE_OP(*bad_calls[3])
