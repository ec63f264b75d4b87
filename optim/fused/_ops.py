"""Multi-tensor optimizer steps that every family reuses: schemas, fake kernels and plain-PyTorch references.

``optim::fused_adamw_`` is the AdamW step of ``torch.optim.AdamW`` (Loshchilov & Hutter, decoupled weight decay)
applied in place to lists of tensors. For every i, with g = -grad if ``maximize`` else grad and t the step count
after the increment::

    t      ← t + 1
    p      ← p · (1 − lr·weight_decay)
    m      ← m + (1 − β1)·(g − m)                    (exp_avg)
    v      ← β2·v + (1 − β2)·g²                      (exp_avg_sq)
    p      ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)

Shapes and dtypes: ``params[i]``, ``grads[i]``, ``exp_avgs[i]``, ``exp_avg_sqs[i]`` have one shape; params and grads
one dtype (float64, float32, bfloat16 or float16); the moments are float32 for bfloat16/float16 params (the update is
computed in float32 and rounded once into the param) and the param's dtype otherwise; ``state_steps[i]`` is a
float32 tensor with one element. All tensors of a call live on one device. Lists may be empty. A step count that
is not reset must be >= 0 (the steps taken so far; a negative or NaN one would give wrong or NaN bias corrections):
checked where the counts live on the CPU, by the reference and the CPU kernel alike; the CUDA kernel does not read
counts on the GPU (that would synchronize every step), nor then does the reference.

``reset`` (optional, keyword-only, one bool per tensor) folds a momentum reset into the step: for every i with
``reset[i]`` the step runs as if ``exp_avgs[i]``, ``exp_avg_sqs[i]`` and ``state_steps[i]`` were zero before it
(t = 1, m = (1 − β1)·g, v = (1 − β2)·g²; their old values are not read, so they may hold anything, NaN included).
A reset costs no extra pass over memory. ``reset=None`` (the default) is all False.

The bias corrections are computed in float64 from the step count, as ``torch.optim.AdamW`` does; the elementwise
update runs in the moments' dtype. Non-finite gradients are not filtered, as in ``torch.optim.AdamW``: a NaN or inf
gradient element makes that element's moments and parameter NaN/inf. Use ``torch.amp.GradScaler`` (which skips
steps with non-finite gradients) or gradient clipping to guard against them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._library import define_op
from .._overlap import check_no_overlap, list_operands

Tensors = Sequence[torch.Tensor]

PARAM_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def moment_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the AdamW moments (and of the update arithmetic) for a parameter of ``param_dtype``."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def check_adamw_hyperparameters(*, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                                caller: str = "fused_adamw_") -> None:
    """Raise ``ValueError`` naming ``caller`` and the first hyperparameter outside its valid range."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{caller}: {name} must be a finite number >= 0, got {value}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not (0.0 <= value < 1.0):
            raise ValueError(f"{caller}: {name} must be in [0, 1), got {value}")


def check_adamw_tensors(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, state_steps: Tensors,
    reset: Sequence[bool] | None = None,
) -> None:
    """Raise ``ValueError`` naming the first list or tensor that does not fit the schema."""
    if reset is not None and len(reset) != len(params):
        raise ValueError(f"fused_adamw_: reset has {len(reset)} flags but params has {len(params)}; pass one flag per "
                         "parameter (or reset=None)")
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "state_steps": state_steps}
    for name, tensors in lists.items():
        if len(tensors) != len(params):
            raise ValueError(
                f"fused_adamw_: {name} has {len(tensors)} tensors but params has {len(params)}; "
                "pass one entry per parameter in every list"
            )
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"fused_adamw_: params must be float64, float32, bfloat16 or float16, got {dtype}")
    state_dtype = moment_dtype(dtype)
    def check_like(name: str, i: int, tensor: torch.Tensor, param: torch.Tensor, want: torch.dtype) -> None:
        # check_tensor_like in csrc/common/checks.h: the same order and messages
        if tensor.layout != torch.strided:
            raise ValueError(f"fused_adamw_: {name}[{i}] is sparse; dense tensors are required")
        if tensor.device != param.device or tensor.dtype != want:
            raise ValueError(f"fused_adamw_: {name}[{i}] is {tensor.dtype} on {tensor.device}; it must be {want} "
                               f"on {param.device}")
        if tensor.shape != param.shape:
            raise ValueError(f"fused_adamw_: {name}[{i}] has shape {tuple(tensor.shape)} but params[{i}] has shape "
                               f"{tuple(param.shape)}")

    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        if p.device != device or p.dtype != dtype:
            raise ValueError(
                f"fused_adamw_: params[{i}] is {p.dtype} on {p.device} but params[0] is {dtype} on {device}; "
                "one call takes tensors of one device and dtype (optim.AdamW groups them for you)"
            )
        check_like("grads", i, g, p, dtype)
        check_like("exp_avgs", i, m, p, state_dtype)
        check_like("exp_avg_sqs", i, v, p, state_dtype)
        if step.numel() != 1 or step.dtype != torch.float32 or step.device != device:
            raise ValueError(
                f"fused_adamw_: state_steps[{i}] must be a float32 tensor with one element on {device}, got "
                f"{step.dtype} with {step.numel()} elements on {step.device}"
            )


def check_step_counts(state_steps: Tensors, reset: Sequence[bool] | None = None) -> None:
    """ValueError naming the first CPU count, not reset, that is negative or NaN: one reduction over the stacked
    counts (the CPU kernel reads each from memory)."""
    index = [i for i, step in enumerate(state_steps) if step.device.type == "cpu" and not (reset and reset[i])]
    if not index:
        return
    bad = ~(torch.stack([state_steps[i].detach().reshape(()) for i in index]) >= 0)
    if bool(bad.any()):
        i = index[int(bad.nonzero()[0, 0])]
        raise ValueError(f"fused_adamw_: state_steps[{i}] is negative or NaN; a step count is the number of steps "
                         "taken so far and must be >= 0 (pass reset with a True flag to start it again from 0)")


def fused_adamw_reference(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    state_steps: Tensors,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    reset: Sequence[bool] | None = None,
) -> None:
    check_adamw_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps)
    check_adamw_tensors(params, grads, exp_avgs, exp_avg_sqs, state_steps, reset)
    check_no_overlap("fused_adamw_", list_operands("params", params, True) + list_operands("grads", grads, False)
                     + list_operands("exp_avgs", exp_avgs, True) + list_operands("exp_avg_sqs", exp_avg_sqs, True)
                     + list_operands("state_steps", state_steps, True))
    check_step_counts(state_steps, reset)
    flags = [False] * len(params) if reset is None else reset
    for param, grad, exp_avg, exp_avg_sq, step, restart in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                                                flags):
        if restart:  # the definition of the flag: the step starts from zero state
            exp_avg.zero_()
            exp_avg_sq.zero_()
            step.zero_()
        step += 1
        t = step.item()
        # The arithmetic runs in the moments' dtype; a low-precision param is rounded once at the end.
        p = param.to(exp_avg.dtype)
        g = grad.to(exp_avg.dtype)
        if maximize:
            g = -g
        p.mul_(1.0 - lr * weight_decay)
        exp_avg.lerp_(g, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        step_size = lr / (1.0 - beta1**t)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        if p is not param:
            param.copy_(p)


def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, weight_decay, eps,
                      maximize, reset=None) -> None:
    check_adamw_tensors(params, grads, exp_avgs, exp_avg_sqs, state_steps, reset)


fused_adamw_ = define_op(
    "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] state_steps, *, float lr, float beta1, float beta2, float weight_decay, float eps, "
    "bool maximize, bool[]? reset=None) -> ()",
    reference=fused_adamw_reference,
    fake=_fused_adamw_fake,
)


# --- finiteness of many tensors -----------------------------------------------------------------------------------
#
# ``optim::all_finite(tensors)`` is a 0-d bool tensor: whether every element of every tensor is finite (no NaN, no
# ±inf), on the tensors' device (the CPU for an empty list). Tensors of any dtype and shape, strided and on one
# device; integer and bool tensors are finite. The compiled CPU kernel reads each tensor once and writes nothing
# else (``torch.isfinite`` writes a bool tensor per input, ``_foreach_norm`` computes a norm per tensor).


def check_tensor_list(op: str, name: str, tensors: Tensors, *, floating: bool = False) -> None:
    """Every tensor of the list ``name`` strided (floating point too with ``floating``) and on one device, with the
    messages the CPU kernels repeat (csrc/fused/all_finite_cpu.cpp, add_to_counts_cpu.cpp), in this order."""
    for i, tensor in enumerate(tensors):
        if tensor.layout != torch.strided:
            raise RuntimeError(f"{op}: {name}[{i}] is not strided; dense tensors are required")
        if floating and not tensor.dtype.is_floating_point:
            raise RuntimeError(f"{op}: {name}[{i}] is not floating point; floating-point tensors are required")
        if tensor.device != tensors[0].device:
            raise RuntimeError(f"{op}: every tensor of {name} must be on one device; {name}[0] is on "
                               f"{tensors[0].device} and {name}[{i}] on {tensor.device}")


def check_all_finite_args(tensors: Tensors) -> None:
    check_tensor_list("all_finite", "tensors", tensors)


def all_finite_reference(tensors: Tensors) -> torch.Tensor:
    check_all_finite_args(tensors)
    finite = torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    for tensor in tensors:
        finite &= torch.isfinite(tensor).all()
    return finite


def _all_finite_fake(tensors):
    check_all_finite_args(tensors)
    return torch.empty((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")


all_finite = define_op(
    "all_finite(Tensor[] tensors) -> Tensor",
    reference=all_finite_reference,
    fake=_all_finite_fake,
)


# --- step counts --------------------------------------------------------------------------------------------------
#
# ``optim::add_to_counts_(counts, value)`` adds ``value`` to every tensor of ``counts`` (the optimizers' step counts:
# one-element float32 tensors on the CPU), as ``torch._foreach_add_(counts, value)`` does, in one op call: on the CPU
# torch's foreach add of a scalar is a loop of ``add_`` calls, ~4 µs each, which on a small model with 28 parameters
# was a tenth of the optimizer step. Floating-point tensors on one device; lists may be empty.
#
# A count is refused, before any is written, unless: ``value`` is finite and >= 0 (a count only grows), every tensor
# has one element, no two tensors share memory (the same count twice would be incremented twice), and
# ``count + value`` stays within the whole numbers the count's dtype holds exactly (2**24 for float32, 2**53 for
# float64, 2**11 for float16, 2**8 for bfloat16): past that an increment of 1 is rounded away and the count stops.
# That last check reads every count: the compiled CPU kernel reads each from memory, the reference takes one
# reduction over the stacked counts (one host read).


def check_add_to_counts_args(counts: Tensors, value: float) -> None:
    """The checks that need no tensor's memory (the fake kernel's): list, value and element counts."""
    check_tensor_list("add_to_counts_", "counts", counts, floating=True)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"add_to_counts_: value must be a finite number >= 0 (a count only grows), got {value}")
    for i, count in enumerate(counts):
        if count.numel() != 1:
            raise ValueError(f"add_to_counts_: counts[{i}] has {count.numel()} elements; every count must be a "
                             "tensor with one element")


def exact_count_bits(dtype: torch.dtype) -> int:
    """b such that ``dtype`` holds every whole number up to 2**b exactly (std::numeric_limits<T>::digits)."""
    return 1 - round(math.log2(torch.finfo(dtype).eps))  # eps = 2**(1 - b)


def check_count_range(counts: Tensors, value: float) -> None:
    """ValueError naming the first count that ``+ value`` would take past its dtype's exact whole numbers."""
    if not counts:
        return
    values = torch.stack([c.detach().reshape(()).to(torch.float64) for c in counts])
    limits = torch.tensor([2.0 ** exact_count_bits(c.dtype) for c in counts], dtype=torch.float64,
                          device=values.device)
    over = (values + value) > limits
    if bool(over.any()):
        i = int(over.nonzero()[0, 0])
        bits = exact_count_bits(counts[i].dtype)
        raise ValueError(f"add_to_counts_: counts[{i}] would pass 2**{bits} with this increment; {counts[i].dtype} "
                         f"holds whole numbers exactly only up to 2**{bits}, so the count would no longer be exact: "
                         "keep counts that large in a wider dtype (torch.float64 is exact up to 2**53)")


def add_to_counts_reference(counts: Tensors, value: float) -> None:
    check_add_to_counts_args(counts, value)
    check_no_overlap("add_to_counts_", list_operands("counts", counts, True))
    check_count_range(counts, value)
    if counts:
        torch._foreach_add_(list(counts), value)


def _add_to_counts_fake(counts, value) -> None:
    check_add_to_counts_args(counts, value)


add_to_counts_ = define_op(
    "add_to_counts_(Tensor(a!)[] counts, float value) -> ()",
    reference=add_to_counts_reference,
    fake=_add_to_counts_fake,
)
