"""Losses whose second derivatives run on fused kernels.

``cross_entropy(logits, target)`` is softmax cross-entropy whose Hessian-vector products, by double backward
("rr") or forward-over-reverse ("fr"), apply ``optim::cross_entropy_hvp`` once instead of differentiating through
``log_softmax`` op by op (which stores several N×V intermediates). Use it as the ``loss_fn`` of a
``HessianOperator`` or inside any function given to ``optim.hvp`` for language-model-sized vocabularies.

``causal_lm_loss(logits, labels)`` is the next-token loss of a causal language model (logits at position t predict
the label at t + 1, labels of ``ignore_index`` skipped), the loss of Hugging Face's ``*ForCausalLM`` models, on the
same fused kernel: ``HessianOperator(model, causal_lm_loss, (input_ids, labels))`` works on them unchanged.
"""

from __future__ import annotations

import torch

from .._library import without_autocast
from ._ops import cross_entropy_hvp

__all__ = ["causal_lm_loss", "cross_entropy", "functional_cross_entropy", "loss_terms", "model_loss", "row_terms"]


def _countable_on_host(target: torch.Tensor) -> bool:
    """Whether the kept targets of a mean can be counted on the host (``int(...)``): not for a target batched by vmap
    (per-sample losses: the empirical Fisher, per-sample gradients), and not inside ``torch.compile``, where the
    count would break the graph (the ``or`` keeps dynamo from tracing the functorch query)."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(target))


def _scaled_by(grad_loss: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``grad_loss · gradient``, the backward of a scalar loss, without the multiply where ``grad_loss`` is a host
    1 that needs no gradient (a loss differentiated as it is): the product is then the same bits, and its own
    backward is one more pass over the (N, C) scores in every second backward (6 of 425 ms per probe on a
    GPT-2-shaped model with (512, 8192) logits, one CPU thread). On a GPU the value is not read (a host sync)."""
    if (grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and not grad_loss.requires_grad
            and _countable_on_host(grad_loss) and grad_loss.item() == 1.0):
        return gradient
    return grad_loss * gradient


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _CrossEntropyGradient(torch.autograd.Function):
    """g(z) = scale · (softmax(z) − onehot(y)) on kept rows, 0 on rows whose target is ``ignore_index``: the
    gradient of the loss in the logits.

    Its derivative in z is the symmetric matrix scale · (diag(p) − p pᵀ) per kept row (0 on ignored rows), so both
    its vector-Jacobian product (backward) and its Jacobian-vector product (jvp) are ``cross_entropy_hvp``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, scale: float, ignore_index: int) -> torch.Tensor:
        probabilities = torch.softmax(logits.to(_work_dtype(logits)), dim=-1)
        ignored = target == ignore_index
        onehot = torch.zeros_like(probabilities).scatter_(-1, target.masked_fill(ignored, 0).unsqueeze(-1), 1.0)
        gradient = (scale * (probabilities - onehot)).masked_fill(ignored.unsqueeze(-1), 0.0)
        return gradient.to(logits.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, scale, ignore_index = inputs
        ctx.save_for_backward(logits, target)
        ctx.save_for_forward(logits, target)
        ctx.scale, ctx.ignore_index = scale, ignore_index

    @staticmethod
    @without_autocast
    def backward(ctx, grad_gradient: torch.Tensor):
        logits, target = ctx.saved_tensors
        return cross_entropy_hvp(logits, grad_gradient, ctx.scale, target, ctx.ignore_index), None, None, None

    @staticmethod
    @without_autocast
    def jvp(ctx, logits_tangent: torch.Tensor, *unused_tangents):
        logits, target = ctx.saved_tensors
        return cross_entropy_hvp(logits, logits_tangent, ctx.scale, target, ctx.ignore_index)


class _CrossEntropy(torch.autograd.Function):
    """L(z) = scale · Σ_{rows with y ≠ ignore_index} (logsumexp(z) − z[y])."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, scale: float, ignore_index: int) -> torch.Tensor:
        z = logits.to(_work_dtype(logits))
        ignored = target == ignore_index
        picked = z.gather(-1, target.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
        per_row = (torch.logsumexp(z, dim=-1) - picked).masked_fill(ignored, 0.0)
        return (scale * per_row.sum()).to(logits.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, scale, ignore_index = inputs
        ctx.save_for_backward(logits, target)
        ctx.save_for_forward(logits, target)
        ctx.scale, ctx.ignore_index = scale, ignore_index

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss: torch.Tensor):
        logits, target = ctx.saved_tensors
        gradient = _CrossEntropyGradient.apply(logits, target, ctx.scale, ctx.ignore_index)
        return _scaled_by(grad_loss, gradient), None, None, None

    @staticmethod
    @without_autocast
    def jvp(ctx, logits_tangent: torch.Tensor, *unused_tangents):
        logits, target = ctx.saved_tensors
        return (_CrossEntropyGradient.apply(logits, target, ctx.scale, ctx.ignore_index) * logits_tangent).sum()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean",
                  ignore_index: int = -100) -> torch.Tensor:
    """Softmax cross-entropy with fused second derivatives.

    Args:
        logits: (..., V) scores, the class dimension LAST (``F.cross_entropy`` wants it at dim 1 for inputs of more
            than two dimensions; for (N, V) the two agree).
        target: (...) class indices in [0, V), or ``ignore_index`` for rows that count for nothing (no
            probabilities, no label smoothing).
        reduction: "mean" (over the rows whose target is not ``ignore_index``) or "sum".
        ignore_index: the target value of ignored rows (default -100, as ``F.cross_entropy``).

    Returns the scalar loss, equal to ``F.cross_entropy(logits.reshape(-1, V), target.reshape(-1),
    ignore_index=ignore_index)``. Gradients, double backward, ``torch.func.grad``/``jvp``/``vmap`` work; a third
    derivative does not. With ``reduction="mean"`` the number of kept rows is read once (a host sync on CUDA); a
    batch whose every row is ignored is refused (``F.cross_entropy`` returns NaN for it). Under ``torch.func.vmap``
    over the targets (per-sample losses) that count cannot be read, and inside ``torch.compile`` it would break the
    graph: there the value is ``F.cross_entropy``'s, by torch's ops (an all-ignored sample's mean is then NaN).
    """
    if logits.dim() < 1 or target.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: target has shape {tuple(target.shape)} but logits of shape {tuple(logits.shape)} need "
            f"target shape {tuple(logits.shape[:-1])} (class dimension last)"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: target must hold class indices (int64), got {target.dtype}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    if target.numel() == 0:
        raise ValueError("cross_entropy: empty batch (no rows); the mean over no rows is undefined")
    target = target.long()
    if not _countable_on_host(target):  # the same value by torch's own ops, differentiated by its rules
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=ignore_index, reduction=reduction)
    scale = 1.0
    if reduction == "mean":
        kept = int((target != ignore_index).sum())
        if kept == 0:
            raise ValueError(f"cross_entropy: every target is ignore_index ({ignore_index}); the mean over no rows "
                             "is undefined")
        scale = 1.0 / kept
    return _CrossEntropy.apply(logits, target, scale, ignore_index)


# F.cross_entropy's reduction names as ATen's enum (at::Reduction).
_REDUCTION_ENUM = {"mean": 1, "sum": 2}


class _TorchCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy`` of (N, C) scores and (N,) class indices by torch's own ops (``log_softmax``, then
    ``nll_loss_forward``), so the loss and its gradient are torch's bit for bit; the derivative of that gradient is
    ``cross_entropy_hvp`` (through :class:`_TorchCrossEntropyGradient`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, scale, reduction, ignore_index):
        log_p = torch.log_softmax(logits, 1)
        loss, total_weight = torch.ops.aten.nll_loss_forward(log_p, target, None, _REDUCTION_ENUM[reduction],
                                                             ignore_index)
        return loss, log_p, total_weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, scale, reduction, ignore_index = inputs
        _, log_p, total_weight = output
        # the gradient below carries log_p's dependence on the logits; total_weight (the kept rows) has none
        ctx.mark_non_differentiable(log_p, total_weight)
        ctx.save_for_backward(logits, target, log_p, total_weight)
        ctx.save_for_forward(logits, target, log_p, total_weight)
        ctx.scale, ctx.reduction, ctx.ignore_index = scale, reduction, ignore_index

    @staticmethod
    def _gradient(ctx):
        logits, target, log_p, total_weight = ctx.saved_tensors
        return _TorchCrossEntropyGradient.apply(logits, log_p, target, total_weight, ctx.scale, ctx.reduction,
                                                ctx.ignore_index)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss, grad_log_p, grad_total_weight):
        # torch's backward passes grad_loss into nll_loss_backward; the gradient at grad_loss = 1 times grad_loss is
        # the same bits when grad_loss is 1 (a loss differentiated as it is) and within an ulp otherwise.
        return _scaled_by(grad_loss, _TorchCrossEntropy._gradient(ctx)), None, None, None, None

    @staticmethod
    @without_autocast
    def jvp(ctx, logits_dot, *unused_tangents):
        return (_TorchCrossEntropy._gradient(ctx) * logits_dot).sum(), None, None


class _TorchCrossEntropyGradient(torch.autograd.Function):
    """The gradient of :class:`_TorchCrossEntropy`'s loss in the logits, by torch's backward ops
    (``nll_loss_backward``, then ``_log_softmax_backward_data``); its derivative in the logits is
    scale · (diag(p) − p pᵀ) per kept row: ``cross_entropy_hvp`` for both the backward and the jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, log_p, target, total_weight, scale, reduction, ignore_index):
        one = torch.ones((), dtype=log_p.dtype, device=log_p.device)
        grad_log_p = torch.ops.aten.nll_loss_backward(one, log_p, target, None, _REDUCTION_ENUM[reduction],
                                                      ignore_index, total_weight)
        return torch.ops.aten._log_softmax_backward_data(grad_log_p, log_p, 1, logits.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, log_p, target, total_weight, scale, reduction, ignore_index = inputs
        ctx.save_for_backward(logits, target)
        ctx.save_for_forward(logits, target)
        ctx.scale, ctx.ignore_index = scale, ignore_index

    @staticmethod
    @without_autocast
    def backward(ctx, u):
        logits, target = ctx.saved_tensors
        return cross_entropy_hvp(logits, u, ctx.scale, target, ctx.ignore_index), None, None, None, None, None, None

    @staticmethod
    @without_autocast
    def jvp(ctx, logits_dot, *unused_tangents):
        logits, target = ctx.saved_tensors
        return cross_entropy_hvp(logits, logits_dot, ctx.scale, target, ctx.ignore_index)


# Fewer scores than this take torch's own F.cross_entropy inside the curvature routes: the fused route's two
# autograd Functions cost ~85 µs more per graph than torch's nodes (one CPU thread), which the fused op wins back
# only over enough scores (k = 1: +87 µs at 128×100, +60 µs at 1024×10, −190 µs at 128×1024; a block of 8 probes
# breaks even near 20–30k scores). A module attribute, so that tests can take the fused route on small inputs.
FUSED_MIN_SCORES = 32768


def functional_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                             reduction="mean", label_smoothing=0.0):
    """``F.cross_entropy``, its signature and its values (the loss and its gradient bit for bit), with the second
    derivatives of ``optim::cross_entropy_hvp`` where they apply: (N, C) float scores, (N,) class indices, no class
    weights, no label smoothing, reduction "mean" or "sum", at least one kept row, and at least
    :data:`FUSED_MIN_SCORES` scores (below it torch's double backward is the faster). Every other call is
    ``F.cross_entropy`` itself (NaN for an all-ignored mean included).

    The curvature routes send ``F.cross_entropy`` here: PyTorch differentiates ``log_softmax`` twice op by op,
    3.3x slower than ``cross_entropy_hvp`` on (512, 8192) float32 logits on one CPU thread (42.5 ms against
    13.0 ms per second backward), about the time of the output layer's matrix products. With reduction "mean"
    the number of kept rows is read once (a host sync on CUDA). A third derivative is not available.
    """
    fused = (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor) and input.dim() == 2
             and input.numel() >= FUSED_MIN_SCORES and input.is_floating_point() and target.dim() == 1
             and target.dtype == torch.int64
             and target.shape[0] == input.shape[0] > 0 and weight is None and size_average is None and reduce is None
             and reduction in _REDUCTION_ENUM and label_smoothing == 0.0 and isinstance(ignore_index, int)
             and not isinstance(ignore_index, bool) and _countable_on_host(target))
    kept = int((target != ignore_index).sum()) if fused else 0
    if not kept:
        return torch.nn.functional.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                                 label_smoothing)
    scale = 1.0 / kept if reduction == "mean" else 1.0
    loss, _, _ = _TorchCrossEntropy.apply(input, target, scale, reduction, ignore_index)
    return loss


def _logits_of(output) -> torch.Tensor:
    """The logits of a model's output: a tensor, an object with ``.logits`` (Hugging Face), or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"causal_lm_loss: expected logits (a tensor, a model output with .logits, or a tuple whose first "
                     f"entry is the logits), got a {type(output).__name__}")


def causal_lm_loss(logits, labels: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a causal LM, on the fused second-derivative kernel.

    The logits at position t predict the label at t + 1::

        L = (1 / K) · Σ_{b, t < T-1, kept} CE(logits[b, t], labels[b, t + 1])

    over the K kept pairs: those whose label is not ``ignore_index`` (and, with ``attention_mask``, whose label
    position has mask 1). This is the loss of Hugging Face's ``*ForCausalLM(labels=...)`` (labels are the
    inputs, padding set to -100). For right-padded batches the model needs no attention mask (a causal model's
    earlier positions never see the padding); mask the labels instead.

    Args:
        logits: (B, T, V) or (T, V) scores, or the model's output holding them (``.logits``, or a tuple's first
            entry), so that it can be a ``HessianOperator``'s ``loss_fn`` as it is.
        labels: (B, T) or (T,) token ids, ``ignore_index`` where nothing is predicted.
        attention_mask: optional, the shape of ``labels``: 0 marks positions whose label is ignored.
        ignore_index, reduction: as :func:`cross_entropy`.
    """
    logits = _logits_of(logits)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"causal_lm_loss: labels must be an int64 tensor of token ids, got "
                         f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if logits.dim() < 2 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"causal_lm_loss: labels have shape {tuple(labels.shape)} but logits of shape "
                         f"{tuple(logits.shape)} need labels of shape {tuple(logits.shape[:-1])} ((B, T) for (B, T, V))")
    if logits.shape[-2] < 2:
        raise ValueError(f"causal_lm_loss: a sequence of {logits.shape[-2]} position(s) has no next token to predict")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != labels.shape:
            raise ValueError(f"causal_lm_loss: attention_mask must be a tensor of the labels' shape "
                             f"{tuple(labels.shape)}, got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask!r}")
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    return cross_entropy(logits[..., :-1, :], labels[..., 1:], reduction=reduction, ignore_index=ignore_index)


def model_loss(output, labels=None) -> torch.Tensor:
    """The loss the model computes itself: ``output.loss`` of a model called with ``labels`` (Hugging Face).

    As the ``loss_fn`` of ``HessianOperator``, ``EmpiricalFisherOperator`` or ``SharpnessMonitor`` it makes them
    call the model with ``labels=`` the batch's labels (its targets) and differentiate the loss it returns: what
    ``model(**batch).loss`` is and a ``Trainer`` optimizes, whatever the task (the shifted next-token loss, a
    masked LM's, a seq2seq's, a classifier's) and with the model's extra terms (a mixture of experts' router loss
    with ``output_router_logits=True``). For the empirical Fisher a row's loss is the model's loss on that row
    alone. The Gauss-Newton matrix needs the loss as a function of the outputs, so ``GGNOperator`` takes a
    criterion instead (:func:`causal_lm_loss`, ``F.cross_entropy``). Hugging Face's language-model losses take
    their cross-entropy in float32 (``logits.float()``) even in a float64 model, so their curvature has float32's
    precision; :func:`causal_lm_loss` keeps the model's. ``labels`` is not read here.
    """
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            "model_loss: the model's output has no scalar .loss (got "
            f"{type(loss).__name__ if loss is None or not isinstance(loss, torch.Tensor) else tuple(loss.shape)}); "
            "it is the loss a Hugging Face model returns when called with labels (return_dict=True): pass a "
            "criterion loss_fn(output, target) for other models")
    return loss


def _counted(loss_fn, targets: torch.Tensor) -> torch.Tensor | None:
    """The weight each target has in ``loss_fn``'s mean (shaped like the targets it reads), for the criteria whose
    mean runs over counted targets rather than rows: 1 for the kept pairs of :func:`causal_lm_loss` (labels at
    t + 1 not -100) and for the targets that are not -100 of :func:`cross_entropy`, ``F.cross_entropy`` and
    ``nn.CrossEntropyLoss`` (its ``ignore_index``; with class weights, the weight of each kept target, whose sum
    is the mean's denominator) on class indices, 0 for the others. None for any other criterion (a wrapper, a
    sum, probabilities as targets, ``model_loss``)."""
    from torch import nn
    import torch.nn.functional as F

    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype.is_complex \
            or targets.dtype == torch.bool:
        return None
    if loss_fn is causal_lm_loss:
        return (targets[..., 1:] != -100).to(torch.float64) if targets.dim() >= 1 else None
    if loss_fn is cross_entropy or loss_fn is F.cross_entropy or loss_fn is functional_cross_entropy:
        return (targets != -100).to(torch.float64)
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean":
        kept = targets != loss_fn.ignore_index
        if loss_fn.weight is None:
            return kept.to(torch.float64)
        weight = loss_fn.weight.detach().to(device=targets.device, dtype=torch.float64)
        return torch.where(kept, weight[targets.masked_fill(~kept, 0)], 0.0)
    return None


def loss_terms(loss_fn, targets: torch.Tensor) -> float | None:
    """The number of terms ``loss_fn``'s mean divides by on a batch with ``targets`` (:func:`_counted`'s sum: the
    counted targets of a causal-LM or cross-entropy loss, or their class weights); None for other criteria, where
    the batch's weight is its row count."""
    counted = _counted(loss_fn, targets)
    return None if counted is None else float(counted.sum())


def row_terms(loss_fn, targets: torch.Tensor) -> torch.Tensor | None:
    """(N,) float64: the terms of each row (dim 0) of ``targets`` in ``loss_fn``'s mean (:func:`_counted`), None
    for other criteria or targets without rows. A row of 0 has a one-row loss 0/0: nothing to predict in it."""
    counted = _counted(loss_fn, targets)
    if counted is None or targets.dim() < (2 if loss_fn is causal_lm_loss else 1):
        return None
    return counted.flatten(1).sum(1) if counted.dim() > 1 else counted
