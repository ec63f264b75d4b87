"""optim::rsdm_step_ and optim::rsdm_sample_rows_: compiled kernels against the float64 reference, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.stiefel import distance_to_manifold, orthogonal_
from optim.stiefel._ops import rsdm_sample_rows_reference, rsdm_step_reference

from ..conftest import DEVICES, REQUIRE_EXTENSION

STEP = torch.ops.optim.rsdm_step_
SAMPLE = torch.ops.optim.rsdm_sample_rows_
CORES = ["qr", "cayley", "exp"]
GUARD = 3

# (shape of X, r). Covers r = 1, r = N, batches (1-D and 2-D batch shapes), the n < p orientation, on CPU the loop
# core (r < 48) and the LAPACK core, and on CUDA every launch path of rsdm_step_ (csrc/stiefel/rsdm_cuda.cu, with
# N, P the oriented sizes max(n, p), min(n, p)). The fused launch is taken when r <= 128, the batch is >= SMs / 2
# (66 on an H100/H200) or r·P <= kFusedWorkPerMatrix = 32768, and its shared memory fits; otherwise the gemm path
# (gather, cuBLAS bmm, the core, scatter), whose core is rsdm_core_kernel when r <= 128 and the r×r core fits in
# shared memory, else torch.linalg (and for float32 at r >= 129 the whole rotation in float64):
#   * fused: every case below with r·P <= 32768, e.g. (30, 8) r = 5 (40), (8, 30) r = 7 (n < p: 56), (3, 60, 10)
#     r = 48 (480).
#   * gemm + rsdm_core_kernel: (600, 400) r = 100: r·P = 40000 > 32768, batch 1 < 66. Its core needs 400 B of
#     indices + r²·sizeof(T) + max(r, 8)·sizeof(T) (+ 2·r²·sizeof(T) for exp): float32 40.8 KB (exp 120.8 KB),
#     float64 81.2 KB, all under the 227 KB opt-in limit; float64 exp needs 241.2 KB and takes torch.linalg.
#     (600, 300) r = 100 would not do: r·P = 30000 <= 32768 is the fused launch.
#   * the same with a batch: (4, 600, 400) r = 100 (batch 4 < 66, r·P = 40000).
#   * the same for n < p: (400, 600) r = 100 (oriented N = 600, P = 400: r·P = 40000).
#   * gemm + torch.linalg core: (200, 40) r = 150 > 128 (float32: the float64 rotation, r >= 129).
# Given indices take the same paths: test_given_indices_match_float64_reference.
CASES = [
    ((30, 8), 5),
    ((3, 30, 8), 30),
    ((8, 30), 7),
    ((40, 6), 1),
    ((2, 3, 25, 4), 12),
    ((70, 24, 6), 9),
    ((600, 400), 100),
    ((4, 600, 400), 100),
    ((400, 600), 100),
    ((200, 40), 150),
    ((3, 60, 10), 48),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5}


def _point(shape, dtype, device):
    return orthogonal_(torch.empty(shape, dtype=torch.float64)).to(dtype=dtype, device=device)


def _guarded(values: torch.Tensor):
    """A copy of ``values`` inside a NaN-filled buffer (catches writes out of bounds)."""
    buffer = torch.full((2 * GUARD + values.numel(),), float("nan"), dtype=values.dtype, device=values.device)
    view = buffer[GUARD:GUARD + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buffer


def _assert_guards(buffer):
    assert buffer[:GUARD].isnan().all() and buffer[-GUARD:].isnan().all(), "a kernel wrote out of bounds"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernels_are_registered(device):
    if not REQUIRE_EXTENSION:
        pytest.skip("OPTIM_REQUIRE_EXTENSION is off: the reference kernel may be what runs")
    assert optim.has_kernel("rsdm_step_", device)
    assert optim.has_kernel(SAMPLE, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_shape, n, r", [((), 10, 1), ((4,), 10, 10), ((3, 5), 1000, 37), ((2,), 70, 33),
                                                ((3, 5), 5000, 37), ((2,), 2**40, 5), ((), 2**62, 3)])
def test_sampled_rows_match_reference_bitwise(device, batch_shape, n, r):
    for seed, offset in [(0, 0), (12345, 987), (2**62 + 3, 2**40)]:
        out = torch.full((*batch_shape, r), -7, dtype=torch.int64, device=device)
        SAMPLE(out, n, seed, offset)
        want = torch.empty((*batch_shape, r), dtype=torch.int64)
        rsdm_sample_rows_reference(want, n, seed, offset)
        assert torch.equal(out.cpu(), want)
        flat = out.reshape(-1, r).cpu()
        assert (flat >= 0).all() and (flat < n).all()
        assert (flat[:, 1:] > flat[:, :-1]).all(), "indices must be distinct and increasing"



def test_sampled_rows_are_the_same_set_with_a_table_or_a_list(monkeypatch):
    """Above n = 64·r the sampler keeps its picks as a sorted list instead of an n-entry table (a huge n with a
    small r allocated n/8 bytes per matrix): the same draws give the same rows either way."""
    import importlib

    ops = importlib.import_module("optim.stiefel._ops")
    for n, r in [(5000, 37), (300, 4), (65, 1)]:
        assert ops.floyd_uses_list(n, r)
        listed = torch.empty(6, r, dtype=torch.int64)
        rsdm_sample_rows_reference(listed, n, 7, 123)
        with monkeypatch.context() as patch:
            patch.setattr(ops, "floyd_uses_list", lambda n, r: False)
            tabled = torch.empty(6, r, dtype=torch.int64)
            rsdm_sample_rows_reference(tabled, n, 7, 123)
        assert torch.equal(listed, tabled)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_rows_counters_up_to_two_to_the_63_and_no_further(device):
    """Counters offset .. offset + out.numel() − 1 are int64: the kernel and the reference agree up to the last one
    and refuse one past it with the same message, writing nothing."""
    shape, n = (3, 5), 40
    last_offset = 2**63 - 15
    out = torch.full(shape, -7, dtype=torch.int64, device=device)
    SAMPLE(out, n, 11, last_offset)
    want = torch.empty(shape, dtype=torch.int64)
    rsdm_sample_rows_reference(want, n, 11, last_offset)
    assert torch.equal(out.cpu(), want)
    messages = []
    for implementation in (SAMPLE, rsdm_sample_rows_reference):
        out = torch.full(shape, -7, dtype=torch.int64, device=device)
        with pytest.raises(ValueError, match="leaves no room below 2\\*\\*63") as error:
            implementation(out, n, 11, last_offset + 1)
        messages.append(str(error.value).splitlines()[0])
        assert (out == -7).all(), "a rejected call wrote its output"
    assert messages[0] == messages[1]

def test_sampled_rows_are_uniform():
    """Every row is drawn with probability r/n: frequencies over 4000 draws within 5 standard deviations."""
    n, r, draws = 12, 4, 4000
    out = torch.empty(draws, r, dtype=torch.int64)
    SAMPLE(out, n, 99, 0)
    counts = torch.bincount(out.flatten(), minlength=n).double()
    expected = draws * r / n
    spread = (draws * (r / n) * (1 - r / n)) ** 0.5
    assert ((counts - expected).abs() < 5 * spread).all(), counts
    # consecutive offsets give different sets (the counters advance by r per matrix)
    a, b = torch.empty(1, r, dtype=torch.int64), torch.empty(1, r, dtype=torch.int64)
    SAMPLE(a, 1000, 5, 0)
    SAMPLE(b, 1000, 5, r)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("shape, r", CASES, ids=str)
def test_step_matches_float64_reference(device, dtype, core, shape, r):
    if device == "cpu" and shape[-2] * shape[-1] > 50000 and dtype == torch.float32:
        pytest.skip("the large cases exercise the CUDA paths; float64 covers them on CPU")
    x0 = _point(shape, dtype, device)
    g0 = torch.randn(shape, dtype=dtype, device=device)
    lr = 0.3
    for transport in (False, True):
        x, x_buffer = _guarded(x0)
        g, g_buffer = _guarded(g0)
        want_x, want_g = x0.double().clone(), g0.double().clone()
        STEP(x, g, None, rank=r, seed=17, offset=5, lr=lr, core=core, transport=transport)
        rsdm_step_reference(want_x, want_g, None, rank=r, seed=17, offset=5, lr=lr, core=core, transport=transport)
        _assert_guards(x_buffer)
        _assert_guards(g_buffer)
        assert not x.isnan().any()
        scale = TOLERANCE[dtype] * max(1.0, g0.abs().max().item())
        torch.testing.assert_close(x.double(), want_x, rtol=0, atol=scale)
        if transport:
            torch.testing.assert_close(g.double(), want_g, rtol=0, atol=scale * g0.abs().max().item())
        else:
            assert torch.equal(g, g0), "G must not be written without transport"
        assert distance_to_manifold(x).max() < (1e-12 if dtype == torch.float64 else 1e-5) * max(1, r) ** 0.5 * 10


# (shape of X, r) with given indices, one per CUDA launch path (arithmetic as for CASES): fused (r·P = 48 and, for
# n < p, 7·6 = 42), gemm + rsdm_core_kernel with a batch (r·P = 100·400 = 40000 > 32768, batch 2 < 66), the same for
# n < p, and gemm + torch.linalg core (r = 150 > 128).
GIVEN_CASES = [
    ((5, 50, 6), 8),
    ((3, 6, 40), 7),
    ((2, 600, 400), 100),
    ((2, 400, 600), 100),
    ((200, 40), 150),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("shape, r", GIVEN_CASES, ids=str)
def test_given_indices_match_float64_reference(device, dtype, core, shape, r):
    """Indices passed in (distinct, in no particular order) instead of drawn: kernel against the float64 reference."""
    if device == "cpu" and shape[-2] * shape[-1] > 50000 and dtype == torch.float32:
        pytest.skip("the large cases exercise the CUDA paths; float64 covers them on CPU")
    n_rows = max(shape[-2:])
    batch_shape = shape[:-2]
    batch = 1
    for size in batch_shape:
        batch *= size
    indices = torch.stack([torch.randperm(n_rows)[:r] for _ in range(batch)]).view(*batch_shape, r).to(device)
    x0 = _point(shape, dtype, device)
    g0 = torch.randn(shape, dtype=dtype, device=device)
    x, x_buffer = _guarded(x0)
    g, g_buffer = _guarded(g0)
    want_x, want_g = x0.double().clone(), g0.double().clone()
    # seed and offset are unused with indices: different values must not matter
    STEP(x, g, indices, rank=r, seed=5, offset=3, lr=0.3, core=core, transport=True)
    rsdm_step_reference(want_x, want_g, indices, rank=r, seed=0, offset=0, lr=0.3, core=core, transport=True)
    _assert_guards(x_buffer)
    _assert_guards(g_buffer)
    assert not x.isnan().any() and not g.isnan().any()
    scale = TOLERANCE[dtype] * max(1.0, g0.abs().max().item())
    torch.testing.assert_close(x.double(), want_x, rtol=0, atol=scale)
    torch.testing.assert_close(g.double(), want_g, rtol=0, atol=scale * g0.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("lr", [0.3, 0.003])
def test_float32_large_rank_rotates_in_float64(device, core, lr):
    """float32 X at r > 128: Y in float64 from A in float32, and the rows by Y·X_I in float64 rounded once (lr 0.3:
    ‖M‖_F ~ 8) or, on the CPU, by their float32 increment D·X_I (lr 0.003: ‖M‖_F ~ 0.08; D from the float32
    increment core for QR, fl32 of the float64 Y − I otherwise), as the reference does; the drift stays tiny either
    way."""
    from optim.stiefel._ops import FLOAT64_ROTATION_MIN_RANK

    r = FLOAT64_ROTATION_MIN_RANK + 21
    x = _point((400, 60), torch.float32, device)
    x_reference = x.cpu().clone()
    generator = torch.Generator().manual_seed(4)
    for step in range(20):
        g = torch.randn(400, 60, generator=generator)
        STEP(x, g.to(device), None, rank=r, seed=3, offset=step * r, lr=lr, core=core, transport=False)
        rsdm_step_reference(x_reference, g, None, rank=r, seed=3, offset=step * r, lr=lr, core=core,
                            transport=False)
    torch.testing.assert_close(x.cpu(), x_reference, rtol=0, atol=1e-6)
    assert distance_to_manifold(x).item() < 1e-6  # float32 throughout: 3e-6 (qr, cayley) to 3e-5 (exp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", CORES)
def test_only_the_sampled_rows_move_and_given_indices_agree(device, core):
    shape, r = (5, 50, 6), 8
    x0 = _point(shape, torch.float64, device)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    indices = torch.empty(5, r, dtype=torch.int64, device=device)
    SAMPLE(indices, 50, 3, 11)
    sampled, given = x0.clone(), x0.clone()
    STEP(sampled, g, None, rank=r, seed=3, offset=11, lr=0.5, core=core, transport=False)
    STEP(given, g, indices, rank=r, seed=0, offset=0, lr=0.5, core=core, transport=False)
    torch.testing.assert_close(sampled, given, rtol=0, atol=1e-13)
    moved = (sampled - x0).abs().amax(-1) > 0
    rows = torch.zeros_like(moved)
    rows.scatter_(1, indices, True)
    assert not (moved & ~rows).any(), "a row outside the index set changed"


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_orientation_samples_columns(device):
    """For n < p the op updates columns of the stored matrix: X ← (step of Xᵀ)ᵀ."""
    x = _point((6, 40), torch.float64, device)
    g = torch.randn(6, 40, dtype=torch.float64, device=device)
    xt, gt = x.mT.contiguous(), g.mT.contiguous()
    STEP(x, g, None, rank=9, seed=1, offset=0, lr=0.4, core="cayley", transport=True)
    STEP(xt, gt, None, rank=9, seed=1, offset=0, lr=0.4, core="cayley", transport=True)
    torch.testing.assert_close(x, xt.mT, rtol=0, atol=1e-13)
    torch.testing.assert_close(g, gt.mT, rtol=0, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_step_is_a_rotation_that_transports_the_direction(device):
    """X_I ← Y X_I and G_I ← Y G_I with Y orthogonal: XᵀX and XᵀG are unchanged, and a small step descends."""
    x = _point((60, 5), torch.float64, device)
    g = torch.randn(60, 5, dtype=torch.float64, device=device)
    before_xg = x.mT @ g
    direction = g.clone()
    STEP(x, direction, None, rank=20, seed=4, offset=0, lr=1e-3, core="qr", transport=True)
    torch.testing.assert_close(x.mT @ direction, before_xg, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = _point((8, 30), torch.float64, device)
    x = base.mT  # (30, 8), not contiguous
    g = torch.randn(8, 30, dtype=torch.float64, device=device).mT
    want_x, want_g = x.clone(), g.clone()
    STEP(x, g, None, rank=6, seed=2, offset=1, lr=0.3, core="exp", transport=True)
    rsdm_step_reference(want_x, want_g, None, rank=6, seed=2, offset=1, lr=0.3, core="exp", transport=True)
    torch.testing.assert_close(base.mT, want_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, want_g, rtol=0, atol=1e-12)


def _laid_out(values: torch.Tensor, layout: str):
    """``values`` (a fresh copy) in one of the memory layouts a parameter can have, inside a NaN-filled buffer:
    ``column`` (each matrix column-major, as a QR factor), ``batch-last`` (the batch dimension innermost: dense, not
    contiguous) or ``strided`` (every other column of a wider matrix: not dense)."""
    shape = values.shape
    if layout == "column":
        permuted = (*range(len(shape) - 2), len(shape) - 1, len(shape) - 2)
        view, buffer = _guarded(values.permute(permuted).contiguous())
        return view.permute(permuted), buffer
    if layout == "batch-last":
        permuted = (*range(1, len(shape)), 0)
        view, buffer = _guarded(values.permute(permuted).contiguous())
        return view.permute(len(shape) - 1, *range(len(shape) - 1)), buffer
    wide, buffer = _guarded(torch.full((*shape[:-1], 2 * shape[-1]), float("nan"), dtype=values.dtype,
                                       device=values.device))
    view = wide[..., ::2]
    view.copy_(values)
    return view, buffer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["column", "batch-last", "strided"])
@pytest.mark.parametrize("shape, r", [((120, 120), 40), ((2, 30, 8), 6), ((3, 8, 30), 7), ((50, 20), 30)], ids=str)
def test_any_memory_layout_is_stepped_in_place(device, dtype, layout, shape, r):
    """X and G with their own (different) strides: the step equals the reference's on contiguous copies, writes X in
    place (views of it see the step) and nothing outside the matrices."""
    if layout == "batch-last" and len(shape) == 2:
        pytest.skip("a single matrix has no batch dimension")
    x0 = _point(shape, dtype, device)
    g0 = torch.randn(shape, dtype=dtype, device=device)
    g_layout = {"column": "strided", "batch-last": "column", "strided": "column"}[layout]
    lr = 0.4 / max(1.0, g0.abs().max().item())
    for core in CORES:
        for transport in (False, True):
            x, x_buffer = _laid_out(x0, layout)
            g, g_buffer = _laid_out(g0, g_layout)
            pointer = x.data_ptr()
            want_x, want_g = x0.double().clone(), g0.double().clone()
            STEP(x, g, None, rank=r, seed=5, offset=3, lr=lr, core=core, transport=transport)
            rsdm_step_reference(want_x, want_g, None, rank=r, seed=5, offset=3, lr=lr, core=core, transport=transport)
            assert x.data_ptr() == pointer
            _assert_guards(x_buffer)
            _assert_guards(g_buffer)
            torch.testing.assert_close(x.double(), want_x, rtol=0, atol=TOLERANCE[dtype])
            assert not torch.equal(x, x0.to(x.dtype)), "the step must move X"
            if transport:
                torch.testing.assert_close(g.double(), want_g, rtol=0, atol=TOLERANCE[dtype] * 10)
            else:
                assert torch.equal(g, g0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("indices", [False, True])
def test_opcheck(device, indices):
    x = _point((2, 20, 5), torch.float32, device)
    g = torch.randn(2, 20, 5, device=device)
    idx = torch.tensor([[0, 3, 7], [1, 2, 19]], device=device) if indices else None
    torch.library.opcheck(STEP.default, args=(x, g, idx),
                          kwargs=dict(rank=3, seed=1, offset=2, lr=0.1, core="cayley", transport=True))
    out = torch.empty(3, 4, dtype=torch.int64, device=device)
    torch.library.opcheck(SAMPLE.default, args=(out, 10, 5, 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", ["kernel", "reference"])
def test_bad_input_is_rejected_and_nothing_changes(device, implementation):
    step = STEP if implementation == "kernel" else rsdm_step_reference
    x = _point((20, 4), torch.float32, device)
    g = torch.randn(20, 4, device=device)
    x0, g0 = x.clone(), g.clone()
    args = dict(seed=0, offset=0, lr=0.1, core="qr", transport=True)
    with pytest.raises(ValueError, match="rank must be in"):
        step(x, g, None, **{**args, "rank": 21})
    with pytest.raises(ValueError, match="rank must be in"):
        step(x, g, None, **{**args, "rank": 0})
    with pytest.raises(ValueError, match="core must be one of"):
        step(x, g, None, **{**args, "rank": 3, "core": "svd"})
    with pytest.raises(ValueError, match="float32 or float64"):
        step(x.bfloat16(), g.bfloat16(), None, **{**args, "rank": 3})
    with pytest.raises(ValueError, match="matrix"):
        step(x[:, 0], g[:, 0], None, **{**args, "rank": 3})
    with pytest.raises(ValueError, match="must match"):
        step(x, g[:10], None, **{**args, "rank": 3})
    with pytest.raises(ValueError, match="lr must be finite"):
        step(x, g, None, **{**args, "rank": 3, "lr": float("nan")})
    with pytest.raises(ValueError, match="equal rank"):
        step(x, g, torch.tensor([0, 1], device=device), **{**args, "rank": 3})
    assert torch.equal(x, x0) and torch.equal(g, g0)


# (shape of X, indices, the message of the first bad entry in row-major order: a value outside [0, max(n, p)), or a
# row repeated within its matrix). On CUDA an index outside would be an illegal address (the kernel would poison the
# CUDA context of the whole test process), so the check must come before any launch.
BAD_INDICES = [
    pytest.param((20, 4), [1, 5, 1], "indices[0] holds row 1 twice", id="repeat"),
    pytest.param((20, 4), [1, 5, 20], "indices[0] holds 20, outside [0, 20)", id="too-large"),
    pytest.param((20, 4), [-1, 5, 2], "indices[0] holds -1, outside [0, 20)", id="negative"),
    pytest.param((4, 20), [3, 19, 3], "indices[0] holds row 3 twice", id="n<p-repeat"),  # columns, N = 20
    pytest.param((4, 20), [3, 19, 2**40], "indices[0] holds 1099511627776, outside [0, 20)", id="n<p-huge"),
    # the first bad entry decides: a repeat before a value outside, and the other way round, in a later matrix
    pytest.param((3, 20, 4), [[0, 1, 2], [7, 7, 99], [0, 1, 2]], "indices[1] holds row 7 twice", id="repeat-first"),
    pytest.param((3, 20, 4), [[0, 1, 2], [7, 99, 7], [0, 1, 2]], "indices[1] holds 99, outside [0, 20)",
                 id="outside-first"),
    pytest.param((3, 20, 4), [[0, 1, 2], [4, 3, 4], [5, 5, -2]], "indices[1] holds row 4 twice",
                 id="earlier-matrix-first"),
    # on CUDA the fused path (70 matrices) and the gemm path (r·P = 100·400 > 32768) check alike
    pytest.param((70, 30, 6), [[0, 1, 2]] * 69 + [[3, 31, 1]], "indices[69] holds 31, outside [0, 30)",
                 id="fused-path"),
    pytest.param((600, 400), list(range(99)) + [598], None, id="gemm-path-valid"),
    pytest.param((600, 400), list(range(99)) + [600], "indices[0] holds 600, outside [0, 600)",
                 id="gemm-path-outside"),
    pytest.param((600, 400), list(range(99)) + [50], "indices[0] holds row 50 twice", id="gemm-path-repeat"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, rows, message", BAD_INDICES)
def test_bad_indices_are_rejected_with_the_same_message_and_nothing_changes(device, shape, rows, message):
    x = _point(shape, torch.float64, device)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    indices = torch.tensor(rows, device=device)
    r = indices.shape[-1]
    x0, g0 = x.clone(), g.clone()
    args = dict(rank=r, seed=0, offset=0, lr=0.1, core="qr", transport=True)
    if message is None:  # a valid set of the same shape: the check must not reject it
        STEP(x, g, indices, **args)
        assert not torch.equal(x, x0)
        return
    messages = []
    for step in (STEP, rsdm_step_reference):
        with pytest.raises(ValueError) as error:
            step(x, g, indices, **args)
        messages.append(str(error.value).splitlines()[0])
        assert torch.equal(x, x0) and torch.equal(g, g0), f"{step} wrote before rejecting the indices"
    assert messages[0] == messages[1], "the kernel and the reference must say the same"
    assert messages[0].startswith(f"rsdm_step_: {message}"), messages[0]
    if device == "cuda":
        torch.cuda.synchronize()  # the context is still usable


def test_multithreaded_cpu_kernel_matches_reference():
    """A batch large enough to be split over threads (the other tests run on one thread, see conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = _point((300, 24, 6), torch.float64, "cpu")
        g = torch.randn(300, 24, 6, dtype=torch.float64)
        want_x, want_g = x.clone(), g.clone()
        STEP(x, g, None, rank=9, seed=1, offset=0, lr=0.2, core="qr", transport=True)
        rsdm_step_reference(want_x, want_g, None, rank=9, seed=1, offset=0, lr=0.2, core="qr", transport=True)
        torch.testing.assert_close(x, want_x, atol=1e-12, rtol=0)
        torch.testing.assert_close(g, want_g, atol=1e-11, rtol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("core", CORES)
def test_tiny_steps_near_convergence_match_reference_and_keep_the_callers_float_mode(core):
    """Near convergence Ω ~ 1e-8, where the CPU core's intermediate products fall below float32's smallest normal
    number; the kernel flushes them (a scoped FTZ/DAZ, for speed) and must still match the reference, and must leave
    subnormal arithmetic in the caller's thread as it was."""
    x = _point((120, 60), torch.float32, "cpu")
    g = (torch.randn(120, 60, dtype=torch.float64) * 1e-8).float()
    rows = torch.arange(0, 120, 3)
    want_x = x.double()
    rsdm_step_reference(want_x, g.double(), rows, rank=40, seed=0, offset=0, lr=0.2, core=core, transport=False)
    STEP(x, g, rows, rank=40, seed=0, offset=0, lr=0.2, core=core, transport=False)
    torch.testing.assert_close(x.double(), want_x, atol=3e-7, rtol=0)
    subnormal = torch.tensor([1e-38], dtype=torch.float32) * torch.tensor([1e-3], dtype=torch.float32)
    assert subnormal.item() != 0.0, "the op changed the caller's floating-point mode (subnormals flushed)"


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("shape", [(120, 80), (80, 120), (3, 64, 64)])
def test_float32_near_square_rotates_in_float64_on_the_cpu(core, shape):
    """On the CPU, float32 X with 2·P >= N rotates its rows in float64 at every r, as the reference does: the kernel
    and the reference agree to float64 rounding of the result, and the drift stays at float32 storage's."""
    from optim.stiefel._ops import rotates_in_float64

    r = 16
    assert rotates_in_float64(torch.float32, r, max(shape[-2:]), min(shape[-2:]), torch.device("cpu"), core=core)
    assert not rotates_in_float64(torch.float32, r, 2 * min(shape[-2:]) + 1, min(shape[-2:]), torch.device("cpu"),
                                  core=core)
    x = _point(shape, torch.float32, "cpu")
    x_reference = x.clone()
    generator = torch.Generator().manual_seed(5)
    for step in range(20):
        g = torch.randn(shape, generator=generator)
        STEP(x, g, None, rank=r, seed=3, offset=step * r, lr=0.3, core=core, transport=False)
        rsdm_step_reference(x_reference, g, None, rank=r, seed=3, offset=step * r, lr=0.3, core=core,
                            transport=False)
    torch.testing.assert_close(x, x_reference, rtol=0, atol=1e-6)
    assert distance_to_manifold(x).max().item() < 2e-6


@pytest.mark.parametrize("r", [5, 40, 150])
def test_qr_increment_reference_is_the_q_factor_minus_identity(r):
    """The increment CholeskyQR (Q − I without forming I + M) equals the sign-fixed Householder Q − I in float64, and
    in float32 it keeps Q's orthogonality at the rounding of Q − I rather than of Q."""
    from optim.stiefel._ops import _core_reference, qr_increment_reference

    generator = torch.Generator().manual_seed(r)
    eye = torch.eye(r, dtype=torch.float64)
    for norm in (0.01, 0.5, 2.0):
        a = torch.randn(3, r, r, dtype=torch.float64, generator=generator)
        m = a - a.mT
        m = m * (norm / torch.linalg.matrix_norm(m))[..., None, None]
        want = _core_reference(m, "qr") - eye
        torch.testing.assert_close(qr_increment_reference(m), want, rtol=0, atol=1e-13 * max(1.0, norm))
        m32 = m.float()
        d32 = qr_increment_reference(m32).double()
        q64 = _core_reference(m32.double(), "qr") - eye
        defect = torch.linalg.matrix_norm((eye + d32).mT @ (eye + d32) - eye)
        householder32 = _core_reference(m32, "qr").double()
        householder_defect = torch.linalg.matrix_norm(householder32.mT @ householder32 - eye)
        # measured: the increment's defect 2–4× that of fl32(Q64 − I), and 5–60× below float32 Householder's
        assert (defect <= 20 * 6e-8 * norm).all(), (norm, defect)
        assert (defect < householder_defect).all(), (norm, defect, householder_defect)
        torch.testing.assert_close(d32, q64, rtol=0, atol=2e-7 * norm)


def test_which_float32_matrices_rotate_accurately():
    """CPU: r >= CPU_ACCURATE_ROTATION_MIN_RANK (qr, cayley), or 2·P >= N, or r > 128; CUDA: r > 128; float64
    never."""
    from optim.stiefel._ops import CPU_ACCURATE_ROTATION_MIN_RANK, FLOAT64_ROTATION_MIN_RANK, rotates_in_float64

    cpu, cuda, low = torch.device("cpu"), torch.device("cuda"), CPU_ACCURATE_ROTATION_MIN_RANK
    for core in CORES:
        assert rotates_in_float64(torch.float32, low, 1000, 100, cpu, core=core) == (core != "exp")
        assert not rotates_in_float64(torch.float32, low - 1, 1000, 100, cpu, core=core)
        assert rotates_in_float64(torch.float32, low - 1, 200, 100, cpu, core=core)
        assert rotates_in_float64(torch.float32, FLOAT64_ROTATION_MIN_RANK, 1000, 100, cpu, core=core)
        assert not rotates_in_float64(torch.float32, FLOAT64_ROTATION_MIN_RANK - 1, 1000, 100, cuda, core=core)
        assert rotates_in_float64(torch.float32, FLOAT64_ROTATION_MIN_RANK, 1000, 100, cuda, core=core)
        assert not rotates_in_float64(torch.float64, FLOAT64_ROTATION_MIN_RANK, 1000, 1000, cpu, core=core)


@pytest.mark.parametrize("shape, r", [((120, 80), 16), ((80, 120), 40), ((3, 64, 64), 30), ((600, 40), 32),
                                      ((400, 200), 150)])
def test_float32_small_steps_move_by_the_increment_core(shape, r):
    """On the CPU, float64-rotated float32 steps with ‖M‖_F <= INCREMENT_MAX_NORM and the QR core move the rows by
    X_I + D·X_I with D from the float32 increment core (the row-loop solve at r <= 128, LAPACK's above), as the
    reference does; the steps here are scaled to ‖M‖_F = 1.5 so that this path, not the float64 product, is taken."""
    from optim.stiefel._ops import INCREMENT_MAX_NORM, rotates_in_float64

    n_rows, n_cols = max(shape[-2:]), min(shape[-2:])
    assert rotates_in_float64(torch.float32, r, n_rows, n_cols, torch.device("cpu"), core="qr")
    x = _point(shape, torch.float32, "cpu")
    x_reference = x.clone()
    x_float64 = x.double()
    generator = torch.Generator().manual_seed(6)
    indices = torch.empty(*shape[:-2], r, dtype=torch.int64)
    for step in range(10):
        g = torch.randn(shape, generator=generator)
        SAMPLE(indices, n_rows, 3, step * r)
        flip = shape[-2] < shape[-1]
        xo, go = (x.mT, g.mT) if flip else (x, g)
        gather = indices.unsqueeze(-1).expand(*indices.shape, n_cols)
        a = (torch.gather(go, -2, gather) @ torch.gather(xo, -2, gather).mT).double()
        lr = 1.5 / torch.linalg.matrix_norm(0.5 * (a - a.mT)).max().item()
        norms = torch.linalg.matrix_norm(lr * 0.5 * (a - a.mT))
        assert (norms <= INCREMENT_MAX_NORM).all() and (norms > 0.5).all()
        STEP(x, g, indices, rank=r, seed=0, offset=0, lr=lr, core="qr", transport=False)
        rsdm_step_reference(x_reference, g, indices, rank=r, seed=0, offset=0, lr=lr, core="qr", transport=False)
        rsdm_step_reference(x_float64, g.double(), indices, rank=r, seed=0, offset=0, lr=lr, core="qr",
                            transport=False)
    torch.testing.assert_close(x, x_reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.double(), x_float64, rtol=0, atol=3e-6)
    assert distance_to_manifold(x).max().item() < 2e-6


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("core", CORES)
def test_gathered_rows_keep_the_whole_matrix_rounding_rule(device, dtype, core):
    """FSDP2's RSDM step runs the op on the r gathered rows inside a matrix of ``gathered_height`` rows: at least r
    and P tall, and rotating in float64 exactly where the whole N×P matrix does (or its rounding would differ from
    one process's)."""
    from optim.stiefel._ops import rotates_in_float64
    from optim.stiefel.sharded import gathered_height

    device = torch.device(device)
    for n_rows in (8, 40, 100, 257, 1000):
        for n_cols in sorted({1, 3, n_rows // 3, n_rows // 2, n_rows // 2 + 1, n_rows}):
            for rank in sorted({1, 16, 23, 24, 64, 128, 129, 200} & set(range(1, n_rows + 1))):
                height = gathered_height(dtype, rank, n_rows, n_cols, device, core)
                assert height >= max(rank, n_cols)
                assert rotates_in_float64(dtype, rank, height, n_cols, device, core=core) == \
                    rotates_in_float64(dtype, rank, n_rows, n_cols, device, core=core), (rank, n_rows, n_cols, height)
