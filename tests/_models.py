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


def gpt2_twins(dtype=torch.float64, n_layer=2, dropout=0.0):
    """Two transformers ``GPT2LMHeadModel`` of one small config with the same weights, attention "sdpa" and
    "eager" (eval mode, ``dtype``; every dropout probability ``dropout``), and a batch (input_ids, labels with
    ignored positions); skips without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=31, n_positions=24, n_embd=16, n_layer=n_layer, n_head=4, bos_token_id=0, eos_token_id=0,
                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(3)
    sdpa = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="sdpa", **config))
    eager = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="eager", **config))
    eager.load_state_dict(sdpa.state_dict())
    input_ids = torch.randint(0, 31, (2, 19))
    labels = input_ids.clone()
    labels[1, 15:] = -100
    return sdpa.to(dtype).eval(), eager.to(dtype).eval(), (input_ids, labels)
