"""optim::fused_sophia_ and optim::fused_adahessian_: compiled kernels against the float64 reference, opcheck, the
probe-multiplying variants (probe tensors, probes regenerated from counters) against an explicitly formed z⊙Hz
(bitwise), and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optim
from optim.hessian import rademacher_like
from optim.hessian._ops import (fused_adahessian_reference, fused_sophia_reference, regenerated_probes,
                                second_order_state_dtype)

from ..conftest import DEVICES, REQUIRE_EXTENSION, batch_split_sizes

SOPHIA = torch.ops.optim.fused_sophia_
ADAHESSIAN = torch.ops.optim.fused_adahessian_
SOPHIA_HYPER = dict(lr=3e-2, beta1=0.965, beta2=0.99, rho=0.05, weight_decay=0.1, eps=1e-12, maximize=False)
ADAHESSIAN_HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-4, hessian_power=1.0, step=3,
                        hessian_step=2, maximize=False)
# One element, an odd size past a vector width, several CUDA chunks (65536) with a ragged tail, an empty tensor
# inside a list, a 2-D tensor.
SIZES = [[1], [4097], [3 * 65536 + 5], [0, 7, 4097, 1], [(33, 65)]]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Kernel (in its dtype) against the float64 reference. Low-precision params are rounded once per step, so they may
# land one ulp from the float64 result rounded to their dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    # atol: a few float32 ulps of O(1) terms; a moving average whose terms cancel keeps their absolute rounding
    torch.float32: dict(rtol=2e-6, atol=5e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}
GUARD = 3  # NaN elements around every tensor, to catch writes out of bounds
# Curvature inputs of one call: none (a step between refreshes), a diagonal estimate, Hz with the probes z, or Hz
# with the (seed, offset) pairs the kernel regenerates z from.
SOPHIA_MODES = ["none", "estimate", "probes", "counters"]
ADAHESSIAN_MODES = ["none", "diagonal"]
STATE_NAMES = {"sophia": ("exp_avgs", "hessians"), "adahessian": ("exp_avgs", "exp_hessian_diag_sqs")}
CURVATURE_NAMES = {"sophia": ("hessian_products", "probes"), "adahessian": ("hessian_diagonals",)}


def _with_guards(values: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``values`` inside a NaN-filled buffer at ``offset`` (odd offsets misalign vector loads)."""
    buffer = torch.full((offset + values.numel() + GUARD,), float("nan"), dtype=values.dtype, device=values.device)
    view = buffer[offset: offset + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buffer


def make_inputs(op: str, shapes, dtype, device, *, mode: str, curvature_dtype=None, offset=GUARD, seed=7):
    """Fresh random operands (never zeros) for one call, each inside a NaN-guarded buffer.

    The Sophia curvature EMA h starts with mixed signs and the new estimates too (Hutchinson's can be negative),
    so both branches of max(ρh, eps) and both clipping bounds are exercised.
    """
    state_dtype = second_order_state_dtype(dtype)
    curvature_dtype = curvature_dtype or dtype
    state_a, state_b = STATE_NAMES[op]
    lists = {name: [] for name in ("params", "grads", state_a, state_b, *CURVATURE_NAMES[op])}
    buffers = []
    shapes = [s if isinstance(s, tuple) else (s,) for s in shapes]
    for shape in shapes:
        values = {
            "params": torch.randn(shape, dtype=dtype, device=device),
            "grads": torch.randn(shape, dtype=dtype, device=device),
            state_a: torch.randn(shape, dtype=state_dtype, device=device) * 0.1,
        }
        if op == "sophia":
            values[state_b] = torch.randn(shape, dtype=state_dtype, device=device)
        else:
            values[state_b] = torch.rand(shape, dtype=state_dtype, device=device) * 0.01 + 1e-4
        if mode != "none":
            values[CURVATURE_NAMES[op][0]] = torch.randn(shape, dtype=curvature_dtype, device=device) * 2
        for name, value in values.items():
            view, buffer = _with_guards(value, offset)
            lists[name].append(view)
            buffers.append(buffer)
    if mode == "probes":
        lists["probes"] = rademacher_like([torch.empty(s, dtype=curvature_dtype, device=device) for s in shapes],
                                          seed=seed, offset=11)
    if mode == "counters":
        # Per-tensor seeds of both signs and offsets that are not the running element count, so that a kernel
        # taking the wrong tensor's counters (or counting from 0) is caught.
        lists["probe_seeds"] = [(-1) ** i * (seed * 1_000_003 + 977 * i) for i in range(len(shapes))]
        lists["probe_offsets"] = [11 + 100_003 * i for i in range(len(shapes))]
    return lists, buffers


def probes_of(lists) -> list[torch.Tensor]:
    """The probes a call multiplies Hz by: the probe tensors, or the ones regenerated from the counters."""
    if lists.get("probe_seeds"):
        return regenerated_probes(lists["params"], lists["probe_seeds"], lists["probe_offsets"],
                                  lists["hessian_products"][0].dtype)
    return lists.get("probes", [])


def as_float64(lists):
    """A float64 copy of every tensor (the counter lists, plain ints, are kept)."""
    return {name: [t.to(torch.float64, copy=True) if isinstance(t, torch.Tensor) else t for t in tensors]
            for name, tensors in lists.items()}


def call(op: str, implementation: str, lists, hyper):
    if op == "sophia":
        function = SOPHIA if implementation == "kernel" else fused_sophia_reference
    else:
        function = ADAHESSIAN if implementation == "kernel" else fused_adahessian_reference
    function(**lists, **hyper)


def cancellation_allowance(op, before, hyper, dtype):
    """Per element, the extra error in p that the state dtype's arithmetic may make through cancellation.

    m = β1·m + (1 − β1)·g can cancel to far below its terms (and Sophia's h likewise), so its relative error in
    float32 is ε·(|β1·m| + |(1 − β1)·g|)/|m|, not ε; the step moves p by lr·ratio (Sophia, |ratio| ≤ 1) or
    step_size·m/denom (AdaHessian), which carries that relative error. Returned per param tensor, in float64,
    capped at the largest possible change of the step (2·lr for Sophia), from the operands before the call.
    """
    if not before["params"]:
        return []
    eps = torch.finfo(second_order_state_dtype(dtype)).eps
    beta1, beta2 = hyper["beta1"], hyper["beta2"]
    tiny = torch.finfo(torch.float64).tiny
    allowances = []
    for i, grad in enumerate(before["grads"]):
        m0 = before["exp_avgs"][i]
        m = beta1 * m0 + (1 - beta1) * grad
        relative = ((beta1 * m0).abs() + ((1 - beta1) * grad).abs()) / (m.abs() + tiny)
        if op == "sophia":
            h0 = before["hessians"][i]
            u = torch.zeros_like(h0)
            if before["hessian_products"]:
                probes = probes_of(before)
                u = before["hessian_products"][i] * (probes[i] if probes else 1.0)
            h = beta2 * h0 + (1 - beta2) * u
            relative = relative + ((beta2 * h0).abs() + ((1 - beta2) * u).abs()) / (h.abs() + tiny)
            allowance = (hyper["lr"] * 8 * eps * relative).clamp(max=2 * hyper["lr"])
        else:
            allowance = 8 * eps * relative * hyper["lr"] * m.abs() / (hyper["eps"] + tiny)
            allowance = allowance.clamp(max=1.0)
        allowances.append(allowance)
    return allowances


def assert_matches_reference(op, lists, reference, dtype, allowance=None):
    """Kernel results against the float64 reference; ``allowance`` (per param element) adds to the param tolerance."""
    for name in ("params", *STATE_NAMES[op]):
        tolerance = TOLERANCES[dtype] if name == "params" else TOLERANCES[second_order_state_dtype(dtype)]
        for i, (got, want) in enumerate(zip(lists[name], reference[name])):
            assert not got.isnan().any(), f"{name}[{i}]: NaN written"
            if name == "params":
                want = want.to(got.dtype)
            error = (got.to(torch.float64) - want.to(torch.float64)).abs()
            bound = tolerance["atol"] + tolerance["rtol"] * want.to(torch.float64).abs()
            if name == "params" and allowance:
                bound = bound + allowance[i]
            worst = int((error - bound).argmax()) if error.numel() else 0
            assert error.numel() == 0 or bool((error <= bound).all()), (
                f"{name}[{i}]: |kernel - reference| = {error.flatten()[worst].item():.3g} > "
                f"{bound.flatten()[worst].item():.3g} at element {worst}")


def assert_guards_intact(buffers):
    for buffer in buffers:
        assert buffer[:GUARD].isnan().all() and buffer[-GUARD:].isnan().all(), "a kernel wrote out of bounds"


HYPER = {"sophia": SOPHIA_HYPER, "adahessian": ADAHESSIAN_HYPER}
CASES = [("sophia", mode) for mode in SOPHIA_MODES] + [("adahessian", mode) for mode in ADAHESSIAN_MODES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["fused_sophia_", "fused_adahessian_"])
def test_compiled_kernel_is_registered(device, op):
    if not REQUIRE_EXTENSION:
        pytest.skip("OPTIM_REQUIRE_EXTENSION is off: the reference kernel may be what runs")
    assert optim.has_kernel(op, device), f"no compiled {op} kernel for {device}"


# The multi-chunk size runs in float32 and bfloat16 only (the other dtypes take the same code paths at 4097), to
# keep the file fast on a 2-core CPU.
SHAPES_AND_DTYPES = [pytest.param(shapes, dtype, id=f"{shapes}-{str(dtype).removeprefix('torch.')}")
                     for shapes in SIZES for dtype in DTYPES
                     if shapes != [3 * 65536 + 5] or dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes,dtype", SHAPES_AND_DTYPES)
@pytest.mark.parametrize("op,mode", CASES, ids=[f"{o}-{m}" for o, m in CASES])
def test_kernel_matches_float64_reference(device, dtype, shapes, op, mode):
    # maximize alternates with the shape so that both signs are covered without doubling the case count
    hyper = dict(HYPER[op], maximize=len(shapes) % 2 == 0)
    for offset in (GUARD, GUARD + 1):  # aligned and misaligned addresses
        lists, buffers = make_inputs(op, shapes, dtype, device, mode=mode, offset=offset)
        reference = as_float64(lists)
        allowance = cancellation_allowance(op, as_float64(lists), hyper, dtype)
        call(op, "kernel", lists, hyper)
        call(op, "reference", reference, hyper)
        assert_matches_reference(op, lists, reference, dtype, allowance)
        assert_guards_intact(buffers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,mode", [("sophia", "probes"), ("sophia", "counters"), ("adahessian", "diagonal")],
                         ids=str)
def test_many_tensors_and_a_huge_one_split_into_launches(device, op, mode):
    """61 tensors: on CUDA several launches of at most 24 tensors (5 or 6 lists) and 320 chunks, with a 21M-element
    tensor carried across a launch boundary (its per-tensor counters and element offsets with it). The CPU kernel
    has no launches to split, so on CPU the large tensor is 3 chunks, to keep the file fast."""
    large = 21_000_000 if device == "cuda" else 3 * 65536 + 7
    lists, buffers = make_inputs(op, batch_split_sizes(large), torch.float32, device, mode=mode)
    reference = as_float64(lists)
    allowance = cancellation_allowance(op, as_float64(lists), HYPER[op], torch.float32)
    call(op, "kernel", lists, HYPER[op])
    call(op, "reference", reference, HYPER[op])
    assert_matches_reference(op, lists, reference, torch.float32, allowance)
    assert_guards_intact(buffers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op,mode", [c for c in CASES if c[1] != "none"], ids=str)
def test_float32_curvature_for_low_precision_params(device, dtype, op, mode):
    """A curvature list may be in the state dtype (an external float32 diagonal for bf16 params)."""
    lists, buffers = make_inputs(op, [4097, 5], dtype, device, mode=mode, curvature_dtype=torch.float32)
    reference = as_float64(lists)
    allowance = cancellation_allowance(op, as_float64(lists), HYPER[op], dtype)
    call(op, "kernel", lists, HYPER[op])
    call(op, "reference", reference, HYPER[op])
    assert_matches_reference(op, lists, reference, dtype, allowance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["probes", "counters"])
def test_sophia_probe_product_is_exact(device, dtype, mode):
    """Passing (Hz, z), or Hz and z's counters, gives bit for bit the step of passing the product z⊙Hz formed
    beforehand (z = ±1); the regenerated z is rademacher_'s for each tensor's (seed, offset)."""
    with_probes, _ = make_inputs("sophia", [(3, 4097), 3 * 65536 + 5, 1], dtype, device, mode=mode)
    with_product = _snapshot(with_probes)
    probes = [z.to(device) for z in probes_of(with_probes)]
    if mode == "counters":
        drawn = [rademacher_like([hz], seed=seed, offset=offset)[0] for hz, seed, offset in
                 zip(with_probes["hessian_products"], with_probes["probe_seeds"], with_probes["probe_offsets"])]
        assert all(torch.equal(a, b) for a, b in zip(drawn, probes))
    with_product["hessian_products"] = [hz * z for hz, z in zip(with_probes["hessian_products"], probes)]
    with_product.update(probes=[], probe_seeds=[], probe_offsets=[])
    SOPHIA(**with_probes, **SOPHIA_HYPER)
    SOPHIA(**with_product, **SOPHIA_HYPER)
    for name in ("params", "exp_avgs", "hessians"):
        for a, b in zip(with_probes[name], with_product[name]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["sophia", "adahessian"])
def test_several_steps_in_a_row(device, op):
    """State carries over between calls as in the reference, refreshing every other step."""
    lists, _ = make_inputs(op, [5, 4097], torch.float32, device, mode="none")
    reference = as_float64(lists)
    curvature_name = CURVATURE_NAMES[op][0]
    for step in range(1, 7):
        for got, want in zip(lists["grads"], reference["grads"]):
            fresh = torch.randn_like(got)
            got.copy_(fresh)
            want.copy_(fresh)
        refresh = step % 2 == 1
        curvature = [torch.randn_like(p) for p in lists["params"]] if refresh else []
        lists[curvature_name] = curvature
        reference[curvature_name] = [c.double() for c in curvature]
        hyper = dict(HYPER[op])
        if op == "adahessian":
            hyper.update(step=step, hessian_step=(step + 1) // 2)
        call(op, "kernel", lists, hyper)
        call(op, "reference", reference, hyper)
    assert_matches_reference(op, lists, reference, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,mode", [("sophia", "probes"), ("sophia", "counters"), ("adahessian", "diagonal")])
def test_strided_operands(device, op, mode):
    """Transposed params and states, with contiguous read-only operands, are updated in place (a regenerated probe
    follows the row-major order of the transposed view, as rademacher_ fills it)."""
    base, _ = make_inputs(op, [(65, 33)], torch.float32, device, mode=mode)
    lists = {name: [t.t() if isinstance(t, torch.Tensor) else t for t in tensors] for name, tensors in base.items()}
    lists["grads"] = [lists["grads"][0].contiguous()]
    lists[CURVATURE_NAMES[op][0]] = [lists[CURVATURE_NAMES[op][0]][0].contiguous()]
    reference = as_float64(lists)
    call(op, "kernel", lists, HYPER[op])
    call(op, "reference", reference, HYPER[op])
    assert_matches_reference(op, lists, reference, torch.float32)
    assert lists["params"][0].data_ptr() == base["params"][0].data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists(device):
    for implementation in ("kernel", "reference"):
        call("sophia", implementation, dict(params=[], grads=[], exp_avgs=[], hessians=[], hessian_products=[],
                                            probes=[]), SOPHIA_HYPER)
        call("adahessian", implementation, dict(params=[], grads=[], exp_avgs=[], exp_hessian_diag_sqs=[],
                                                hessian_diagonals=[]), ADAHESSIAN_HYPER)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,mode", CASES, ids=[f"{o}-{m}" for o, m in CASES])
def test_opcheck(device, dtype, op, mode):
    lists, _ = make_inputs(op, [4097, 3], dtype, device, mode=mode)
    target = SOPHIA if op == "sophia" else ADAHESSIAN
    torch.library.opcheck(target.default, args=(), kwargs=dict(**lists, **HYPER[op]))


def test_clipping_and_nonpositive_curvature():
    """The two regimes of Sophia's update: |m| ≥ ρh (clipped to lr) and h ≤ 0 (denominator eps: lr·sign(m))."""
    p = torch.zeros(4, dtype=torch.float64)
    m = torch.tensor([1.0, -1.0, 0.01, 0.02], dtype=torch.float64)
    h = torch.tensor([1.0, 1.0, 1.0, -3.0], dtype=torch.float64)
    lists = dict(params=[p], grads=[m.clone()], exp_avgs=[m.clone()], hessians=[h], hessian_products=[], probes=[])
    SOPHIA(**lists, **dict(SOPHIA_HYPER, lr=0.1, beta1=0.0, rho=0.1, weight_decay=0.0))
    # m/(ρh): 10 → clipped to 1; −10 → −1; 0.1 → 0.1; h < 0 → m/eps → clipped to 1
    torch.testing.assert_close(p, torch.tensor([-0.1, 0.1, -0.01, -0.1], dtype=torch.float64), rtol=1e-12,
                               atol=1e-15)


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.integers(0, 3000), min_size=0, max_size=5),
    dtype=st.sampled_from(DTYPES),
    op_mode=st.sampled_from(CASES),
    weight_decay=st.floats(0.0, 0.5),
    betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)),
    power=st.sampled_from([0.0, 0.5, 1.0]),
    maximize=st.booleans(),
)
def test_property_cpu_kernel_matches_reference(shapes, dtype, op_mode, weight_decay, betas, power, maximize):
    op, mode = op_mode
    hyper = dict(HYPER[op], weight_decay=weight_decay, beta1=betas[0], beta2=betas[1], maximize=maximize)
    if op == "adahessian":
        hyper["hessian_power"] = power
    lists, buffers = make_inputs(op, shapes, dtype, "cpu", mode=mode)
    reference = as_float64(lists)
    allowance = cancellation_allowance(op, as_float64(lists), hyper, dtype)
    call(op, "kernel", lists, hyper)
    call(op, "reference", reference, hyper)
    assert_matches_reference(op, lists, reference, dtype, allowance)
    assert_guards_intact(buffers)


# --- bad input: a clear error naming the argument, and nothing modified -------------------------------------------

def _set(name, index, make):
    def mutate(lists):
        lists[name][index] = make(lists[name][index])
    return mutate


BAD_TENSORS = {
    "short grads": ("sophia", "probes", ValueError, "grads has 1 tensors but params has 2",
                    lambda l: l["grads"].pop()),
    "short hessians": ("sophia", "none", ValueError, "hessians has 1", lambda l: l["hessians"].pop()),
    "short products": ("sophia", "probes", ValueError, "hessian_products has 1 tensors",
                       lambda l: l["hessian_products"].pop()),
    "probes alone": ("sophia", "probes", ValueError, "probes were given without hessian_products",
                     lambda l: l.update(hessian_products=[])),
    "probe dtype": ("sophia", "probes", ValueError, r"probes(\[0\] is| are) torch.float64",
                    lambda l: l.update(probes=[z.double() for z in l["probes"]])),
    "short counters": ("sophia", "counters", ValueError, "probe_seeds has 1 entries and probe_offsets 2",
                       lambda l: l["probe_seeds"].pop()),
    "counters alone": ("sophia", "counters", ValueError, "probe_seeds were given without hessian_products",
                       lambda l: l.update(hessian_products=[])),
    "probes and counters": ("sophia", "counters", ValueError, "both probes and probe_seeds",
                            lambda l: l.update(probes=[torch.ones_like(p) for p in l["params"]])),
    "negative offset": ("sophia", "counters", ValueError, r"probe_offsets\[1\] must be >= 0",
                        _set("probe_offsets", 1, lambda o: -1)),
    "grad dtype": ("sophia", "none", ValueError, r"grads\[1\] is torch.float64", _set("grads", 1, lambda t: t.double())),
    "state dtype": ("adahessian", "none", ValueError, r"exp_avgs\[0\] is torch.float64",
                    _set("exp_avgs", 0, lambda t: t.double())),
    "state shape": ("adahessian", "none", ValueError, r"exp_hessian_diag_sqs\[1\] has shape",
                    _set("exp_hessian_diag_sqs", 1, lambda t: t[:-1])),
    "curvature dtype": ("adahessian", "diagonal", ValueError, r"hessian_diagonals\[0\] is torch.float16",
                        lambda l: l.update(hessian_diagonals=[d.half() for d in l["hessian_diagonals"]])),
    "curvature shape": ("sophia", "probes", ValueError, r"hessian_products\[1\] has shape",
                        _set("hessian_products", 1, lambda t: t[:-1])),
    "param dtype mix": ("sophia", "none", ValueError, r"params\[1\] is torch.float64",
                        _set("params", 1, lambda t: t.double())),
    "integer params": ("adahessian", "none", ValueError, "params must be float64, float32",
                       lambda l: l.update(params=[p.long() for p in l["params"]],
                                          grads=[g.long() for g in l["grads"]])),
}
BAD_HYPER = {
    "negative lr": ("sophia", "lr", -1e-3),
    "negative rho": ("sophia", "rho", -0.1),
    "zero eps (sophia)": ("sophia", "eps", 0.0),
    "nan weight_decay": ("sophia", "weight_decay", float("nan")),
    "beta1 = 1": ("sophia", "beta1", 1.0),
    "negative eps": ("adahessian", "eps", -1e-8),
    "negative beta2": ("adahessian", "beta2", -0.5),
    "hessian_power > 1": ("adahessian", "hessian_power", 1.5),
    "step 0": ("adahessian", "step", 0),
    "hessian_step 0": ("adahessian", "hessian_step", 0),
}


def _snapshot(lists):
    return {name: [t.clone() if isinstance(t, torch.Tensor) else t for t in tensors]
            for name, tensors in lists.items()}


def _assert_unchanged(lists, snapshot):
    for name, tensors in snapshot.items():
        for now, before in zip(lists[name], tensors):
            if isinstance(now, torch.Tensor) and now.shape == before.shape and now.dtype == before.dtype:
                assert torch.equal(now, before), f"{name} was modified by a rejected call"


@pytest.mark.parametrize("implementation", ["kernel", "reference"])
@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensors_raise_and_change_nothing(implementation, case):
    op, mode, error, message, mutate = BAD_TENSORS[case]
    lists, _ = make_inputs(op, [4097, 3], torch.float32, "cpu", mode=mode)
    mutate(lists)
    snapshot = _snapshot(lists)
    with pytest.raises(error, match=message):
        call(op, implementation, lists, HYPER[op])
    _assert_unchanged(lists, snapshot)


@pytest.mark.parametrize("implementation", ["kernel", "reference"])
@pytest.mark.parametrize("case", BAD_HYPER)
def test_bad_hyperparameters_raise_and_change_nothing(implementation, case):
    op, name, value = BAD_HYPER[case]
    lists, _ = make_inputs(op, [4097, 3], torch.float32, "cpu", mode="none")
    snapshot = _snapshot(lists)
    with pytest.raises(ValueError, match=name):
        call(op, implementation, lists, dict(HYPER[op], **{name: value}))
    _assert_unchanged(lists, snapshot)


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    lists, _ = make_inputs("sophia", [4097], torch.float32, "cuda", mode="probes")
    lists["probes"] = [z.cpu() for z in lists["probes"]]
    snapshot = _snapshot(lists)
    with pytest.raises(ValueError, match=r"probes\[0\]"):
        SOPHIA(**lists, **SOPHIA_HYPER)
    _assert_unchanged(lists, snapshot)
