"""Property test over the raw ops: for a malformed call (a list of the wrong length, a tensor of the wrong dtype or
shape, an expanded or aliased written tensor) at a random position, the plain-PyTorch reference and the compiled
CPU kernel raise the same exception type with the same message, and neither writes anything."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optim
from optim.fused._ops import fused_adamw_reference
from optim.hessian._ops import fused_adahessian_reference, fused_sophia_reference
from optim.lowrank._ops import lowrank_refactorize_reference

F64 = dict(dtype=torch.float64)


def adamw(n):
    p = [torch.randn(3 + i, **F64) for i in range(n)]
    lists = {"params": p, "grads": [torch.randn_like(t) for t in p], "exp_avgs": [torch.zeros_like(t) for t in p],
             "exp_avg_sqs": [torch.zeros_like(t) for t in p], "state_steps": [torch.zeros(()) for _ in p]}
    return lists, dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)


def sophia(n):
    p = [torch.randn(3 + i, **F64) for i in range(n)]
    lists = {"params": p, "grads": [torch.randn_like(t) for t in p], "exp_avgs": [torch.zeros_like(t) for t in p],
             "hessians": [torch.zeros_like(t) for t in p], "hessian_products": [torch.randn_like(t) for t in p],
             "probes": [torch.ones_like(t) for t in p]}
    return lists, dict(lr=1e-3, beta1=0.9, beta2=0.99, rho=0.04, weight_decay=0.0, eps=1e-12, maximize=False)


def adahessian(n):
    p = [torch.randn(3 + i, **F64) for i in range(n)]
    lists = {"params": p, "grads": [torch.randn_like(t) for t in p], "exp_avgs": [torch.zeros_like(t) for t in p],
             "exp_hessian_diag_sqs": [torch.zeros_like(t) for t in p],
             "hessian_diagonals": [torch.randn_like(t) for t in p]}
    return lists, dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-4, hessian_power=1.0, step=1,
                       hessian_step=1, maximize=False)


def refactorize(n):
    return {"B": [torch.randn(6, 2, **F64) for _ in range(n)], "A": [torch.randn(2, 5, **F64) for _ in range(n)]}, {}


OPS = {
    "fused_adamw_": (fused_adamw_reference, adamw),
    "fused_sophia_": (fused_sophia_reference, sophia),
    "fused_adahessian_": (fused_adahessian_reference, adahessian),
    "lowrank_refactorize_": (lowrank_refactorize_reference, refactorize),
}
WRITTEN = {"fused_adamw_": ("params", "exp_avgs", "exp_avg_sqs"), "fused_sophia_": ("params", "exp_avgs", "hessians"),
           "fused_adahessian_": ("params", "exp_avgs", "exp_hessian_diag_sqs"), "lowrank_refactorize_": ("B", "A")}
KINDS = ("short list", "float32 tensor", "wrong shape", "expanded", "aliased")


def malform(lists, kind, name, i, other):
    tensors = lists[name]
    if kind == "expanded" and tensors[i].dim() == 0:
        kind = "aliased"  # a 0-d tensor has no expanded form
    if kind == "short list":
        lists[name] = tensors[:-1]
    elif kind == "float32 tensor":
        tensors[i] = tensors[i].float()
    elif kind == "wrong shape":
        tensors[i] = torch.zeros(tensors[i].numel() + 1, *tensors[i].shape[1:], **F64)
    elif kind == "expanded":
        tensors[i] = torch.zeros(1, **F64).expand(tensors[i].shape) if tensors[i].dim() == 1 else \
            torch.zeros(1, tensors[i].shape[1], **F64).expand(tensors[i].shape)
    else:  # one tensor given twice: the same memory in two places
        lists[other][i] = tensors[i]


@settings(max_examples=80, deadline=None)
@given(op=st.sampled_from(list(OPS)), kind=st.sampled_from(KINDS), n=st.integers(1, 3), data=st.data())
def test_reference_and_kernel_reject_a_malformed_call_alike(op, kind, n, data):
    reference, make = OPS[op]
    names = list(make(1)[0])
    name = data.draw(st.sampled_from(names[1:] if kind == "short list" else names), label="list")
    other = data.draw(st.sampled_from([m for m in names if m != name]), label="other")
    i = data.draw(st.integers(0, n - 1), label="index")
    outcomes = []
    for implementation in (reference, getattr(torch.ops.optim, op)):
        torch.manual_seed(0)
        lists, kwargs = make(n)
        if kind == "wrong shape" and op == "lowrank_refactorize_" and i == 0:
            i = min(1, n - 1)  # the first pair defines the shapes
        malform(lists, kind, name, i, other)
        if kind == "wrong shape" and op == "lowrank_refactorize_" and i == 0:
            return  # a single pair of another shape is a valid call
        written = [t for tensors in lists.values() for t in tensors]
        before = [t.clone() for t in written]
        try:
            implementation(*lists.values(), **kwargs)
            outcomes.append(None)
        except (ValueError, TypeError, RuntimeError) as error:
            outcomes.append((type(error), str(error)))
        assert all(torch.equal(t, b) for t, b in zip(written, before)) or outcomes[-1] is None, \
            f"{implementation} raised after writing"
    assert outcomes[0] == outcomes[1]
    optional = name in ("hessian_products", "probes", "hessian_diagonals") and n == 1  # [] means "none given"
    if (kind == "short list" and not optional) or (kind == "expanded" and name in WRITTEN[op]):
        assert outcomes[0] is not None


def test_the_kernels_under_test_are_compiled():
    assert all(optim.has_kernel(op, "cpu") for op in OPS)
