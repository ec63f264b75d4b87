"""optim::add_to_counts_: the compiled kernel against the reference (torch._foreach_add_), opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.fused._ops import add_to_counts_reference

from ..conftest import DEVICES, REQUIRE_EXTENSION

OP = torch.ops.optim.add_to_counts_
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernel_is_registered(device):
    if not REQUIRE_EXTENSION:
        pytest.skip("OPTIM_REQUIRE_EXTENSION is off: the reference kernel may be what runs")
    assert optim.has_kernel(OP, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [1.0, -3.0, 0.1, 1e30])
def test_kernel_matches_reference_bit_for_bit(device, dtype, value):
    """Step counts (0-d and one-element) and larger tensors of random values, dense, transposed and with gaps."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        base = torch.randn(9, 7, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
        counts = [torch.randint(0, 1000, (), generator=generator).to(dtype=dtype, device=device),
                  torch.full((1,), 7.0, dtype=dtype, device=device), base.clone(), base.clone().t(),
                  base.clone()[::2, 1:], torch.empty(0, dtype=dtype, device=device)]
        want = [c.clone() for c in counts]
        OP(counts, value)
        add_to_counts_reference(want, value)
        for got, expected in zip(counts, want):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_empty_list(device):
    counts = [torch.zeros((), dtype=d, device=device) for d in DTYPES]
    OP(counts, 2.0)
    assert all(float(c) == 2.0 for c in counts)
    OP([], 1.0)
    add_to_counts_reference([], 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    counts = [torch.zeros((), device=device), torch.full((1,), 3.0, device=device)]
    torch.library.opcheck(OP.default, args=(counts, 1.0))


@pytest.mark.parametrize("implementation", [OP, add_to_counts_reference], ids=["kernel", "reference"])
def test_bad_counts_raise_and_change_nothing(implementation):
    counts = [torch.zeros(()), torch.zeros((), dtype=torch.int64)]
    with pytest.raises(RuntimeError, match=r"add_to_counts_: counts\[1\] is not floating point; floating-point counts are"):
        implementation(counts, 1.0)
    assert float(counts[0]) == 0.0
    with pytest.raises(RuntimeError, match=r"add_to_counts_: counts\[1\] is not strided; dense tensors are required"):
        implementation([torch.zeros(()), torch.ones(3).to_sparse()], 1.0)
