"""optim._step_wrapper: the package's optimizers keep torch's step hooks and profiler range (torch's own wrapper
runs whenever they could be seen) and skip the range otherwise."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import optim
from optim.stiefel import orthogonal_


def _optimizers():
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    x = orthogonal_(torch.empty(8, 3, dtype=torch.float64)).requires_grad_()
    h = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    return [
        (optim.AdamW([w], lr=1e-2), w),
        (optim.RSDM([x], lr=1e-2, rank=2, seed=0), x),
        (optim.SophiaH([h], lr=1e-2, update_period=1000, seed=0), h),
    ]


def _step(opt, p):
    p.grad = torch.randn_like(p)
    if isinstance(opt, optim.SophiaH) and not opt.state:
        opt.set_hessian_diagonal([torch.ones_like(p)])
    return opt.step()


@pytest.mark.parametrize("index", range(3))
def test_instance_and_global_hooks_run_around_the_step(index):
    opt, p = _optimizers()[index]
    _step(opt, p)
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))),
               opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))),
               register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", o))),
               register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post", o)))]
    try:
        before = p.detach().clone()
        _step(opt, p)
        assert not torch.equal(before, p.detach())  # the step ran
        assert calls == [("global pre", opt), ("pre", opt), ("post", opt), ("global post", opt)]
    finally:
        for handle in handles:
            handle.remove()
    calls.clear()
    _step(opt, p)
    assert calls == []


def test_a_pre_hook_can_replace_the_arguments():
    opt, p = _optimizers()[0]
    seen = []

    def closure():
        seen.append(True)
        return torch.tensor(3.0)

    handle = opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": closure}))
    p.grad = torch.randn_like(p)
    assert float(opt.step()) == 3.0 and seen == [True]
    handle.remove()
    p.grad = torch.randn_like(p)
    assert opt.step() is None


@pytest.mark.parametrize("index", range(3))
def test_the_profiler_sees_the_step_range_and_no_profiler_skips_it(index, monkeypatch):
    opt, p = _optimizers()[index]
    _step(opt, p)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(opt, p)
    names = {event.name for event in prof.events()}
    assert f"Optimizer.step#{type(opt).__name__}.step" in names
    entered = []
    original = torch.autograd.profiler.record_function.__enter__
    monkeypatch.setattr(torch.autograd.profiler.record_function, "__enter__",
                        lambda self: (entered.append(self.name), original(self))[1])
    _step(opt, p)
    assert not any(name.startswith("Optimizer.step#") for name in entered)
