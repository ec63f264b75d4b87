"""Raw ops given a written tensor that overlaps itself (``expand()``) or another argument raise a ValueError before
writing anything, with the same message from the plain-PyTorch reference (optim/_overlap.py) and the compiled
kernel (csrc/common/checks.h). Issue 16: the kernels wrote the other tensors and the step counts, then raised
torch's generic overlap error."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.fused._ops import fused_adamw_reference
from optim.hessian._ops import fused_adahessian_reference, fused_sophia_reference, rademacher_reference
from optim.lowrank._ops import lowrank_refactorize_reference
from optim.stiefel import orthogonal_
from optim.stiefel._ops import rsdm_sample_rows_reference, rsdm_step_reference

F64 = dict(dtype=torch.float64)


def adamw_args(bad):
    p = [torch.randn(3, 2, **F64), torch.randn(4, **F64)]
    g = [torch.randn_like(t) for t in p]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    steps = [torch.zeros(()) for _ in p]
    if bad == "expanded":
        m[1] = torch.zeros(1, **F64).expand(4)
    elif bad == "aliased":
        v[0] = m[0]
    else:  # a step count shared by two parameters
        steps[1] = steps[0]
    return (p, g, m, v, steps), dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)


def sophia_args(bad):
    p = [torch.randn(5, **F64), torch.randn(2, 3, **F64)]
    g = [torch.randn_like(t) for t in p]
    m = [torch.zeros_like(t) for t in p]
    h = [torch.zeros_like(t) for t in p]
    hz = [torch.randn_like(t) for t in p]
    if bad == "expanded":
        p[1] = torch.randn(1, 3, **F64).expand(2, 3)
    elif bad == "aliased":
        h[1] = m[1]
    else:  # the parameter written through its own gradient's memory
        p[0] = g[0]
    return (p, g, m, h, hz, []), dict(lr=1e-3, beta1=0.9, beta2=0.99, rho=0.04, weight_decay=0.0, eps=1e-12,
                                      maximize=False)


def adahessian_args(bad):
    p = [torch.randn(5, **F64)]
    g = [torch.randn_like(p[0])]
    m, v, d = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])], [torch.randn_like(p[0])]
    if bad == "expanded":
        v[0] = torch.zeros(1, **F64).expand(5)
    elif bad == "aliased":
        m[0] = p[0][:]  # a view of the parameter
    else:
        d[0] = m[0]
    return (p, g, m, v, d), dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-4, hessian_power=1.0,
                                 step=1, hessian_step=1, maximize=False)


def rsdm_args(bad):
    x = orthogonal_(torch.empty(2, 6, 3, **F64))
    g = torch.randn_like(x)
    if bad == "expanded":
        x = orthogonal_(torch.empty(1, 6, 3, **F64)).expand(2, 6, 3)
    elif bad == "aliased":
        g = x
    else:  # G read-only (no transport) but X written over it
        g = x[:]
    return (x, g, None), dict(rank=2, seed=0, offset=0, lr=0.1, core="qr", transport=bad == "aliased")


def sample_rows_args(bad):
    out = torch.zeros(1, 1, dtype=torch.int64).expand(2, 3)
    return (out, 6, 0, 0), {}


def refactorize_args(bad):
    b = [torch.randn(6, 2, **F64), torch.randn(6, 2, **F64)]
    a = [torch.randn(2, 5, **F64), torch.randn(2, 5, **F64)]
    if bad == "expanded":
        b[1] = torch.randn(6, 1, **F64).expand(6, 2)
    elif bad == "aliased":
        a[1] = a[0]
    else:  # A[0] written over B[0]'s memory
        storage = torch.randn(100, **F64)
        b[0], a[0] = storage[:12].view(6, 2), storage[5:15].view(2, 5)
    return (b, a), {}


def rademacher_args(bad):
    out = [torch.zeros(4, **F64), torch.zeros(1, **F64).expand(3)] if bad == "expanded" else [torch.zeros(4, **F64)]
    if bad != "expanded":
        out.append(out[0][1:3])
    return (out, 0, 0), {}


OPS = {
    "fused_adamw_": (fused_adamw_reference, adamw_args, ("expanded", "aliased", "shared step")),
    "fused_sophia_": (fused_sophia_reference, sophia_args, ("expanded", "aliased", "param over grad")),
    "fused_adahessian_": (fused_adahessian_reference, adahessian_args, ("expanded", "aliased", "read over written")),
    "rsdm_step_": (rsdm_step_reference, rsdm_args, ("expanded", "aliased", "G under X")),
    "rsdm_sample_rows_": (rsdm_sample_rows_reference, sample_rows_args, ("expanded",)),
    "lowrank_refactorize_": (lowrank_refactorize_reference, refactorize_args, ("expanded", "aliased",
                                                                               "overlapping views")),
    "rademacher_": (rademacher_reference, rademacher_args, ("expanded", "aliased")),
}
CASES = [(op, bad) for op, (_, _, bads) in OPS.items() for bad in bads]


def tensors_of(args):
    for arg in args:
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from (t for t in arg if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("op, bad", CASES, ids=[f"{op}-{bad}" for op, bad in CASES])
def test_reference_and_kernel_refuse_overlap_alike_and_write_nothing(op, bad):
    reference, make_args, _ = OPS[op]
    assert optim.has_kernel(op, "cpu"), "the compiled CPU kernel must be the one under test"
    messages = []
    for implementation in (reference, getattr(torch.ops.optim, op)):
        torch.manual_seed(0)
        args, kwargs = make_args(bad)
        before = [t.clone() for t in tensors_of(args)]
        with pytest.raises(ValueError) as error:
            implementation(*args, **kwargs)
        assert all(torch.equal(t, b) for t, b in zip(tensors_of(args), before)), "a tensor was written"
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert ("internally overlapping" if bad == "expanded" else "share memory") in messages[0]


def test_read_only_tensors_may_share_memory():
    """Only what an op writes must be separate: one gradient tensor read for two parameters is fine."""
    p = [torch.randn(4, **F64), torch.randn(4, **F64)]
    shared = torch.randn(4, **F64)
    for implementation in (fused_adamw_reference, torch.ops.optim.fused_adamw_):
        implementation([t.clone() for t in p], [shared, shared], [torch.zeros(4, **F64) for _ in p],
                       [torch.zeros(4, **F64) for _ in p], [torch.zeros(()) for _ in p], lr=1e-3, beta1=0.9,
                       beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)


# ------------------------------------------------------------------------------- a step of several op calls (sweep)

def stepped(cls, groups, **kwargs):
    """An optimizer over ``groups`` (lists of parameters) after one step, gradients set again."""
    opt = cls([{"params": ps} for ps in groups], **kwargs)
    params = [p for ps in groups for p in ps]
    for p in params:
        p.grad = torch.randn_like(p)
    if cls is optim.SophiaH:
        opt.step(lambda: sum((p ** 2).sum() + (p ** 4).sum() for p in params))
    else:
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return opt, params


def aliased_gradients():
    """(label, edit of the parameters' gradients): a gradient sharing memory with a parameter the step writes, in
    the last group (its op refused it, after the first group's op had written) or across groups (no op saw it)."""
    return [("a gradient aliasing its own parameter", lambda a, b: setattr(b, "grad", b.detach())),
            ("a gradient aliasing a parameter of the other group", lambda a, b: setattr(b, "grad", a.detach()))]


@pytest.mark.parametrize("cls, kwargs", [(optim.AdamW, {}), (optim.SophiaH, dict(seed=0, update_period=10))],
                         ids=["AdamW", "SophiaH"])
@pytest.mark.parametrize("label, alias", aliased_gradients(), ids=["own", "other group"])
def test_a_gradient_sharing_memory_with_a_written_tensor_is_refused_before_any_group_steps(cls, kwargs, label, alias):
    """Issue 16 sweep: the op of the second group raised after the first group's op (and SophiaH's step counts)
    had written; a gradient aliasing another group's parameter was seen by no op and read after it changed."""
    from ._infos import assert_same, snapshot

    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    opt, params = stepped(cls, [[a], [b]], **kwargs)
    alias(a, b)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert_same(before, snapshot(opt))


def test_adamw_keeps_a_pending_reset_when_its_step_raises():
    """The reset flag was popped before the op ran; an op that raised lost the request."""
    a = torch.nn.Parameter(torch.randn(4, 3))
    opt, _ = stepped(optim.AdamW, [[a]])
    opt.reset_moments([a])
    a.grad = a.detach()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert opt.pending_resets() == [a]


def test_adamw_refuses_a_gradient_resized_in_place_before_any_group_steps():
    """``grad.set_()`` bypasses torch's grad setter; the fast check trusted it and the second group's op raised
    after the first group stepped."""
    from ._infos import assert_same, snapshot

    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    opt, _ = stepped(optim.AdamW, [[a], [b]])
    b.grad.set_(torch.randn(4))
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"gradient of parameter 0 of param group 1.*\(4,\).*\(5,\)"):
        opt.step()
    assert_same(before, snapshot(opt))


def _storage_cases():
    """(written, read) lists: each tensor fresh random (never zeros), some sharing storages through views."""
    base, other = torch.randn(6, 4, **F64), torch.randn(5, **F64)
    fresh = [torch.randn(3, **F64) for _ in range(4)]
    empty = torch.empty(0, **F64)
    return [
        ([], []),
        (fresh[:2], fresh[2:]),
        (fresh[:2], [fresh[2], fresh[2][1:]]),  # read tensors sharing among themselves do not count
        ([base[0], base[1]], [other]),  # two written views of one storage
        ([base, other], [base.T]),  # a read view of a written storage
        ([other], [base[2:], base[:1]]),
        ([base[:, 1], fresh[0]], [fresh[1], base[3:, 2:]]),
        ([fresh[0], empty], [torch.empty(0, **F64)]),  # empty storages compare by their (null) pointers too
        ([fresh[0].float(), fresh[1].to(torch.bfloat16)], [fresh[0]]),
    ]


@pytest.mark.parametrize("case", range(len(_storage_cases())))
def test_shares_storage_kernel_matches_reference(case):
    from optim._overlap import shares_storage, shares_storage_reference

    written, read = _storage_cases()[case]
    want = bool(shares_storage_reference(written, read))
    got = shares_storage.default(written, read)
    assert got.dtype == torch.bool and got.shape == () and bool(got) == want
    expected = [False, False, False, True, True, False, True, None, False][case]
    if expected is not None:
        assert want == expected


def test_shares_storage_has_a_cpu_kernel():
    from ..conftest import REQUIRE_EXTENSION

    if not REQUIRE_EXTENSION:
        pytest.skip("OPTIM_REQUIRE_EXTENSION is off: the reference kernel may be what runs")
    assert optim.has_kernel("shares_storage", "cpu")
