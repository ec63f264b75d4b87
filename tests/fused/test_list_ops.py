"""The small list ops of the optimizer steps: optim::all_finite (the compiled kernel against the reference on random
tensors with NaN and ±inf planted at random positions; optim._finite.all_finite on top of it) and
optim::add_to_counts_ (bit for bit against torch._foreach_add_); opcheck and bad input for both. That the compiled
kernels are registered: tests/fused/test_ops.py."""

from __future__ import annotations

import pytest
import torch

from optim._finite import all_finite
from optim.fused._ops import add_to_counts_reference, all_finite_reference

from ..conftest import DEVICES

OP = torch.ops.optim.all_finite
COUNTS_OP = torch.ops.optim.add_to_counts_
# one element, an odd size past every vector width, past the kernel's parallel grain (65536) with a ragged tail
SIZES = [1, 4097, 3 * 65536 + 5]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
BAD = [float("nan"), float("inf"), float("-inf")]


def _random(size, dtype, device, generator):
    # large finite values too (near the dtype's max: a norm would overflow, the check must not call them non-finite)
    values = torch.randn(size, generator=generator, dtype=torch.float64) * 10.0
    values[torch.rand(size, generator=generator) < 0.01] = torch.finfo(dtype).max
    return values.to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_kernel_matches_reference_with_planted_non_finite_values(device, dtype, size):
    generator = torch.Generator().manual_seed(size)
    for trial in range(12):
        tensors = [_random(s, dtype, device, generator) for s in (size, 7, 1)]
        if trial % 3:  # two of three trials: one non-finite value in a random tensor at a random position
            k = int(torch.randint(0, len(tensors), (), generator=generator))
            position = int(torch.randint(0, tensors[k].numel(), (), generator=generator))
            tensors[k][position] = BAD[trial % len(BAD)]
        want = all_finite_reference([t.double() for t in tensors])
        got = OP(tensors)
        assert got.dtype == torch.bool and got.shape == () and got.device == tensors[0].device
        assert bool(got) == bool(want) == (trial % 3 == 0)
        assert all_finite(tensors) == bool(want)


@pytest.mark.parametrize("device", DEVICES)
def test_every_position_of_a_vector_block(device):
    """A non-finite value at each position of the first and the last block and the tail of a float32 tensor."""
    size = 65536 + 37
    base = torch.ones(size, device=device)
    for position in [*range(0, 40), *range(65536 - 20, size)]:
        for bad in BAD:
            t = base.clone()
            t[position] = bad
            assert not bool(OP([t])), (position, bad)
    assert bool(OP([base]))


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_dtypes(device):
    """Transposed, channels_last and sliced (not dense) tensors, mixed dtypes in one list, integers and bools."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(4, 3, 5, 6, generator=generator).to(device)
    for make_view in (lambda t: t.transpose(0, 3), lambda t: t.contiguous(memory_format=torch.channels_last),
                      lambda t: t[:, :, ::2, 1:]):
        assert bool(OP([make_view(dense)])) and bool(all_finite_reference([make_view(dense)]))
        base = dense.clone()
        view = make_view(base)
        view[1, 2, 1, 3] = float("inf")
        assert not bool(OP([view])) and not bool(all_finite_reference([view]))
    # a NaN the strided view does not see
    base = dense.clone()
    base[0, 0, 1, 0] = float("nan")
    assert bool(OP([base[:, :, ::2, 1:]]))
    mixed = [torch.randn(9, dtype=d, device=device) for d in DTYPES]
    assert bool(OP(mixed))
    mixed[2][4] = float("nan")
    assert not bool(OP(mixed))
    assert bool(OP([torch.arange(5, device=device), torch.ones(3, dtype=torch.bool, device=device)]))
    assert not bool(OP([torch.tensor([1.0, complex(float("inf"), 0.0)], device=device)]))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists_and_empty_tensors(device):
    assert bool(OP([])) and bool(all_finite_reference([])) and all_finite([])
    empty = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    assert bool(OP(empty)) and bool(all_finite_reference(empty))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tensors = [torch.randn(4097, device=device), torch.randn(3, 5, dtype=torch.float64, device=device)]
    torch.library.opcheck(OP.default, args=(tensors,))
    tensors[1][2, 2] = float("nan")
    torch.library.opcheck(OP.default, args=(tensors,))


@pytest.mark.parametrize("implementation", [OP, all_finite_reference], ids=["kernel", "reference"])
def test_sparse_tensors_raise(implementation):
    with pytest.raises(RuntimeError, match=r"all_finite: tensors\[1\] is not strided; dense tensors are required"):
        implementation([torch.ones(3), torch.ones(3).to_sparse()])


# --- add_to_counts_ ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [1.0, 0.0, 0.1, 3.0])
def test_counts_kernel_matches_reference_bit_for_bit(device, dtype, value):
    """Step counts of one element each: 0-d, (1,), (1, 1), and one-element views with gaps into a larger tensor
    (the values below every dtype's exact range: the op refuses counts it cannot increment exactly)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        base = torch.randint(0, 100, (9, 7), generator=generator).to(dtype=dtype, device=device)
        counts = [torch.randint(0, 100, (), generator=generator).to(dtype=dtype, device=device),
                  torch.full((1,), 7.0, dtype=dtype, device=device), base[:1, :1].clone(), base.clone()[2, 3:4],
                  base.clone().t()[4:5, 1:2]]
        want = [c.clone() for c in counts]
        COUNTS_OP(counts, value)
        add_to_counts_reference(want, value)
        for got, expected in zip(counts, want):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_counts_of_mixed_dtypes_and_an_empty_list(device):
    counts = [torch.zeros((), dtype=d, device=device) for d in DTYPES]
    COUNTS_OP(counts, 2.0)
    assert all(float(c) == 2.0 for c in counts)
    COUNTS_OP([], 1.0)
    add_to_counts_reference([], 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_counts_opcheck(device):
    counts = [torch.zeros((), device=device), torch.full((1,), 3.0, device=device)]
    torch.library.opcheck(COUNTS_OP.default, args=(counts, 1.0))


@pytest.mark.parametrize("implementation", [COUNTS_OP, add_to_counts_reference], ids=["kernel", "reference"])
def test_bad_counts_raise_and_change_nothing(implementation):
    counts = [torch.zeros(()), torch.zeros((), dtype=torch.int64)]
    with pytest.raises(RuntimeError,
                       match=r"add_to_counts_: counts\[1\] is not floating point; floating-point tensors are"):
        implementation(counts, 1.0)
    assert float(counts[0]) == 0.0
    with pytest.raises(RuntimeError, match=r"add_to_counts_: counts\[1\] is not strided; dense tensors are required"):
        implementation([torch.zeros(()), torch.ones(3).to_sparse()], 1.0)


def test_all_finite_of_tensor_subclasses_takes_the_norm_path():
    """A subclass (DTensor has no sharding rule for the op) is checked by _foreach_norm, plain tensors by the op."""
    class Sub(torch.Tensor):
        pass

    tensors = [torch.ones(5).as_subclass(Sub), torch.ones(3), torch.nn.Parameter(torch.ones(2))]
    assert all_finite(tensors)
    tensors[0][1] = float("nan")
    assert not all_finite(tensors)
