"""``LowRankAdamW``: ``to_low_rank`` + ``optim.AdamW`` + ``Refactorizer`` in one optimizer object."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..fused._ops import PARAM_DTYPES
from ..fused.adamw import AdamW, _real_dtype
from .layers import Target, low_rank_modules, to_low_rank
from .refactorizer import Refactorizer, saved_refactorizer_state
from .refactorizer import _check_settings as check_refactorizer_settings

__all__ = ["LowRankAdamW"]


class LowRankAdamW(AdamW):
    r"""Low-rank pre-training in one object: factor the model, step it with the fused AdamW, refactorize on schedule.

    What it does to ``model`` (in place, in ``__init__``): with ``rank`` given, ``optim.to_low_rank(model, rank,
    target=target, scale=scale, init=init)`` replaces the targeted ``nn.Linear`` layers (by default every linear layer
    of the model's blocks: ``find_targets``) with ``LowRankLinear`` layers W = scale·B·A; with ``rank=None`` the model must already hold
    ``LowRankLinear`` layers. Then it optimizes every parameter of the model (``model.parameters()`` after the
    conversion: factors, embeddings, head, norms) with ``optim.AdamW(lr, betas, eps, weight_decay, ...)`` and, after
    each ``step()``, lets an ``optim.Refactorizer(model, self, every=..., reset=..., recovery_steps=...,
    recovery_start=...)`` act (available as ``.refactorizer``): every ``every`` steps the factors are balanced,
    the moments of the chosen parameters restart inside the next fused step, and the LR ramps back from
    ``recovery_start``. ``state_dict()`` holds the refactorizer's state under ``"refactorizer"``.

    Use ``optim.AdamW`` + ``optim.Refactorizer`` directly for param groups (e.g. no weight decay on norms).

    FSDP2: convert first, shard, then build the optimizer on the sharded model with ``rank=None``
    (``optim.to_low_rank(model, r)``, ``fully_shard(...)``, ``LowRankAdamW(model, rank=None, ...)``): each
    refactorization gathers one layer's factors at a time and every rank keeps its rows (``optim.lowrank.refactorize``).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, rank: int | None = None, every: int = 200,
                 reset: str = "factors", recovery_steps: int = 10, recovery_start: float = 1e-3,
                 target: Target = None, scale: float = 1.0, init: str = "random", **adamw_options: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"LowRankAdamW: model must be an nn.Module (it is converted in place), got "
                            f"{type(model).__name__}")
        # Validate every setting before to_low_rank changes the model: a throwaway AdamW runs AdamW's own checks.
        AdamW([torch.zeros(1, requires_grad=True)], lr, betas, eps, weight_decay, **adamw_options)
        check_refactorizer_settings(every, reset, recovery_steps, recovery_start)
        # Every parameter the optimizer will own (the model's, with the targets' weights replaced by factors of the
        # same dtype) is checked before the conversion changes the model.
        for name, p in model.named_parameters():
            if _real_dtype(p) not in PARAM_DTYPES:
                raise ValueError(f"LowRankAdamW: parameter {name!r} of the model (shape {tuple(p.shape)}) is "
                                 f"{p.dtype}{' and frozen' if not p.requires_grad else ''}; optim.AdamW steps only "
                                 "float64, float32, bfloat16 and float16 (and complex) parameters, and LowRankAdamW "
                                 "optimizes every parameter of the model. Nothing was converted; for a model with "
                                 "such parameters use optim.to_low_rank, then optim.AdamW on the trainable "
                                 "parameters and optim.Refactorizer")
        if rank is None:
            if not low_rank_modules(model):
                raise ValueError("LowRankAdamW: rank=None but the model has no LowRankLinear layer; pass rank= to "
                                 "convert its projections")
        else:
            to_low_rank(model, rank, target=target, scale=scale, init=init)
        super().__init__(model.parameters(), lr, betas, eps, weight_decay, **adamw_options)
        self.refactorizer = Refactorizer(model, self, every=every, reset=reset, recovery_steps=recovery_steps,
                                         recovery_start=recovery_start)
        # A post hook rather than an overridden step(): one hooked step() per call, and a step that raises does not
        # advance the schedule.
        self._refactorizer_hook = self.register_step_post_hook(lambda optimizer, args, kwargs:
                                                               self.refactorizer.step())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The refactorizer's own hooks take its entry out of the dict, check it and load it with the optimizer's.
        if saved_refactorizer_state(state_dict) is None:
            raise ValueError("LowRankAdamW.load_state_dict: the state dict has no 'refactorizer' entry; it was not "
                             "saved by LowRankAdamW (load a plain optim.AdamW state dict into optim.AdamW)")
        super().load_state_dict(state_dict)
