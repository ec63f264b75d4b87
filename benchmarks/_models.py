"""Models the Hessian benchmarks share: an MLP classifier and a GPT-2-shaped language model with math attention.

Both are plain ``nn.Module`` s whose loss is a function of the flat list of their parameters (``loss_of_params``),
so the same model serves ``optim.hvp`` (functional), ``optim.HessianOperator`` and the peers' module APIs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class MLP(nn.Module):
    """``depth`` Linear layers of ``width`` with tanh between them, then a Linear head to ``classes`` logits."""

    def __init__(self, width: int, depth: int, classes: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention written out (softmax(QKᵀ/√d + mask) V): every op has a double backward."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=-1)
        shape = (batch, seq, self.heads, d_model // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_model // self.heads)
        mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, seq, d_model))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2 layout (pre-LayerNorm blocks, learned positions, GELU MLP of 4·d) with an untied output head."""

    def __init__(self, vocab: int, seq: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def sequence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PyTorch's cross-entropy over every position: logits (..., V), targets (...)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def fused_sequence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss through ``optim.hessian.cross_entropy`` (second derivatives by the fused kernel)."""
    from optim.hessian.losses import cross_entropy

    return cross_entropy(logits, targets)


@dataclass
class Case:
    """A model, one batch and its size description."""

    name: str
    description: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def loss_of_params(self, criterion: Callable) -> Callable[..., torch.Tensor]:
        """``f(*params) -> loss`` for the functional HVP API (``torch.func.functional_call`` on the model)."""
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]

        def loss(*params: torch.Tensor) -> torch.Tensor:
            output = functional_call(self.model, dict(zip(names, params)), (self.inputs,))
            return criterion(output, self.targets)

        return loss


def mlp_case(device: torch.device, quick: bool, seed: int = 0) -> Case:
    """4 layers of 4096 on a GPU (67M params), of 1024 on a CPU (4.2M), of 256 with ``quick`` (0.27M)."""
    if quick:
        width, depth, batch, classes = 256, 4, 128, 10
    elif torch.device(device).type == "cpu":
        width, depth, batch, classes = 1024, 4, 256, 10
    else:
        width, depth, batch, classes = 4096, 4, 1024, 10
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(width, depth, classes).to(device)
    inputs = torch.randn(batch, width, generator=generator).to(device)
    targets = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return Case("mlp", f"MLP {depth}x{width}, batch {batch}, {classes} classes", model, inputs, targets)


def gpt_case(device: torch.device, quick: bool, seed: int = 0, batch: int | None = None) -> Case:
    """GPT-2-small shapes on a GPU (124M params); on a CPU 4 layers of d = 256 with an 8192-token vocabulary (5.3M,
    the issue's >= 5M); ``quick``: a 2-layer d = 128 toy (0.67M). ``batch`` overrides the batch size."""
    if quick:
        vocab, seq, d_model, layers, heads, default_batch = 1024, 64, 128, 2, 4, 2
    elif torch.device(device).type == "cpu":
        vocab, seq, d_model, layers, heads, default_batch = 8192, 128, 256, 4, 4, 4
    else:
        vocab, seq, d_model, layers, heads, default_batch = 50304, 512, 768, 12, 12, 8
    batch = default_batch if batch is None else batch
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT(vocab, seq, d_model, layers, heads).to(device)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator).to(device)
    description = f"GPT-2 shape: {layers} layers, d={d_model}, {heads} heads, seq {seq}, batch {batch}, vocab {vocab}"
    return Case("gpt", description, model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def run_cases(device: torch.device, quick: bool, run_case: Callable[[Case], dict]) -> list[dict]:
    """``run_case`` on the MLP case, then the GPT case, freeing each model before the next is built."""
    import gc

    results = []
    for make in (mlp_case, gpt_case):
        case = make(device, quick)
        results.append(run_case(case))
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
