"""In-place changes that alter the function a kept graph or forward differentiates, without (all) bumping the
version counters: the freshness tests of every curvature operator apply them through :func:`make_change`."""

from __future__ import annotations

import torch

# The model is tests' BatchNorm case: Linear(3, 4), BatchNorm1d(4), Tanh, Dropout, Linear(4, 2), in float64.
CHANGES = ("param .data", "buffer by a train-mode forward", "batch .data", "targets in place", "out-of-scope param",
           "param replaced")


def make_change(change: str, model, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    if change == "param .data":
        model[0].weight.data.add_(0.3)
    elif change == "buffer by a train-mode forward":
        model.train()
        model(torch.randn(8, 3, dtype=torch.float64) * 3 + 1)  # updates BatchNorm's running statistics
        model.eval()
    elif change == "batch .data":
        inputs.data.mul_(2.0)
    elif change == "targets in place":
        targets.copy_(1 - targets)
    elif change == "out-of-scope param":
        model[4].weight.data.mul_(-2.0)
    elif change == "param replaced":
        model[0].weight.data = model[0].weight.data * 1.5
    else:
        raise ValueError(f"unknown change {change!r}")
