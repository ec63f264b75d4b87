"""Full training step (forward, backward, curvature, update) of the second-order optimizers against AdamW.

``python -m benchmarks sophia``: a GPT-2-small-shaped causal language model (12 layers, d = 768, 12 heads, vocabulary
50257, sequence 512, batch 8; ``--quick``: 2 layers, d = 64, vocabulary 1024, sequence 32, batch 2) trained on one
fixed batch of random tokens. Attention is written out (softmax(QKᵀ/√d)V), because the fused attention kernels
have no double backward. Every implementation starts from the same weights and is timed in one process, with the
repeats of all implementations interleaved; the table gives milliseconds per training step and the ratio to
``torch.optim.AdamW(fused=True)``'s step (forward + backward + step) measured in the same run.

Rows:

* ``optim.AdamW`` and ``torch.optim.AdamW`` (fused where torch supports it): ``zero_grad``, ``backward``, ``step``.
* ``optim.SophiaH`` / ``optim.AdaHessian`` (ours; closure protocol, fused kernel): the refresh step (every step
  refreshes, ``update_period=1``), the step between refreshes (``update_period`` so large that only the first,
  untimed step refreshes), and the mean over 10 consecutive steps at ``update_period=10`` (one refresh in 10).
* pytorch-optimizer's ``SophiaH`` / ``AdaHessian`` (when ``pytorch_optimizer`` is installed; otherwise reported as
  missing): their protocol, ``loss.backward(create_graph=True)`` on every step then ``step()``, at update_period 1
  and 10 (mean over 10 consecutive steps). Their default Sophia probe is Gaussian; we pass Rademacher to both.
"""

from __future__ import annotations

import gc
import math

import torch
import torch.nn.functional as F
from torch import nn

import optim

from ._timing import device_name, time_interleaved_ms

SOPHIA_HYPER = dict(lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
# Small learning rates: the benchmark repeats steps on one batch, and only the time is measured.
ADAHESSIAN_HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0)
ADAMW_HYPER = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
NEVER = 10**9  # an update_period that never comes round again after the first step


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (u.view(b, t, self.heads, d // self.heads).transpose(1, 2) for u in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attention = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """GPT-2's architecture (pre-norm blocks, learned positions, tied embedding) with written-out attention."""

    def __init__(self, vocab: int, positions: int, d: int, layers: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(positions, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def model_config(quick: bool) -> dict:
    if quick:
        return dict(vocab=1024, positions=32, d=64, layers=2, heads=4, batch=2, sequence=32)
    return dict(vocab=50257, positions=1024, d=768, layers=12, heads=12, batch=8, sequence=512)


def _torch_adamw(params):
    try:
        return torch.optim.AdamW(params, fused=True, **ADAMW_HYPER), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **ADAMW_HYPER), "foreach"


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out") -> dict:
    device = torch.device(device)
    config = model_config(quick)
    torch.manual_seed(0)
    base = GPT(config["vocab"], config["positions"], config["d"], config["layers"], config["heads"]).to(device)
    generator = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, config["vocab"], (config["batch"], config["sequence"] + 1), generator=generator)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def loss_of(model):
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    try:
        import pytorch_optimizer
        peer_error = None
    except ImportError as error:
        pytorch_optimizer, peer_error = None, f"pytorch_optimizer is not installed ({error})"

    cases = {}  # name -> (step function, steps per call)

    def first_order_step(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            loss_of(model).backward()
            opt.step()
        return step

    def add(name, make_opt, protocol, steps_per_call=1):
        model = GPT(config["vocab"], config["positions"], config["d"], config["layers"], config["heads"]).to(device)
        model.load_state_dict(base.state_dict())
        opt = make_opt(list(model.parameters()))
        if protocol == "first-order":
            one = first_order_step(model, opt)
        elif protocol == "closure":
            def one(model=model, opt=opt):
                opt.step(lambda: loss_of(model))
        else:  # pytorch-optimizer: backward(create_graph=True) on every step
            def one(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss_of(model).backward(create_graph=True)
                opt.step()
                opt.zero_grad(set_to_none=True)  # breaks the parameter -> grad -> graph cycle
        one()  # the first step refreshes in every configuration; untimed

        def call(one=one):
            for _ in range(steps_per_call):
                one()
        cases[name] = (call, steps_per_call)

    torch_opt_path = _torch_adamw([nn.Parameter(torch.zeros(4, device=device))])[1]
    anchor = f"torch.optim.AdamW ({torch_opt_path})"
    add(anchor, lambda p: _torch_adamw(p)[0], "first-order")
    add("optim.AdamW", lambda p: optim.AdamW(p, **ADAMW_HYPER), "first-order")
    ours = {"SophiaH": (optim.SophiaH, SOPHIA_HYPER), "AdaHessian": (optim.AdaHessian, ADAHESSIAN_HYPER)}
    for name, (cls, hyper) in ours.items():
        add(f"optim.{name} refresh step", lambda p, c=cls, h=hyper: c(p, **h, update_period=1, seed=0), "closure")
        add(f"optim.{name} between refreshes", lambda p, c=cls, h=hyper: c(p, **h, update_period=NEVER, seed=0),
            "closure")
        add(f"optim.{name} update_period=10 (mean of 10)",
            lambda p, c=cls, h=hyper: c(p, **h, update_period=10, seed=0), "closure", steps_per_call=10)
    peers_missing = []
    if pytorch_optimizer is not None:
        peer_hyper = {"SophiaH": dict(lr=SOPHIA_HYPER["lr"], betas=SOPHIA_HYPER["betas"],
                                      weight_decay=SOPHIA_HYPER["weight_decay"], hessian_distribution="rademacher"),
                      "AdaHessian": dict(ADAHESSIAN_HYPER, hessian_distribution="rademacher")}
        for name in ("SophiaH", "AdaHessian"):
            cls = getattr(pytorch_optimizer, name)
            add(f"pytorch_optimizer.{name} update_period=1", lambda p, c=cls, h=peer_hyper[name]: c(
                p, **h, update_period=1), "create_graph")
            add(f"pytorch_optimizer.{name} update_period=10 (mean of 10)", lambda p, c=cls, h=peer_hyper[name]: c(
                p, **h, update_period=10), "create_graph", steps_per_call=10)
    else:
        peers_missing.append(peer_error)

    repeats = 3 if quick else 10
    timings = time_interleaved_ms({name: call for name, (call, _) in cases.items()}, device, warmup=1,
                                  repeats=repeats)
    anchor_ms = timings[anchor].median_ms
    rows = []
    for name, (_, steps) in cases.items():
        per_step = timings[name].median_ms / steps
        rows.append({"impl": name, "ms_per_step": per_step, "ratio_to_torch_adamw": per_step / (anchor_ms / 1),
                     "steps_per_timed_call": steps, "repeat_ms": timings[name].repeat_ms})
    del cases
    gc.collect()
    result = {
        "device": str(device),
        "device_name": device_name(device),
        "quick": quick,
        "model": config,
        "params": sum(p.numel() for p in base.parameters()),
        "anchor": anchor,
        "fused_kernels": {op: optim.has_kernel(op, device) for op in ("fused_sophia_", "fused_adahessian_")},
        "peers_missing": peers_missing,
        "hyperparameters": {"SophiaH": {**SOPHIA_HYPER, "betas": list(SOPHIA_HYPER["betas"])},
                            "AdaHessian": {**ADAHESSIAN_HYPER, "betas": list(ADAHESSIAN_HYPER["betas"])}},
        "rows": rows,
    }
    print(format_table(result), flush=True)
    return result


def format_table(result: dict) -> str:
    config = result["model"]
    lines = [
        f"Training step (forward + backward + curvature + update) on {result['device']} ({result['device_name']}), "
        f"torch {torch.__version__}{', --quick sizes' if result['quick'] else ''}",
        f"model: GPT-2-shaped, {config['layers']} layers, d={config['d']}, vocab {config['vocab']}, batch "
        f"{config['batch']} x {config['sequence']} tokens, {result['params'] / 1e6:.1f}M params; written-out attention",
        f"ratio: ms per step / {result['anchor']} ms per step, same run",
        "",
    ]
    width = max(len(row["impl"]) for row in result["rows"])
    lines.append(f"{'implementation'.ljust(width)}  {'ms/step':>9}  {'ratio':>6}")
    lines.append(f"{'-' * width}  {'-' * 9}  {'-' * 6}")
    for row in result["rows"]:
        lines.append(f"{row['impl'].ljust(width)}  {row['ms_per_step']:9.2f}  {row['ratio_to_torch_adamw']:5.2f}x")
    for missing in result["peers_missing"]:
        lines.append(f"peer missing: {missing}")
    if not all(result["fused_kernels"].values()):
        lines.append(f"NOTE: compiled kernels for {result['device']}: {result['fused_kernels']} (missing ones fall "
                     "back to the foreach path)")
    return "\n".join(lines)
