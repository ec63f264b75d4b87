"""Refactorizer, reset_moments, LowRankAdamW and memory_report: schedule, LR recovery with schedulers, exactly which
state is reset, the fused reset path against the in-place one, bit-identical resume, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optim
from optim.lowrank import LowRankAdamW, LowRankLinear, Refactorizer, memory_report, refactorize, reset_moments


class MLP(nn.Module):
    def __init__(self, d=12, hidden=20, out=5):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(self.norm(self.fc2(torch.tanh(self.fc1(x)))))


def low_rank_mlp(rank=4, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return optim.to_low_rank(MLP(), rank).to(dtype)


def batches(steps, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=generator).to(dtype), torch.randn(16, 5, generator=generator).to(dtype))
            for _ in range(steps)]


def train(model, optimizer, data, refactorizer=None, scheduler=None):
    for x, y in data:
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if refactorizer is not None:
            refactorizer.step()


def factors(model):
    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.B, m.A)]


# --------------------------------------------------------------------------------------------- refactorization


def test_refactorize_keeps_the_function_and_balances_every_layer():
    model = low_rank_mlp()
    x = torch.randn(8, 12)
    before = model(x)
    products = [m.dense_weight().double() for m in model.modules() if isinstance(m, LowRankLinear)]
    assert refactorize(model) == 2  # fc1 (20x12) and fc2 (20x20) have different shapes: two batched calls
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    for layer, product in zip([m for m in model.modules() if isinstance(m, LowRankLinear)], products):
        B, A = layer.B.double(), layer.A.double()
        assert ((B @ A - product).norm() / product.norm()) <= 1e-5
        gram_b, gram_a = B.T @ B, A @ A.T
        torch.testing.assert_close(gram_b, gram_a, atol=1e-5 * gram_b.diag().max().item(), rtol=0)
        torch.testing.assert_close(gram_b, torch.diag(gram_b.diag()), atol=1e-5 * gram_b.diag().max().item(), rtol=0)


def test_schedule_acts_after_every_kth_step():
    model = low_rank_mlp()
    optimizer = optim.AdamW(model.parameters(), lr=1e-2)
    refactorizer = Refactorizer(model, optimizer, every=3, recovery_steps=0)
    acted = []
    for x, y in batches(7):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        acted.append(refactorizer.step())
    assert acted == [False, False, True, False, False, True, False]
    assert refactorizer.refactorizations == 2


def lrs_seen(model, optimizer, data, refactorizer, scheduler=None):
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    after = []
    for x, y in data:
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        after.append(optimizer.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step()
        if refactorizer is not None:
            refactorizer.step()
    return seen, after


def test_lr_recovery_ramp_and_restore():
    model = low_rank_mlp()
    optimizer = optim.AdamW(model.parameters(), lr=0.1)
    refactorizer = Refactorizer(model, optimizer, every=3, recovery_steps=4, recovery_start=1e-3)
    seen, after = lrs_seen(model, optimizer, batches(9), refactorizer)
    ramp = [0.1 * (1e-3 + (1 - 1e-3) * k / 4) for k in range(4)]
    # steps 1-3 at full LR, refactorization after step 3, steps 4-6 ramp, refactorization after 6 restarts the ramp
    expected = [0.1, 0.1, 0.1, *ramp[:3], *ramp[:3]]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert after == [0.1] * 9  # the group's lr outside step() is the scheduled value


@pytest.mark.parametrize("order", ["scheduler first", "refactorizer first"])
@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),  # chainable: reads group["lr"]
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
], ids=["exponential", "lambda"])
def test_recovery_composes_with_schedulers(order, make_scheduler):
    model = low_rank_mlp()
    optimizer = optim.AdamW(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer)
    refactorizer = Refactorizer(model, optimizer, every=2, recovery_steps=3)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    scheduled = []
    for x, y in batches(8):
        scheduled.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        if order == "scheduler first":
            scheduler.step()
            refactorizer.step()
        else:
            refactorizer.step()
            scheduler.step()
    reference = make_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    plain = []
    for _ in range(8):
        plain.append(reference.optimizer.param_groups[0]["lr"])
        reference.optimizer.step()
        reference.step()
    assert scheduled == pytest.approx(plain, rel=1e-12)  # the schedule itself is untouched
    factors_used = [s / p for s, p in zip(seen, plain)]
    ramp = [1e-3 + (1 - 1e-3) * k / 3 for k in range(2)]
    assert factors_used == pytest.approx([1, 1, *ramp, *ramp, *ramp], rel=1e-9)


# ---------------------------------------------------------------------------------------------------- resets


def state_snapshot(optimizer):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("scope", ["factors", "all", "none"])
def test_in_place_reset_zeroes_exactly_the_chosen_state(scope):
    model = low_rank_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    refactorizer = Refactorizer(model, optimizer, every=2, reset=scope)
    train(model, optimizer, batches(1))
    refactorizer.step()
    train(model, optimizer, batches(1, seed=2))
    before = state_snapshot(optimizer)
    assert refactorizer.step()
    chosen = {"factors": {id(p) for p in factors(model)}, "all": {id(p) for p in model.parameters()},
              "none": set()}[scope]
    for p in model.parameters():
        state, old = optimizer.state[p], before[id(p)]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for key, value in state.items():
            if id(p) in chosen:
                assert not value.any(), f"{key} not zeroed"
            else:
                assert torch.equal(value, old[key]), f"{key} of an unchosen parameter changed"
                assert value.any()


@pytest.mark.parametrize("path", [dict(fused=True), dict(foreach=True), dict(fused=False, foreach=False)],
                         ids=["fused", "foreach", "single"])
def test_fused_reset_matches_in_place_reset_with_torch_adamw(path):
    """optim.AdamW's deferred reset (kernel flag) and torch.optim.AdamW's in-place reset train the same model."""
    ours_model = low_rank_mlp(dtype=torch.float64)
    torch_model = copy.deepcopy(ours_model)
    ours = optim.AdamW(ours_model.parameters(), lr=1e-2, **path)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, foreach=False)
    ours_refactorizer = Refactorizer(ours_model, ours, every=3, reset="factors", recovery_steps=2)
    theirs_refactorizer = Refactorizer(torch_model, theirs, every=3, reset="factors", recovery_steps=2)
    data = batches(8, dtype=torch.float64)
    train(ours_model, ours, data, ours_refactorizer)
    train(torch_model, theirs, data, theirs_refactorizer)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        assert ours.state[a]["step"].item() == theirs.state[b]["step"].item()
    assert ours.state[ours_model.fc1.B]["step"].item() == 2  # reset after step 6, two steps since
    assert ours.state[ours_model.head.weight]["step"].item() == 8


@pytest.mark.parametrize("make", [lambda p: optim.AdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)],
                         ids=["optim.AdamW", "torch.optim.AdamW"])
def test_an_accelerate_wrapped_optimizer_refactorizes_as_the_optimizer_it_wraps(make):
    # accelerator.prepare(optimizer) returns an AcceleratedOptimizer, which keeps no step hooks of its own: the
    # Refactorizer raised AttributeError there; its hooks go on the wrapped optimizer, which the wrapper steps.
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        plain_model = low_rank_mlp(dtype=torch.float64)
        wrapped_model = copy.deepcopy(plain_model)
        plain = make(plain_model.parameters())
        wrapped = accelerator.prepare_optimizer(make(wrapped_model.parameters()))
        data = batches(8, dtype=torch.float64)
        for model, optimizer in ((plain_model, plain), (wrapped_model, wrapped)):
            refactorizer = Refactorizer(model, optimizer, every=3, recovery_steps=2)
            train(model, optimizer, data, refactorizer)
            assert refactorizer.refactorizations == 2
        for a, b in zip(plain_model.parameters(), wrapped_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:  # Accelerate's process state is a singleton: leave none for the Trainer tests to find
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def test_adamw_reset_moments_is_deferred_and_validated():
    model = low_rank_mlp()
    optimizer = optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, batches(2))
    exp_avg = optimizer.state[model.fc1.A]["exp_avg"].clone()
    reset_moments(optimizer, [model.fc1.A])
    assert optimizer.pending_resets() == [model.fc1.A]
    assert torch.equal(optimizer.state[model.fc1.A]["exp_avg"], exp_avg)  # applied by the next step, not now
    train(model, optimizer, batches(1, seed=3))
    assert optimizer.pending_resets() == []
    assert optimizer.state[model.fc1.A]["step"].item() == 1
    assert optimizer.state[model.fc1.B]["step"].item() == 3
    with pytest.raises(ValueError, match="not a parameter"):
        reset_moments(optimizer, [torch.zeros(3)])


# ---------------------------------------------------------------------------------------------------- resume


def run_with_checkpoint(tmp_path, make, steps, checkpoint_at, optimizer_only=False):
    """Train ``steps`` steps straight, and again with a save/load into fresh objects after ``checkpoint_at``;
    ``optimizer_only``: the checkpoint holds the model and the optimizer, as the HF Trainer and Lightning save."""
    data = batches(steps)
    model, optimizer, refactorizer = make()
    train(model, optimizer, data, refactorizer)
    straight = [p.detach().clone() for p in model.parameters()]

    model, optimizer, refactorizer = make()
    train(model, optimizer, data[:checkpoint_at], refactorizer)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "refactorizer": refactorizer.state_dict() if refactorizer and not optimizer_only else None}, path)
    model, optimizer, refactorizer = make(seed=99)  # different initial weights: everything must come from the file
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    if checkpoint["refactorizer"] is not None:
        refactorizer.load_state_dict(checkpoint["refactorizer"])  # before the optimizer: order does not matter
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, data[checkpoint_at:], refactorizer)
    return straight, [p.detach() for p in model.parameters()]


def make_adamw_refactorizer(optimizer_class, reset):
    def make(seed=0):
        model = low_rank_mlp(seed=seed)
        optimizer = optimizer_class(model.parameters(), lr=1e-2)
        return model, optimizer, Refactorizer(model, optimizer, every=4, reset=reset, recovery_steps=3)
    return make


def make_low_rank_adamw(seed=0):
    torch.manual_seed(seed)
    model = MLP()
    optimizer = LowRankAdamW(model, lr=1e-2, rank=4, every=4, recovery_steps=3, reset="all")
    return model, optimizer, None


@pytest.mark.parametrize("checkpoint_at", [4, 5, 6])  # right after a refactorization (reset pending), in the ramp
@pytest.mark.parametrize("make", [
    make_adamw_refactorizer(optim.AdamW, "factors"),
    make_adamw_refactorizer(torch.optim.AdamW, "all"),
    make_low_rank_adamw,
], ids=["optim.AdamW", "torch.optim.AdamW", "LowRankAdamW"])
@pytest.mark.parametrize("optimizer_only", [False, True], ids=["both", "optimizer-only"])
def test_resume_mid_cycle_is_bit_identical(tmp_path, make, checkpoint_at, optimizer_only):
    straight, resumed = run_with_checkpoint(tmp_path, make, 11, checkpoint_at, optimizer_only)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_class", [optim.AdamW, torch.optim.AdamW])
def test_the_optimizer_state_dict_carries_the_refactorizer_and_a_bad_one_changes_nothing(optimizer_class):
    """Frameworks that checkpoint only the optimizer resume the schedule: its state dict holds the refactorizer's
    state (top level and, for torch.distributed.checkpoint, in the first group), and its load restores it after
    checking it; the caller's dict is left as it was, and the groups keep no copy."""
    model = low_rank_mlp()
    optimizer = optimizer_class(model.parameters(), lr=1e-2)
    refactorizer = Refactorizer(model, optimizer, every=4, recovery_steps=2)
    train(model, optimizer, batches(5), refactorizer)
    saved = optimizer.state_dict()
    assert saved["refactorizer"] == refactorizer.state_dict() == saved["param_groups"][0]["refactorizer"]
    assert "refactorizer" not in optimizer.param_groups[0]

    fresh = low_rank_mlp(seed=3)
    resumed = optimizer_class(fresh.parameters(), lr=1e-2)
    resumed_refactorizer = Refactorizer(fresh, resumed, every=4, recovery_steps=2)
    before = copy.deepcopy(saved)
    resumed.load_state_dict(saved)
    assert resumed_refactorizer.step_count == 5 and resumed_refactorizer.refactorizations == 1
    assert resumed_refactorizer.lr_factor() == refactorizer.lr_factor() != 1.0
    assert all("refactorizer" not in group for group in resumed.param_groups)
    assert saved.keys() == before.keys() and saved["param_groups"][0]["refactorizer"] == before["refactorizer"]

    # Only in a group (what set_state_dict of torch.distributed.checkpoint passes on) loads as well.
    in_group = {key: value for key, value in saved.items() if key != "refactorizer"}
    model_a = low_rank_mlp()
    other = Refactorizer(model_a, optimizer_class(model_a.parameters()), every=4, recovery_steps=2)
    other.optimizer.load_state_dict(in_group)
    assert other.step_count == 5

    # Settings that differ are refused before the optimizer loads anything.
    model_b = low_rank_mlp(seed=5)
    untouched = optimizer_class(model_b.parameters(), lr=1e-2)
    strict = Refactorizer(model_b, untouched, every=7)
    with pytest.raises(ValueError, match="every=4"):
        untouched.load_state_dict(saved)
    assert strict.step_count == 0 and len(untouched.state) == 0

    # A state dict saved without a refactorizer leaves this one as it is (its state may come from its own file).
    plain = optimizer_class(fresh.parameters(), lr=1e-2).state_dict()
    resumed.load_state_dict(plain)
    assert resumed_refactorizer.step_count == 5
    # After remove() the optimizer's state dict no longer carries it.
    resumed_refactorizer.remove()
    assert "refactorizer" not in resumed.state_dict()


# ------------------------------------------------------------------------------------------------ LowRankAdamW


def test_low_rank_adamw_converts_the_model_and_refactorizes():
    torch.manual_seed(0)
    model = MLP()
    optimizer = LowRankAdamW(model, lr=1e-2, rank=3, every=2, recovery_steps=1)
    assert isinstance(model.fc1, LowRankLinear) and isinstance(model.head, nn.Linear)
    data = batches(4)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    train(model, optimizer, data)
    assert optimizer.refactorizer.refactorizations == 2
    assert seen == pytest.approx([1e-2, 1e-2, 1e-5, 1e-2])
    assert optimizer.state[model.fc1.B]["step"].item() == 2  # reset after step 2, then steps 3, 4; reset after 4
    assert optimizer.pending_resets() == [model.fc1.B, model.fc1.A, model.fc2.B, model.fc2.A]
    assert "refactorizer" in optimizer.state_dict()


def test_bf16_model_with_fused_reset():
    """bf16 factors: refactorized in float32 and rounded once (product kept to bf16 rounding), fp32 moments reset."""
    model = low_rank_mlp(dtype=torch.bfloat16)
    optimizer = optim.AdamW(model.parameters(), lr=1e-2)
    refactorizer = Refactorizer(model, optimizer, every=2)
    train(model, optimizer, batches(1, dtype=torch.bfloat16), refactorizer)
    product = model.fc2.dense_weight(torch.float32)
    refactorizer.refactorize_now()
    assert model.fc2.B.dtype == torch.bfloat16
    error = (model.fc2.dense_weight(torch.float32) - product).norm() / product.norm()
    assert 0 < error < 2e-2  # a few bf16 ulps (2^-8), nowhere near a changed product
    train(model, optimizer, batches(1, dtype=torch.bfloat16, seed=5))
    assert optimizer.state[model.fc2.B]["step"].item() == 1
    assert optimizer.state[model.fc2.B]["exp_avg"].dtype == torch.float32
    assert optimizer.state[model.head.weight]["step"].item() == 2


# ------------------------------------------------------------------------------------------------ memory report


def test_memory_report_counts_each_category():
    model = low_rank_mlp()
    optimizer = optim.AdamW(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * 4 for p in params)
    report = memory_report(model, optimizer)
    assert (report.weights, report.gradients, report.optimizer_state) == (weight_bytes, 0, 0)
    train(model, optimizer, batches(1))
    report = memory_report(model, optimizer)
    assert report.gradients == weight_bytes
    assert report.optimizer_state == 2 * weight_bytes + 4 * len(params)  # two moments + one float32 step each
    assert report.total == report.weights + report.gradients + report.optimizer_state
    assert "weights" in str(report) and "MiB" in str(report)
    assert memory_report(model).optimizer_state == 0


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(every=0), "every must be an int >= 1"),
    (dict(reset="moments"), "reset must be one of"),
    (dict(recovery_steps=-1), "recovery_steps must be an int >= 0"),
    (dict(recovery_start=0.0), r"recovery_start must be in \(0, 1\]"),
])
def test_bad_settings(kwargs, message):
    model = low_rank_mlp()
    with pytest.raises(ValueError, match=message):
        Refactorizer(model, optim.AdamW(model.parameters()), **kwargs)


def test_bad_models_and_optimizers():
    with pytest.raises(ValueError, match="no LowRankLinear layer"):
        Refactorizer(MLP(), optim.AdamW(MLP().parameters()))
    model = low_rank_mlp()
    with pytest.raises(ValueError, match="not parameters of the optimizer"):
        Refactorizer(model, optim.AdamW([model.head.weight]))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Refactorizer(model, object())
    with pytest.raises(ValueError, match="rank=None but the model has no LowRankLinear"):
        LowRankAdamW(MLP())
    with pytest.raises(ValueError, match="rank"):
        LowRankAdamW(MLP(), rank=12)


def test_bad_state_dicts_change_nothing():
    model = low_rank_mlp()
    optimizer = optim.AdamW(model.parameters())
    refactorizer = Refactorizer(model, optimizer, every=5)
    state = refactorizer.state_dict()
    with pytest.raises(ValueError, match="every=7"):
        refactorizer.load_state_dict(dict(state, every=7, step_count=3))
    with pytest.raises(ValueError, match="lacks"):
        refactorizer.load_state_dict({"every": 5})
    with pytest.raises(ValueError, match="do not fit"):
        refactorizer.load_state_dict(dict(state, pending_resets=[999], step_count=3))
    assert refactorizer.step_count == 0 and optimizer.pending_resets() == []
    torch_optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="no reset_moments"):
        Refactorizer(model, torch_optimizer, every=5).load_state_dict(dict(state, pending_resets=[0]))
    low_rank = LowRankAdamW(MLP(), rank=3)
    with pytest.raises(ValueError, match="no 'refactorizer' entry"):
        low_rank.load_state_dict(optim.AdamW(low_rank.param_groups[0]["params"]).state_dict())


def test_exports():
    assert optim.Refactorizer is Refactorizer and optim.LowRankAdamW is LowRankAdamW
    assert optim.lowrank.memory_report is memory_report


@pytest.mark.cuda
def test_cuda_fused_reset_and_refactorization_match_torch_adamw():
    ours_model = low_rank_mlp(dtype=torch.float64).cuda()
    torch_model = copy.deepcopy(ours_model)
    ours = optim.AdamW(ours_model.parameters(), lr=1e-2, fused=True)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, foreach=False)
    ours_refactorizer = Refactorizer(ours_model, ours, every=3, recovery_steps=2)
    theirs_refactorizer = Refactorizer(torch_model, theirs, every=3, recovery_steps=2)
    data = [(x.cuda(), y.cuda()) for x, y in batches(7, dtype=torch.float64)]
    train(ours_model, ours, data, ours_refactorizer)
    train(torch_model, theirs, data, theirs_refactorizer)
    assert optim.has_kernel("lowrank_refactorize_", "cuda")
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_pending_reset_survives_a_state_dict_round_trip(tmp_path):
    """The pending reset is AdamW state: saved, loaded with weights_only=True, and applied by the resumed step."""
    model = low_rank_mlp()
    optimizer = optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, batches(2))
    reset_moments(optimizer, [model.fc1.A])
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model = low_rank_mlp()
    resumed_model.load_state_dict(saved["model"])
    resumed = optim.AdamW(resumed_model.parameters(), lr=1e-2)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.pending_resets() == [resumed_model.fc1.A]
    assert resumed.state[resumed_model.fc1.A]["reset_pending"].dtype == torch.bool
    train(model, optimizer, batches(1, seed=3))
    train(resumed_model, resumed, batches(1, seed=3))
    assert resumed.pending_resets() == [] and resumed.state[resumed_model.fc1.A]["step"].item() == 1
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_old_format_refactorizer_state_dict_loads_its_pending_resets():
    """Checkpoints from before the flag lived in AdamW's state kept the resets as positions in the Refactorizer's."""
    model = low_rank_mlp()
    optimizer = optim.AdamW(model.parameters(), lr=1e-2)
    refactorizer = Refactorizer(model, optimizer, every=5)
    train(model, optimizer, batches(1))
    old = dict(refactorizer.state_dict(), pending_resets=[0, 1])
    refactorizer.load_state_dict(old)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert optimizer.pending_resets() == params[:2]
    with pytest.raises(ValueError, match="pending_resets"):
        refactorizer.load_state_dict(dict(old, pending_resets="0"))
    with pytest.raises(ValueError, match="reset_pending"):
        bad = optimizer.state_dict()
        bad["state"][0]["reset_pending"] = torch.tensor(0.5)
        optimizer.load_state_dict(bad)


def test_in_place_reset_restarts_every_count_and_per_matrix_moment():
    # AdaHessian keeps a second count, hessian_step: the reset zeroed step but not it, and the next step refused the
    # state (hessian_step > step). RiemannianAdam(second_moment="matrix") keeps one second moment per matrix, of
    # shape (1, 1): left stale, it divided the restarted first moment by an old v at t = 1.
    torch.manual_seed(0)
    model = low_rank_mlp()
    x, y = batches(1)[0]
    optimizer = optim.AdaHessian(model.parameters(), lr=1e-2, seed=0)
    refactorizer = Refactorizer(model, optimizer, every=2, recovery_steps=1)
    for _ in range(5):
        optimizer.step(lambda: F.mse_loss(model(x), y))
        refactorizer.step()
    state = optimizer.state[model.fc1.B]  # reset after steps 2 and 4, then one step
    assert float(state["step"]) == float(state["hessian_step"]) == 1.0
    assert float(optimizer.state[model.head.weight]["step"]) == 5.0  # not a factor: kept

    w = optim.stiefel.orthogonal_(torch.empty(12, 4, dtype=torch.float64))
    w = nn.Parameter(w)
    adam = optim.RiemannianAdam([{"params": [w], "second_moment": "matrix"}], lr=1e-2)
    for _ in range(2):
        adam.zero_grad()
        (w * torch.arange(48.0, dtype=torch.float64).view(12, 4)).sum().backward()
        adam.step()
    assert adam.state[w]["exp_avg_sq"].shape == (1, 1) and float(adam.state[w]["exp_avg_sq"]) > 0
    reset_moments(adam, [w])
    assert adam.state[w]["step"] == 0
    assert float(adam.state[w]["exp_avg_sq"]) == 0 and float(adam.state[w]["exp_avg"].abs().sum()) == 0


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("optimizer_class", [optim.AdamW, torch.optim.AdamW, optim.SophiaH, optim.AdaHessian])
def test_a_step_the_grad_scaler_skips_is_not_counted(optimizer_class):
    # With float16 a GradScaler skips the steps whose gradients overflowed (several at the start of training,
    # while it calibrates), and the HF Trainer's on_step_end still runs: a Refactorizer counted them, so it
    # refactorized early and advanced its LR ramp over steps that were never taken.
    model = low_rank_mlp()
    optimizer = optimizer_class(model.parameters(), lr=1e-2)
    refactorizer = Refactorizer(model, optimizer, every=3, recovery_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    taken = []
    for index, (x, y) in enumerate(batches(8)):
        optimizer.zero_grad()
        # SophiaH and AdaHessian take the overflow flag and are called on a skipped step too (and skip it)
        second_order = isinstance(optimizer, (optim.SophiaH, optim.AdaHessian))
        scaler.scale(F.mse_loss(model(x), y)).backward(create_graph=second_order)
        if index in (1, 4, 5):
            model.fc1.A.grad[0, 0] = float("inf")  # an overflow: the scaler skips this step
        before = optimizer.state[model.head.weight].get("step")
        before = None if before is None else float(before)
        scaler.step(optimizer)
        scaler.update()
        after = float(optimizer.state[model.head.weight]["step"]) if optimizer.state[model.head.weight] else None
        taken.append(after != before)
        refactorizer.step()
    assert taken == [True, False, True, True, False, False, True, True]
    assert refactorizer.step_count == 5 and refactorizer.refactorizations == 1  # after the 3rd step taken
    # without its hooks (remove()), step() counts every call again
    refactorizer.remove()
    refactorizer.step()
    assert refactorizer.step_count == 6 and refactorizer.refactorizations == 2
