"""Bad values given to the raw ops (found by a hostile-input sweep of ``torch.ops.optim.*``): the plain-PyTorch
reference and the compiled CPU kernel both refuse them with the same ValueError, naming the argument, before
anything is written. And the values that look odd but are part of an op's contract (negative int64 seeds) are
accepted by both alike."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.fused._ops import add_to_counts_reference, fused_adamw_reference
from optim.hessian._ops import (cross_entropy_hvp_reference, fused_adahessian_reference, fused_sophia_reference,
                                rademacher_reference)
from optim.stiefel._ops import rsdm_sample_rows_reference, rsdm_step_reference

F64 = dict(dtype=torch.float64)
IMPLEMENTATIONS = ["reference", "kernel"]
REFERENCES = {"add_to_counts_": add_to_counts_reference, "fused_adamw_": fused_adamw_reference,
              "fused_adahessian_": fused_adahessian_reference, "cross_entropy_hvp": cross_entropy_hvp_reference,
              "fused_sophia_": fused_sophia_reference, "rademacher_": rademacher_reference,
              "rsdm_sample_rows_": rsdm_sample_rows_reference, "rsdm_step_": rsdm_step_reference}


def implementation(op: str, which: str):
    return REFERENCES[op] if which == "reference" else getattr(torch.ops.optim, op)


# --- the calls: (op, args, kwargs); every tensor of args is snapshotted ----------------------------------------------

def counts_call(counts, value=1.0):
    return "add_to_counts_", (counts, value), {}


def adamw_call(steps, reset=None):
    p = [torch.randn(3, **F64) for _ in steps]
    lists = (p, [torch.randn_like(t) for t in p], [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p],
             [torch.tensor(float(s)) for s in steps])
    return "fused_adamw_", lists, dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False,
                                       reset=reset)


def adahessian_call(eps=1e-4, step=2, hessian_step=1):
    p = [torch.randn(4, **F64), torch.randn(2, 3, **F64)]
    lists = (p, [torch.randn_like(t) for t in p], [torch.randn_like(t) for t in p], [torch.zeros_like(t) for t in p],
             [])
    return "fused_adahessian_", lists, dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=eps,
                                            hessian_power=1.0, step=step, hessian_step=hessian_step, maximize=False)


def cross_entropy_call(target, ignore_index=-100, classes=5):
    logits = torch.randn(*target.shape, classes, **F64)
    return "cross_entropy_hvp", (logits, torch.randn_like(logits), 0.5, target, ignore_index), {}


BAD = {
    "counts: NaN value": (lambda: counts_call([torch.zeros(())], float("nan")),
                          r"add_to_counts_: value must be a finite number >= 0 \(a count only grows\), got nan"),
    "counts: negative value": (lambda: counts_call([torch.zeros(())], -1.0),
                               r"add_to_counts_: value must be a finite number >= 0"),
    "counts: infinite value": (lambda: counts_call([torch.zeros(())], float("inf")),
                               r"add_to_counts_: value must be a finite number >= 0"),
    "counts: two elements": (lambda: counts_call([torch.zeros(()), torch.zeros(2)]),
                             r"add_to_counts_: counts\[1\] has 2 elements; every count must be a tensor with one"),
    "counts: one tensor twice": (lambda: (lambda c: counts_call([torch.zeros(1), c, c]))(torch.zeros(())),
                                 r"add_to_counts_: counts\[1\] and counts\[2\] share memory"),
    "counts: a view of another": (lambda: (lambda c: counts_call([c, c[0]]))(torch.zeros(1)),
                                  r"add_to_counts_: counts\[0\] and counts\[1\] share memory"),
    "counts: float32 at 2**24": (lambda: counts_call([torch.zeros(()), torch.tensor(2.0**24)]),
                                 r"add_to_counts_: counts\[1\] would pass 2\*\*24 with this increment; torch.float32 "
                                 r"holds whole numbers exactly only up to 2\*\*24"),
    "counts: float32 past 2**24": (lambda: counts_call([torch.tensor(2.0**24 + 2)], 1.0),
                                   r"counts\[0\] would pass 2\*\*24"),
    "counts: a jump past 2**24": (lambda: counts_call([torch.tensor(2.0**24 - 1)], 2.0),
                                  r"counts\[0\] would pass 2\*\*24"),
    "counts: bfloat16 at 2**8": (lambda: counts_call([torch.tensor(256.0, dtype=torch.bfloat16)]),
                                 r"counts\[0\] would pass 2\*\*8 with this increment; torch.bfloat16"),
    "adamw: negative step": (lambda: adamw_call([3, -5]),
                             r"fused_adamw_: state_steps\[1\] is negative or NaN; a step count is the number of "
                             r"steps taken so far and must be >= 0"),
    "adamw: NaN step": (lambda: adamw_call([float("nan")]), r"fused_adamw_: state_steps\[0\] is negative or NaN"),
    "adahessian: eps 0": (lambda: adahessian_call(eps=0.0), r"fused_adahessian_: eps must be a finite number > 0"),
    "adahessian: hessian_step > step": (lambda: adahessian_call(step=2, hessian_step=3),
                                        r"fused_adahessian_: hessian_step=3 exceeds step=2; the curvature is "
                                        r"refreshed at most once per step"),
    "cross entropy: target = classes": (lambda: cross_entropy_call(torch.tensor([0, 4, 5, -100])),
                                        r"cross_entropy_hvp: target holds class index 5, outside \[0, 5\) for logits "
                                        r"with 5 classes; give every row a class index in range, or "
                                        r"ignore_index=-100 for a row without a loss"),
    "cross entropy: negative target": (lambda: cross_entropy_call(torch.tensor([[1, -100], [-1, 7]])),
                                       r"target holds class index -1, outside \[0, 5\)"),
    "cross entropy: -100 not ignored": (lambda: cross_entropy_call(torch.tensor([-100, 2]), ignore_index=-1),
                                        r"target holds class index -100, outside \[0, 5\).*ignore_index=-1 for"),
}


def snapshot(args):
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
    return tensors, [t.clone() for t in tensors]


@pytest.mark.parametrize("which", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_is_refused_and_nothing_changes(case, which):
    make, message = BAD[case]
    op, args, kwargs = make()
    tensors, before = snapshot(args)
    with pytest.raises(ValueError, match=message):
        implementation(op, which)(*args, **kwargs)
    assert all(torch.equal(t, b) or (t.isnan().all() and b.isnan().all()) for t, b in zip(tensors, before))


@pytest.mark.parametrize("case", list(BAD))
def test_reference_and_kernel_give_the_same_message(case):
    messages = []
    for which in IMPLEMENTATIONS:
        op, args, kwargs = BAD[case][0]()
        with pytest.raises(ValueError) as error:
            implementation(op, which)(*args, **kwargs)
        messages.append(str(error.value))
    messages = [m.rsplit(", got ", 1)[0] for m in messages]  # a float given: Python prints -1.0, C++ -1
    assert messages[0] == messages[1]


# --- the edges that stay valid ---------------------------------------------------------------------------------------

GOOD = {
    "counts: float32 up to 2**24": lambda: counts_call([torch.tensor(2.0**24 - 1)]),
    "counts: float64 past 2**24": lambda: counts_call([torch.tensor(2.0**24, **F64), torch.zeros((1, 1))], 3.0),
    "counts: value 0": lambda: counts_call([torch.tensor(2.0**24)], 0.0),
    "counts: empty list": lambda: counts_call([], 1.0),
    "adamw: a negative step that is reset": lambda: adamw_call([3, -5], reset=[False, True]),
    "adamw: step 0": lambda: adamw_call([0, 0]),
    "adahessian: hessian_step = step": lambda: adahessian_call(step=2, hessian_step=2),
    "cross entropy: targets in range and ignored": lambda: cross_entropy_call(torch.tensor([0, 4, -100, 2])),
    "cross entropy: ignore_index -1": lambda: cross_entropy_call(torch.tensor([-1, 3]), ignore_index=-1),
    "cross entropy: ignore_index inside the classes": lambda: cross_entropy_call(torch.tensor([2, 3]), ignore_index=2),
    "cross entropy: no rows": lambda: cross_entropy_call(torch.zeros(0, dtype=torch.int64)),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_the_valid_edges_are_accepted_alike(case):
    """Both implementations run on the same inputs and give the same output and the same written tensors."""
    results = []
    for which in IMPLEMENTATIONS:
        torch.manual_seed(0)
        op, args, kwargs = GOOD[case]()
        out = implementation(op, which)(*args, **kwargs)
        results.append((out, snapshot(args)[0]))
    (out_ref, ref), (out_kernel, kernel) = results
    if out_ref is not None:
        torch.testing.assert_close(out_kernel, out_ref, rtol=1e-12, atol=1e-14)
    for got, want in zip(kernel, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_counts_reach_two_to_the_24_exactly_and_stop_there():
    for which in IMPLEMENTATIONS:
        count = torch.tensor(2.0**24 - 2)
        add = implementation("add_to_counts_", which)
        add([count], 1.0)
        add([count], 1.0)
        assert float(count) == 2.0**24
        with pytest.raises(ValueError, match=r"would pass 2\*\*24"):
            add([count], 1.0)
        assert float(count) == 2.0**24


# --- seeds: any int64 (its 64 bits), negative ones included -------------------------------------------------------

def test_negative_seeds_are_valid_and_the_kernels_agree_with_the_references():
    """Seeds are the 64 bits of an int64 (the second-order optimizers pass hashed per-step seeds, negative half of
    the time): a negative seed draws as its two's-complement bits, the same in the reference and the kernel."""
    for seed in (-5, -1, -(2**63)):
        want, got = torch.empty(37, **F64), torch.empty(37, **F64)
        rademacher_reference([want], seed, 3)
        torch.ops.optim.rademacher_([got], seed, 3)
        assert torch.equal(got, want) and set(got.tolist()) == {-1.0, 1.0}

        want, got = torch.empty(4, 3, dtype=torch.int64), torch.empty(4, 3, dtype=torch.int64)
        rsdm_sample_rows_reference(want, 10, seed, 7)
        torch.ops.optim.rsdm_sample_rows_(got, 10, seed, 7)
        assert torch.equal(got, want)

        x = torch.linalg.qr(torch.randn(2, 9, 4, **F64)).Q
        g = torch.randn_like(x)
        xs, gs = [x.clone(), x.clone()], [g.clone(), g.clone()]
        step = dict(rank=3, seed=seed, offset=0, lr=0.1, core="qr", transport=False)
        rsdm_step_reference(xs[0], gs[0], None, **step)
        torch.ops.optim.rsdm_step_(xs[1], gs[1], None, **step)
        torch.testing.assert_close(xs[1], xs[0], rtol=1e-12, atol=1e-12)

        p = [torch.randn(5, **F64), torch.randn(2, 2, **F64)]
        runs = []
        for implementation_ in (fused_sophia_reference, torch.ops.optim.fused_sophia_):
            lists = ([t.clone() for t in p], [t.clone() * 0.5 for t in p], [torch.zeros_like(t) for t in p],
                     [torch.zeros_like(t) for t in p], [t.clone() + 1 for t in p], [])
            implementation_(*lists, lr=1e-2, beta1=0.9, beta2=0.99, rho=0.04, weight_decay=0.0, eps=1e-12,
                            maximize=False, probe_seeds=[seed, seed], probe_offsets=[0, 5])
            runs.append(lists)
        for want_list, got_list in zip(*runs):
            for want_t, got_t in zip(want_list, got_list):
                torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-14)


def test_the_kernels_under_test_are_compiled():
    assert all(optim.has_kernel(op, "cpu") for op in REFERENCES)
