"""GGNOperator and EmpiricalFisherOperator against explicit matrices of small float64 models.

The explicit GGN is ``Jᵀ H_loss J`` with ``J = torch.autograd.functional.jacobian`` of the flattened outputs in the
flat parameters and ``H_loss = torch.autograd.functional.hessian`` of the loss in the flattened outputs; the explicit
Fisher is ``(1/N) Σ_i g_i g_iᵀ`` from per-row ``torch.autograd.grad`` calls. Models: an MLP with tanh (5→7→3), a
Linear-BatchNorm-tanh-Dropout-Linear net in eval mode, and a pre-norm transformer block with math attention (from
test_hvp.py). Every input is drawn fresh from the seeded generator (conftest seeds each test).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optim
from optim.hessian.fisher import EmpiricalFisherOperator
from optim.hessian.ggn import GGNOperator
from optim.hessian.monitor import SharpnessMonitor
from optim.hessian.operator import HessianOperator
from optim.hessian.spectrum import MatrixOperator, diagonal, spectral_density, top_eigenvalues, trace

from ._changes import CHANGES, make_change
from .test_hvp import EXACT_RTOL, TinyAttentionBlock, dense_hessian, mean_squared_error, relative_error

OPERATORS = [GGNOperator, EmpiricalFisherOperator]


# ----------------------------------------------------------------------------------------------------------------
# Models, batches and the explicit matrices


def mlp_problem(rows=4):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    return model, torch.randn(rows, 5, dtype=torch.float64), torch.randint(0, 3, (rows,))


def batchnorm_problem(rows=6):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    return model, torch.randn(rows, 3, dtype=torch.float64), torch.randint(0, 2, (rows,))


def attention_problem(rows=2):
    model = TinyAttentionBlock().double().eval()
    return model, torch.randn(rows, 4, 8, dtype=torch.float64), torch.randn(rows, 4, 8, dtype=torch.float64)


PROBLEMS = {"mlp": mlp_problem, "batchnorm": batchnorm_problem, "attention": attention_problem}
# (problem, loss_fn, the closed form the operator should pick)
LOSSES = [
    ("mlp", F.cross_entropy, "cross_entropy"),
    ("mlp", lambda z, y: F.cross_entropy(z, y), "autograd"),
    ("mlp", nn.CrossEntropyLoss(reduction="sum"), "cross_entropy"),
    ("batchnorm", F.cross_entropy, "cross_entropy"),
    ("attention", F.mse_loss, "mse"),
    ("attention", mean_squared_error, "autograd"),
    ("attention", lambda z, y: (z - y).abs().pow(3).sum() / 7 + torch.logsumexp(z.flatten(), 0), "autograd"),
]
LOSS_IDS = [f"{problem}-{kind}-{i}" for i, (problem, _, kind) in enumerate(LOSSES)]


def functional(model, inputs, scope=None):
    """``(flat, out)``: the in-scope parameters as one vector and ``out(flat)``, the model's flattened outputs."""
    names = [name for name, p in model.named_parameters() if scope is None or scope(name, p)]
    named = dict(model.named_parameters())
    params = [named[name].detach() for name in names]
    fixed = {name: p.detach() for name, p in named.items() if name not in names}
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def out(flat):
        pieces = [piece.reshape(p.shape) for piece, p in zip(flat.split([p.numel() for p in params]), params)]
        return torch.func.functional_call(model, {**buffers, **fixed, **dict(zip(names, pieces))}, (inputs,))

    return torch.cat([p.reshape(-1) for p in params]), out


def explicit_ggn(model, loss_fn, inputs, targets, scope=None):
    """``(Jᵀ H_loss J, J, H_loss, ∇_z ℓ, z)`` with J (m, n) and H_loss (m, m), explicitly."""
    flat, out = functional(model, inputs, scope)
    z = out(flat).detach()
    J = torch.autograd.functional.jacobian(lambda f: out(f).reshape(-1), flat)
    loss_of_z = lambda zf: loss_fn(zf.reshape(z.shape), targets)  # noqa: E731
    H_loss = torch.autograd.functional.hessian(loss_of_z, z.reshape(-1))
    return J.T @ H_loss @ J, J, H_loss, z


def explicit_fisher(model, loss_fn, inputs, targets):
    flat, out = functional(model, inputs)
    rows = []
    for i in range(targets.shape[0]):
        point = flat.clone().requires_grad_(True)
        _, out_i = functional(model, inputs[i:i + 1])
        (g,) = torch.autograd.grad(loss_fn(out_i(point), targets[i:i + 1]), point)
        rows.append(g)
    G = torch.stack(rows)
    return G.T @ G / targets.shape[0], G


class RowsLast(nn.Module):
    """``model(x)`` with the rows moved to the last dim: outputs whose dim 0 is not the rows."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).movedim(0, -1)


def dense_of(operator) -> torch.Tensor:
    """The operator's matrix from n products (one (n, n) block of basis vectors)."""
    return operator @ torch.eye(operator.n, dtype=operator.dtype)


def random_flat(operator, k=None):
    return torch.randn(((k,) if k is not None else ()) + (operator.n,), dtype=operator.dtype)


# ----------------------------------------------------------------------------------------------------------------
# GGN = Jᵀ H_loss J


@pytest.mark.parametrize("problem, loss_fn, kind", LOSSES, ids=LOSS_IDS)
def test_ggn_equals_explicit_jt_h_j(problem, loss_fn, kind):
    model, inputs, targets = PROBLEMS[problem]()
    expected, J, H_loss, _ = explicit_ggn(model, loss_fn, inputs, targets)
    G = GGNOperator(model, loss_fn, (inputs, targets))
    v = random_flat(G)
    assert relative_error(G @ v, expected @ v) <= EXACT_RTOL
    assert G.output_hessian == kind
    assert relative_error(v @ G, expected @ v) <= EXACT_RTOL
    for k in (1, 3):
        block = random_flat(G, k)
        product = G @ block
        assert product.shape == (k, G.n)
        assert relative_error(product, block @ expected) <= EXACT_RTOL
    assert J.shape[1] == G.n and H_loss.shape == (J.shape[0], J.shape[0])


@pytest.mark.parametrize("problem, loss_fn, kind", LOSSES, ids=LOSS_IDS)
def test_kept_and_fresh_forward_agree(problem, loss_fn, kind):
    model, inputs, targets = PROBLEMS[problem]()
    kept, fresh = (GGNOperator(model, loss_fn, (inputs, targets), reuse_graph=r) for r in (None, False))
    block = random_flat(kept, 4)
    kept @ block  # the first block of 4 measures how its backwards run (vmap or loop) and remembers that
    first = kept @ block
    assert kept._graph is not None and fresh._graph is None
    torch.testing.assert_close(kept @ block, first, rtol=0, atol=0)  # the kept forward, reused
    torch.testing.assert_close(fresh @ block, first, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("problem", ["mlp", "batchnorm", "attention"])
def test_hessian_is_ggn_plus_residual(problem):
    # ∇²ℓ(θ) = Jᵀ H_loss J + Σ_j (∂ℓ/∂z_j) ∇²_θ z_j, the residual from the explicit second derivatives of every output.
    model, inputs, targets = PROBLEMS[problem]()
    loss_fn = F.cross_entropy if problem != "attention" else F.mse_loss
    ggn, _, _, z = explicit_ggn(model, loss_fn, inputs, targets)
    flat, out = functional(model, inputs)
    z_leaf = z.clone().requires_grad_(True)
    (dloss_dz,) = torch.autograd.grad(loss_fn(z_leaf, targets), z_leaf)
    # Σ_j c_j ∇²_θ z_j with c = ∂ℓ/∂z held fixed: the Hessian of θ ↦ ⟨c, z(θ)⟩ (linearity of ∇²) ...
    residual = dense_hessian(lambda p: (dloss_dz * out(p)).sum(), [flat])
    if problem == "mlp":  # ... which is the sum of every output's own Hessian, term by term
        second = torch.autograd.functional.jacobian(
            lambda f: torch.autograd.functional.jacobian(lambda g: out(g).reshape(-1), f, create_graph=True), flat,
            vectorize=True)  # (m, n, n): ∇²_θ z_j for every output j
        torch.testing.assert_close(torch.einsum("j,jab->ab", dloss_dz.reshape(-1), second), residual, rtol=1e-10,
                                   atol=1e-14)
    hessian = dense_hessian(lambda p: loss_fn(out(p), targets), [flat])
    G = GGNOperator(model, loss_fn, (inputs, targets))
    H = HessianOperator(model, loss_fn, (inputs, targets))
    torch.testing.assert_close(dense_of(G) + residual, hessian, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense_of(H) - dense_of(G), residual, rtol=1e-9, atol=1e-12)
    assert relative_error(dense_of(G), ggn) <= EXACT_RTOL
    assert residual.abs().max() > 1e-3 * hessian.abs().max()  # a real difference, not a trivial identity


@pytest.mark.parametrize("problem, loss_fn, kind", LOSSES, ids=LOSS_IDS)  # every loss here is convex in z
@pytest.mark.parametrize("operator_class", OPERATORS)
def test_positive_semi_definite_and_symmetric(problem, loss_fn, kind, operator_class):
    model, inputs, targets = PROBLEMS[problem]()
    matrix = dense_of(operator_class(model, loss_fn, (inputs, targets)))
    torch.testing.assert_close(matrix, matrix.T, rtol=1e-12, atol=1e-14)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    scale = eigenvalues.abs().max().item()
    assert scale > 0 and eigenvalues.min().item() >= -1e-10 * scale
    # The Hessian of the same problems is indefinite: PSD is the GGN's property, not the models'.
    if problem == "mlp" and operator_class is GGNOperator:
        assert torch.linalg.eigvalsh(dense_of(HessianOperator(model, loss_fn, (inputs, targets)))).min() < 0


@pytest.mark.parametrize("operator_class", OPERATORS)
def test_k_probe_blocks_equal_k_single_products(operator_class):
    model, inputs, targets = mlp_problem()
    C = operator_class(model, F.cross_entropy, (inputs, targets))
    block = random_flat(C, 5)
    product = C @ block
    singles = torch.stack([C @ row for row in block])
    torch.testing.assert_close(product, singles, rtol=1e-12, atol=1e-15)
    assert C.num_matvecs == 10
    assert (C @ random_flat(C, 0)).shape == (0, C.n)
    assert C.num_matvecs == 10


@pytest.mark.parametrize("operator_class", OPERATORS)
def test_param_shaped_lists_and_param_filter(operator_class):
    model, inputs, targets = attention_problem()
    in_scope = {"query.weight", "norm_bias", "down.bias"}
    scope = lambda name, p: name in in_scope  # noqa: E731
    C = operator_class(model, F.mse_loss, (inputs, targets), param_filter=scope)
    if operator_class is GGNOperator:
        expected = explicit_ggn(model, F.mse_loss, inputs, targets, scope)[0]
    else:
        names = [name for name, _ in model.named_parameters()]
        full, _ = explicit_fisher(model, F.mse_loss, inputs, targets)
        offsets, index = 0, []
        for name, p in model.named_parameters():
            if name in in_scope:
                index.extend(range(offsets, offsets + p.numel()))
            offsets += p.numel()
        expected = full[index][:, index]
        assert C.names == [name for name in names if name in in_scope]
    assert C.n == expected.shape[0] == 8 * 8 + 8 + 8
    v = random_flat(C)
    as_list = C.unflatten(v)
    product = C @ as_list
    assert isinstance(product, list) and [t.shape for t in product] == [p.shape for p in C.params]
    assert relative_error(C.flatten(product), expected @ v) <= EXACT_RTOL
    assert isinstance(C @ tuple(as_list), tuple)
    block = random_flat(C, 3)
    product = C @ C.unflatten(block)
    assert [t.shape for t in product] == [(3,) + tuple(p.shape) for p in C.params]
    assert relative_error(C.flatten(product), block @ expected) <= EXACT_RTOL


@pytest.mark.parametrize("operator_class", OPERATORS)
def test_batches_are_weighted_by_rows_as_hessian_operator(operator_class):
    model, inputs, targets = mlp_problem(rows=8)
    full = operator_class(model, F.cross_entropy, (inputs, targets))
    expected = dense_of(full)
    batches = [(inputs[:3], targets[:3]), (inputs[3:3], targets[3:3]), (inputs[3:], targets[3:])]  # 3, 0, 5 rows
    split = operator_class(model, F.cross_entropy, batches)
    block = random_flat(split, 2)
    assert relative_error(split @ block, block @ expected) <= EXACT_RTOL
    # The same weights as HessianOperator: (3·C_1 + 5·C_2) / 8.
    parts = [dense_of(operator_class(model, F.cross_entropy, b)) for b in (batches[0], batches[2])]
    torch.testing.assert_close(dense_of(split), (3 * parts[0] + 5 * parts[1]) / 8, rtol=1e-12, atol=1e-15)
    loss, grad = split.loss_and_grad()
    hessian_loss, hessian_grad = HessianOperator(model, F.cross_entropy, batches).loss_and_grad()
    assert torch.equal(loss, hessian_loss) and torch.equal(grad, hessian_grad)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=3, shuffle=True)
    assert relative_error(operator_class(model, F.cross_entropy, loader) @ block[0], expected @ block[0]) <= 1e-10


# ----------------------------------------------------------------------------------------------------------------
# The kept forward (GGN) and the kept G (Fisher) are never stale


def count_builds(monkeypatch, operator_class):
    builds = []
    build = operator_class._build
    monkeypatch.setattr(operator_class, "_build", lambda self, *a: builds.append(1) or build(self, *a))
    return builds


def exact_now(operator_class, model, loss_fn, inputs, targets):
    if operator_class is GGNOperator:
        return explicit_ggn(model, loss_fn, inputs, targets)[0]
    return explicit_fisher(model, loss_fn, inputs, targets)[0]


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("operator_class", OPERATORS)
def test_kept_state_is_never_stale(operator_class, change, monkeypatch):
    model, inputs, targets = batchnorm_problem()
    C = operator_class(model, F.cross_entropy, (inputs, targets))
    builds = count_builds(monkeypatch, operator_class)
    v = random_flat(C)
    first = C @ v
    assert torch.equal(C @ v, first) and len(builds) == 1 and C._graph is not None
    assert relative_error(first, exact_now(operator_class, model, F.cross_entropy, inputs, targets) @ v) <= 1e-10
    make_change(change, model, inputs, targets)
    expected = exact_now(operator_class, model, F.cross_entropy, inputs, targets) @ v
    assert relative_error(C @ v, expected) <= EXACT_RTOL and len(builds) == 2
    assert relative_error(C @ v, expected) <= EXACT_RTOL and len(builds) == 2  # the new state is kept
    C.release_graph()
    assert C._graph is None
    assert relative_error(C @ v, expected) <= EXACT_RTOL and len(builds) == 3


@pytest.mark.parametrize("operator_class", OPERATORS)
def test_train_mode_is_not_kept_unless_asked(operator_class):
    model, inputs, targets = mlp_problem()
    model.train()
    for reuse, kept in ((None, False), (True, True), (False, False)):
        C = operator_class(model, F.cross_entropy, (inputs, targets), reuse_graph=reuse)
        C @ random_flat(C)
        assert (C._graph is not None) == kept


def test_ggn_of_a_last_dim_cross_entropy_with_ignored_targets_is_exact():
    """``optim.hessian.cross_entropy`` averages over the rows not ignored and gives ignored rows no curvature: not
    the closed form's 1/rows, so those batches take autograd (a closed form once gave 27% relative error here)."""
    model, inputs, targets = sequence_problem()
    loss_fn = optim.hessian.cross_entropy
    expected = explicit_ggn(model, loss_fn, inputs, targets)[0]
    for compile in (False, True):
        G = GGNOperator(model, loss_fn, (inputs, targets), compile=compile)
        block = random_flat(G, 2)
        assert relative_error(G @ block, block @ expected) <= EXACT_RTOL and G.output_hessian == "autograd"
    full = torch.randint(0, 5, (3, 7))  # nothing ignored: the closed form
    G = GGNOperator(model, loss_fn, (inputs, full))
    assert relative_error(G @ block, block @ explicit_ggn(model, loss_fn, inputs, full)[0]) <= EXACT_RTOL
    assert G.output_hessian == "cross_entropy"


def test_ggn_of_the_causal_lm_loss_has_its_closed_form_eager_and_compiled():
    """causal_lm_loss: the softmax form on the shifted, kept pairs over K, zero on the last position and the ignored
    ones; exact against the explicit Jᵀ H J, eager (kept and unkept) and compiled, with and without ignored labels,
    and the same product as autograd through a criterion the operator does not recognize."""
    model, inputs, labels = sequence_problem()
    loss_fn = optim.hessian.causal_lm_loss
    for targets in (labels, torch.randint(0, 5, (3, 7))):
        expected = explicit_ggn(model, loss_fn, inputs, targets)[0]
        block = random_flat(GGNOperator(model, loss_fn, (inputs, targets)), 3)
        for options, kind in ((dict(), "causal_lm"), (dict(reuse_graph=False), "causal_lm"),
                              (dict(compile=True), "compiled")):
            G = GGNOperator(model, loss_fn, (inputs, targets), **options)
            assert relative_error(G @ block, block @ expected) <= EXACT_RTOL and G.output_hessian == kind, options
            assert relative_error(G @ block[0], expected @ block[0]) <= EXACT_RTOL, options
        autograd = GGNOperator(model, lambda z, y: loss_fn(z, y), (inputs, targets))
        assert relative_error(autograd @ block, block @ expected) <= EXACT_RTOL
        assert autograd.output_hessian == "autograd"


# ----------------------------------------------------------------------------------------------------------------
# Empirical Fisher


@pytest.mark.parametrize("problem", ["mlp", "batchnorm", "attention"])
def test_fisher_equals_explicit_per_sample_gradients(problem):
    model, inputs, targets = PROBLEMS[problem]()
    loss_fn = F.mse_loss if problem == "attention" else F.cross_entropy
    expected, G_explicit = explicit_fisher(model, loss_fn, inputs, targets)
    Fi = EmpiricalFisherOperator(model, loss_fn, (inputs, targets))
    torch.testing.assert_close(Fi.per_sample_gradients(inputs, targets), G_explicit, rtol=1e-12, atol=1e-14)
    block = random_flat(Fi, 3)
    assert relative_error(Fi @ block, block @ expected) <= EXACT_RTOL
    assert Fi._graph is not None and Fi.last_path in ("kept G", "kept forward")  # as the first build measured
    # Over the bound: the forward in the outputs is kept instead of G, the same matrix.
    small = EmpiricalFisherOperator(model, loss_fn, (inputs, targets), max_kept_bytes=Fi.n * 8)
    assert relative_error(small @ block, block @ expected) <= EXACT_RTOL and small.last_path == "kept forward"
    # Nothing kept: the first product is taken on one forward in the outputs (then the faster way, as measured).
    unkept = EmpiricalFisherOperator(model, loss_fn, (inputs, targets), reuse_graph=False)
    assert relative_error(unkept @ block, block @ expected) <= EXACT_RTOL and unkept._graph is None
    assert unkept.last_path == "outputs"
    assert relative_error(unkept @ block[0], expected @ block[0]) <= EXACT_RTOL  # one probe
    # Outputs whose dim 0 is not the rows: the per-sample gradients, recomputed chunk by chunk (a row at a time).
    columns = EmpiricalFisherOperator(RowsLast(model), lambda z, y: loss_fn(z.movedim(-1, 0), y), (inputs, targets),
                                      max_kept_bytes=Fi.n * 8)
    assert relative_error(columns @ block, block @ expected) <= EXACT_RTOL and columns.last_path == "per-sample"
    # The 1/N is always there. Cross-entropy reduces over rows only: "sum" gives the same one-row loss. MSE's
    # "mean" also averages a row's m = 32 elements, so its "sum" scales ℓ_i by m and F by m².
    summed = EmpiricalFisherOperator(model, lambda z, y: loss_fn(z, y, reduction="sum"), (inputs, targets))
    factor = 1.0 if loss_fn is F.cross_entropy else float(targets[0].numel()) ** 2
    torch.testing.assert_close(summed @ block, factor * (Fi @ block), rtol=1e-12, atol=1e-15)
    assert not (Fi @ block).requires_grad
    torch.testing.assert_close(dense_of(Fi), G_explicit.T @ G_explicit / targets.shape[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("faster", ["outputs", "per-sample"])
def test_unkept_fisher_products_take_the_way_measured_faster(faster, monkeypatch):
    """The first unkept product of a batch shape and k times both ways (the per-sample one on a few rows, scaled);
    later products take the faster, and both are the explicit Fisher."""
    import optim.hessian.fisher as fisher_module

    model, inputs, targets = mlp_problem(rows=9)
    expected, _ = explicit_fisher(model, F.cross_entropy, inputs, targets)
    times = iter([1.0, 2.0] if faster == "outputs" else [1.0, 0.1])  # outputs', then the sampled rows' seconds
    monkeypatch.setattr(fisher_module, "_elapsed_s", lambda device, start: next(times))
    Fi = EmpiricalFisherOperator(model, F.cross_entropy, (inputs, targets), reuse_graph=False)
    block = random_flat(Fi, 2)
    assert relative_error(Fi @ block, block @ expected) <= EXACT_RTOL and Fi.last_path == "outputs"
    for _ in range(2):  # remembered: nothing is timed again (the iterator is spent)
        assert relative_error(Fi @ block, block @ expected) <= EXACT_RTOL and Fi.last_path == faster
    again = EmpiricalFisherOperator(model, F.cross_entropy, (inputs, targets), reuse_graph=False)
    assert relative_error(again @ block, block @ expected) <= EXACT_RTOL and again.last_path == faster  # per model


@pytest.mark.parametrize("faster", ["kept forward", "kept G"])
def test_the_kept_fisher_state_is_the_one_measured_faster(faster, monkeypatch):
    """The first build of a batch shape times a product on the kept forward against one on G (estimated from a few
    rows); the faster is kept and remembered, both exact. G that does not fit max_kept_bytes: the forward."""
    import optim.hessian.fisher as fisher_module

    model, inputs, targets = attention_problem(rows=6)
    expected, _ = explicit_fisher(model, F.mse_loss, inputs, targets)
    times = iter([1.0, 2.0] if faster == "kept forward" else [1.0, 0.1])  # the forward's, then G's sampled rows'
    monkeypatch.setattr(fisher_module, "_elapsed_s", lambda device, start: next(times))
    for _ in range(2):  # the second operator is built from the remembered choice (nothing timed: times is spent)
        Fi = EmpiricalFisherOperator(model, F.mse_loss, (inputs, targets))
        for k in (None, 3):
            v = random_flat(Fi, k)
            assert relative_error(Fi @ v, v @ expected if k else expected @ v) <= EXACT_RTOL
            assert Fi.last_path == faster and Fi._graph is not None
    kept = Fi._graph
    next(model.parameters()).data.add_(0.1)  # no version bump: the kept state is proven stale by its contents
    v = random_flat(Fi)
    assert relative_error(Fi @ v, explicit_fisher(model, F.mse_loss, inputs, targets)[0] @ v) <= EXACT_RTOL
    assert Fi._graph is not kept and Fi.last_path == faster
    expected, _ = explicit_fisher(model, F.mse_loss, inputs, targets)
    too_small = EmpiricalFisherOperator(model, F.mse_loss, (inputs, targets), max_kept_bytes=8)
    block = random_flat(too_small, 2)
    assert relative_error(too_small @ block, block @ expected) <= EXACT_RTOL
    assert too_small.last_path == "kept forward"


def sequence_problem():
    """A per-position model on (B, T, 4) inputs, (B, T) labels with some ignored (-100): a language model's shapes."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double().eval()
    inputs, labels = torch.randn(3, 7, 4, dtype=torch.float64), torch.randint(0, 5, (3, 7))
    labels[0, :3] = -100
    return model, inputs, labels


@pytest.mark.parametrize("loss_fn", [optim.hessian.cross_entropy, optim.hessian.causal_lm_loss],
                         ids=["cross_entropy", "causal_lm_loss"])
def test_fisher_of_the_language_model_losses_on_every_path(loss_fn):
    """The package's own language-model losses count their kept labels on the host, which vmap (per-sample
    losses) cannot: under vmap they take torch's formula. Every way of the product is the explicit Fisher."""
    model, inputs, labels = sequence_problem()
    expected, _ = explicit_fisher(model, loss_fn, inputs, labels)
    block = random_flat(EmpiricalFisherOperator(model, loss_fn, (inputs, labels)), 2)
    ways = {"kept": dict(), "kept forward": dict(max_kept_bytes=8), "unkept": dict(reuse_graph=False)}
    for way, options in ways.items():
        Fi = EmpiricalFisherOperator(model, loss_fn, (inputs, labels), **options)
        assert relative_error(Fi @ block, block @ expected) <= EXACT_RTOL, way
    columns = EmpiricalFisherOperator(RowsLast(model), lambda z, y: loss_fn(z.movedim(-1, 0), y), (inputs, labels),
                                      max_kept_bytes=8)
    assert relative_error(columns @ block, block @ expected) <= EXACT_RTOL and columns.last_path == "per-sample"


class Branching(nn.Module):
    """Branches on its input's values, as a Hugging Face model's attention-mask handling does (``if mask.all()``):
    vmap refuses it. Rows stay independent: the branch is the same for one row as for the batch."""

    def __init__(self):
        super().__init__()
        self.mlp = mlp_problem()[0]

    def forward(self, x):
        return self.mlp(x) if bool(torch.isfinite(x).all()) else self.mlp(x.nan_to_num())


class Recurrent(nn.Module):
    """An nn.LSTM over 4 steps of 5 features, then a head on the last step: vmap over rows fails inside _VF.lstm with
    a shape error that does not say vmap ("output with shape [1, 28] doesn't match the broadcast shape")."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 7, batch_first=True)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.rnn(x.view(x.shape[0], 1, 5).expand(-1, 4, -1))[0][:, -1])


class _OldStyleTanh(torch.autograd.Function):
    """An autograd.Function without setup_context (BLOOM's GeLU is one): autograd differentiates it, and twice
    (its backward is torch ops), but torch.func refuses it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class OldStyleFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.head = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(_OldStyleTanh.apply(self.hidden(x)))


MODELS_VMAP_CANNOT_RUN = {"branching": (lambda: Branching(), "vmap"),
                          "lstm": (lambda: Recurrent().double().eval(), "shape"),
                          "old-style autograd.Function": (lambda: OldStyleFunction().double(), "setup_context")}


@pytest.mark.parametrize("kind", list(MODELS_VMAP_CANNOT_RUN))
def test_per_sample_gradients_of_a_model_vmap_cannot_run_go_row_by_row(kind):
    # The row loop was torch.func.grad per row, which refuses the old-style Function as vmap does: the Fisher of
    # such a model raised, every way; its rows now go by torch.autograd.grad.
    torch.manual_seed(0)
    make, error = MODELS_VMAP_CANNOT_RUN[kind]
    model = make()
    _, inputs, targets = mlp_problem(rows=6)
    expected, G_explicit = explicit_fisher(model, F.cross_entropy, inputs, targets)
    with pytest.raises(RuntimeError, match=error):
        torch.func.vmap(model)(inputs)
    for options in (dict(), dict(reuse_graph=False), dict(max_kept_bytes=8)):
        Fi = EmpiricalFisherOperator(model, F.cross_entropy, (inputs, targets), **options)
        block = random_flat(Fi, 2)
        assert relative_error(Fi @ block, block @ expected) <= EXACT_RTOL, options
    assert relative_error(Fi.per_sample_gradients(inputs, targets), G_explicit) <= EXACT_RTOL


def test_a_model_error_is_raised_not_hidden_by_the_row_loop():
    class Broken(nn.Module):  # fails for any batch size, vmapped or not
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x):
            return self.linear(x) @ torch.ones(4, 2, dtype=x.dtype)

    _, inputs, targets = mlp_problem(rows=4)
    Fi = EmpiricalFisherOperator(Broken().double(), F.cross_entropy, (inputs, targets), reuse_graph=False)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        Fi.per_sample_gradients(inputs, targets)


def test_fisher_of_a_mean_loss_has_the_gradient_as_mean_of_its_rows():
    model, inputs, targets = mlp_problem(rows=5)
    Fi = EmpiricalFisherOperator(model, F.cross_entropy, (inputs, targets))
    G = Fi.per_sample_gradients(inputs, targets)
    _, grad = Fi.loss_and_grad()
    torch.testing.assert_close(G.mean(0), grad, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# Estimators and the monitor


@pytest.mark.parametrize("operator_class", OPERATORS)
def test_estimators_match_the_dense_matrix(operator_class):
    model, inputs, targets = mlp_problem(rows=6)
    C = operator_class(model, F.cross_entropy, (inputs, targets))
    dense = dense_of(C)
    if operator_class is GGNOperator:
        torch.testing.assert_close(dense, explicit_ggn(model, F.cross_entropy, inputs, targets)[0], rtol=1e-10,
                                   atol=1e-14)
    else:
        torch.testing.assert_close(dense, explicit_fisher(model, F.cross_entropy, inputs, targets)[0], rtol=1e-10,
                                   atol=1e-14)
    matrix = MatrixOperator(dense)
    exact_values = torch.linalg.eigvalsh(dense).flip(0)

    values, vectors = top_eigenvalues(C, k=3, tol=1e-10, max_iter=C.n, seed=0)
    torch.testing.assert_close(values, exact_values[:3], rtol=1e-6, atol=1e-8 * exact_values[0].item())

    estimate = trace(C, num_probes=60, seed=1)
    same = trace(matrix, num_probes=60, seed=1)
    assert estimate.estimate == pytest.approx(same.estimate, rel=1e-9)
    assert abs(estimate.estimate - torch.trace(dense).item()) <= 4 * estimate.std_error
    hutchpp = trace(C, num_probes=60, method="hutch++", seed=1)
    assert hutchpp.estimate == pytest.approx(torch.trace(dense).item(), rel=1e-8)  # rank ≤ 12 < 20: exact sketch

    diag = diagonal(C, num_probes=50, seed=2)
    assert [t.shape for t in diag.estimate] == [p.shape for p in C.params]
    flat_diag = C.flatten(diag.estimate)
    torch.testing.assert_close(flat_diag, diagonal(matrix, num_probes=50, seed=2).estimate, rtol=1e-9, atol=1e-13)
    inside = (flat_diag - torch.diagonal(dense)).abs() <= 4 * C.flatten(diag.std_error) + 1e-12
    assert inside.double().mean() >= 0.95

    density = spectral_density(C, num_runs=4, lanczos_steps=20, seed=3)
    reference = spectral_density(matrix, num_runs=4, lanczos_steps=20, seed=3)
    torch.testing.assert_close(density.density, reference.density, rtol=1e-6, atol=1e-8 * density.density.max().item())
    assert abs(torch.trapezoid(density.density, density.grid).item() - 1.0) <= 1e-4


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_sharpness_monitor_curvature(curvature):
    model, inputs, targets = mlp_problem(rows=6)
    monitor = SharpnessMonitor(model, F.cross_entropy, every=1, lr_from=0.1, probes=60, lanczos_iters=60, tol=1e-10,
                               trace_method="hutch++", curvature=curvature)
    record = monitor.measure(0, (inputs, targets))
    operator_class = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": EmpiricalFisherOperator}[curvature]
    dense = dense_of(operator_class(model, F.cross_entropy, (inputs, targets)))
    assert record["lambda_max"] == pytest.approx(torch.linalg.eigvalsh(dense)[-1].item(), rel=1e-6)
    if curvature != "hessian":  # low rank: the Hutch++ sketch holds the whole range, the trace is exact
        assert record["trace"] == pytest.approx(torch.trace(dense).item(), rel=1e-8)
    assert monitor.curvature == curvature


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and nothing changed


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_unchanged(model, before):
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("operator_class", OPERATORS)
def test_construction_errors(operator_class):
    model, inputs, targets = mlp_problem()
    batch = (inputs, targets)
    before = snapshot(model)
    name = operator_class.__name__
    with pytest.raises(ValueError, match=f"{name}: model must be a torch.nn.Module, got a function"):
        operator_class(lambda x: x, F.cross_entropy, batch)
    with pytest.raises(ValueError, match=f"{name}: loss_fn must be callable"):
        operator_class(model, "cross_entropy", batch)
    with pytest.raises(ValueError, match=f"{name}: param_filter must be callable"):
        operator_class(model, F.cross_entropy, batch, param_filter="0.weight")
    with pytest.raises(ValueError, match=f"{name}: no parameters in scope.*passes param_filter"):
        operator_class(model, F.cross_entropy, batch, param_filter=lambda n, p: False)
    with pytest.raises(ValueError, match=f"{name}: reuse_graph must be None, True or False"):
        operator_class(model, F.cross_entropy, batch, reuse_graph="yes")
    with pytest.raises(ValueError, match=f"{name}: data must be one batch or an iterable of batches, a batch being "
                                         "an \\(inputs, targets\\) pair"):
        operator_class(model, F.cross_entropy, 3)
    with pytest.raises(TypeError, match="mode"):
        operator_class(model, F.cross_entropy, batch, mode="rr")
    generator = (b for b in [batch])
    with pytest.raises(ValueError, match="reuse_graph"):
        operator_class(model, F.cross_entropy, generator, reuse_graph=1.5)
    assert next(generator) is batch  # not consumed by a construction that failed
    if operator_class is EmpiricalFisherOperator:
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="max_kept_bytes must be an integer >= 0"):
                operator_class(model, F.cross_entropy, batch, max_kept_bytes=bad)
    assert_unchanged(model, before)


@pytest.mark.parametrize("operator_class", OPERATORS)
def test_bad_vectors_and_batches_raise_before_computing(operator_class, monkeypatch):
    model, inputs, targets = mlp_problem()
    C = operator_class(model, F.cross_entropy, (inputs, targets))
    builds = count_builds(monkeypatch, operator_class)
    before = snapshot(model)
    name = operator_class.__name__
    with pytest.raises(ValueError, match=rf"{name}: v has 1 tensors but params has 4"):
        C @ [torch.randn(7, 5, dtype=torch.float64)]
    with pytest.raises(ValueError, match=rf"{name}: v has shape \(67,\); expected a flat vector \(66,\)"):
        C @ torch.randn(67, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{name}: v is torch.float32 on cpu but the parameters are torch.float64"):
        C @ torch.randn(66)
    with pytest.raises(ValueError, match=rf"{name}: v\[0\] contains non-finite"):
        C @ torch.full((66,), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{name}: v must be a tensor"):
        C @ {"0.weight": 1}
    with pytest.raises(ValueError, match=rf"{name}.unflatten: expected a tensor of shape \(66,\)"):
        C.unflatten(torch.randn(65, dtype=torch.float64))
    assert builds == [] and C._graph is None and C.num_matvecs == 0  # checked before anything was computed
    with pytest.raises(ValueError, match=f"{name}: data batch 1 is a tuple of length 1"):  # at construction
        operator_class(model, F.cross_entropy, [(inputs, targets), (inputs,)])
    with pytest.raises(ValueError, match=f"{name}: data has no batch with at least one row"):
        operator_class(model, F.cross_entropy, []) @ random_flat(C)
    nan_inputs = inputs.clone()
    nan_inputs[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite loss"):
        operator_class(model, F.cross_entropy, (nan_inputs, targets)) @ random_flat(C)
    assert_unchanged(model, before)


def test_ggn_model_output_must_be_one_tensor():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2).double()

        def forward(self, x):
            return self.linear(x), x

    G = GGNOperator(TwoOutputs(), F.cross_entropy, (torch.randn(4, 3, dtype=torch.float64), torch.zeros(4).long()))
    with pytest.raises(ValueError, match="GGNOperator: the model must return one floating-point tensor.*tuple"):
        G @ random_flat(G)
    with pytest.raises(ValueError, match="f must return a scalar loss"):
        GGNOperator(nn.Linear(3, 2).double(), lambda z, y: z, (torch.randn(4, 3, dtype=torch.float64),
                                                               torch.zeros(4))) @ torch.zeros(8, dtype=torch.float64)


def test_fisher_refuses_what_has_no_per_sample_gradient():
    model, inputs, targets = batchnorm_problem()
    model.train()
    Fi = EmpiricalFisherOperator(model, F.cross_entropy, (inputs, targets))
    before = snapshot(model)
    with pytest.raises(ValueError, match="EmpiricalFisherOperator: module 1 is a BatchNorm in training mode.*eval"):
        Fi @ random_flat(Fi)
    assert_unchanged(model, before)
    model.eval()
    mismatched = EmpiricalFisherOperator(model, F.cross_entropy, (inputs[:5], targets))
    with pytest.raises(ValueError, match="does not have the targets' 6 rows on dim 0"):
        mismatched @ random_flat(Fi)
    scalar = EmpiricalFisherOperator(model, lambda z, y: z.sum() * y, (inputs, torch.tensor(1.0, dtype=torch.float64)))
    with pytest.raises(ValueError, match="targets must have a row dimension"):
        scalar @ random_flat(Fi)
    assert_unchanged(model, before)
    # a sequence row with nothing to predict: its mean loss is 0/0 (the message spoke of "the Hessian"); a criterion
    # the operator cannot read (a wrapper) leaves it to the caller
    sequences, seq_inputs, labels = sequence_problem()
    labels[1] = -100
    for options in (dict(), dict(reuse_graph=False), dict(max_kept_bytes=8)):
        empty_row = EmpiricalFisherOperator(sequences, lambda z, y: optim.hessian.cross_entropy(z, y),
                                            (seq_inputs, labels), **options)
        with pytest.raises(ValueError, match=r"non-finite loss \(nan\) of row 1 of the batch alone.*every label -100"):
            empty_row @ random_flat(empty_row)


class ClassesOnDim1(nn.Module):
    def forward(self, z):
        return z.transpose(1, 2)


@pytest.mark.parametrize("criterion", ["optim cross_entropy", "F.cross_entropy", "nn.CrossEntropyLoss weights",
                                       "causal_lm_loss"])
def test_fisher_leaves_out_the_rows_with_nothing_to_predict(criterion):
    # A row whose labels are all ignored (a prompt-only sequence) has no part in the batch's loss, nor in its Hessian
    # or GGN; its one-row loss was 0/0 and the Fisher refused the batch. It is now left out: F is that of the other
    # rows, whichever way the product takes, over one batch or several.
    sequences, seq_inputs, labels = sequence_problem()
    loss_fn = {"optim cross_entropy": optim.hessian.cross_entropy, "F.cross_entropy": F.cross_entropy,
               "nn.CrossEntropyLoss weights": nn.CrossEntropyLoss(weight=torch.rand(5, dtype=torch.float64) + 0.5),
               "causal_lm_loss": optim.hessian.causal_lm_loss}[criterion]
    if criterion in ("F.cross_entropy", "nn.CrossEntropyLoss weights"):  # on (N, C, T) scores
        sequences = nn.Sequential(sequences, ClassesOnDim1())
    labels[1] = -100
    if criterion == "causal_lm_loss":
        labels[2, 1:] = -100  # only its first label, which predicts nothing
    kept = [i for i in range(labels.shape[0]) if i not in (1, 2)] if criterion == "causal_lm_loss" else \
        [i for i in range(labels.shape[0]) if i != 1]
    expected = EmpiricalFisherOperator(sequences, loss_fn, (seq_inputs[kept], labels[kept]))
    v = random_flat(expected)
    reference = expected @ v
    for options in (dict(), dict(reuse_graph=False), dict(max_kept_bytes=8)):
        fisher = EmpiricalFisherOperator(sequences, loss_fn, (seq_inputs, labels), **options)
        torch.testing.assert_close(fisher @ v, reference, rtol=1e-10, atol=1e-14)
    halves = [(seq_inputs[:2], labels[:2]), (seq_inputs[2:], labels[2:])]
    torch.testing.assert_close(EmpiricalFisherOperator(sequences, loss_fn, halves) @ v, reference, rtol=1e-10,
                               atol=1e-14)


def test_exported():
    assert optim.GGNOperator is GGNOperator and optim.hessian.GGNOperator is GGNOperator
    assert optim.EmpiricalFisherOperator is EmpiricalFisherOperator
    assert "GGNOperator" in optim.__all__ and "EmpiricalFisherOperator" in optim.hessian.__all__
    with pytest.raises(ValueError, match="curvature must be one of 'hessian', 'ggn', 'fisher', got 'gauss'"):
        SharpnessMonitor(nn.Linear(2, 2), F.mse_loss, curvature="gauss")


def test_a_blocks_backwards_are_measured_once_per_model_and_then_take_the_faster_way(monkeypatch):
    import importlib

    hvp_module = importlib.import_module("optim.hessian.hvp")
    model, inputs, targets = PROBLEMS["mlp"]()
    expected = explicit_ggn(model, F.cross_entropy, inputs, targets)[0]
    ways = []
    for name in ("_vmapped_backward", "_looped_backward"):
        original = getattr(hvp_module, name)
        monkeypatch.setattr(hvp_module, name,
                            lambda *a, _o=original, _n=name, **kw: ways.append(_n) or _o(*a, **kw))
    G = GGNOperator(model, F.cross_entropy, (inputs, targets))
    block = random_flat(G, 8)
    assert relative_error(G @ block, block @ expected) <= EXACT_RTOL
    assert ways.count("_vmapped_backward") == 2  # J v and Jᵀ w: half of the block each way, once
    assert all(hvp_module.batching_choice(model, 8, kind) in ("vmap", "loop") for kind in ("J v", "J^T w"))
    fresh = GGNOperator(model, F.cross_entropy, (inputs, targets), reuse_graph=False)
    for forced, calls in (("vmap", ["_vmapped_backward"] * 2), ("loop", [])):  # a loop goes probe by probe
        for kind in ("J v", "J^T w"):
            hvp_module._batching_choice.set(model, (kind, 8), forced)
        for operator in (G, fresh):  # another operator on the same model reads the same choice
            ways.clear()
            assert relative_error(operator @ block, block @ expected) <= EXACT_RTOL
            assert ways == calls
