"""Small models shared by test files."""

from __future__ import annotations

import torch
from torch import nn


class TanhMLP(nn.Module):
    """6 features -> 8 (tanh) -> 3 logits: the smallest model with a hidden layer, for end-to-end optimizer tests."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))
