"""The language-model benchmarks' shared model and data: a LLaMA-style decoder and real English text.

Used by ``benchmarks/lowrank.py`` (low-rank pre-training) and ``benchmarks/sophia.py`` (second-order optimizers).

Model: :class:`Llama` (RMSNorm, rotary attention, SwiGLU MLP, untied head), shaped by a :class:`LlamaConfig`.
``attention="sdpa"`` uses ``F.scaled_dot_product_attention``; ``attention="math"`` writes softmax(QKᵀ/√d + mask)V
out, which every second-order method needs (the fused SDPA kernels have no double backward).

Data: the English text of the Python standard library's ``pydoc_data.topics`` (the help pages of the Python
documentation, shipped with every Python), as byte-level tokens (ids < 256), prepared once and cached
(``$OPTIM_CACHE`` or ~/.cache/optim); :func:`make_batches` cuts seeded random windows out of it.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LlamaConfig", "Llama", "corpus", "make_batches", "cache_dir"]


@dataclass(frozen=True)
class LlamaConfig:
    name: str
    hidden: int
    ffn: int
    heads: int
    layers: int
    vocab: int = 32000
    seq: int = 256
    rank: int = 128  # the low-rank benchmark's factor rank (unused by the dense model)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(QKᵀ/√d)V of (batch, heads, seq, d) tensors, written out: every op has a double backward."""
    seq = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, attention: str = "sdpa"):
        super().__init__()
        if attention not in ("sdpa", "math"):
            raise ValueError(f"attention must be 'sdpa' or 'math', got {attention!r}")
        self.heads = c.heads
        self.attention = attention
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(c.hidden, c.hidden, bias=False)
                                                              for _ in range(4))

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.attention == "math":
            y = math_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.ffn, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.ffn, bias=False)
        self.down_proj = nn.Linear(c.ffn, c.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, attention: str = "sdpa"):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(c.hidden), RMSNorm(c.hidden)
        self.self_attn, self.mlp = Attention(c, attention), MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A LLaMA-style decoder: embed_tokens, blocks (q/k/v/o_proj, gate/up/down_proj), final norm, lm_head.

    ``attention``: "sdpa" (fused kernels, first-order training) or "math" (written out, twice differentiable).
    """

    def __init__(self, c: LlamaConfig, attention: str = "sdpa"):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Block(c, attention) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)
        head_dim = c.hidden // c.heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(c.seq).float(), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        cos, sin = self.cos[: tokens.shape[1]], self.sin[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def cache_dir() -> str:
    path = os.environ.get("OPTIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "optim")
    os.makedirs(path, exist_ok=True)
    return path


def corpus() -> tuple[torch.Tensor, str]:
    """Byte tokens of the Python documentation's help topics (stdlib ``pydoc_data.topics``), cached on disk."""
    path = os.path.join(cache_dir(), "pydoc_topics_bytes.pt")
    description = "Python stdlib pydoc_data.topics (the Python documentation's help pages), byte-level tokens"
    if os.path.exists(path):
        return torch.load(path, weights_only=True), description
    topics = importlib.import_module("pydoc_data.topics").topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()
    partial = f"{path}.{os.getpid()}.tmp"  # several benchmark processes may prepare it at once
    torch.save(tokens, partial)
    os.replace(partial, path)
    return tokens, description


def make_batches(tokens: torch.Tensor, count: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches of ``batch`` windows of seq + 1 tokens at positions drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq - 1, (count, batch), generator=generator)
    return [torch.stack([tokens[s: s + seq + 1] for s in row.tolist()]).long() for row in starts]
