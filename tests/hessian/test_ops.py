"""optim::rademacher_: compiled kernels against the reference, the generator against SplitMix64, and bad input."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.hessian import rademacher, rademacher_like
from optim.hessian._ops import GOLDEN_GAMMA, mix64_int, rademacher_reference

from ..conftest import DEVICES, REQUIRE_EXTENSION

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
def test_compiled_kernel_is_registered(device):
    if not REQUIRE_EXTENSION:
        pytest.skip("OPTIM_REQUIRE_EXTENSION is off")
    assert optim.has_kernel("rademacher_", device)


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
    with pytest.raises(RuntimeError, match=r"out\[1\] is torch.float64"):
        implementation(out, 0, 0)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in out), "a rejected call wrote its output"
