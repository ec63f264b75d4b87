"""Framework wrappers of an optimizer, seen through to the optimizer they wrap."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside a framework's wrapper (Accelerate's ``AcceleratedOptimizer``, which the Hugging Face
    Trainer hands its callbacks; DeepSpeed's; any ``torch.optim.Optimizer`` holding the real one as ``.optimizer``
    or ``._optimizer``): what its type says (Adam's stability limit) and where its hooks go (the wrapper steps
    it); anything else as it is. The wrappers share the inner optimizer's param groups and state, so its lr follows
    the schedule either way."""
    seen = set()
    while isinstance(optimizer, torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = next((getattr(optimizer, name) for name in ("optimizer", "_optimizer")
                      if isinstance(getattr(optimizer, name, None), torch.optim.Optimizer)), None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer
