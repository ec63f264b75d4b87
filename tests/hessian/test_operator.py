"""optim.hessian.operator.HessianOperator against the exact Hessian of small float64 models."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optim
from optim.hessian.hvp import fd_rtol
from optim.hessian.operator import HessianOperator

from ..conftest import DEVICES
from ._changes import CHANGES, make_change
from .test_hvp import EXACT_RTOL, MODEL_NAMES, build_case, cached_case, dense_hessian, relative_error


def operator_of(case, **kwargs) -> HessianOperator:
    return HessianOperator(case.model, case.loss_fn, (case.inputs, case.targets), **kwargs)


def flat_random(H, k=None):
    return torch.randn(((k,) if k is not None else ()) + (H.n,), dtype=H.dtype, device=H.device)


def halve_parameters(model) -> None:
    """Move the model in place, as an optimizer step does."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)


def halved_mlp_case():
    """A fresh "mlp" case after ``halve_parameters``: where an operator of a halved "mlp" case must now be."""
    moved = build_case("mlp")
    halve_parameters(moved.model)
    return moved


def dense_hessian_of(case) -> torch.Tensor:
    return dense_hessian(case.f, [p.detach() for p in case.model.parameters()])


# ----------------------------------------------------------------------------------------------------------------
# Products


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_products_equal_dense_hessian_times_v(device, model_name):
    case, hessian = cached_case(model_name, device)
    H = operator_of(case)
    v = flat_random(H)
    assert relative_error(H @ v, hessian @ v) <= EXACT_RTOL
    assert relative_error(H.matvec(v), hessian @ v) <= EXACT_RTOL
    assert relative_error(v @ H, hessian @ v) <= EXACT_RTOL

    for rows in (3, 1):  # a block of one probe takes a plain backward instead of the vmapped one
        block = flat_random(H, rows)
        product = H @ block
        assert product.shape == (rows, H.n)
        assert relative_error(product, block @ hessian) <= EXACT_RTOL

    as_list = H.unflatten(v)
    product = H @ as_list
    assert isinstance(product, list) and [t.shape for t in product] == [p.shape for p in H.params]
    assert relative_error(H.flatten(product), hessian @ v) <= EXACT_RTOL
    assert isinstance(H @ tuple(as_list), tuple)


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_every_mode(mode):
    case, hessian = cached_case("conv")
    H = operator_of(case, mode=mode)
    block = flat_random(H, 2)
    tol = EXACT_RTOL if mode != "fd" else fd_rtol(torch.float64)
    for row, expected in zip(H @ block, block @ hessian):
        assert relative_error(row, expected) <= tol
    assert H.resolved_mode == ("rr" if mode == "auto" else mode)


def test_auto_keeps_the_graph_of_its_first_product():
    # "auto" has not chosen before the first product; its first choice, "rr", keeps the graph it builds there, so
    # a second product on the batch runs no forward (the estimators' fresh operators would pay one more otherwise).
    case = build_case("mlp", rows=8)
    case.model.eval()
    hessian = dense_hessian(case.f, case.params)
    forwards = []
    handle = case.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        H = operator_of(case)
        first, second = flat_random(H, 3), flat_random(H)
        assert relative_error(H @ first, first @ hessian) <= EXACT_RTOL
        assert relative_error(H @ second, hessian @ second) <= EXACT_RTOL
    finally:
        handle.remove()
    assert len(forwards) == 1
    assert H.resolved_mode == "rr" and H.num_matvecs == 4


@pytest.mark.parametrize("reuse_graph", [None, False], ids=["kept", "rebuilt"])
def test_quadratic_forms_are_the_diagonal_of_v_h_vt(reuse_graph, monkeypatch):
    import importlib

    from optim.hessian.operator import CurvatureOperator
    from optim.hessian.spectrum import trace

    case = build_case("mlp", rows=8)
    case.model.eval()
    hessian = dense_hessian(case.f, case.params)
    H = operator_of(case, reuse_graph=reuse_graph)
    H @ flat_random(H)  # "auto" decides on its first product
    hvp_module = importlib.import_module("optim.hessian.hvp")  # the attribute optim.hessian.hvp is the function
    hvp_module._batching_choice.set(case.model, 5, "loop")  # blocks of 5 loop for this model: the dotted path
    blocks, matvec = [], CurvatureOperator.matvec
    monkeypatch.setattr(CurvatureOperator, "matvec", lambda self, v: blocks.append(tuple(v.shape)) or matvec(self, v))
    V = flat_random(H, 5)
    values = H.quadratic_forms(V)
    assert values.dtype == torch.float64 and values.shape == (5,)
    torch.testing.assert_close(values, torch.einsum("ij,jk,ik->i", V, hessian, V), rtol=1e-12, atol=1e-12)
    assert blocks == ([] if reuse_graph is None else [(5, H.n)])  # a kept graph forms no (k, n) product
    assert H.num_matvecs == 6
    with pytest.raises(ValueError, match=r"expected a block \(k, "):
        H.quadratic_forms(V[0])
    poisoned = V.clone()
    poisoned[2, 3] = float("nan")
    with pytest.raises(ValueError):
        H.quadratic_forms(poisoned)
    monkeypatch.undo()
    # The Hutchinson trace through it equals the dense matrix's on the same probes.
    assert trace(H, num_probes=12, seed=1, batch_size=5).estimate == pytest.approx(
        trace(hessian, num_probes=12, seed=1, batch_size=5).estimate, rel=1e-12)


class _CubeModel(nn.Module):
    """Σ x_i³ w_i through a function with no double backward: "auto" must end at "fr"."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, dtype=torch.float64))

    def forward(self, x):
        from .test_hvp import _Cube

        return _Cube.apply(self.weight) * x


def test_auto_on_a_model_rr_cannot_differentiate_falls_back_to_fr():
    model = _CubeModel().eval()
    x = torch.rand(3, 5, dtype=torch.float64) + 0.5
    H = HessianOperator(model, lambda out, target: (out * target).sum(), (x, torch.ones(3, 5, dtype=torch.float64)))
    v = torch.randn(2, 5, dtype=torch.float64)
    expected = 6 * model.weight.detach() * x.sum(0) * v  # the Hessian is diagonal: 6 w_i Σ_b x_bi
    for _ in range(2):
        torch.testing.assert_close(H @ v, expected, rtol=1e-13, atol=0.0)
    assert H.resolved_mode == "fr" and H.num_matvecs == 4


def test_k_probes_per_list():
    case, hessian = cached_case("mlp")
    H = operator_of(case)
    block = flat_random(H, 4)
    product = H @ H.unflatten(block)  # a list whose entries carry the leading k
    assert [t.shape for t in product] == [(4,) + tuple(p.shape) for p in H.params]
    assert relative_error(H.flatten(product), block @ hessian) <= EXACT_RTOL


def test_batches_are_averaged_by_row_count():
    case = build_case("mlp", rows=8)
    batches = [(case.inputs[:3], case.targets[:3]), (case.inputs[3:], case.targets[3:])]  # 3 and 5 rows
    H = HessianOperator(case.model, F.cross_entropy, batches)
    # (3·L_1 + 5·L_2)/8 is the mean over the 8 rows: the full-batch loss.
    hessian = dense_hessian(case.f, case.params)
    block = flat_random(H, 2)
    assert relative_error(H @ block, block @ hessian) <= EXACT_RTOL

    loss, grad = H.loss_and_grad()
    leaves = [p.clone().requires_grad_(True) for p in case.params]
    full_loss = case.f(*leaves)
    expected_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(full_loss, leaves)])
    torch.testing.assert_close(loss, full_loss.detach(), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_dataloader_and_generator_data():
    case = build_case("mlp", rows=8)
    hessian = dense_hessian(case.f, case.params)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(case.inputs, case.targets), batch_size=3, shuffle=True
    )  # batches of 3, 3 and 2 rows
    v = torch.randn(sum(p.numel() for p in case.params), dtype=torch.float64)
    for data in (loader, ((case.inputs[i:i + 4], case.targets[i:i + 4]) for i in (0, 4))):
        H = HessianOperator(case.model, F.cross_entropy, data)
        for _ in range(2):  # a generator is kept, not exhausted by the first product
            assert relative_error(H @ v, hessian @ v) <= EXACT_RTOL


def test_empty_batches_are_skipped():
    case, hessian = cached_case("mlp")
    empty = (case.inputs[:0], case.targets[:0])
    H = HessianOperator(case.model, case.loss_fn, [empty, (case.inputs, case.targets)])
    v = flat_random(H)
    assert relative_error(H @ v, hessian @ v) <= EXACT_RTOL


def test_param_filter_gives_the_sub_block():
    case, hessian = cached_case("attention")
    in_scope = {"query.weight", "norm_bias", "down.bias"}
    H = operator_of(case, param_filter=lambda name, p: name in in_scope)
    assert H.names == [name for name in case.names if name in in_scope]  # model order
    offsets, index = 0, []
    for name, p in zip(case.names, case.params):
        if name in in_scope:
            index.extend(range(offsets, offsets + p.numel()))
        offsets += p.numel()
    index = torch.tensor(index)
    sub_block = hessian[index][:, index]
    assert H.n == len(index) and H.shape == (H.n, H.n)
    block = flat_random(H, 2)
    assert relative_error(H @ block, block @ sub_block) <= EXACT_RTOL


def test_params_without_grad_are_out_of_scope():
    case = build_case("mlp")
    case.model[0].weight.requires_grad_(False)
    H = operator_of(case)
    assert H.names == ["0.bias", "2.weight", "2.bias"]


# ----------------------------------------------------------------------------------------------------------------
# Attributes, helpers, counters


@pytest.mark.parametrize("device", DEVICES)
def test_attributes(device):
    case, _ = cached_case("conv", device)
    H = operator_of(case)
    assert H.names == case.names
    assert all(a is b for a, b in zip(H.params, case.model.parameters()))  # the model's own tensors
    assert H.n == case.n == 2 * 9 + 2 + 32 * 3 + 3
    assert H.shape == (H.n, H.n)
    assert H.dtype == torch.float64
    assert H.device == torch.device(device)
    assert "n=119" in repr(H)


def test_flatten_unflatten():
    case, _ = cached_case("conv")
    H = operator_of(case)
    v = flat_random(H)
    pieces = H.unflatten(v)
    assert [t.shape for t in pieces] == [p.shape for p in H.params]
    assert all(t.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() for t in pieces)  # views
    assert torch.equal(H.flatten(pieces), v)

    block = flat_random(H, 3)
    pieces = H.unflatten(block)
    assert [t.shape for t in pieces] == [(3,) + tuple(p.shape) for p in H.params]
    assert all(t.untyped_storage().data_ptr() == block.untyped_storage().data_ptr() for t in pieces)
    assert torch.equal(H.flatten(pieces), block)
    assert torch.equal(pieces[1][2], block[2, 18:20])  # conv bias follows the 18 conv weights


def test_num_matvecs_counts_probes():
    case = build_case("mlp", rows=6)
    H = HessianOperator(case.model, case.loss_fn, [(case.inputs[:3], case.targets[:3]),
                                                   (case.inputs[3:], case.targets[3:])])
    assert H.num_matvecs == 0
    H @ flat_random(H)
    assert H.num_matvecs == 1  # one product with H, whatever the number of batches
    H @ flat_random(H, 5)
    assert H.num_matvecs == 6
    H @ H.unflatten(flat_random(H))
    assert H.num_matvecs == 7
    H.loss_and_grad()
    assert H.num_matvecs == 7


def test_loss_and_grad_single_batch():
    case, _ = cached_case("attention")
    H = operator_of(case)
    loss, grad = H.loss_and_grad()
    leaves = [p.clone().requires_grad_(True) for p in case.params]
    expected = case.f(*leaves)
    grads = torch.autograd.grad(expected, leaves)
    assert loss.shape == () and grad.shape == (H.n,)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(grad, torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# The model: left alone, read at each product, evaluated in its current mode


@pytest.mark.parametrize("mode", ["rr", "fr", "fd", "auto"])
def test_model_unchanged(mode):
    case = build_case("conv")
    before = {name: t.detach().clone() for name, t in case.model.state_dict().items()}
    H = operator_of(case, mode=mode)
    H @ flat_random(H, 2)
    H.loss_and_grad()
    for name, t in case.model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert all(p.grad is None for p in case.model.parameters())


def test_products_follow_the_current_parameters():
    case = build_case("mlp")
    H = operator_of(case)
    v = flat_random(H)
    halve_parameters(case.model)
    assert relative_error(H @ v, dense_hessian_of(halved_mlp_case()) @ v) <= EXACT_RTOL


# ----------------------------------------------------------------------------------------------------------------
# Reusing the gradient's graph between products


@pytest.mark.parametrize("device", DEVICES)
def test_reused_graph_gives_the_same_products_with_one_build(device, monkeypatch):
    import optim.hessian.operator as operator_module

    case, hessian = cached_case("mlp", device)
    case.model.eval()
    builds = []
    build = operator_module.first_order_graph
    monkeypatch.setattr(operator_module, "first_order_graph", lambda *a, **kw: builds.append(1) or build(*a, **kw))
    H, fresh = operator_of(case, mode="rr"), operator_of(case, mode="rr", reuse_graph=False)
    for v in (flat_random(H), flat_random(H, 3), flat_random(H)):
        product = H @ v
        assert relative_error(product, v @ hessian) <= EXACT_RTOL
        assert torch.allclose(product, fresh @ v, rtol=1e-12, atol=1e-12)
    assert len(builds) == 1 and H._graph is not None and fresh._graph is None
    for operator in (H, fresh):  # a block of no probes is an empty block, with or without a kept graph
        assert (operator @ flat_random(H, 0)).shape == (0, H.n)
    assert H.num_matvecs == 5
    H.release_graph()
    assert H._graph is None
    assert relative_error(H @ v, hessian @ v) <= EXACT_RTOL and len(builds) == 2


def test_reused_graph_follows_in_place_updates_and_new_parameters():
    case = build_case("mlp")
    case.model.eval()
    H = operator_of(case, mode="rr")
    v = flat_random(H)
    H @ v  # builds the graph at the first point
    halve_parameters(case.model)
    moved = halved_mlp_case()
    assert relative_error(H @ v, dense_hessian_of(moved) @ v) <= EXACT_RTOL
    inputs = case.inputs
    with torch.no_grad():
        inputs.mul_(2.0)  # the batch changed in place: not the same loss any more
    moved.inputs.mul_(2.0)
    hessian = dense_hessian_of(moved)
    assert relative_error(H @ v, hessian @ v) <= EXACT_RTOL


def test_graph_reuse_needs_eval_mode_unless_asked():
    model, inputs, targets = _batchnorm_case()  # has Dropout
    model.train()
    v = None
    for reuse, kept in ((None, False), (True, True), (False, False)):
        H = HessianOperator(model, F.cross_entropy, (inputs, targets), mode="rr", reuse_graph=reuse)
        v = flat_random(H) if v is None else v
        first = H @ v
        assert (H._graph is not None) == kept
        if kept:  # one dropout mask for every product: the same operator each time
            assert torch.equal(first, H @ v)
    model.eval()  # a mode change invalidates a kept graph
    H = HessianOperator(model, F.cross_entropy, (inputs, targets), mode="rr", reuse_graph=True)
    model.train()
    H @ v
    key = H._graph[0]
    model.eval()
    H @ v
    assert H._graph[0] != key
    with pytest.raises(ValueError, match="reuse_graph must be None, True or False"):
        HessianOperator(model, F.cross_entropy, (inputs, targets), reuse_graph="yes")


def _exact_product(model, inputs, targets, v, scope=None):
    """The dense Hessian of the current model on the current batch (eval mode, buffers as they are now) times v."""
    names = [name for name, p in model.named_parameters() if scope is None or scope(name, p)]
    params = [dict(model.named_parameters())[name].detach() for name in names]
    others = {name: p.detach() for name, p in model.named_parameters() if name not in names}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    shapes = [p.shape for p in params]

    def f(flat):
        pieces = [piece.reshape(shape) for piece, shape in zip(flat.split([p.numel() for p in params]), shapes)]
        state = {**buffers, **others, **dict(zip(names, pieces))}
        return F.cross_entropy(torch.func.functional_call(model, state, (inputs,)), targets)

    flat = torch.cat([p.reshape(-1) for p in params])
    return torch.autograd.functional.hessian(f, flat) @ v


def _count_builds(monkeypatch):
    import optim.hessian.operator as operator_module

    builds = []
    build = operator_module.first_order_graph
    monkeypatch.setattr(operator_module, "first_order_graph", lambda *a, **kw: builds.append(1) or build(*a, **kw))
    return builds


@pytest.mark.parametrize("change", CHANGES)
def test_a_kept_graph_is_never_stale(change, monkeypatch):
    # Each of these changes the function the graph differentiates without bumping the version counters the
    # operator used to trust (or outside what it tracked): the product must be the exact one at the new state.
    model, inputs, targets = _batchnorm_case()
    model.eval()
    scope = (lambda name, p: not name.startswith("4.")) if change == "out-of-scope param" else None
    H = HessianOperator(model, F.cross_entropy, (inputs, targets), mode="rr", param_filter=scope)
    builds = _count_builds(monkeypatch)
    v = flat_random(H)
    H @ v
    assert torch.allclose(H @ v, _exact_product(model, inputs, targets, v, scope), rtol=1e-10, atol=1e-12)
    assert len(builds) == 1  # unchanged: reused
    make_change(change, model, inputs, targets)
    expected = _exact_product(model, inputs, targets, v, scope)
    assert relative_error(H @ v, expected) <= EXACT_RTOL
    assert len(builds) == 2
    assert relative_error(H @ v, expected) <= EXACT_RTOL and len(builds) == 2  # the new graph is kept


def test_a_kept_graph_with_structured_inputs_is_checked_too(monkeypatch):
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(2, 4).double()
            self.head = nn.Linear(4, 2).double()

        def forward(self, batch):
            return self.head(torch.tanh(self.a(batch["x"]) + self.b(batch["z"])))

    model = DictModel().eval()
    x, z = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    targets = torch.randint(0, 2, (5,))
    H = HessianOperator(model, F.cross_entropy, ({"x": x, "z": z}, targets), mode="rr")
    builds = _count_builds(monkeypatch)
    v = flat_random(H)
    first = H @ v
    assert torch.equal(first, H @ v) and len(builds) == 1 and H._graph is not None
    z.data.mul_(-1.0)
    fresh = HessianOperator(model, F.cross_entropy, ({"x": x, "z": z}, targets), mode="rr", reuse_graph=False)
    assert torch.allclose(H @ v, fresh @ v, rtol=1e-12, atol=1e-12) and len(builds) == 2


def test_a_mapping_that_names_forwards_parameters_is_passed_as_keywords():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(2, 4).double()
            self.head = nn.Linear(4, 2).double()

        def forward(self, x, z=None, *, shift=0.0):
            return self.head(torch.tanh(self.a(x) + self.b(z) + shift))

    model = TwoInputs().eval()
    x, z = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    shift = torch.full((5, 4), 0.3, dtype=torch.float64)
    targets = torch.randint(0, 2, (5,))
    H = HessianOperator(model, F.cross_entropy, ({"z": z, "x": x, "shift": shift}, targets))
    v = flat_random(H)
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x, z, shift=shift), targets), params, create_graph=True)
    expected = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, H.unflatten(v))])
    assert relative_error(H @ v, expected) <= EXACT_RTOL and H._graph is not None
    with pytest.raises(TypeError):  # a key that names no parameter: the dict is the one positional argument
        HessianOperator(model, F.cross_entropy, ({"x": x, "y": z}, targets)) @ v


def test_a_tuple_of_inputs_is_the_positional_arguments_of_a_forward_that_takes_several():
    # forward(self, x, z) with inputs (x, z): the tuple was the one positional argument, and the call raised
    # "missing 1 required positional argument: 'z'". A forward that can take the tuple as one argument still gets it.
    from optim import EmpiricalFisherOperator, GGNOperator

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(2, 4).double()
            self.head = nn.Linear(4, 2).double()

        def forward(self, x, z):
            return self.head(torch.tanh(self.a(x) + self.b(z)))

    class PairInput(TwoInputs):
        def forward(self, pair):
            return super().forward(*pair)

    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, z = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    targets = torch.randint(0, 2, (5,))
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x, z), targets), params, create_graph=True)
    for inputs in ((x, z), [x, z]):
        H = HessianOperator(model, F.cross_entropy, (inputs, targets))
        v = flat_random(H)
        expected = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, H.unflatten(v),
                                                                         retain_graph=True)])
        assert relative_error(H @ v, expected) <= EXACT_RTOL
        keywords = {"x": x, "z": z}
        for operator in (GGNOperator, EmpiricalFisherOperator):
            torch.testing.assert_close(operator(model, F.cross_entropy, (inputs, targets)) @ v,
                                       operator(model, F.cross_entropy, (keywords, targets)) @ v, rtol=1e-12,
                                       atol=1e-14)
    pair = PairInput()
    pair.load_state_dict(model.state_dict())
    torch.testing.assert_close(HessianOperator(pair.eval(), F.cross_entropy, ((x, z), targets)) @ v, H @ v,
                               rtol=1e-12, atol=1e-14)


def test_captured_state_compares_bits():
    # Bits are compared, not values: a parameter holding NaN still matches its copy (NaN != NaN as values).
    from optim.hessian.operator import CapturedState

    t = torch.tensor([1.0, float("nan"), -0.0])
    state = CapturedState([t])
    assert state.unchanged()
    t[2] = 0.0  # -0.0 -> +0.0: a different bit pattern, a different tensor for the graph
    assert not state.unchanged()


def _batchnorm_case():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2))
        model = model.double()
        with torch.no_grad():
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 2.0)
        inputs, targets = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    return model, inputs, targets


def _functional_loss(model, inputs, targets):
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def f(*ps):
        state = dict(buffers)
        state.update(zip(names, ps))
        return F.cross_entropy(torch.func.functional_call(model, state, (inputs,)), targets)

    return f, params


def test_eval_mode_is_deterministic_and_exact():
    model, inputs, targets = _batchnorm_case()
    model.eval()
    H = HessianOperator(model, F.cross_entropy, (inputs, targets))
    f, params = _functional_loss(model, inputs, targets)
    hessian = dense_hessian(f, params)
    v = flat_random(H)
    first = H @ v
    assert torch.equal(first, H @ v)
    assert relative_error(first, hessian @ v) <= EXACT_RTOL


def test_train_mode_batchnorm_uses_batch_statistics_and_keeps_running_stats():
    model, inputs, targets = _batchnorm_case()
    model[3].p = 0.0  # keep dropout's train-mode path but make it deterministic for the comparison
    model.train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    H = HessianOperator(model, F.cross_entropy, (inputs, targets))
    f, params = _functional_loss(model, inputs, targets)
    hessian = dense_hessian(f, params)
    block = flat_random(H, 2)
    assert relative_error(H @ block, block @ hessian) <= EXACT_RTOL
    assert H.resolved_mode == "rr"
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    # Batch statistics, not the running ones: the eval-mode Hessian differs.
    model.eval()
    eval_f, _ = _functional_loss(model, inputs, targets)
    assert relative_error(block @ dense_hessian(eval_f, params), block @ hessian) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_construction_errors():
    case, _ = cached_case("mlp")
    batch = (case.inputs, case.targets)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got a method"):
        HessianOperator(case.f, case.loss_fn, batch)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        HessianOperator(case.model, "cross_entropy", batch)
    with pytest.raises(ValueError, match="param_filter must be callable"):
        HessianOperator(case.model, case.loss_fn, batch, param_filter="0.weight")
    with pytest.raises(ValueError, match="no parameters in scope.*passes param_filter"):
        HessianOperator(case.model, case.loss_fn, batch, param_filter=lambda name, p: False)
    with pytest.raises(ValueError, match="unknown mode 'exact'"):
        HessianOperator(case.model, case.loss_fn, batch, mode="exact")
    with pytest.raises(ValueError, match="data must be one batch or an iterable of batches, a batch being an "
                                         "\\(inputs, targets\\) pair"):
        HessianOperator(case.model, case.loss_fn, 3)


def test_mixed_dtypes_need_a_filter():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    batch = (torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="mix dtypes or devices.*param_filter"):
        HessianOperator(model, F.mse_loss, batch)
    H = HessianOperator(model, F.mse_loss, batch, param_filter=lambda name, p: name.startswith("0."))
    assert H.dtype == torch.float32 and H.n == 6


def test_bad_batches():
    case, _ = cached_case("mlp")
    # a list of batches is checked at construction (a loader, at each product)
    with pytest.raises(ValueError, match="data batch 1 is a tuple of length 1; each batch must be an "
                                         "\\(inputs, targets\\) pair"):
        HessianOperator(case.model, case.loss_fn, [(case.inputs, case.targets), (case.inputs,)])
    H = HessianOperator(case.model, case.loss_fn, [])
    with pytest.raises(ValueError, match="no batch with at least one row"):
        H @ flat_random(H)
    with pytest.raises(ValueError, match="no batch with at least one row"):
        H.loss_and_grad()


def test_bad_vectors():
    case, _ = cached_case("mlp")
    H = operator_of(case)
    with pytest.raises(ValueError, match=r"v has shape \(67,\); expected a flat vector \(66,\), a block \(k, 66\)"):
        H @ torch.randn(67, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v has shape \(2, 3, 66\)"):
        H @ torch.randn(2, 3, 66, dtype=torch.float64)
    with pytest.raises(ValueError, match="v is torch.float32 on cpu but the parameters are torch.float64"):
        H @ torch.randn(66)
    with pytest.raises(ValueError, match=r"v\[0\] contains non-finite"):
        H @ torch.full((66,), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v has 1 tensors but params has 4"):
        H @ [torch.randn(7, 5, dtype=torch.float64)]
    with pytest.raises(ValueError, match="got a dict"):
        H @ {"0.weight": torch.randn(7, 5, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(66,\) or \(k, 66\), got \(65,\)"):
        H.unflatten(torch.randn(65, dtype=torch.float64))


def test_non_finite_loss():
    case, _ = cached_case("mlp")
    bad_inputs = case.inputs.clone()
    bad_inputs[0, 0] = float("nan")
    H = HessianOperator(case.model, case.loss_fn, (bad_inputs, case.targets))
    with pytest.raises(ValueError, match="non-finite loss"):
        H @ flat_random(H)
    with pytest.raises(ValueError, match="non-finite loss"):
        H.loss_and_grad()


class _CheckpointedBlock(nn.Module):
    """``head(block(stem(x)))`` with the block under ``torch.utils.checkpoint`` (``reentrant`` None: not)."""

    def __init__(self, reentrant):
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 2)
        self.reentrant = reentrant

    def forward(self, x):
        h = self.stem(x)
        if self.reentrant is not None:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        else:
            h = self.block(h)
        return self.head(h)


def test_parameters_hidden_in_a_reentrant_checkpoint_are_refused_not_zero():
    # With the stem out of scope nothing the reentrant checkpoint takes is differentiated, so autograd.grad never
    # ran its backward and every product of the block's parameters read exactly zero (loss.backward() reaches them).
    torch.manual_seed(0)
    plain = _CheckpointedBlock(None).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    not_stem = lambda name, p: not name.startswith("stem.")  # noqa: E731
    head_only = lambda name, p: name.startswith("head.")  # noqa: E731
    for cls in (HessianOperator, optim.GGNOperator, optim.EmpiricalFisherOperator):
        reference = {flt: cls(plain, F.mse_loss, (x, y), param_filter=flt) for flt in (not_stem, head_only)}
        v = {flt: torch.randn(op.n, dtype=torch.float64) for flt, op in reference.items()}
        for reentrant in (True, False):
            model = _CheckpointedBlock(reentrant).double()
            model.load_state_dict(plain.state_dict())
            operator = cls(model, F.mse_loss, (x, y), param_filter=not_stem)
            if reentrant:
                with pytest.raises(ValueError, match=r"'block\.0\.weight', 'block\.0\.bias' are used inside a "
                                                     r"reentrant activation checkpoint.*use_reentrant=False"):
                    operator @ v[not_stem]
            else:
                torch.testing.assert_close(operator @ v[not_stem], reference[not_stem] @ v[not_stem],
                                           rtol=1e-12, atol=1e-14)
            # parameters outside the checkpoint are measured as ever, reentrant or not
            operator = cls(model, F.mse_loss, (x, y), param_filter=head_only)
            torch.testing.assert_close(operator @ v[head_only], reference[head_only] @ v[head_only],
                                       rtol=1e-12, atol=1e-14)
    model = _CheckpointedBlock(True).double()
    names = [name for name, _ in model.named_parameters() if not_stem(name, None)]
    params = [p for name, p in model.named_parameters() if not_stem(name, None)]

    def loss(*ps):
        return F.mse_loss(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    for mode in ("rr", "fd"):
        with pytest.raises(ValueError, match=r"'params\[0\]', 'params\[1\]' are used inside a reentrant"):
            optim.hvp(loss, params, [torch.randn_like(p) for p in params], mode=mode)
    monitor = optim.SharpnessMonitor(model, F.mse_loss, every=1, lr_from=0.1, param_filter=not_stem)
    with pytest.raises(ValueError, match="reentrant activation checkpoint"):
        monitor.step(0, (x, y))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_products_are_the_same_in_no_grad_and_inference_mode(context):
    # Lightning runs validation under torch.inference_mode(): there the GGN and Fisher products raised "Inference
    # tensors cannot be saved for backward", loss_and_grad "element 0 of tensors does not require grad", and the
    # Hessian's auto mode failed over to fr for good. The batch and the probes are made inside the mode too.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    names = [name for name, _ in model.named_parameters()]
    x, y, v = torch.randn(6, 4), torch.randint(0, 3, (6,)), torch.randn(2, sum(p.numel() for p in model.parameters()))

    def loss(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    def measure(make_inputs):
        x_, y_, v_ = make_inputs()
        results = []
        for cls in (HessianOperator, optim.GGNOperator, optim.EmpiricalFisherOperator):
            for reuse in (None, False):
                operator = cls(model, F.cross_entropy, (x_, y_), reuse_graph=reuse)
                results += [operator @ v_, operator.quadratic_forms(v_), *operator.loss_and_grad()]
        results += list(optim.hvp(loss, list(model.parameters()), HessianOperator(model, F.cross_entropy, (x_, y_))
                                  .unflatten(v_[0])))
        results.append(optim.SharpnessMonitor(model, F.cross_entropy, every=1, lr_from=0.1, probes=2)
                       .step(0, (x_, y_))["lambda_max"])
        return results

    expected = measure(lambda: (x, y, v))
    with context():
        got = measure(lambda: (x.clone(), y.clone(), v.clone()))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):  # to rounding: the Fisher's kept state is whichever way its build timed faster
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-6, atol=1e-7)
    with context():
        H = HessianOperator(model, F.cross_entropy, (x, y))
        H @ v
    assert H.resolved_mode == "rr"


class _NoisyNet(nn.Module):
    """Random in training mode only through the functions ``draw`` names (nothing but the layers otherwise)."""

    def __init__(self, draw: str, batch_norm: bool = False):
        super().__init__()
        self.draw = draw
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)
        self.dropout = nn.Dropout(0.3)
        self.norm = nn.BatchNorm1d(12) if batch_norm else nn.Identity()

    def forward(self, x):
        h = torch.tanh(self.norm(self.fc1(x)))
        if self.draw == "module":
            h = self.dropout(h)
        elif self.draw == "functional":
            h = F.dropout(h, 0.2, training=self.training)
        elif self.draw == "noise" and self.training:
            h = h + 0.1 * torch.randn_like(h)
        elif self.draw == "sdpa":
            q = h.view(x.shape[0], 1, 3, 4)
            h = F.scaled_dot_product_attention(q, q, q, dropout_p=0.25 if self.training else 0.0).reshape(h.shape)
        elif self.draw == "off":  # dropout with training=False, or p = 0: deterministic
            h = nn.functional.dropout(F.dropout(h, 0.5, training=False), 0.0)
        return self.fc2(h)


@pytest.mark.filterwarnings("ignore:top_eigenvalues. Lanczos did not converge")
@pytest.mark.parametrize("draw, named", [("module", "dropout(p=0.3)"), ("functional", "dropout(p=0.2)"),
                                         ("noise", "randn_like"),
                                         ("sdpa", "scaled_dot_product_attention(dropout_p=0.25)")])
@pytest.mark.parametrize("operator", [optim.HessianOperator, optim.GGNOperator, optim.EmpiricalFisherOperator])
def test_eigenvalues_of_a_random_operator_are_refused_not_made_up(draw, named, operator):
    # In training mode with dropout every product ran a new forward with a new mask: top_eigenvalues returned
    # 0.985 and 0.823 for a model whose Hessian has 0.925 and 0.727 (eval mode), and repeated products differed
    # by 0.74. Lanczos, power iteration and SLQ now refuse the operator; Hutchinson averages over the masks.
    torch.manual_seed(0)
    model = _NoisyNet(draw).double().train()
    batch = (torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,)))
    before = [p.detach().clone() for p in model.parameters()]
    H = operator(model, F.cross_entropy, batch)
    for estimate in (lambda: optim.top_eigenvalues(H, k=1, max_iter=8),
                     lambda: optim.top_eigenvalues(H, k=1, max_iter=8, method="power"),
                     lambda: optim.spectral_density(H, num_runs=2, lanczos_steps=4)):
        with pytest.raises(ValueError, match=r"another matrix at every product.*" + re.escape(named)
                           + r".*model\.eval\(\)"):
            estimate()
    assert H.random_draws == (named,)
    assert model.training and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert math.isfinite(optim.trace(H, num_probes=2).estimate)
    # one draw kept for every product: a fixed (random) matrix, symmetric
    kept = operator(model, F.cross_entropy, batch, reuse_graph=True)
    u, v = torch.randn(2, kept.n, dtype=torch.float64)
    torch.testing.assert_close(u @ (kept @ v), v @ (kept @ u), rtol=1e-10, atol=1e-12)
    optim.top_eigenvalues(kept, k=1, max_iter=8, tol=1e-2)
    assert kept.random_draws == ()
    model.eval()
    assert math.isfinite(float(optim.top_eigenvalues(operator(model, F.cross_entropy, batch), k=1,
                                                     max_iter=8, tol=1e-2).eigenvalues[0]))


@pytest.mark.parametrize("draw", ["none", "off"])
def test_a_deterministic_training_mode_forward_keeps_its_eigenvalues(draw):
    # BatchNorm with the batch's statistics, dropout with p = 0 or training=False: one matrix, nothing refused.
    torch.manual_seed(0)
    model = _NoisyNet(draw, batch_norm=True).double().train()
    batch = (torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,)))
    H = optim.HessianOperator(model, F.cross_entropy, batch)
    values = optim.top_eigenvalues(H, k=2, tol=1e-8).eigenvalues
    dense = H @ torch.eye(H.n, dtype=torch.float64)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(dense)[-2:].flip(0), rtol=1e-6, atol=1e-9)
    assert H.random_draws == ()


def test_the_monitor_outside_eval_mode_refuses_a_model_with_dropout():
    torch.manual_seed(0)
    model = _NoisyNet("module").double().train()
    batch = (torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,)))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = optim.SharpnessMonitor(model, F.cross_entropy, every=1, lr_from=sgd, eval_mode=False, probes=2,
                                     lanczos_iters=20, seed=0)
    with pytest.raises(ValueError, match="eval_mode=True"):
        monitor.step(0, batch)
    assert monitor.records == [] and model.training
    default = optim.SharpnessMonitor(model, F.cross_entropy, every=1, lr_from=sgd, probes=2, lanczos_iters=20, seed=0)
    assert math.isfinite(default.step(0, batch)["lambda_max"]) and model.training


def test_dropout_turned_off_in_its_module_alone_is_one_matrix_again():
    torch.manual_seed(0)
    model = _NoisyNet("module").double().train()
    batch = (torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,)))
    H = optim.HessianOperator(model, F.cross_entropy, batch)
    with pytest.raises(ValueError, match="another matrix"):
        optim.top_eigenvalues(H, k=1, max_iter=4)
    model.dropout.eval()  # the rest stays in training mode
    optim.top_eigenvalues(H, k=1, max_iter=8, tol=1e-2)
    assert H.random_draws == ()


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

    def forward(self, ids):
        return self.head(torch.tanh(self.embedding(ids)))


@pytest.mark.parametrize("operator", [optim.HessianOperator, optim.GGNOperator])
def test_batches_weigh_the_targets_their_loss_counts(operator):
    # A causal-LM or cross-entropy loss averages over the targets it counts, not over rows: batches with padding
    # (-100), or of other lengths, weighted by rows gave an operator 11% away from that of the same data as one
    # batch (the mean over all its counted tokens). Each batch now weighs what its mean divides by.
    torch.manual_seed(0)
    model = _TinyLM().double()
    first = torch.randint(0, 11, (3, 6))
    second = torch.randint(0, 11, (2, 6))
    first_labels = first.clone()
    first_labels[:, 4:] = -100  # right padding
    third = torch.randint(0, 11, (2, 6))
    third_labels = torch.full_like(third, -100)  # nothing to predict: weight 0, left out (its mean is 0/0)
    split = [(first, first_labels), (second, second.clone()), (third, third_labels)]
    whole = [(torch.cat([first, second]), torch.cat([first_labels, second]))]
    v = None
    for loss_fn in (optim.hessian.causal_lm_loss, optim.hessian.cross_entropy):
        A, B = operator(model, loss_fn, split), operator(model, loss_fn, whole)
        v = torch.randn(A.n, dtype=torch.float64) if v is None else v
        torch.testing.assert_close(A @ v, B @ v, rtol=1e-10, atol=1e-12)
        loss, grad = A.loss_and_grad()
        expected_loss, expected_grad = B.loss_and_grad()
        torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    # torch's criterion, its module with class weights (the mean divides by the kept targets' weights)
    linear = nn.Linear(5, 11).double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 11, (11,))
    y[:3] = -100
    weighted = nn.CrossEntropyLoss(weight=torch.rand(11, dtype=torch.float64) + 0.5)
    for loss_fn in (F.cross_entropy, weighted):
        A = operator(linear, loss_fn, [(x[:7], y[:7]), (x[7:], y[7:])])
        B = operator(linear, loss_fn, [(x, y)])
        u = torch.randn(A.n, dtype=torch.float64)
        torch.testing.assert_close(A @ u, B @ u, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one target that is not ignored"):
        operator(model, optim.hessian.causal_lm_loss, [(third, third_labels)]) @ v


def test_loss_terms_of_the_criteria_it_knows():
    from optim.hessian.losses import loss_terms

    labels = torch.tensor([[1, 2, -100, 3], [-100, 4, 5, -100]])
    assert loss_terms(optim.hessian.causal_lm_loss, labels) == 4.0  # labels at t + 1: 2, 3, 4, 5
    assert loss_terms(optim.hessian.cross_entropy, labels) == 5.0
    assert loss_terms(F.cross_entropy, labels) == 5.0
    assert loss_terms(nn.CrossEntropyLoss(ignore_index=2), labels) == 7.0
    assert loss_terms(nn.CrossEntropyLoss(reduction="sum"), labels) is None
    assert loss_terms(lambda z, t: F.cross_entropy(z, t), labels) is None  # unknown: the batch weighs its rows
    assert loss_terms(F.cross_entropy, torch.rand(2, 4)) is None  # probabilities
    assert loss_terms(optim.hessian.model_loss, labels) is None


def test_the_random_calls_follow_each_functions_training_default():
    from optim.hessian.routing import _random_call

    x = torch.ones(3)
    assert _random_call(F.dropout, (x,), {}) == "dropout(p=0.5)"  # training=True by default
    assert _random_call(F.dropout, (x, 0.0), {}) is None
    assert _random_call(F.dropout, (x, 0.3), {"training": False}) is None
    assert _random_call(F.alpha_dropout, (x, 0.5), {}) is None  # training=False by default
    assert _random_call(F.alpha_dropout, (x, 0.5, True), {}) == "alpha_dropout(p=0.5)"
    assert _random_call(F.rrelu, (x,), {}) is None and _random_call(F.rrelu, (x,), {"training": True}) == "rrelu"
    assert _random_call(F.scaled_dot_product_attention, (x, x, x), {"dropout_p": 0.1}) == \
        "scaled_dot_product_attention(dropout_p=0.1)"
    assert _random_call(F.scaled_dot_product_attention, (x, x, x, None, 0.0), {}) is None
    assert _random_call(torch.randn_like, (x,), {}) == "randn_like"
    assert _random_call(torch.Tensor.uniform_, (x,), {}) == "uniform_"
    assert _random_call(torch.tanh, (x,), {}) is None
