"""optim.RSDM: convergence to known optima, staying on the manifold, momentum transport, state, API, bad input."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.stiefel import distance_to_manifold, grassmann_distance, orthogonal_

from ._problems import PCA, Procrustes, run_steps

F64 = torch.float64


def _point(shape, dtype=F64):
    return orthogonal_(torch.empty(shape, dtype=dtype)).requires_grad_()


@pytest.mark.parametrize("core", ["qr", "cayley", "exp"])
def test_permutation_sampling_reaches_the_pca_optimum(core):
    problem = PCA.make(20, 3, low=-2)
    x = _point((20, 3))
    opt = optim.RSDM([x], lr=0.15 if core == "cayley" else 0.1, rank=8, core=core, seed=0)
    run_steps(opt, x, problem, 1500)
    assert problem.relative_gap(x) < 1e-6
    assert grassmann_distance(x.detach(), problem.top_eigenvectors()) < 1e-3
    assert distance_to_manifold(x) < 1e-12


def test_orthogonal_sampling_reaches_the_same_fixed_point():
    problem = PCA.make(12, 3, low=-2)
    x = _point((12, 3))
    opt = optim.RSDM([x], lr=0.1, rank=6, sampling="orthogonal", core="exp", seed=0)
    run_steps(opt, x, problem, 600)
    assert problem.relative_gap(x) < 1e-6
    assert grassmann_distance(x.detach(), problem.top_eigenvectors()) < 1e-3


@pytest.mark.parametrize("sampling", ["permutation", "orthogonal"])
def test_procrustes_reaches_the_polar_factor(sampling):
    problem = Procrustes.make(15, 4)
    x = _point((15, 4))
    opt = optim.RSDM([x], lr=0.3, rank=6, sampling=sampling, seed=1)
    run_steps(opt, x, problem, 300)
    assert problem.relative_gap(x) < 1e-6
    torch.testing.assert_close(x.detach(), problem.solution(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampling", ["permutation", "orthogonal"])
@pytest.mark.parametrize("core", ["qr", "cayley", "exp"])
def test_small_steps_decrease_the_objective(sampling, core):
    for problem in (PCA.make(16, 3), Procrustes.make(16, 3)):
        x = _point((16, 3))
        opt = optim.RSDM([x], lr=1e-3, rank=5, sampling=sampling, core=core, seed=2)
        for _ in range(5):
            before = problem.loss(x.detach()).item()
            run_steps(opt, x, problem, 1)
            assert problem.loss(x.detach()).item() < before


@pytest.mark.parametrize("sampling", ["permutation", "orthogonal"])
def test_momentum_converges_and_is_transported(sampling):
    problem = PCA.make(20, 3, low=-2)
    x = _point((20, 3))
    opt = optim.RSDM([x], lr=0.02, rank=8, sampling=sampling, momentum=0.8, seed=3)
    run_steps(opt, x, problem, 700 if sampling == "permutation" else 400)
    assert problem.relative_gap(x) < (1e-6 if sampling == "permutation" else 1e-4)
    # the buffer moves with X by the same rotation: XᵀB is what it was right after the buffer update
    x.grad = problem.grad(x.detach())
    buffer = opt.state[x]["momentum_buffer"]
    expected = x.detach().T @ (0.8 * buffer + x.grad)
    opt.step()
    torch.testing.assert_close(x.detach().T @ buffer, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sampling, shape, steps", [("permutation", (24, 4), 10_000), ("orthogonal", (2, 24, 4), 1_000)])
def test_float32_iterates_stay_on_the_manifold(sampling, shape, steps):
    """10,000 float32 steps (1,000 with orthogonal sampling, which is 10× slower per step here) with
    re-orthonormalization every 100 steps: the defect stays below 1e-5."""
    problem = PCA.make(24, 4, dtype=torch.float32)
    x = _point(shape, dtype=torch.float32)
    opt = optim.RSDM([x], lr=0.05, rank=6, sampling=sampling, momentum=0.5, seed=4)
    worst = 0.0
    for step in range(steps):
        x.grad = problem.a @ x.detach() * -1
        opt.step()
        if step % 997 == 0 or step == steps - 1:
            worst = max(worst, distance_to_manifold(x).max().item())
    assert worst < 1e-5


def test_batched_and_row_oriented_parameters():
    """(..., n, p) batches and n < p (nn.Linear layout): rows are sampled from the long side, rows stay orthonormal."""
    problem = PCA.make(12, 3, low=-2)
    batch = _point((2, 12, 3))
    rows = _point((3, 12))  # orthonormal rows: X Xᵀ = I
    opt = optim.RSDM([batch, rows], lr=0.1, rank=6, seed=5)
    for _ in range(800):
        batch.grad = problem.grad(batch.detach())
        rows.grad = problem.grad(rows.detach().T).T
        opt.step()
    for i in range(2):
        assert problem.relative_gap(batch[i]) < 1e-6
    assert problem.relative_gap(rows.T) < 1e-6
    torch.testing.assert_close(rows.detach() @ rows.detach().T, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)


def test_grassmann_group_and_plain_group():
    """Grassmann groups take the same steps as Stiefel ones; a manifold=None group gets torch.optim.SGD's update."""
    x_stiefel, x_grassmann = _point((12, 3)), None
    x_grassmann = x_stiefel.detach().clone().requires_grad_()
    bias = torch.randn(5, dtype=F64, requires_grad=True)
    bias_ref = bias.detach().clone().requires_grad_()
    a = optim.RSDM([x_stiefel], lr=0.1, rank=4, seed=6)
    b = optim.RSDM([{"params": [x_grassmann], "manifold": "grassmann"},
                    {"params": [bias], "manifold": None}], lr=0.1, rank=4, seed=6, momentum=0.0)
    sgd = torch.optim.SGD([bias_ref], lr=0.1)
    problem = PCA.make(12, 3)
    for _ in range(5):
        x_stiefel.grad = problem.grad(x_stiefel.detach())
        x_grassmann.grad = problem.grad(x_grassmann.detach())
        g = torch.randn(5, dtype=F64)
        bias.grad, bias_ref.grad = g.clone(), g.clone()
        a.step(), b.step(), sgd.step()
    torch.testing.assert_close(x_stiefel, x_grassmann, atol=0, rtol=0)
    torch.testing.assert_close(bias, bias_ref, atol=1e-15, rtol=0)


def _train(opt, x, problem, steps):
    for _ in range(steps):
        x.grad = problem.grad(x.detach())
        opt.step()


@pytest.mark.parametrize("sampling", ["permutation", "orthogonal"])
def test_state_dict_round_trip_continues_bit_exactly(tmp_path, sampling):
    problem = PCA.make(14, 3)
    x = _point((2, 14, 3), dtype=torch.float32)
    make = lambda params: optim.RSDM(params, lr=0.05, rank=5, sampling=sampling, momentum=0.7, seed=None,
                                     reorthonormalize_every=4)
    opt = make([x])
    _train(opt, x, problem.__class__(problem.a.float(), 3), 6)
    torch.save({"x": x.detach().clone(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(opt, x, problem.__class__(problem.a.float(), 3), 7)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    y = saved["x"].clone().requires_grad_()
    resumed = make([y])
    resumed.load_state_dict(saved["opt"])
    _train(resumed, y, problem.__class__(problem.a.float(), 3), 7)
    assert torch.equal(x.detach(), y.detach())
    assert torch.equal(opt.state[x]["momentum_buffer"], resumed.state[y]["momentum_buffer"])
    assert opt.state[x]["offset"] == resumed.state[y]["offset"]


def test_seed_makes_runs_reproducible_and_different_seeds_differ():
    problem = PCA.make(14, 3)
    runs = []
    for seed in (7, 7, 8):
        x = _point((14, 3))
        x.data.copy_(orthogonal_(torch.empty(14, 3, dtype=F64), generator=torch.Generator().manual_seed(0)))
        _train(optim.RSDM([x], lr=0.1, rank=4, seed=seed), x, problem, 3)
        runs.append(x.detach())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_maximize_and_lr_scheduler():
    problem = PCA.make(12, 3)
    x, y = _point((12, 3)), None
    y = x.detach().clone().requires_grad_()
    minimize = optim.RSDM([x], lr=0.1, rank=4, seed=9)
    maximize = optim.RSDM([y], lr=0.1, rank=4, seed=9, maximize=True)
    for _ in range(4):
        x.grad = problem.grad(x.detach())
        y.grad = -problem.grad(y.detach())  # ascend on −F = descend on F
        minimize.step(), maximize.step()
    torch.testing.assert_close(x, y, atol=1e-14, rtol=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(minimize, lambda epoch: 0.0)
    assert minimize.param_groups[0]["lr"] == 0.0
    before = x.detach().clone()
    x.grad = problem.grad(x.detach())
    minimize.step()
    scheduler.step()
    assert torch.equal(x.detach(), before)


def test_closure_and_zero_grad():
    problem = PCA.make(10, 2)
    x = _point((10, 2))
    opt = optim.RSDM([x], lr=0.1, rank=3, seed=0)

    def closure():
        opt.zero_grad()
        loss = problem.loss(x)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(20):
        last = opt.step(closure).item()
    assert last < first


def test_bad_input_is_rejected_and_nothing_changes():
    x = _point((10, 3))
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        optim.RSDM([x], rank=0)
    with pytest.raises(ValueError, match="larger than N"):
        optim.RSDM([x], rank=11)
    with pytest.raises(ValueError, match="larger than N"):
        optim.RSDM([x.detach().T.clone().requires_grad_()], rank=11)
    with pytest.raises(ValueError, match="optim.stiefel.orthogonal_"):
        optim.RSDM([torch.randn(10, 3, requires_grad=True)], rank=2)
    with pytest.raises(ValueError, match="manifold must be"):
        optim.RSDM([{"params": [x], "manifold": "sphere"}], rank=2)
    with pytest.raises(ValueError, match="manifold=None"):
        optim.RSDM([torch.randn(10, requires_grad=True)], rank=2)
    with pytest.raises(ValueError, match="float32 or float64"):
        optim.RSDM([x.detach().bfloat16().requires_grad_()], rank=2)
    with pytest.raises(ValueError, match="core must be one of"):
        optim.RSDM([x], rank=2, core="bf16")
    with pytest.raises(ValueError, match="sampling must be one of"):
        optim.RSDM([x], rank=2, sampling="gaussian")
    with pytest.raises(ValueError, match="momentum"):
        optim.RSDM([x], rank=2, momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        optim.RSDM([x], rank=2, lr=-1.0)
    # a non-finite gradient: error, parameter and state untouched (the other parameter too)
    other = _point((10, 3))
    opt = optim.RSDM([x, other], lr=0.1, rank=2, momentum=0.9, seed=0)
    other.grad = torch.randn(10, 3, dtype=F64)
    x.grad = torch.randn(10, 3, dtype=F64)
    opt.step()
    snapshot = (x.detach().clone(), other.detach().clone(), opt.state_dict())
    x.grad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*no parameter or state was changed"):
        opt.step()
    assert torch.equal(x.detach(), snapshot[0]) and torch.equal(other.detach(), snapshot[1])
    assert opt.state[other]["offset"] == snapshot[2]["state"][1]["offset"]
    # a group whose rank is changed to a bad value after construction is rejected at the next step
    opt.param_groups[0]["rank"] = 50
    x.grad = torch.randn(10, 3, dtype=F64)
    with pytest.raises(ValueError, match="larger than N"):
        opt.step()
    assert torch.equal(x.detach(), snapshot[0])


def test_float32_default_reorthonormalizes_when_the_measured_defect_asks_for_it(monkeypatch):
    """float32, default period: every DEFECT_CHECK_EVERY steps the defect is estimated, and X is re-orthonormalized
    only when the estimate passes the limit (a QR costs N·P², the estimate ~8·N·P)."""
    import optim.stiefel.optimizers as stiefel_optimizers
    from optim.stiefel import distance_to_manifold, orthogonal_

    calls = []
    real = stiefel_optimizers._reorthonormalize_
    monkeypatch.setattr(stiefel_optimizers, "_reorthonormalize_", lambda p: calls.append(1) or real(p))
    generator = torch.Generator().manual_seed(0)
    every = stiefel_optimizers.DEFECT_CHECK_EVERY
    # On the manifold, lr = 0: nothing drifts, no QR in 5 checks.
    w = torch.nn.Parameter(orthogonal_(torch.empty(40, 12), generator=generator))
    opt = optim.RSDM([w], lr=0.0, rank=4, seed=0)
    for _ in range(5 * every):
        w.grad = torch.randn(40, 12, generator=generator)
        opt.step()
    assert calls == []
    # Pushed 1e-4 off the manifold: the first check re-orthonormalizes it.
    with torch.no_grad():
        w.mul_(1 + 1e-4)
    assert float(distance_to_manifold(w)) > 1e-4
    for _ in range(every):
        w.grad = torch.randn(40, 12, generator=generator)
        opt.step()
    assert calls == [1]
    assert float(distance_to_manifold(w)) < 1e-6


@pytest.mark.parametrize("shape", [(300, 20), (20, 300), (256, 256), (3, 512, 128)])
def test_float32_storage_defect_matches_a_rounded_orthonormal_matrix(shape):
    """The storage floor the re-orthonormalization limit is kept above: a float64 orthonormal matrix rounded to
    float32 has ‖X̃ᵀX̃ − I‖_F ≈ 0.6·2⁻²⁴·P/√N."""
    import optim.stiefel.optimizers as stiefel_optimizers
    from optim.stiefel import orthogonal_

    x = orthogonal_(torch.empty(shape, dtype=F64), generator=torch.Generator().manual_seed(1)).float()
    xo = (x.mT if shape[-2] < shape[-1] else x).double()
    measured = torch.linalg.matrix_norm(xo.mT @ xo - torch.eye(xo.shape[-1], dtype=F64)).max().item()
    predicted = stiefel_optimizers.float32_storage_defect(max(shape[-2:]), min(shape[-2:]))
    assert 0.8 * predicted < measured < 1.25 * predicted
    assert stiefel_optimizers.defect_estimate_limit(x) == max(stiefel_optimizers.DEFECT_ESTIMATE_LIMIT, 2 * predicted)


def test_float32_default_does_not_reorthonormalize_below_the_storage_floor(monkeypatch):
    """A matrix whose float32 storage alone is further off the manifold than DEFECT_ESTIMATE_LIMIT (square matrices
    beyond ~1700 columns; emulated by lowering the limit) is not re-orthonormalized at every check: the QR cannot
    lower the defect below that floor."""
    import optim.stiefel.optimizers as stiefel_optimizers
    from optim.stiefel import orthogonal_

    calls = []
    real = stiefel_optimizers._reorthonormalize_
    monkeypatch.setattr(stiefel_optimizers, "_reorthonormalize_", lambda p: calls.append(1) or real(p))
    monkeypatch.setattr(stiefel_optimizers, "DEFECT_ESTIMATE_LIMIT", 1e-9)
    generator = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(orthogonal_(torch.empty(300, 128, dtype=F64), generator=generator).float())
    opt = optim.RSDM([w], lr=0.0, rank=8, seed=0)
    for _ in range(3 * stiefel_optimizers.DEFECT_CHECK_EVERY):
        w.grad = torch.randn(300, 128, generator=generator)
        opt.step()
    assert calls == []
    # Pushed off the manifold by much more than the floor: the next check re-orthonormalizes it.
    with torch.no_grad():
        w.mul_(1 + 1e-4)
    for _ in range(stiefel_optimizers.DEFECT_CHECK_EVERY):
        w.grad = torch.randn(300, 128, generator=generator)
        opt.step()
    assert calls == [1]
