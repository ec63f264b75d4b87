"""optim.RiemannianSGD and optim.RiemannianAdam: optima, manifold, momentum transport, plain groups, state, bad input."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.stiefel import distance_to_manifold, grassmann_distance, orthogonal_, project_tangent

from ._problems import PCA, Procrustes, run_steps

F64 = torch.float64
RETRACTIONS = ["qr", "cayley", "polar"]
OPTIMIZERS = {
    "sgd": lambda params, **kw: optim.RiemannianSGD(params, **{"lr": 0.05, **kw}),
    "sgd_momentum": lambda params, **kw: optim.RiemannianSGD(params, **{"lr": 0.02, "momentum": 0.8, **kw}),
    "sgd_nesterov": lambda params, **kw: optim.RiemannianSGD(params, **{"lr": 0.02, "momentum": 0.8,
                                                                        "nesterov": True, **kw}),
    "adam": lambda params, **kw: optim.RiemannianAdam(params, **{"lr": 0.01, **kw}),
}


def _point(shape, dtype=F64):
    return orthogonal_(torch.empty(shape, dtype=dtype)).requires_grad_()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_pca_reaches_the_optimum(name, retraction):
    problem = PCA.make(16, 3, low=-2)
    x = _point((16, 3))
    opt = OPTIMIZERS[name]([x], retraction=retraction)
    run_steps(opt, x, problem, 600 if name != "adam" else 1500)
    assert problem.relative_gap(x) < 1e-6, problem.relative_gap(x)
    assert grassmann_distance(x.detach(), problem.top_eigenvectors()) < 1e-3
    assert distance_to_manifold(x) < 1e-12


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_procrustes_reaches_the_polar_factor(name):
    problem = Procrustes.make(12, 4)
    x = _point((12, 4))
    opt = OPTIMIZERS[name]([x], lr=0.2 if name == "sgd" else 0.02)
    run_steps(opt, x, problem, 500)
    assert problem.relative_gap(x) < 1e-6
    torch.testing.assert_close(x.detach(), problem.solution(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_small_steps_decrease_the_objective(name, retraction):
    for problem in (PCA.make(10, 3), Procrustes.make(10, 3)):
        x = _point((10, 3))
        opt = OPTIMIZERS[name]([x], lr=1e-3, retraction=retraction)
        for _ in range(3):
            before = problem.loss(x.detach()).item()
            run_steps(opt, x, problem, 1)
            assert problem.loss(x.detach()).item() < before


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_float32_iterates_stay_on_the_manifold_for_10000_steps(name, retraction):
    """Cayley keeps any drift (it is an exact rotation), so it runs the full 10,000 steps with the default
    re-orthonormalization; QR and polar re-normalize at every step, so 2,000 steps show the same."""
    problem = PCA.make(8, 2, dtype=torch.float32)
    x = _point((8, 2), dtype=torch.float32)
    opt = OPTIMIZERS[name]([x], retraction=retraction)
    worst = 0.0
    for step in range(10_000 if retraction == "cayley" else 2_000):
        x.grad = problem.grad(x.detach())
        opt.step()
        if step % 1000 == 999:
            worst = max(worst, distance_to_manifold(x).item())
    assert worst < 1e-5


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_momentum_is_transported_to_the_new_tangent_space(name):
    problem = PCA.make(10, 3)
    x = _point((10, 3))
    opt = OPTIMIZERS[name]([x])
    run_steps(opt, x, problem, 3)
    buffer = opt.state[x]["momentum_buffer" if name != "adam" else "exp_avg"]
    torch.testing.assert_close(project_tangent(x.detach(), buffer), buffer, atol=1e-13, rtol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grassmann_batches_and_rows(name):
    """Grassmann groups, batches and the n < p row layout all converge; Grassmann gradients are horizontal."""
    problem = PCA.make(12, 3, low=-2)
    batch = _point((2, 12, 3))
    rows = _point((3, 12))
    opt = OPTIMIZERS[name]([{"params": [batch], "manifold": "grassmann"}, {"params": [rows]}])
    for _ in range(600 if name != "adam" else 1500):
        batch.grad = problem.grad(batch.detach())
        rows.grad = problem.grad(rows.detach().T).T
        opt.step()
    for i in range(2):
        assert problem.relative_gap(batch[i]) < 1e-6
    assert problem.relative_gap(rows.T) < 1e-6


def test_plain_groups_match_torch_sgd_and_adam():
    w = torch.randn(4, 3, dtype=F64, requires_grad=True)
    refs = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    for name, cls in refs.items():
        ours_w = w.detach().clone().requires_grad_()
        ref_w = w.detach().clone().requires_grad_()
        x = _point((6, 2))
        kwargs = dict(lr=0.1, momentum=0.9, nesterov=True) if name == "sgd" else dict(lr=0.1, betas=(0.8, 0.9))
        ours = (optim.RiemannianSGD if name == "sgd" else optim.RiemannianAdam)(
            [{"params": [x]}, {"params": [ours_w], "manifold": None}], **kwargs)
        ref = cls([ref_w], **kwargs)
        for _ in range(7):
            g = torch.randn(4, 3, dtype=F64)
            ours_w.grad, ref_w.grad = g.clone(), g.clone()
            x.grad = torch.randn(6, 2, dtype=F64)
            ours.step(), ref.step()
        torch.testing.assert_close(ours_w, ref_w, atol=1e-14, rtol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_bit_exactly(tmp_path, name):
    problem = PCA.make(10, 3, dtype=torch.float32)
    x = _point((10, 3), dtype=torch.float32)
    b = torch.randn(5, requires_grad=True)
    opt = OPTIMIZERS[name]([{"params": [x]}, {"params": [b], "manifold": None}], retraction="cayley",
                           reorthonormalize_every=3)

    def train(opt, x, b, steps):
        for step in range(steps):
            x.grad = problem.grad(x.detach())
            b.grad = torch.sin(b.detach() + step)
            opt.step()

    train(opt, x, b, 4)
    torch.save({"x": x.detach().clone(), "b": b.detach().clone(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    train(opt, x, b, 5)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    y, c = saved["x"].clone().requires_grad_(), saved["b"].clone().requires_grad_()
    resumed = OPTIMIZERS[name]([{"params": [y]}, {"params": [c], "manifold": None}], retraction="cayley",
                               reorthonormalize_every=3)
    resumed.load_state_dict(saved["opt"])
    train(resumed, y, c, 5)
    assert torch.equal(x.detach(), y.detach()) and torch.equal(b.detach(), c.detach())


@pytest.mark.parametrize("cls", [optim.RiemannianSGD, optim.RiemannianAdam])
def test_maximize_and_lr_scheduler(cls):
    problem = PCA.make(10, 3)
    x = _point((10, 3))
    y = x.detach().clone().requires_grad_()
    minimize, maximize = cls([x], lr=0.01), cls([y], lr=0.01, maximize=True)
    for _ in range(4):
        x.grad, y.grad = problem.grad(x.detach()), -problem.grad(y.detach())
        minimize.step(), maximize.step()
    torch.testing.assert_close(x, y, atol=1e-14, rtol=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(minimize, lambda epoch: 0.0)
    before = x.detach().clone()
    x.grad = problem.grad(x.detach())
    minimize.step()
    torch.testing.assert_close(x.detach(), before, atol=1e-14, rtol=0)  # the retraction re-normalizes: rounding


@pytest.mark.parametrize("cls", [optim.RiemannianSGD, optim.RiemannianAdam])
def test_bad_input_is_rejected_and_nothing_changes(cls):
    x = _point((8, 3))
    with pytest.raises(ValueError, match="optim.stiefel.orthogonal_"):
        cls([torch.randn(8, 3, requires_grad=True)])
    with pytest.raises(ValueError, match="manifold=None"):
        cls([torch.randn(8, requires_grad=True)])
    with pytest.raises(ValueError, match="manifold must be"):
        cls([{"params": [x], "manifold": "hyperbolic"}])
    with pytest.raises(ValueError, match="retraction must be one of"):
        cls([x], retraction="exp")
    with pytest.raises(ValueError, match="lr"):
        cls([x], lr=float("inf"))
    with pytest.raises(ValueError, match="float32 or float64"):
        cls([x.detach().half().requires_grad_()])
    with pytest.raises(ValueError, match="reorthonormalize_every"):
        cls([x], reorthonormalize_every=-1)
    opt = cls([x], lr=0.1)
    x.grad = torch.randn(8, 3, dtype=F64)
    opt.step()
    before, state_before = x.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v
                                                for k, v in opt.state[x].items()}
    x.grad = torch.full((8, 3), float("inf"), dtype=F64)
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step()
    assert torch.equal(x.detach(), before)
    for key, value in state_before.items():
        assert torch.equal(opt.state[x][key], value) if torch.is_tensor(value) else opt.state[x][key] == value


def test_sgd_argument_checks():
    x = _point((8, 3))
    with pytest.raises(ValueError, match="nesterov"):
        optim.RiemannianSGD([x], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        optim.RiemannianSGD([x], lr=0.1, momentum=-0.1)
    with pytest.raises(ValueError, match="betas"):
        optim.RiemannianAdam([x], betas=(0.9,))


@pytest.mark.parametrize("make", [
    lambda params, **kw: optim.RSDM(params, lr=0.1, rank=2, seed=0, **kw),
    lambda params, **kw: optim.RiemannianSGD(params, lr=0.1, **kw),
    lambda params, **kw: optim.RiemannianAdam(params, lr=0.1, **kw),
], ids=["RSDM", "RiemannianSGD", "RiemannianAdam"])
def test_check_finite_false_skips_the_check_per_group(make):
    """check_finite=False (per group): no finiteness check (no host sync); NaN goes where the math takes it."""
    x, y = _point((8, 3)), _point((8, 3))
    opt = make([{"params": [x], "check_finite": False}, {"params": [y]}])
    assert opt.param_groups[0]["check_finite"] is False and opt.param_groups[1]["check_finite"] is True
    x.grad = torch.full((8, 3), float("nan"), dtype=F64)
    y.grad = torch.randn(8, 3, dtype=F64)
    opt.step()  # the unchecked group's NaN gradient is not an error
    assert not torch.isfinite(x.detach()).all() and torch.isfinite(y.detach()).all()
    y.grad = torch.full((8, 3), float("inf"), dtype=F64)
    with pytest.raises(ValueError, match="NaN or inf"):  # the checked group still raises
        opt.step()
    with pytest.raises(ValueError, match="check_finite must be True or False"):
        make([_point((8, 3))], check_finite="no")


class _GeooptLike:
    """Stands for a geoopt manifold when geoopt is not installed: the optimizers recognize geoopt's manifolds by
    their class's module and name."""


def _marked(tensor: torch.Tensor, manifold: str) -> torch.nn.Parameter:
    cls = type(manifold, (_GeooptLike,), {"__module__": "geoopt.manifolds.stiefel"})
    param = torch.nn.Parameter(tensor)
    param.manifold = cls()
    return param


def _geoopt_model(marker):
    torch.manual_seed(0)
    return {"W": marker(orthogonal_(torch.empty(8, 4, dtype=F64)), "stiefel"),
            "U": marker(orthogonal_(torch.empty(2, 6, 3, dtype=F64)), "euclidean_stiefel"),
            "b": torch.nn.Parameter(torch.randn(3, 4, dtype=F64)),
            "e": marker(torch.randn(5, dtype=F64), "euclidean")}


def _real_geoopt(tensor, manifold):
    geoopt = pytest.importorskip("geoopt")
    cls = {"stiefel": geoopt.Stiefel, "euclidean_stiefel": geoopt.EuclideanStiefel, "euclidean": geoopt.Euclidean}
    instance = cls[manifold]()
    return geoopt.ManifoldParameter(tensor, manifold=instance)


def _fake_geoopt(tensor, manifold):
    names = {"stiefel": "CanonicalStiefel", "euclidean_stiefel": "EuclideanStiefel", "euclidean": "Euclidean"}
    return _marked(tensor, names[manifold])


@pytest.mark.parametrize("marker", [_fake_geoopt, _real_geoopt], ids=["geoopt-like", "geoopt"])
@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "rsdm"])
def test_geoopt_manifold_parameters_place_themselves_as_with_geoopts_optimizers(name, marker):
    # RiemannianAdam(model.parameters()) of a geoopt model constrained every tensor, and raised on its biases;
    # geoopt's own optimizers constrain the ManifoldParameters on a Stiefel manifold and step the rest freely.
    make = (lambda params, **kw: optim.RSDM(params, lr=0.05, rank=2, seed=0, **kw)) if name == "rsdm" \
        else OPTIMIZERS[name]
    tensors = _geoopt_model(marker)
    twins = {key: torch.nn.Parameter(t.detach().clone()) for key, t in tensors.items()}
    ours = make(list(tensors.values()))
    assert [g["manifold"] for g in ours.param_groups] == ["stiefel", None]
    explicit = make([{"params": [twins["W"], twins["U"]], "manifold": "stiefel"},
                     {"params": [twins["b"], twins["e"]], "manifold": None}])
    target = {key: torch.randn_like(t) for key, t in tensors.items()}
    for _ in range(3):
        for opt, params in ((ours, tensors), (explicit, twins)):
            opt.zero_grad()
            sum(((params[key] - target[key]) ** 2).sum() for key in params).backward()
            opt.step()
    for key in tensors:
        torch.testing.assert_close(tensors[key], twins[key], rtol=0, atol=0)
    assert distance_to_manifold(tensors["W"].detach()) < 1e-12
    # a group of its own keeps its settings when it is split; one that names its manifold is left alone
    groups = make([{"params": list(_geoopt_model(marker).values()), "lr": 0.01}]).param_groups
    assert [(g["manifold"], g["lr"], len(g["params"])) for g in groups] == [("stiefel", 0.01, 2), (None, 0.01, 2)]
    with pytest.raises(ValueError, match="not on the Stiefel manifold"):
        make([{"params": list(_geoopt_model(marker).values()), "manifold": "stiefel"}])
    # add_param_group (progressive unfreezing) places a geoopt group too; a mixed one must be given as two
    later = _geoopt_model(marker)
    ours.add_param_group({"params": [later["W"], later["U"]]})
    ours.add_param_group({"params": [later["e"]]})
    assert [g["manifold"] for g in ours.param_groups] == ["stiefel", None, "stiefel", None]
    with pytest.raises(ValueError, match="mixes geoopt ManifoldParameters .* add them as two"):
        ours.add_param_group({"params": [marker(orthogonal_(torch.empty(5, 2, dtype=F64)), "stiefel"),
                                         torch.nn.Parameter(torch.randn(2, dtype=F64))]})
    assert len(ours.param_groups) == 4
    off = {"params": [marker(torch.randn(5, 2, dtype=F64), "stiefel")]}  # not on the manifold: refused as it is
    with pytest.raises(ValueError, match="not on the Stiefel manifold"):
        ours.add_param_group(off)
    assert "manifold" not in off and len(ours.param_groups) == 4


@pytest.mark.parametrize("cls", [optim.RiemannianSGD, optim.RiemannianAdam, optim.RSDM])
def test_a_group_of_a_generator_keeps_its_parameters(cls):
    # Looking for geoopt tensors read the group's generator (model.parameters()); the group then had none.
    W = torch.nn.Parameter(orthogonal_(torch.empty(6, 3, dtype=F64)))
    b = torch.nn.Parameter(torch.randn(3, dtype=F64))
    options = {"lr": 0.1, "rank": 2} if cls is optim.RSDM else {"lr": 0.1}
    opt = cls([{"params": (p for p in [W])}, {"params": (p for p in [b]), "manifold": None}], **options)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert opt.param_groups[0]["params"][0] is W
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(orthogonal_(torch.empty(4, 2, dtype=F64)))])})
    assert len(opt.param_groups[2]["params"]) == 1


def test_a_geoopt_manifold_these_optimizers_do_not_handle_is_named():
    sphere = _marked(torch.randn(4, dtype=F64), "Sphere")
    with pytest.raises(ValueError, match="parameter 1 is a geoopt ManifoldParameter on Sphere"):
        optim.RiemannianAdam([torch.nn.Parameter(torch.randn(3, dtype=F64)), sphere])
