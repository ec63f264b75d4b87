"""One ``OptimizerInfo`` per optimizer class, in the style of torch's ``torch/testing/_internal/common_optimizers.py``:
how to build a small problem for it, how to take a step, and which hyperparameters torch itself validates.

The problem: a 6×3 matrix W (orthonormal columns, in a ``manifold="stiefel"`` group for the manifold optimizers) and a
bias b (an unconstrained group), loss = ‖W − T‖² + ‖b − c‖² + 0.1·Σ W⁴ (smooth, with a non-constant Hessian).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

import optim
from optim.stiefel import orthogonal_


@dataclasses.dataclass
class OptimizerInfo:
    name: str
    cls: type
    kwargs: dict[str, Any]  # always passed (e.g. rank, seed)
    second_order: bool = False  # closure returns the loss without backward()
    manifold: bool = False  # W lives on St(6, 3)
    torch_validated: tuple[str, ...] = ("lr",)  # hyperparameters torch validates with its own message
    has_betas: bool = False

    def params(self, *, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        w = torch.randn(6, 3, dtype=dtype, generator=generator)
        if self.manifold:
            w = orthogonal_(torch.empty(6, 3, dtype=dtype), generator=generator)
        b = torch.randn(3, dtype=dtype, generator=generator)
        return [torch.nn.Parameter(w), torch.nn.Parameter(b)]

    def groups(self, params: list[torch.Tensor], **group_kwargs) -> list[dict[str, Any]]:
        w, b = params
        if self.manifold:
            return [{"params": [w], "manifold": "stiefel", **group_kwargs}, {"params": [b], "manifold": None}]
        return [{"params": [w], **group_kwargs}, {"params": [b]}]

    def make(self, params: list[torch.Tensor], **kwargs) -> torch.optim.Optimizer:
        return self.cls(self.groups(params), **{**self.kwargs, **kwargs})

    @staticmethod
    def loss(params: list[torch.Tensor]) -> torch.Tensor:
        w, b = params
        target = torch.linspace(-1, 1, w.numel(), dtype=w.dtype).view_as(w)
        return ((w - target) ** 2).sum() + (b - 0.5).pow(2).sum() + 0.1 * w.pow(4).sum()

    def closure(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        if self.second_order:
            return lambda: self.loss(params)

        def closure():
            opt.zero_grad()
            loss = self.loss(params)
            if loss.requires_grad:  # every parameter may be frozen
                loss.backward()
            return loss
        return closure

    def step(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Any:
        return opt.step(self.closure(opt, params))

    def set_grads(self, params: list[torch.Tensor]) -> None:
        """Gradients in p.grad (what a step without closure reads); with a graph for second-order classes."""
        for p in params:
            p.grad = None
        loss = self.loss(params)
        loss.backward(create_graph=self.second_order)  # a graph in p.grad: the refresh step differentiates it


INFOS = [
    OptimizerInfo("AdamW", optim.AdamW, dict(lr=1e-2), torch_validated=("lr", "eps", "weight_decay", "betas"),
                  has_betas=True),
    OptimizerInfo("SophiaH", optim.SophiaH, dict(lr=1e-2, seed=0), second_order=True,
                  torch_validated=("lr", "eps", "weight_decay", "betas"), has_betas=True),
    OptimizerInfo("AdaHessian", optim.AdaHessian, dict(lr=1e-2, seed=0), second_order=True,
                  torch_validated=("lr", "eps", "weight_decay", "betas"), has_betas=True),
    OptimizerInfo("RSDM", optim.RSDM, dict(lr=1e-2, rank=4, seed=0, momentum=0.5), manifold=True,
                  torch_validated=("lr", "momentum")),
    OptimizerInfo("RiemannianSGD", optim.RiemannianSGD, dict(lr=1e-2, momentum=0.5), manifold=True,
                  torch_validated=("lr", "momentum")),
    OptimizerInfo("RiemannianAdam", optim.RiemannianAdam, dict(lr=1e-2), manifold=True,
                  torch_validated=("lr", "eps", "betas"), has_betas=True),
    OptimizerInfo("RiemannianAdam-matrix", optim.RiemannianAdam, dict(lr=1e-2, second_moment="matrix"),
                  manifold=True, torch_validated=("lr", "eps", "betas"), has_betas=True),
]
INFO_IDS = [info.name for info in INFOS]

# torch's messages for the hyperparameters torch validates (torch/optim/adam.py, sgd.py), with a bad value each.
TORCH_MESSAGES = {
    "lr": (-1.0, "Invalid learning rate: -1.0"),
    "eps": (-1.0, "Invalid epsilon value: -1.0"),
    "weight_decay": (-1.0, "Invalid weight_decay value: -1.0"),
    "betas": ((1.0, 0.999), "Invalid beta parameter at index 0: 1.0"),
    "momentum": (-0.5, "Invalid momentum value: -0.5"),
}


def snapshot(opt: torch.optim.Optimizer, extra: list[torch.Tensor] = ()) -> Any:
    """Every parameter, gradient, state value and param-group value of ``opt`` (plus ``extra`` tensors), copied."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            dense = value.detach() if value.layout == torch.strided else value.detach().to_dense()
            return ("tensor", value.dtype, tuple(value.shape), dense.clone())
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    groups = [{k: (copy(v) if k != "params" else [copy(p) for p in v]) for k, v in g.items()}
              for g in opt.param_groups]
    grads = [copy(p.grad) for g in opt.param_groups for p in g["params"]]
    state = [copy(dict(opt.state.get(p, {}))) for g in opt.param_groups for p in g["params"]]
    return groups, grads, state, len(opt.state), [copy(t) for t in extra]


def assert_same(before: Any, after: Any, path: str = "") -> None:
    """Bit-for-bit equality of two snapshots (NaN equal to NaN at the same place)."""
    if isinstance(before, tuple) and before and before[0] == "tensor":
        assert isinstance(after, tuple) and after[0] == "tensor", path
        assert before[1:3] == after[1:3], f"{path}: {before[1:3]} != {after[1:3]}"
        a, b = before[3], after[3]
        assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                           b.reshape(-1).contiguous().view(torch.uint8)), f"{path} changed"
        return
    if isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys(), f"{path}: keys {before.keys()} != " \
                                                                           f"{getattr(after, 'keys', lambda: None)()}"
        for key in before:
            assert_same(before[key], after[key], f"{path}[{key!r}]")
        return
    if isinstance(before, (list, tuple)):
        assert type(before) is type(after) and len(before) == len(after), f"{path}: {before!r} != {after!r}"
        for i, (x, y) in enumerate(zip(before, after)):
            assert_same(x, y, f"{path}[{i}]")
        return
    assert before == after or (before != before and after != after), f"{path}: {before!r} != {after!r}"
