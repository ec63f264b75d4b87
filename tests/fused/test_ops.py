"""optim::fused_adamw_: the compiled kernels against the float64 reference, opcheck, and bad input."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optim
from optim.fused._ops import fused_adamw_reference, moment_dtype

from ..conftest import DEVICES, REQUIRE_EXTENSION, batch_split_sizes

OP = torch.ops.optim.fused_adamw_
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, maximize=False)
# Sizes: one element, an odd size past a vector width, several CUDA chunks (65536) with a ragged tail, an empty
# tensor inside a list, and a 2-D tensor.
SIZES = [[1], [4097], [3 * 65536 + 5], [0, 7, 4097, 1], [(33, 65)]]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Tolerances of the kernel (in its dtype) against the float64 reference. Params of a low-precision dtype are rounded
# once per step, so they may land one ulp away from the float64 result rounded to that dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=2e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}
GUARD = 3  # elements of NaN around every tensor, to catch writes out of bounds


def _with_guards(values: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``values`` living inside a NaN-filled buffer at ``offset`` elements from its start.

    Returns (view, buffer). An odd offset makes the view's address misaligned for vector loads on purpose.
    """
    buffer = torch.full((offset + values.numel() + GUARD,), float("nan"), dtype=values.dtype, device=values.device)
    view = buffer[offset : offset + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buffer


def make_inputs(shapes, dtype, device, *, offset=GUARD):
    """Fresh random operands (never zeros) for one call, each inside a NaN-guarded buffer."""
    state_dtype = moment_dtype(dtype)
    lists = {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "state_steps": []}
    buffers = []
    for shape in shapes:
        shape = shape if isinstance(shape, tuple) else (shape,)
        values = {
            "params": torch.randn(shape, dtype=dtype, device=device),
            "grads": torch.randn(shape, dtype=dtype, device=device),
            "exp_avgs": torch.randn(shape, dtype=state_dtype, device=device) * 0.1,
            "exp_avg_sqs": torch.rand(shape, dtype=state_dtype, device=device) * 0.01 + 1e-4,
        }
        for name, value in values.items():
            view, buffer = _with_guards(value, offset)
            lists[name].append(view)
            buffers.append(buffer)
        lists["state_steps"].append(torch.randint(0, 50, (), device=device).to(torch.float32))
    return lists, buffers


def as_float64(lists):
    return {name: [t.to(torch.float64 if name != "state_steps" else t.dtype).clone() for t in tensors]
            for name, tensors in lists.items()}


def assert_matches_reference(lists, reference, dtype, params_before=None):
    """Kernel outputs against the float64 reference. With ``params_before`` the parameters' tolerance is relative to
    the larger of the new value and the step taken: p − lr·m̂/(√v̂ + eps) cancels when the step is about as large as
    p, and the kernel's rounding of the step (relative to the step) then dwarfs the small result."""
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        tolerance = TOLERANCES[dtype] if name == "params" else TOLERANCES[moment_dtype(dtype)]
        for i, (got, want) in enumerate(zip(lists[name], reference[name])):
            assert not got.isnan().any(), f"{name}: NaN written"
            if name == "params" and params_before is not None:
                exact = want
                scale = torch.maximum(exact.abs(), (exact - params_before[i]).abs())
                error = (got.to(torch.float64) - exact).abs()
                bound = tolerance["rtol"] * scale + tolerance["atol"]
                worst = int((error - bound).argmax()) if error.numel() else 0
                assert bool((error <= bound).all()), (
                    f"params[{i}]: element {worst} is {float(got.flatten()[worst])}, the reference "
                    f"{float(exact.flatten()[worst])} (step {float((exact - params_before[i]).flatten()[worst])})")
                continue
            want = want.to(got.dtype) if name == "params" else want
            torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), **tolerance, msg=name)
    for got, want in zip(lists["state_steps"], reference["state_steps"]):
        assert got.item() == want.item()


def assert_guards_intact(buffers):
    for buffer in buffers:
        assert buffer[:GUARD].isnan().all() and buffer[-GUARD:].isnan().all(), "a kernel wrote out of bounds"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernel_is_registered(device):
    if not REQUIRE_EXTENSION:
        pytest.skip("OPTIM_REQUIRE_EXTENSION is off: the reference kernel may be what runs")
    assert optim.has_kernel("fused_adamw_", device), f"no compiled fused_adamw_ kernel for {device}"
    assert optim.has_kernel(OP, device)
    for op in ("all_finite", "add_to_counts_"):  # the list ops of tests/fused/test_list_ops.py
        assert optim.has_kernel(op, device), f"no compiled {op} kernel for {device}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SIZES, ids=str)
@pytest.mark.parametrize("maximize", [False, True])
def test_kernel_matches_float64_reference(device, dtype, shapes, maximize):
    hyper = dict(HYPER, maximize=maximize)
    for offset in (GUARD, GUARD + 1):  # aligned and misaligned addresses
        lists, buffers = make_inputs(shapes, dtype, device, offset=offset)
        reference = as_float64(lists)
        OP(**lists, **hyper)
        fused_adamw_reference(**reference, **hyper)
        assert_matches_reference(lists, reference, dtype)
        assert_guards_intact(buffers)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_and_a_huge_one_split_into_launches(device):
    """61 tensors, one of 21M elements: on CUDA several launches of at most 30 tensors and 320 chunks, with the large
    tensor carried across a launch boundary (conftest.batch_split_sizes); on CPU the CPU kernel at that size."""
    lists, buffers = make_inputs(batch_split_sizes(), torch.float32, device)
    reference = as_float64(lists)
    OP(**lists, **HYPER)
    fused_adamw_reference(**reference, **HYPER)
    assert_matches_reference(lists, reference, torch.float32)
    assert_guards_intact(buffers)


@pytest.mark.parametrize("device", DEVICES)
def test_several_steps_in_a_row(device):
    """Moments and step counts carry over between calls exactly as in the reference."""
    lists, _ = make_inputs([5, 4097], torch.float32, device)
    reference = as_float64(lists)
    for _ in range(5):
        for name in ("grads",):
            for got, want in zip(lists[name], reference[name]):
                fresh = torch.randn_like(got)
                got.copy_(fresh)
                want.copy_(fresh)
        OP(**lists, **HYPER)
        fused_adamw_reference(**reference, **HYPER)
    assert_matches_reference(lists, reference, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_operands(device):
    """Transposed params/moments and a grad with other strides are updated like contiguous ones."""
    base, _ = make_inputs([(65, 33)], torch.float32, device)
    lists = {name: [t.t() if name != "state_steps" else t for t in tensors] for name, tensors in base.items()}
    lists["grads"] = [lists["grads"][0].contiguous()]  # contiguous grad, transposed param: different strides
    reference = as_float64(lists)
    OP(**lists, **HYPER)
    fused_adamw_reference(**reference, **HYPER)
    assert_matches_reference(lists, reference, torch.float32)
    assert lists["params"][0].data_ptr() == base["params"][0].data_ptr()  # updated in place, not rebound


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists(device):
    OP([], [], [], [], [], **HYPER)
    fused_adamw_reference([], [], [], [], [], **HYPER)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    lists, _ = make_inputs([4097, 3], dtype, device)
    torch.library.opcheck(OP.default, args=(), kwargs=dict(**lists, **HYPER))


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.integers(0, 3000), min_size=0, max_size=6),
    dtype=st.sampled_from(DTYPES),
    weight_decay=st.floats(0.0, 0.5),
    betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)),
    maximize=st.booleans(),
)
def test_property_cpu_kernel_matches_reference(shapes, dtype, weight_decay, betas, maximize):
    hyper = dict(HYPER, weight_decay=weight_decay, beta1=betas[0], beta2=betas[1], maximize=maximize)
    lists, buffers = make_inputs(shapes, dtype, "cpu")
    reference = as_float64(lists)
    before = [p.clone() for p in reference["params"]]
    OP(**lists, **hyper)
    fused_adamw_reference(**reference, **hyper)
    assert_matches_reference(lists, reference, dtype, params_before=before)
    assert_guards_intact(buffers)


# --- bad input: a clear error naming the argument, and nothing modified -------------------------------------------

def _sparse_grad(lists):
    lists["grads"][0] = lists["grads"][0].to_sparse()


def _set(name, index, make):
    def mutate(lists):
        lists[name][index] = make(lists[name][index])
    return mutate


BAD_TENSORS = {
    "short grads": (ValueError, "grads has 1 tensors but params has 2", lambda l: l["grads"].pop()),
    "short state_steps": (ValueError, "state_steps has 1", lambda l: l["state_steps"].pop()),
    "grad dtype": (ValueError, r"grads\[1\] is torch.float64", _set("grads", 1, lambda t: t.double())),
    "param dtype mix": (ValueError, r"params\[1\] is torch.float64", _set("params", 1, lambda t: t.double())),
    "moment dtype": (ValueError, r"exp_avgs\[0\] is torch.float64", _set("exp_avgs", 0, lambda t: t.double())),
    "moment shape": (ValueError, r"exp_avg_sqs\[1\] has shape", _set("exp_avg_sqs", 1, lambda t: t[:-1])),
    "grad on meta": (ValueError, r"grads\[0\]", _set("grads", 0, lambda t: t.to("meta"))),
    "sparse grad": (ValueError, r"grads\[0\] is sparse", _sparse_grad),
    "step dtype": (ValueError, r"state_steps\[0\] must be a float32", _set("state_steps", 0, lambda t: t.long())),
    "integer params": (ValueError, "params must be float64, float32",
                       lambda l: l.update(params=[p.long() for p in l["params"]],
                                          grads=[g.long() for g in l["grads"]])),
}
BAD_HYPER = {
    "negative lr": ("lr", -1e-3),
    "negative eps": ("eps", -1e-8),
    "negative weight_decay": ("weight_decay", -0.1),
    "nan lr": ("lr", float("nan")),
    "beta1 = 1": ("beta1", 1.0),
    "negative beta2": ("beta2", -0.5),
}
IMPLEMENTATIONS = {"kernel": OP, "reference": fused_adamw_reference}


def _snapshot(lists):
    return {name: [t.clone() for t in tensors if t.layout == torch.strided and t.device.type != "meta"]
            for name, tensors in lists.items()}


def _assert_unchanged(lists, snapshot):
    for name, tensors in snapshot.items():
        current = [t for t in lists[name] if t.layout == torch.strided and t.device.type != "meta"]
        for now, before in zip(current, tensors):
            assert torch.equal(now, before), f"{name} was modified by a rejected call"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensors_raise_and_change_nothing(implementation, case):
    error, message, mutate = BAD_TENSORS[case]
    lists, _ = make_inputs([4097, 3], torch.float32, "cpu")
    mutate(lists)
    snapshot = _snapshot(lists)
    with pytest.raises(error, match=message):
        IMPLEMENTATIONS[implementation](**lists, **HYPER)
    _assert_unchanged(lists, snapshot)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", BAD_HYPER)
def test_bad_hyperparameters_raise_and_change_nothing(implementation, case):
    name, value = BAD_HYPER[case]
    lists, _ = make_inputs([4097, 3], torch.float32, "cpu")
    snapshot = _snapshot(lists)
    with pytest.raises(ValueError, match=name):
        IMPLEMENTATIONS[implementation](**lists, **dict(HYPER, **{name: value}))
    _assert_unchanged(lists, snapshot)


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    lists, _ = make_inputs([4097], torch.float32, "cuda")
    lists["grads"] = [g.cpu() for g in lists["grads"]]
    snapshot = _snapshot(lists)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        OP(**lists, **HYPER)
    _assert_unchanged(lists, snapshot)


def test_non_finite_gradients_propagate_like_torch():
    """Documented behaviour: as in torch.optim.AdamW, a NaN gradient element poisons only that element."""
    lists, _ = make_inputs([64], torch.float32, "cpu")
    lists["grads"][0][5] = float("nan")
    OP(**lists, **HYPER)
    nan_positions = lists["params"][0].isnan().nonzero().flatten().tolist()
    assert nan_positions == [5]
    assert lists["exp_avgs"][0][5].isnan() and lists["exp_avg_sqs"][0][5].isnan()


# --- the reset flag: "treat m, v and the step of this tensor as zero before this step" ----------------------------

def _poison_state(lists, flags):
    """The old moments and step of flagged tensors are never read: make them NaN to prove it."""
    for i, flag in enumerate(flags):
        if flag:
            lists["exp_avgs"][i].fill_(float("nan"))
            lists["exp_avg_sqs"][i].fill_(float("nan"))
            lists["state_steps"][i].fill_(float("nan"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", [[4097], [1, 3 * 65536 + 5, 0, 7, (33, 65)]], ids=str)
def test_reset_kernel_matches_float64_reference(device, dtype, shapes):
    flags = [i % 2 == 0 for i in range(len(shapes))]
    lists, buffers = make_inputs(shapes, dtype, device)
    _poison_state(lists, flags)
    reference = as_float64(lists)
    OP(**lists, **HYPER, reset=flags)
    fused_adamw_reference(**reference, **HYPER, reset=flags)
    assert_matches_reference(lists, reference, dtype)
    assert_guards_intact(buffers)
    for flag, step in zip(flags, lists["state_steps"]):
        if flag:
            assert step.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reset_equals_zeroing_the_state_then_stepping(device, dtype):
    """Bit for bit: the flag gives what zeroing m, v, step in place and then stepping gives."""
    shapes = [4097, 5, (33, 65)]
    flags = [True, False, True]
    flagged, _ = make_inputs(shapes, dtype, device)
    zeroed = {name: [t.clone() for t in tensors] for name, tensors in flagged.items()}
    for i, flag in enumerate(flags):
        if flag:
            for name in ("exp_avgs", "exp_avg_sqs", "state_steps"):
                zeroed[name][i].zero_()
    OP(**flagged, **HYPER, reset=flags)
    OP(**zeroed, **HYPER)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for got, want in zip(flagged[name], zeroed[name]):
            assert torch.equal(got, want), name


@pytest.mark.parametrize("device", DEVICES)
def test_reset_all_false_or_none_is_the_plain_step(device):
    lists, _ = make_inputs([4097, 3], torch.float32, device)
    copies = {name: [t.clone() for t in tensors] for name, tensors in lists.items()}
    OP(**lists, **HYPER, reset=[False, False])
    OP(**copies, **HYPER)
    for name in lists:
        for got, want in zip(lists[name], copies[name]):
            assert torch.equal(got, want), name


@pytest.mark.parametrize("device", DEVICES)
def test_reset_opcheck(device):
    lists, _ = make_inputs([4097, 3], torch.float32, device)
    torch.library.opcheck(OP.default, args=(), kwargs=dict(**lists, **HYPER, reset=[True, False]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_reset_of_wrong_length_raises_and_changes_nothing(implementation):
    lists, _ = make_inputs([4097, 3], torch.float32, "cpu")
    snapshot = _snapshot(lists)
    with pytest.raises(ValueError, match="reset has 1 flags but params has 2"):
        IMPLEMENTATIONS[implementation](**lists, **HYPER, reset=[True])
    _assert_unchanged(lists, snapshot)
