"""``memory_report``: the bytes of a model's weights, gradients and optimizer state, counted separately."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MemoryReport", "memory_report"]

MIB = 1 << 20


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a model's parameters, their gradients and the optimizer's state (each storage counted once)."""

    weights: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer_state": self.optimizer_state,
                "total": self.total}

    def __str__(self) -> str:
        parts = [f"{name} {value / MIB:.1f} MiB" for name, value in self.as_dict().items()]
        return "weights+grads+state: " + ", ".join(parts).replace("optimizer_state", "optimizer state")


def _tensors_in(value, depth: int = 0):
    """Tensors reachable from an optimizer state value: tensors, containers, and the attributes of objects (e.g. a
    projector object holding a projection matrix)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 4:
        return
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
        for item in vars(value).values():
            yield from _tensors_in(item, depth + 1)


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count the bytes of ``model``'s parameters, of their ``.grad`` and of ``optimizer.state``, separately.

    Each storage is counted once (tied weights, views, a state tensor shared by several params), in the category
    where it is first seen (weights, then gradients, then state). Optimizer state includes every tensor reachable
    from ``optimizer.state`` (moments, step counters, and tensors held by objects in the state, such as GaLore's
    projection matrices). Buffers (e.g. rotary tables) and activations are not counted; peak memory during training
    is a separate figure (``torch.cuda.max_memory_allocated``).
    """
    seen: set = set()
    params = list(model.parameters())
    weights = _storage_bytes(params, seen)
    gradients = _storage_bytes([p.grad for p in params if p.grad is not None], seen)
    state = 0
    if optimizer is not None:
        state = _storage_bytes(_tensors_in(dict(optimizer.state)), seen)
    return MemoryReport(weights=weights, gradients=gradients, optimizer_state=state)
