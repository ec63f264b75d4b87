"""torch.compile and the package: every custom op inside a compiled graph, and compiled training steps of every
optimizer compared with eager on CPU (inductor, PyTorch 2.13).

Every op passes ``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOT dispatch) here and, on
more shapes, dtypes and devices, in its family's ``tests/<family>/test_ops.py``; each op also runs inside
``torch.compile(fullgraph=True)``, i.e. traced through its fake kernel, functionalized (the mutating ops become
``auto_functionalized``) and re-inplaced by inductor, and must give eager's result. A new op without a case here
fails ``test_every_op_has_a_case``.

What compiles (each case is a test below; results equal eager to float32 rounding):

* ``optim.AdamW`` (default fused path): ``torch.compile(opt.step, fullgraph=True)`` is one graph; a compiled
  forward + backward + ``opt.step()`` function is compared with eager in ``tests/fused/test_adamw.py``.
* ``optim.LowRankAdamW`` and ``optim.AdamW`` + ``optim.Refactorizer``: a compiled step function and a compiled
  ``opt.step`` across refactorizations, momentum resets and LR-recovery ramps.
* ``optim.RSDM``, ``optim.RiemannianSGD``, ``optim.RiemannianAdam``: a compiled step function (forward, backward,
  ``opt.step()``) and a compiled ``opt.step``, with graph breaks (below).
* ``optim.SophiaH``, ``optim.AdaHessian``: ``torch.compile(model)`` in the closure on the steps that do not refresh
  the curvature (``opt.next_step_refreshes()`` is False) with the eager model on refresh steps, and a compiled
  ``opt.step()`` after ``loss.backward()`` between refreshes.

What does not compile, and why:

* **Refresh steps of SophiaH / AdaHessian (and ``optim.hvp`` / ``HessianOperator`` of a compiled model, modes
  ``"rr"``, ``"fr"``, ``"auto"``).** The Hutchinson estimate needs the Hessian-vector product ∇(∇L·z), a double
  backward. AOTAutograd, which every ``torch.compile`` backend except ``"eager"`` uses, compiles the backward as
  an opaque function that cannot be differentiated again ("torch.compile with aot_autograd does not currently
  support double backward"), and ``torch.func`` transforms do not see through compiled code. So on refresh steps
  (every ``update_period``-th, and the first) the loss must come from the eager model; the optimizers then raise a
  ``RuntimeError`` that says so, with parameters and state unchanged. ``HessianOperator(..., mode="fd")`` works on a
  compiled model (two first-order gradients).
* **Data-dependent host syncs are graph breaks**, not errors: the non-finite checks (``check_finite=True`` of
  SophiaH/AdaHessian, the gradient check every Stiefel optimizer makes before touching anything) read a flag on
  the host; SophiaH/AdaHessian read their step counts (CPU tensors) with ``.item()`` to decide refreshes; the polar
  retraction's Newton–Schulz loop tests convergence on the host; ``optim.AdamW(foreach=True)`` reads the step
  counts for its bias corrections. Each splits the compiled step into several graphs, so ``fullgraph=True``
  fails for these optimizers; ``fullgraph=False`` (the default) gives eager's numbers.
* **Python scalars that change every step recompile.** The ops take their hyperparameters and counters as
  ``float``/``int`` arguments, and dynamo specializes a compiled ``opt.step`` on their values: RSDM's random row
  sets are a function of (seed, offset) kept as Python ints in the optimizer state (so state dicts load with
  ``weights_only=True`` and a resumed run draws the same rows), AdaHessian passes its step counts as ints, and an
  ``lr`` moved by an LR scheduler or the Refactorizer's recovery ramp is a new float at every step (torch's own
  optimizers avoid this with a Tensor ``lr``, which these classes do not take). Each new value recompiles that
  frame until ``torch._dynamo.config.recompile_limit`` (8); after that the frame runs eagerly. Results stay
  exact (the tests run past the limit); only the compile is lost. Compile the model, not these steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optim
from optim._library import NAMESPACE
from optim.stiefel import orthogonal_

from ._models import TanhMLP


def compiled(fn, **kwargs):
    """``torch.compile`` on a fresh dynamo cache, so a test's recompile counts do not depend on earlier tests."""
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


# --------------------------------------------------------------------------------------- every op in a graph

def _lists(shapes, **factories):
    return {name: [factory(shape) for shape in shapes] for name, factory in factories.items()}


SHAPES = [(5, 3), (7,)]

# name -> () -> (tensor arguments, other arguments), all by schema name. Fresh random values (never zeros).
def _attention_case(name: str):
    """Inputs of one attention op: q, k, v (1, 2, 6, 4), causal, and the forward's (out, lse) for the others."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    q, k, v = rand(1, 2, 6, 4), rand(1, 2, 6, 4), rand(1, 2, 6, 4)
    constants = dict(attn_mask=None, is_causal=True, scale=0.5)
    out, lse = torch.ops.optim.sdpa_forward(q, k, v, **constants)
    saved = dict(q=q, k=k, v=v, out=out, lse=lse)
    tangents = dict(q_dot=rand(1, 2, 6, 4), k_dot=rand(1, 2, 6, 4), v_dot=rand(1, 2, 6, 4))
    inputs = {"sdpa_forward": dict(q=q, k=k, v=v),
              "sdpa_backward": dict(grad_out=rand(1, 2, 6, 4), **saved),
              "sdpa_forward_jvp": dict(**saved, **tangents),
              "sdpa_backward_jvp": dict(grad_out=rand(1, 2, 6, 4), **saved, grad_out_dot=rand(1, 2, 6, 4),
                                        **tangents)}[name]
    return inputs, constants


OP_CASES = {
    "fused_adamw_": lambda: (
        {**_lists(SHAPES, params=torch.randn, grads=torch.randn, exp_avgs=torch.randn, exp_avg_sqs=torch.rand),
         "state_steps": [torch.tensor(3.0), torch.tensor(1.0)]},
        dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, maximize=False, reset=[False, True])),
    "all_finite": lambda: (dict(tensors=[torch.randn(4, 3), torch.randn(5, dtype=torch.float64)]), {}),
    "add_to_counts_": lambda: (dict(counts=[torch.tensor(3.0), torch.tensor([1.0])]), dict(value=1.0)),
    "shares_storage": lambda: (
        (lambda base: dict(written=[base[0], torch.randn(3)], read=[base[1:], torch.randn(2)]))(torch.randn(4, 3)),
        {}),
    "rademacher_": lambda: (
        dict(out=[torch.full((4, 3), float("nan")), torch.full((5,), float("nan"))]), dict(seed=7, offset=11)),
    "cross_entropy_hvp": lambda: (dict(logits=torch.randn(4, 9), tangent=torch.randn(4, 9)), dict(scale=0.25)),
    "krylov_dots": lambda: (dict(basis=torch.randn(2, 3, 50), w=torch.randn(2, 50)), {}),
    "layer_norm_double_backward": lambda: (
        dict(input=torch.randn(4, 6), mean=torch.randn(4), rstd=torch.rand(4) + 0.5, weight=torch.randn(6),
             grad_out=torch.randn(4, 6), u_input=torch.randn(4, 6), u_weight=torch.randn(6), u_bias=torch.randn(6)),
        {}),
    "fused_sophia_": lambda: (
        {**_lists(SHAPES, params=torch.randn, grads=torch.randn, exp_avgs=torch.randn, hessians=torch.rand,
                  hessian_products=torch.randn),
         "probes": [torch.randint(0, 2, s).float() * 2 - 1 for s in SHAPES]},
        dict(lr=1e-2, beta1=0.9, beta2=0.99, rho=0.05, weight_decay=0.1, eps=1e-12, maximize=False)),
    "fused_adahessian_": lambda: (
        _lists(SHAPES, params=torch.randn, grads=torch.randn, exp_avgs=torch.randn, exp_hessian_diag_sqs=torch.rand,
               hessian_diagonals=torch.randn),
        dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-4, hessian_power=1.0, step=3, hessian_step=2,
             maximize=False)),
    "rsdm_step_": lambda: (
        dict(X=orthogonal_(torch.empty(2, 9, 3)), G=torch.randn(2, 9, 3)),
        dict(indices=None, rank=4, seed=5, offset=8, lr=0.1, core="cayley", transport=True)),
    "rsdm_sample_rows_": lambda: (dict(out=torch.full((2, 4), -1, dtype=torch.int64)), dict(n=10, seed=3, offset=4)),
    "lowrank_refactorize_": lambda: (dict(B=[torch.randn(8, 3) for _ in range(2)],
                                          A=[torch.randn(3, 6) for _ in range(2)]), {}),
    **{name: (lambda name=name: _attention_case(name))
       for name in ("sdpa_forward", "sdpa_backward", "sdpa_forward_jvp", "sdpa_backward_jvp")},
}


def op_call(name, constants):
    op = getattr(torch.ops.optim, name)

    def call(**tensors):
        return op(**tensors, **constants)
    return call


def defined_ops() -> set[str]:
    """Every op registered in the package's namespace (by the families' ``_ops.py`` files)."""
    prefix = f"{NAMESPACE}::"
    return {name[len(prefix):] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)}


def test_every_op_has_a_case():
    assert defined_ops() == set(OP_CASES), f"ops without a case here: {defined_ops() - set(OP_CASES)}"


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_passes_opcheck(name):
    """Schema, fake kernel, autograd registration and AOT dispatch, for every op of the namespace in one place (the
    families' test_ops.py files run it on more shapes, dtypes and devices)."""
    inputs, constants = OP_CASES[name]()
    torch.library.opcheck(getattr(torch.ops.optim, name).default, args=(), kwargs={**inputs, **constants})


def _flat(value):
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_in_a_fullgraph_compiled_function_equals_eager(name):
    """Inductor, fullgraph: the fake kernel traces, mutated lists are functionalized and written back in place."""
    assert optim.has_kernel(name, "cpu")
    inputs, constants = OP_CASES[name]()
    call = op_call(name, constants)
    original = copy.deepcopy(inputs)
    eager_inputs = copy.deepcopy(inputs)
    expected = call(**eager_inputs)
    got = compiled(call, fullgraph=True)(**inputs)
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    changed = False
    for key in inputs:  # every mutated (and every read-only) argument ends as in eager
        for now, eager, before in zip(_flat(inputs[key]), _flat(eager_inputs[key]), _flat(original[key])):
            torch.testing.assert_close(now, eager, rtol=1e-6, atol=1e-6)
            changed |= not torch.equal(now, before)
    assert changed or expected is not None, "the case exercises nothing"


# ------------------------------------------------------------------------------------- optimizers, end to end

def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=generator), torch.randn(16, 3, generator=generator)) for _ in range(steps)]


def stiefel_groups(model: TanhMLP) -> list[dict]:
    with torch.no_grad():
        orthogonal_(model.fc1.weight)
        orthogonal_(model.fc2.weight)
    return [{"params": [model.fc1.weight, model.fc2.weight]},
            {"params": [model.fc1.bias, model.fc2.bias], "manifold": None}]


def _low_rank_adamw(model):
    return optim.LowRankAdamW(model, lr=1e-2, rank=2, target=["fc1", "fc2"], every=2, recovery_steps=1), None


def _adamw_refactorizer(model):
    optim.to_low_rank(model, 2, target=["fc1", "fc2"])
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    return opt, optim.Refactorizer(model, opt, every=2, recovery_steps=1)


# name -> (build(model) -> (optimizer, refactorizer or None), steps). RSDM runs past dynamo's recompile limit (8):
# its offsets are Python ints, so its step frames recompile until they fall back to eager (module docstring).
FIRST_ORDER = {
    "LowRankAdamW": (_low_rank_adamw, 5),
    "AdamW+Refactorizer": (_adamw_refactorizer, 6),
    "RSDM": (lambda m: (optim.RSDM(stiefel_groups(m), lr=0.05, rank=3, momentum=0.5, seed=0), None), 12),
    "RiemannianSGD": (lambda m: (optim.RiemannianSGD(stiefel_groups(m), lr=0.05, momentum=0.5), None), 5),
    "RiemannianAdam": (lambda m: (optim.RiemannianAdam(stiefel_groups(m), lr=0.01), None), 5),
}


def build(name):
    torch.manual_seed(0)
    model = TanhMLP()
    opt, refactorizer = FIRST_ORDER[name][0](model)
    return model, opt, refactorizer


def assert_same_training(eager, compiled_run, atol):
    (model_a, opt_a, _), (model_b, opt_b, _) = eager, compiled_run
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=atol)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        state_a, state_b = opt_a.state[p_a], opt_b.state[p_b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            if isinstance(state_a[key], torch.Tensor):
                torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=atol)
            else:
                assert state_b[key] == state_a[key], key


def train(run, data, step_fn):
    model, opt, refactorizer = run
    losses = []
    for x, y in data:
        losses.append(step_fn(x, y))
        if refactorizer is not None:
            refactorizer.step()
    return losses


def make_step(run):
    model, opt, _ = run

    def step(x, y):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


# The slowest tests of the file (10-20 s each on 2 cores with a cold inductor cache): one per optimizer class;
# RiemannianSGD and AdamW + Refactorizer share their step code with RiemannianAdam and LowRankAdamW and are
# compiled through ``opt.step`` below.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["LowRankAdamW", "RSDM", "RiemannianAdam"])
def test_compiled_train_step_equals_eager(name):
    """torch.compile of forward + backward + opt.step() (graph breaks allowed) trains like eager."""
    data = batches(FIRST_ORDER[name][1])
    eager, compiled_run = build(name), build(name)
    eager_losses = train(eager, data, make_step(eager))
    compiled_losses = train(compiled_run, data, compiled(make_step(compiled_run)))
    torch.testing.assert_close(torch.stack(compiled_losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-6)
    assert_same_training(eager, compiled_run, atol=1e-5)
    if isinstance(eager[1], optim.AdamW):
        assert len(eager[1].pending_resets()) == len(compiled_run[1].pending_resets())


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_compiled_optimizer_step_equals_eager(name):
    """torch.compile(opt.step) with eager forward/backward: same parameters and state as eager ``opt.step``."""
    data = batches(FIRST_ORDER[name][1])
    eager, compiled_run = build(name), build(name)
    train(eager, data, make_step(eager))
    compiled_run[1].step = compiled(compiled_run[1].step)
    train(compiled_run, data, make_step(compiled_run))
    assert_same_training(eager, compiled_run, atol=1e-6)


def test_compiled_low_rank_step_applies_the_fused_reset():
    """Regression: the pending-reset dict was read through ``self.__dict__.get``, which dynamo did not guard, so a
    compiled ``opt.step`` kept running the graph traced without resets and the resets stayed pending forever."""
    model, opt, _ = run = build("LowRankAdamW")
    opt.step = compiled(opt.step)
    train(run, batches(3), make_step(run))  # refactorized after step 2: step 3 restarts the factors' moments
    assert opt.pending_resets() == []
    assert opt.state[model.fc1.B]["step"].item() == 1 and opt.state[model.fc1.bias]["step"].item() == 3


def test_adamw_step_is_one_graph():
    """The fused path has no graph break: ``has_kernel`` is a compile-time constant and the op has a fake kernel."""
    torch.manual_seed(0)
    model = TanhMLP()
    eager_model = copy.deepcopy(model)
    opt, eager_opt = optim.AdamW(model.parameters(), lr=1e-2), optim.AdamW(eager_model.parameters(), lr=1e-2)
    step = compiled(opt.step, fullgraph=True)
    for x, y in batches(3):
        for m, s in ((model, step), (eager_model, eager_opt.step)):
            m.zero_grad()
            F.mse_loss(m(x), y).backward()
            s()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_compiled_step_under_an_lr_scheduler_equals_eager():
    """A new lr every step recompiles until dynamo's recompile limit, then runs eagerly: same numbers throughout."""
    torch.manual_seed(0)
    model = TanhMLP()
    eager_model = copy.deepcopy(model)
    runs = []
    for m in (model, eager_model):
        opt = optim.AdamW(m.parameters(), lr=1e-2)
        runs.append((m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))))
    step = compiled(runs[0][1].step)
    for x, y in batches(12):
        for (m, opt, scheduler), s in zip(runs, (step, runs[1][1].step)):
            m.zero_grad()
            F.mse_loss(m(x), y).backward()
            s()
            scheduler.step()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


# -------------------------------------------------------------------------------------- second-order optimizers

SECOND_ORDER = {"SophiaH": optim.SophiaH, "AdaHessian": optim.AdaHessian}


def build_second_order(name, **kwargs):
    torch.manual_seed(0)
    model = TanhMLP()
    return model, SECOND_ORDER[name](model.parameters(), lr=1e-2, update_period=3, seed=0, **kwargs)


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_compiled_model_between_refreshes_equals_eager(name):
    """The closure uses the compiled model whenever the step does not refresh the curvature."""
    data = batches(7)
    (eager_model, eager_opt), (model, opt) = build_second_order(name), build_second_order(name)
    compiled_model = compiled(model)
    refreshes = []
    for x, y in data:
        eager_opt.step(lambda: F.mse_loss(eager_model(x), y))
        refreshes.append(opt.next_step_refreshes())
        net = model if refreshes[-1] else compiled_model
        opt.step(lambda: F.mse_loss(net(x), y))
    assert refreshes == [True, False, False, True, False, False, True]
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_compiled_optimizer_step_between_refreshes_equals_eager(name):
    """Between refreshes ``loss.backward()`` then a compiled ``opt.step()`` (graph breaks at the host syncs)."""
    data = batches(7)
    (eager_model, eager_opt), (model, opt) = build_second_order(name), build_second_order(name)
    compiled_step = compiled(opt.step)
    for x, y in data:
        eager_opt.step(lambda: F.mse_loss(eager_model(x), y))
        if opt.next_step_refreshes():
            opt.step(lambda: F.mse_loss(model(x), y))
        else:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            compiled_step()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        for key, value in eager_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_refresh_step_with_a_compiled_model_raises_and_changes_nothing(name):
    model, opt = build_second_order(name)
    before = [p.detach().clone() for p in model.parameters()]
    compiled_model = compiled(model)
    x, y = batches(1)[0]
    assert opt.next_step_refreshes()
    with pytest.raises(RuntimeError, match="cannot be differentiated twice.*next_step_refreshes"):
        opt.step(lambda: F.mse_loss(compiled_model(x), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state
    opt.step(lambda: F.mse_loss(model(x), y))  # the eager model still works
    assert opt.state


def test_next_step_refreshes_follows_the_schedule_and_external_diagonals():
    model, opt = build_second_order("SophiaH")
    x, y = batches(1)[0]
    schedule = []
    for _ in range(4):
        schedule.append(opt.next_step_refreshes())
        opt.step(lambda: F.mse_loss(model(x), y))
    assert schedule == [True, False, False, True]
    opt.set_hessian_diagonal([torch.ones_like(p) for p in model.parameters()])
    assert not opt.next_step_refreshes()  # due, but every parameter has an external diagonal


def test_hessian_operator_of_a_compiled_model_needs_finite_differences():
    torch.manual_seed(0)
    model = TanhMLP().double()
    x, y = (t.double() for t in batches(1)[0])
    exact = optim.HessianOperator(model, F.mse_loss, (x, y), mode="rr")
    v = torch.randn(exact.shape[0], dtype=torch.float64)
    compiled_model = compiled(model)
    fd = optim.HessianOperator(compiled_model, F.mse_loss, (x, y), mode="fd")
    torch.testing.assert_close(fd @ v, exact @ v, rtol=1e-6, atol=1e-8)
    with pytest.raises(RuntimeError, match="double backward|donated buffers"):  # which one depends on caching
        optim.HessianOperator(compiled_model, F.mse_loss, (x, y), mode="rr") @ v
