"""optim.hessian.cross_entropy: same loss, gradient and Hessian as F.cross_entropy, through the fused op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import optim.hessian.losses as losses
from optim.hessian.losses import cross_entropy

from ..conftest import DEVICES


def mlp_loss(loss_fn, inputs, target):
    """A two-layer network's loss as a function of its flat parameter vector (so the Hessian is a matrix)."""
    sizes = [(7, 5), (7,), (4, 7), (4,)]

    def loss(flat):
        tensors, start = [], 0
        for shape in sizes:
            count = torch.Size(shape).numel()
            tensors.append(flat[start:start + count].view(shape))
            start += count
        w1, b1, w2, b2 = tensors
        return loss_fn(torch.tanh(inputs @ w1.T + b1) @ w2.T + b2, target)

    return loss, sum(torch.Size(s).numel() for s in sizes)


@pytest.fixture
def counted_op(monkeypatch):
    """Counts the calls of the fused op made through the loss, to show the fused path is the one taken."""
    calls = []
    op = losses.cross_entropy_hvp

    def counting(*args):
        calls.append(args[0].shape)
        return op(*args)

    monkeypatch.setattr(losses, "cross_entropy_hvp", counting)
    monkeypatch.setattr(losses, "FUSED_MIN_SCORES", 0)  # the fused route on these tests' small scores
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_index", [None, -3], ids=["all-rows", "ignore_index"])
def test_loss_gradient_and_hessian_match_torch(device, reduction, ignore_index, counted_op):
    inputs = torch.randn(9, 5, dtype=torch.float64, device=device)
    target = torch.randint(0, 4, (9,), device=device)
    options = {"reduction": reduction}
    if ignore_index is not None:  # three rows count for nothing, in the loss and in its derivatives
        target[[1, 4, 5]] = ignore_index
        options["ignore_index"] = ignore_index
    ours, n = mlp_loss(lambda z, y: cross_entropy(z, y, **options), inputs, target)
    torch_loss, _ = mlp_loss(lambda z, y: F.cross_entropy(z, y, **options), inputs, target)
    flat = torch.randn(n, dtype=torch.float64, device=device)
    torch.testing.assert_close(ours(flat), torch_loss(flat), rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.func.grad(ours)(flat), torch.func.grad(torch_loss)(flat), rtol=1e-12,
                               atol=1e-14)
    hessian = torch.autograd.functional.hessian(torch_loss, flat)
    torch.testing.assert_close(torch.autograd.functional.hessian(ours, flat), hessian, rtol=1e-10, atol=1e-12)
    assert counted_op, "the fused op did not run in the double backward"


@pytest.mark.parametrize("device", DEVICES)
def test_every_hvp_mode_matches_the_exact_hessian(device, counted_op):
    inputs = torch.randn(9, 5, dtype=torch.float64, device=device)
    target = torch.randint(0, 4, (9,), device=device)
    ours, n = mlp_loss(cross_entropy, inputs, target)
    flat = torch.randn(n, dtype=torch.float64, device=device)
    probes = torch.randn(3, n, dtype=torch.float64, device=device)
    exact = probes @ torch.autograd.functional.hessian(ours, flat)
    # forward-over-reverse, one probe and vmapped probes
    fr = torch.func.vmap(lambda v: torch.func.jvp(torch.func.grad(ours), (flat,), (v,))[1])(probes)
    torch.testing.assert_close(fr, exact, rtol=1e-10, atol=1e-12)
    # reverse-over-reverse with batched grad outputs (shared forward and first backward)
    point = flat.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ours(point), point, create_graph=True)
    (rr,) = torch.autograd.grad(grad, point, grad_outputs=probes, is_grads_batched=True)
    torch.testing.assert_close(rr, exact, rtol=1e-10, atol=1e-12)
    assert len(counted_op) >= 2


def test_class_dimension_last_with_leading_dimensions():
    logits = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (2, 3))
    loss = cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 6), target.reshape(-1)))


def test_bfloat16_logits_are_reduced_in_float32():
    logits = torch.randn(64, 1000) * 3
    target = torch.randint(0, 1000, (64,))
    loss = cross_entropy(logits.bfloat16(), target)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), F.cross_entropy(logits.bfloat16().float(), target), rtol=2**-7, atol=0)


def test_bad_input():
    logits = torch.randn(4, 5)
    with pytest.raises(ValueError, match="target has shape"):
        cross_entropy(logits, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="class indices"):
        cross_entropy(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="reduction must be"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.int64), reduction="none")
    with pytest.raises(ValueError, match="empty batch"):
        cross_entropy(torch.randn(0, 5), torch.zeros(0, dtype=torch.int64))


def test_every_row_ignored_is_refused():
    with pytest.raises(ValueError, match="every target is ignore_index"):
        cross_entropy(torch.randn(3, 4), torch.full((3,), -100))
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), ignore_index=1.5)


def _shifted_torch_loss(logits, labels, ignore_index=-100):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=ignore_index)


def test_causal_lm_loss_is_the_shifted_cross_entropy_with_masks():
    from optim.hessian import causal_lm_loss

    logits = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 4:] = -100
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[2, 3:] = 0
    expected_labels = labels.masked_fill(mask == 0, -100)
    torch.testing.assert_close(causal_lm_loss(logits, labels, attention_mask=mask),
                               _shifted_torch_loss(logits, expected_labels), rtol=1e-13, atol=0)
    # a Hugging Face-style output object and a tuple are accepted as they are
    output = type("Output", (), {"logits": logits})()
    torch.testing.assert_close(causal_lm_loss(output, labels), _shifted_torch_loss(logits, labels), rtol=1e-13, atol=0)
    torch.testing.assert_close(causal_lm_loss((logits,), labels), _shifted_torch_loss(logits, labels), rtol=1e-13,
                               atol=0)
    with pytest.raises(ValueError, match="labels have shape"):
        causal_lm_loss(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="attention_mask must be a tensor"):
        causal_lm_loss(logits, labels, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="no next token"):
        causal_lm_loss(logits[:, :1], labels[:, :1])
    with pytest.raises(ValueError, match="expected logits"):
        causal_lm_loss({"logits": logits}, labels)


def test_hessian_of_a_transformers_gpt2_with_causal_lm_loss():
    transformers = pytest.importorskip("transformers")
    from optim import HessianOperator
    from optim.hessian import causal_lm_loss

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    input_ids = torch.randint(0, 37, (2, 7))
    labels = input_ids.clone()
    labels[1, 5:] = -100  # right padding
    scope = lambda name, p: name.startswith("transformer.h.0.mlp")  # noqa: E731  (a small block: dense check)
    H = HessianOperator(model, causal_lm_loss, (input_ids, labels), param_filter=scope)
    names, params = H.names, [p.detach() for p in H.params]
    # The reference: F.cross_entropy of the shifted float64 logits, and its dense Hessian over the block
    shapes = [p.shape for p in params]

    def call(flat, **kwargs):
        pieces = [piece.reshape(shape) for piece, shape in zip(flat.split([p.numel() for p in params]), shapes)]
        return torch.func.functional_call(model, dict(zip(names, pieces)), (input_ids,), kwargs)

    flat = torch.cat([p.reshape(-1) for p in params])
    dense = torch.autograd.functional.hessian(lambda f: _shifted_torch_loss(call(f).logits, labels), flat)
    v = torch.randn(H.n, dtype=torch.float64)
    torch.testing.assert_close(H @ v, dense @ v, rtol=1e-9, atol=1e-11)
    loss, _ = H.loss_and_grad()
    torch.testing.assert_close(loss, _shifted_torch_loss(call(flat).logits, labels), rtol=1e-12, atol=0)
    # HF's own loss (labels=...; it upcasts the logits to float32 first) agrees to float32 rounding
    torch.testing.assert_close(loss.float(), call(flat, labels=labels).loss, rtol=1e-6, atol=0)


# --- F.cross_entropy inside the curvature routes --------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_routed_cross_entropy_is_torchs_loss_and_gradient_bit_for_bit(device, dtype, reduction, counted_op):
    # 49 kept rows: 1 / (1 / 49) is not 49 in float64, so a total weight derived from the mean's scale would show
    logits = torch.randn(51, 11, dtype=dtype, device=device, requires_grad=True)
    target = torch.randint(0, 11, (51,), device=device)
    target[[2, 30]] = -100
    want = F.cross_entropy(logits, target, reduction=reduction)
    got = losses.functional_cross_entropy(logits, target, reduction=reduction)
    assert torch.equal(got, want)
    (want_grad,) = torch.autograd.grad(want, logits, create_graph=True)
    (got_grad,) = torch.autograd.grad(got, logits, create_graph=True)
    assert torch.equal(got_grad, want_grad)
    u = torch.randn_like(logits)
    (want_hv,) = torch.autograd.grad(want_grad, logits, u)
    (got_hv,) = torch.autograd.grad(got_grad, logits, u)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got_hv, want_hv, rtol=tolerance, atol=tolerance * want_hv.abs().max().item())
    assert counted_op, "the fused op did not run in the double backward"


@pytest.mark.parametrize("loss_fn", ["routed", "optim"])
@pytest.mark.parametrize("factor", [1.0, 0.37])
def test_cross_entropy_backward_scales_by_the_incoming_gradient(loss_fn, factor, counted_op):
    """The backward multiplies by the loss's incoming gradient, and leaves the multiply out where that is a host 1:
    the gradient is then the same tensor, and the second backward makes no extra pass over the scores."""
    logits = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (7,))
    target[1] = -100
    ours = losses.functional_cross_entropy if loss_fn == "routed" else losses.cross_entropy
    (want_grad,) = torch.autograd.grad(factor * F.cross_entropy(logits, target), logits, create_graph=True)
    (got_grad,) = torch.autograd.grad(factor * ours(logits, target), logits, create_graph=True)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-14, atol=0)
    assert (got_grad.grad_fn.name() == "MulBackward0") == (factor != 1.0)
    u = torch.randn_like(logits)
    (want_hv,) = torch.autograd.grad(want_grad, logits, u)
    (got_hv,) = torch.autograd.grad(got_grad, logits, u)
    torch.testing.assert_close(got_hv, want_hv, rtol=1e-12, atol=1e-14)
    assert counted_op, "the fused op did not run in the double backward"


@pytest.mark.parametrize("case", ["weight", "label_smoothing", "class_dim_1", "probabilities", "all_ignored",
                                  "none_reduction"])
def test_routed_cross_entropy_falls_back_to_torch(case, counted_op):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    args, options = (logits, target), {}
    if case == "weight":
        options["weight"] = torch.rand(5, dtype=torch.float64)
    elif case == "label_smoothing":
        options["label_smoothing"] = 0.1
    elif case == "class_dim_1":
        args = (torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True), torch.randint(0, 5, (2, 3)))
    elif case == "probabilities":
        args = (logits, torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1))
    elif case == "all_ignored":
        args = (logits, torch.full((6,), -100))
    else:
        options["reduction"] = "none"
    want = F.cross_entropy(*args, **options)
    got = losses.functional_cross_entropy(*args, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if got.requires_grad and not got.isnan().any():
        (grad,) = torch.autograd.grad(got.sum(), args[0], create_graph=True)
        torch.autograd.grad(grad, args[0], torch.randn_like(grad))
    assert not counted_op


def test_routed_cross_entropy_takes_torchs_double_backward_below_the_size_it_pays_at(counted_op, monkeypatch):
    monkeypatch.setattr(losses, "FUSED_MIN_SCORES", 60)
    for rows, fused in ((5, False), (6, True)):  # 10 classes: 50 and 60 scores
        counted_op.clear()
        logits = torch.randn(rows, 10, dtype=torch.float64, requires_grad=True)
        target = torch.randint(0, 10, (rows,))
        (grad,) = torch.autograd.grad(losses.functional_cross_entropy(logits, target), logits, create_graph=True)
        (want,) = torch.autograd.grad(F.cross_entropy(logits, target), logits, create_graph=True)
        assert torch.equal(grad, want)
        u = torch.randn_like(logits)
        torch.testing.assert_close(torch.autograd.grad(grad, logits, u)[0], torch.autograd.grad(want, logits, u)[0],
                                   rtol=1e-12, atol=1e-14)
        assert bool(counted_op) == fused


def test_hvp_routes_f_cross_entropy_to_the_fused_op_in_every_mode(counted_op):
    """optim.hvp enters the routes itself: a model written with F.cross_entropy gets the fused second derivatives
    in "rr" (one probe, a block) and "fr" (vmapped tangents), equal to torch's Hessian in float64."""
    import optim

    inputs = torch.randn(9, 5, dtype=torch.float64)
    target = torch.randint(0, 4, (9,))
    target[3] = -100
    loss, n = mlp_loss(F.cross_entropy, inputs, target)
    flat = torch.randn(n, dtype=torch.float64)
    probes = torch.randn(4, n, dtype=torch.float64)
    exact = probes @ torch.autograd.functional.hessian(loss, flat)
    for mode in ("rr", "fr"):
        counted_op.clear()
        torch.testing.assert_close(optim.hvp(loss, [flat], [probes], mode=mode)[0], exact, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(optim.hvp(loss, [flat], [probes[0]], mode=mode)[0], exact[0], rtol=1e-10,
                                   atol=1e-12)
        assert counted_op, f"mode {mode!r} did not run the fused op"
    counted_op.clear()
    torch.autograd.functional.hessian(loss, flat)  # outside the routes: torch's own double backward
    assert not counted_op


def test_per_sample_gradients_under_vmap_are_torchs():
    """A target batched by vmap (the empirical Fisher's per-sample gradients) takes torch's function."""
    logits = torch.randn(6, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (6,))

    def per_row(z, y):
        return losses.functional_cross_entropy(z[None], y[None])

    want = torch.func.vmap(torch.func.grad(lambda z, y: F.cross_entropy(z[None], y[None])))(logits, target)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(per_row))(logits, target), want, rtol=0, atol=0)
