"""Second-order optimizers against AdamW: full training step times, and a short training run with loss curves.

``python -m benchmarks sophia [--quick] [--device cuda]``. Attention is written out (softmax(QKᵀ/√d)V) in every
model, because the fused attention kernels have no double backward.

Part 1, step times (``rows``, one table per ``case``): forward, backward, curvature and update on one fixed batch.

* ``gpt2``: a GPT-2-small-shaped causal language model (12 layers, d = 768, 12 heads, vocabulary 50257, sequence
  512, batch 8; ``--quick``: 2 layers, d = 64, vocabulary 1024, sequence 32, batch 2), random tokens.
* ``llama``: the LLaMA-60M shape of the low-rank benchmark (hidden 512, FFN 1376, 8 heads, 8 layers, vocabulary
  32000, sequence 256, batch 16; ``--quick``: hidden 64, FFN 172, 4 heads, 2 layers, vocabulary 1024, sequence 32,
  batch 2), a batch of real text (``benchmarks/_text.py``: model and data shared with ``benchmarks/lowrank.py``).

Every implementation starts from the same weights and is timed in one process, with the repeats of all
implementations interleaved; the table gives milliseconds per training step and the ratio to
``torch.optim.AdamW(fused=True)``'s step (forward + backward + step) measured in the same run. Rows:

* ``optim.AdamW`` and ``torch.optim.AdamW`` (fused where torch supports it): ``zero_grad``, ``backward``, ``step``.
* ``optim.SophiaH`` / ``optim.AdaHessian`` (ours; closure protocol, fused kernel): the refresh step (every step
  refreshes, ``update_period=1``), the step between refreshes (``update_period`` so large that only the first,
  untimed step refreshes), and the mean over 10 consecutive steps at ``update_period=10`` (one refresh in 10).
* pytorch-optimizer's ``SophiaH`` / ``AdaHessian`` (when ``pytorch_optimizer`` is installed; otherwise reported as
  missing): their protocol, ``loss.backward(create_graph=True)`` on every step then ``step()``, at update_period 1
  and 10 (mean over 10 consecutive steps). Their default Sophia probe is Gaussian; we pass Rademacher to both.

Part 2, the update kernels alone (``kernel_rows``): one call of ``optim::fused_sophia_`` / ``fused_adahessian_``
on the parameter shapes of GPT-2 small in float32 (``--quick``: 2 layers, vocabulary 8192), between refreshes and
on a refresh (Sophia: probe tensors read, or probes regenerated from their counters in the kernel), against
``torch.optim.AdamW(fused=True).step()`` on the same shapes and the device's ``dst.copy_(src)`` bandwidth, all
measured in one run. Bytes per float32 element: read p, g, m, h and write p, m, h = 28 B between refreshes (as
AdamW); a refresh also reads Hz (32 B), and z when it is a tensor (36 B).

Part 3, training run (``train``, ``train_rows``, ``lr_sweep``, ``png``): a LLaMA-style model trained from the same
initial weights (seed 0) on the same batches of the same text (byte tokens of the standard library's
``pydoc_data.topics``, 90/10 train/validation split) by ``optim.AdamW`` (backward, step), ``optim.SophiaH``
(closure protocol, ``update_period=10``: a second-order graph on 1 step in 10) and ``optim.AdaHessian`` (closure
protocol, ``update_period=1``, its published algorithm), each at its own learning rate with the same warm-up +
cosine schedule. Sizes: on CUDA the LLaMA-60M shape (vocabulary 32000), 2000 steps of 8 × 256 tokens, after a
200-step learning-rate sweep per method (``SWEEP_LRS``; the lowest validation loss wins); on CPU without ``--quick``
4 layers of hidden 128, 400 steps after a 100-step sweep; ``--quick``: 2 layers of hidden 64, 100 steps at fixed
learning rates (``QUICK_LRS``, from a sweep documented there); ``$OPTIM_SOPHIA_TRAIN_STEPS`` overrides the full
modes' step count. Reported: the final validation loss, the training
wall time (device synchronized every step, evaluation excluded) and ``sophia_loss.png`` in the output folder:
training loss and validation points against step and against wall time.
"""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import optim

from ._text import Llama, LlamaConfig, corpus, make_batches
from ._plots import pyplot, save
from ._timing import GB, device_name, measure_copy_bandwidth, synchronize, time_interleaved_ms
from .steps import gpt2_shapes, settings_for

SOPHIA_HYPER = dict(lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
# Small learning rates: the benchmark repeats steps on one batch, and only the time is measured.
ADAHESSIAN_HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0)
ADAMW_HYPER = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
NEVER = 10**9  # an update_period that never comes round again after the first step
LLAMA_60M = LlamaConfig("60M", hidden=512, ffn=1376, heads=8, layers=8, vocab=32000, seq=256)
# (config, batch) of the LLaMA case of the step-time table, by --quick
LLAMA_STEP = {False: (LLAMA_60M, 16),
              True: (LlamaConfig("tiny", hidden=64, ffn=172, heads=4, layers=2, vocab=1024, seq=32), 2)}


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



# ------------------------------------------------------------------------------------------------- step times


def gpt_step_case(quick: bool) -> dict:
    """The GPT case of the step-time table (also ``benchmarks.sophia_step_race``'s): name, description, model
    factory, batch of random tokens (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    config = model_config(quick)
    generator = torch.Generator(device="cpu").manual_seed(1)
    random_tokens = torch.randint(0, config["vocab"], (config["batch"], config["sequence"] + 1), generator=generator)
    return dict(case="gpt2", config=config,
                make=lambda: GPT(config["vocab"], config["positions"], config["d"], config["layers"], config["heads"]),
                batch=random_tokens,
                description=(f"GPT-2-shaped, {config['layers']} layers, d={config['d']}, vocab {config['vocab']}, "
                             f"batch {config['batch']} x {config['sequence']} random tokens"))


def _step_cases(device: torch.device, quick: bool, tokens: torch.Tensor) -> list[dict]:
    """The models of the step-time table: (case name, description, model factory, inputs, targets)."""
    gpt = gpt_step_case(quick)
    c, batch = LLAMA_STEP[quick]
    text_batch = make_batches(tokens, 1, batch, c.seq, seed=2)[0]
    llama = dict(case="llama", config={**asdict(c), "batch": batch},
                 make=lambda: Llama(c, attention="math"), batch=text_batch,
                 description=(f"LLaMA-{c.name}-shaped, {c.layers} layers, hidden {c.hidden}, FFN {c.ffn}, {c.heads} "
                              f"heads, vocab {c.vocab}, batch {batch} x {c.seq} text tokens"))
    return [gpt, llama]


def base_model_and_loss(case: dict, device: torch.device):
    """``(model, loss_of)``: the case's model built from seed 0 on ``device``, and ``loss_of(model)``, the mean
    next-token cross-entropy of any model of the case on its batch."""
    torch.manual_seed(0)
    base = case["make"]().to(device)
    inputs, targets = case["batch"][:, :-1].to(device), case["batch"][:, 1:].to(device)

    def loss_of(model):
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return base, loss_of


def time_steps(case: dict, device: torch.device, quick: bool, pytorch_optimizer) -> tuple[list[dict], str, int]:
    """The rows of one model's step-time table (see the module docstring), its anchor and its parameter count."""
    base, loss_of = base_model_and_loss(case, device)

    cases = {}  # name -> (step function, steps per call)

    def first_order_step(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            loss_of(model).backward()
            opt.step()
        return step

    def add(name, make_opt, protocol, steps_per_call=1):
        model = case["make"]().to(device)
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

    repeats = 5 if quick else 10
    timings = time_interleaved_ms({name: call for name, (call, _) in cases.items()}, device, warmup=1,
                                  repeats=repeats)
    anchor_ms = timings[anchor].median_ms
    rows = []
    for name, (_, steps) in cases.items():
        per_step = timings[name].median_ms / steps
        rows.append({"case": case["case"], "impl": name, "ms_per_step": per_step,
                     "ratio_to_torch_adamw": per_step / anchor_ms, "steps_per_timed_call": steps,
                     "repeat_ms": timings[name].repeat_ms})
    params = sum(p.numel() for p in base.parameters())
    del cases, base
    _release(device)
    return rows, anchor, params


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- training run


@dataclass(frozen=True)
class TrainSchedule:
    """A training run: model, batch, steps, evaluation, learning rates (``lrs``: the picked one per method, or the
    grid swept over ``sweep_steps`` steps when the grid has more than one value)."""

    config: LlamaConfig
    batch: int
    steps: int
    eval_every: int
    eval_batches: int
    lrs: dict
    sweep_steps: int = 0
    warmup_fraction: float = 0.05  # linear warm-up, then cosine decay to 10% of the peak (every method)


# Methods of the training run: their class, fixed hyperparameters and protocol. Weight decay is 0 for all three
# (a short run: the comparison is of the preconditioners); no gradient clipping (the closure protocol computes
# the gradient inside step()). SophiaH refreshes its curvature every 10 steps, AdaHessian on every step (its
# published algorithm and default).
TRAIN_METHODS = {
    "AdamW": (optim.AdamW, dict(betas=(0.9, 0.95), weight_decay=0.0), "first-order"),
    "SophiaH": (optim.SophiaH, dict(betas=(0.965, 0.99), rho=0.04, weight_decay=0.0, update_period=10, seed=0),
                "closure"),
    "AdaHessian": (optim.AdaHessian, dict(betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, update_period=1,
                                          seed=0), "closure"),
}
TRAIN_TINY = LlamaConfig("train-tiny", hidden=64, ffn=172, heads=4, layers=2, vocab=256, seq=64)
TRAIN_SMALL = LlamaConfig("train-small", hidden=128, ffn=344, heads=4, layers=4, vocab=256, seq=128)
# Learning rates. --quick: fixed, picked by a sweep of 100-step runs of the tiny model on CPU, the lowest final
# validation loss (AdamW over {1e-3, 3e-3, 1e-2, 2e-2, 3e-2}: 2.60, 2.14, 2.06, 2.10, 2.12; SophiaH over {3e-4,
# 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2}: 3.68, 2.40, 2.17, 2.19, 2.26, 2.25, 2.72; AdaHessian over {0.03, 0.1, 0.3}:
# 2.23, 2.04, 2.09). Full mode: a grid around those ratios is swept with short runs of the trained model, and the
# full run uses the learning rate of the lowest validation loss (every trial is in the JSON's lr_sweep).
QUICK_LRS = {"AdamW": [1e-2], "SophiaH": [2e-3], "AdaHessian": [0.1]}
SWEEP_LRS = {"AdamW": [3e-4, 1e-3, 3e-3], "SophiaH": [1e-4, 3e-4, 1e-3], "AdaHessian": [0.03, 0.1, 0.3]}


def train_schedule(device: torch.device, quick: bool) -> TrainSchedule:
    """The run's sizes; ``$OPTIM_SOPHIA_TRAIN_STEPS`` overrides the step count of the full modes (the sweep then
    runs a tenth of it, the evaluation every twentieth), e.g. to fit a time limit on the GPU machine."""
    if quick:
        return TrainSchedule(TRAIN_TINY, batch=8, steps=100, eval_every=25, eval_batches=2, lrs=QUICK_LRS)
    if device.type == "cuda":
        s = TrainSchedule(LLAMA_60M, batch=8, steps=2000, eval_every=100, eval_batches=8, lrs=SWEEP_LRS,
                          sweep_steps=200)
    else:
        s = TrainSchedule(TRAIN_SMALL, batch=8, steps=400, eval_every=50, eval_batches=4, lrs=SWEEP_LRS,
                          sweep_steps=100)
    steps = os.environ.get("OPTIM_SOPHIA_TRAIN_STEPS")
    if steps:
        steps = int(steps)
        s = replace(s, steps=steps, sweep_steps=max(1, steps // 10), eval_every=max(1, steps // 20))
    return s


def _lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    warmup = max(1, int(warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train_one(method: str, lr: float, s: TrainSchedule, steps: int, train_batches, eval_batches,
              device: torch.device, initial_state: dict) -> dict:
    """``steps`` steps of ``method`` from ``initial_state`` on ``train_batches``; the validation loss every
    ``eval_every`` steps and at the end. Wall time counts the training steps only (device synchronized per step)."""
    cls, hyper, protocol = TRAIN_METHODS[method]
    model = Llama(s.config, attention="math").to(device)
    model.load_state_dict(initial_state)
    opt = cls(model.parameters(), lr=lr, **hyper)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, steps, s.warmup_fraction))

    def loss_on(batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def validation_loss():
        return sum(loss_on(b).item() for b in eval_batches) / len(eval_batches)

    losses, seconds, val_points = [], [], []
    elapsed, diverged = 0.0, None
    for step in range(steps):
        batch = train_batches[step % len(train_batches)]
        synchronize(device)
        start = time.perf_counter()
        try:
            if protocol == "first-order":
                opt.zero_grad(set_to_none=True)
                loss = loss_on(batch)
                loss.backward()
                opt.step()
            else:  # the closure returns the loss; the optimizer differentiates it (twice on refresh steps)
                loss = opt.step(lambda: loss_on(batch))
        except ValueError as error:  # a non-finite gradient or curvature: nothing was stepped
            diverged = f"step {step + 1}: {error}"
            break
        scheduler.step()
        value = loss.item()  # synchronizes
        elapsed += time.perf_counter() - start
        losses.append(value)
        seconds.append(elapsed)
        if not math.isfinite(value):
            diverged = f"step {step + 1}: the training loss is {value}"
            break
        if (step + 1) % s.eval_every == 0 or step + 1 == steps:
            model.eval()
            val_points.append({"step": step + 1, "seconds": elapsed, "val_loss": validation_loss()})
            model.train()
    row = {
        "method": method, "lr": lr, "steps": len(losses), "steps_planned": steps,
        "update_period": hyper.get("update_period"), "hyperparameters": _plain(hyper),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "val_loss": val_points[-1]["val_loss"] if val_points and not diverged else None,
        "wall_s": elapsed, "ms_per_step": 1e3 * elapsed / len(losses) if losses else None,
        "diverged": diverged, "losses": losses, "seconds": seconds, "val_points": val_points,
    }
    del model, opt, scheduler
    _release(device)
    return row


def _plain(hyper: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()}


def train_run(device: torch.device, quick: bool, tokens: torch.Tensor, data: str) -> dict:
    s = train_schedule(device, quick)
    split = int(0.9 * tokens.numel())
    steps = max(s.steps, s.sweep_steps)
    train_batches = make_batches(tokens[:split], steps, s.batch, s.config.seq, seed=0)
    eval_batches = make_batches(tokens[split:], s.eval_batches, s.batch, s.config.seq, seed=1)
    train_batches = [b.to(device) for b in train_batches]
    eval_batches = [b.to(device) for b in eval_batches]
    torch.manual_seed(0)
    initial_state = {k: v.clone() for k, v in Llama(s.config, attention="math").state_dict().items()}
    sweep, rows = [], []
    for method in TRAIN_METHODS:
        grid = s.lrs[method]
        if len(grid) == 1:
            lr, how = grid[0], "fixed (--quick; see QUICK_LRS in benchmarks/sophia.py)"
        else:
            trials = []
            for candidate in grid:
                trial = train_one(method, candidate, s, s.sweep_steps, train_batches, eval_batches, device,
                                  initial_state)
                trials.append(trial)
                sweep.append({k: trial[k] for k in ("method", "lr", "steps", "val_loss", "final_train_loss",
                                                     "wall_s", "diverged")})
            finite = [t for t in trials if t["val_loss"] is not None]
            lr = min(finite, key=lambda t: t["val_loss"])["lr"] if finite else min(grid)
            how = f"lowest validation loss after {s.sweep_steps} steps over {grid}"
            if finite and lr in (min(grid), max(grid)):
                how += " (at the edge of the grid: widen it)"
        row = train_one(method, lr, s, s.steps, train_batches, eval_batches, device, initial_state)
        row["lr_picked_by"] = how
        rows.append(row)
    params = sum(v.numel() for v in initial_state.values())
    return {
        "train": {"config": asdict(s.config), "params": params, "batch": s.batch, "steps": s.steps,
                  "eval_every": s.eval_every, "eval_batches": s.eval_batches, "sweep_steps": s.sweep_steps,
                  "data": data + f", {tokens.numel()} tokens, 90/10 train/validation split",
                  "schedule": (f"linear warm-up over {100 * s.warmup_fraction:.0f}% of the steps, then cosine decay "
                               "to 10% of the peak lr (torch.optim.lr_scheduler.LambdaLR); same initial weights "
                               "(seed 0) and batches for every method; float32; written-out attention")},
        "train_rows": rows, "lr_sweep": sweep,
    }


def plot(train: dict, rows: list[dict], path: str) -> str | None:
    """Training loss (and validation points) against step and against wall time; None without matplotlib."""
    plt = pyplot("sophia_loss.png")
    if plt is None:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row, color in zip(rows, ("tab:blue", "tab:orange", "tab:green")):
        label = f"{row['method']} lr={row['lr']:g}"
        steps = range(1, len(row["losses"]) + 1)
        for axis, x, val_x in ((axes[0], steps, "step"), (axes[1], row["seconds"], "seconds")):
            axis.plot(x, row["losses"], color=color, alpha=0.6, linewidth=0.8, label=f"{label} (train)")
            points = row["val_points"]
            axis.plot([p[val_x] for p in points], [p["val_loss"] for p in points], "o-", color=color,
                      markersize=4, label=f"{label} (validation)")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training wall time (s)")
    for axis in axes:
        axis.set_ylabel("loss (byte-level cross-entropy)")
        axis.legend(fontsize=7)
    c = train["config"]
    figure.suptitle(f"LLaMA-style {c['layers']} layers, hidden {c['hidden']}, {train['params'] / 1e6:.1f}M params, "
                    f"batch {train['batch']} x {c['seq']} tokens", fontsize=9)
    return save(figure, path)


# ------------------------------------------------------------------------------------------- update kernels alone


def kernel_shapes(quick: bool) -> tuple[str, tuple[tuple[int, ...], ...]]:
    if quick:
        return "GPT-2 small shapes, 2 layers, vocabulary 8192", gpt2_shapes(n_layer=2, vocab_size=8192)
    return "GPT-2 small (124M) shapes", gpt2_shapes()


def time_update_kernels(device: torch.device, quick: bool) -> dict:
    """Part 2 of the module docstring: each update kernel alone, in float32, against AdamW's fused step."""
    description, shapes = kernel_shapes(quick)
    settings = settings_for(device, quick)
    copy = measure_copy_bandwidth(device, settings.copy_nbytes)
    generator = torch.Generator(device=device).manual_seed(0)

    def tensors(scale: float = 1.0, positive: bool = False) -> list[torch.Tensor]:
        out = [scale * torch.randn(shape, generator=generator, device=device) for shape in shapes]
        return [t.abs_() for t in out] if positive else out

    params, grads = tensors(0.02), tensors()
    numel = sum(p.numel() for p in params)
    sophia = dict(params=[p.clone() for p in params], grads=grads, exp_avgs=tensors(0.1), hessians=tensors(positive=True))
    adahessian = dict(params=[p.clone() for p in params], grads=grads, exp_avgs=tensors(0.1),
                      exp_hessian_diag_sqs=tensors(positive=True))
    products = tensors()
    probes = optim.hessian.rademacher_like(products, seed=1)
    offsets, offset = [], 0
    for p in params:
        offsets.append(offset)
        offset += p.numel()
    sophia_hyper = dict(lr=1e-6, beta1=0.965, beta2=0.99, rho=0.04, weight_decay=0.1, eps=1e-12, maximize=False)
    adahessian_hyper = dict(lr=1e-6, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-4, hessian_power=1.0,
                            step=10, hessian_step=10, maximize=False)
    sophia_op, adahessian_op = torch.ops.optim.fused_sophia_, torch.ops.optim.fused_adahessian_
    adamw_params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(adamw_params, grads):
        p.grad = g
    adamw = torch.optim.AdamW(adamw_params, lr=1e-6, fused=True)
    adamw.step()  # creates the state

    calls = {  # name: (function, bytes moved per float32 element)
        "torch.optim.AdamW step": (adamw.step, 28),
        "fused_sophia_ between refreshes": (lambda: sophia_op(**sophia, hessian_products=[], probes=[],
                                                              **sophia_hyper), 28),
        "fused_sophia_ refresh, probe tensors": (lambda: sophia_op(**sophia, hessian_products=products,
                                                                   probes=probes, **sophia_hyper), 36),
        "fused_sophia_ refresh, regenerated probes": (
            lambda: sophia_op(**sophia, hessian_products=products, probes=[], probe_seeds=[1] * len(params),
                              probe_offsets=offsets, **sophia_hyper), 32),
        "fused_adahessian_ between refreshes": (lambda: adahessian_op(**adahessian, hessian_diagonals=[],
                                                                      **adahessian_hyper), 28),
        "fused_adahessian_ refresh": (lambda: adahessian_op(**adahessian, hessian_diagonals=products,
                                                            **adahessian_hyper), 32),
    }
    timings = time_interleaved_ms({name: fn for name, (fn, _) in calls.items()}, device, warmup=settings.warmup,
                                  repeats=settings.repeats, min_repeat_ms=settings.min_repeat_ms)
    adamw_ms = timings["torch.optim.AdamW step"].median_ms
    rows = []
    for name, (_, bytes_per_element) in calls.items():
        ms = timings[name].median_ms
        gb_per_s = numel * bytes_per_element / (ms * 1e-3) / GB
        rows.append({"impl": name, "bytes_per_element": bytes_per_element, "median_ms": ms, "gb_per_s": gb_per_s,
                     "fraction_of_copy_bandwidth": gb_per_s / copy.gb_per_s, "ratio_to_adamw": ms / adamw_ms,
                     "repeat_spread": max(timings[name].repeat_ms) / min(timings[name].repeat_ms)})
    del sophia, adahessian, products, probes, adamw, adamw_params
    _release(device)
    return {"kernel_case": {"description": description, "params": numel, "tensors": len(shapes),
                            "dtype": "float32", "copy_gb_per_s": copy.gb_per_s, "copy_nbytes": copy.nbytes},
            "kernel_rows": rows}


def format_kernels(result: dict) -> str:
    case = result["kernel_case"]
    width = max(len(row["impl"]) for row in result["kernel_rows"])
    lines = [f"Update kernels alone: {case['description']}, {case['params'] / 1e6:.1f}M float32 params in "
             f"{case['tensors']} tensors; copy bandwidth {case['copy_gb_per_s']:.1f} GB/s (dst.copy_(src), "
             f"{case['copy_nbytes'] >> 20} MiB); AdamW: torch.optim.AdamW(fused=True).step()", "",
             f"{'kernel'.ljust(width)}  {'B/elem':>6}  {'ms':>8}  {'GB/s':>7}  {'of copy':>7}  {'x AdamW':>7}",
             f"{'-' * width}  {'-' * 6}  {'-' * 8}  {'-' * 7}  {'-' * 7}  {'-' * 7}"]
    for row in result["kernel_rows"]:
        lines.append(f"{row['impl'].ljust(width)}  {row['bytes_per_element']:>6}  {row['median_ms']:8.3f}  "
                     f"{row['gb_per_s']:7.1f}  {100 * row['fraction_of_copy_bandwidth']:6.0f}%  "
                     f"{row['ratio_to_adamw']:6.2f}x")
    lines.append("B/elem: bytes read + written per element (28: p, g, m, h read, p, m, h written; a refresh adds Hz, "
                 "and z when read); GB = 1e9 B")
    if result["device"] == "cpu":
        lines.append("CPU: GB/s can exceed the copy figure (the copy also reads dst's lines before writing them).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- run


def run(device: torch.device, quick: bool = False, out_dir: str = "bench_out", headline: bool = False) -> dict:
    """``headline``: the update kernels alone (part 2), GPT-2-small shapes (a few seconds on an H200)."""
    device = torch.device(device)
    if headline:
        result = {"device": str(device), "device_name": device_name(device), "quick": quick,
                  "fused_kernels": {op: optim.has_kernel(op, device) for op in ("fused_sophia_", "fused_adahessian_")},
                  **time_update_kernels(device, quick)}
        print(format_kernels(result), flush=True)
        return result
    tokens, data = corpus()
    try:
        import pytorch_optimizer
        peer_error = None
    except ImportError as error:
        pytorch_optimizer, peer_error = None, f"pytorch_optimizer is not installed ({error})"

    rows, cases = [], {}
    for case in _step_cases(device, quick, tokens):
        case_rows, anchor, params = time_steps(case, device, quick, pytorch_optimizer)
        rows += case_rows
        cases[case["case"]] = {"description": case["description"], "model": case["config"], "params": params,
                               "anchor": anchor}
    gpt = cases["gpt2"]
    result = {
        "device": str(device),
        "device_name": device_name(device),
        "quick": quick,
        "model": gpt["model"],
        "params": gpt["params"],
        "anchor": gpt["anchor"],
        "fused_kernels": {op: optim.has_kernel(op, device) for op in ("fused_sophia_", "fused_adahessian_")},
        "peers_missing": [] if pytorch_optimizer is not None else [peer_error],
        "hyperparameters": {"SophiaH": {**SOPHIA_HYPER, "betas": list(SOPHIA_HYPER["betas"])},
                            "AdaHessian": {**ADAHESSIAN_HYPER, "betas": list(ADAHESSIAN_HYPER["betas"])}},
        "rows": rows,
        "cases": cases,
    }
    print(format_table(result), flush=True)
    result.update(time_update_kernels(device, quick))
    print("\n" + format_kernels(result), flush=True)
    result.update(train_run(device, quick, tokens, data))
    result["png"] = plot(result["train"], result["train_rows"], os.path.join(out_dir, "sophia_loss.png"))
    print("\n" + format_training(result), flush=True)
    return result


def format_table(result: dict) -> str:
    lines = [
        f"Training step (forward + backward + curvature + update) on {result['device']} ({result['device_name']}), "
        f"torch {torch.__version__}{', --quick sizes' if result['quick'] else ''}; written-out attention",
    ]
    width = max(len(row["impl"]) for row in result["rows"])
    for name, case in result["cases"].items():
        lines += ["", f"model: {case['description']}, {case['params'] / 1e6:.1f}M params",
                  f"ratio: ms per step / {case['anchor']} ms per step, same run", ""]
        lines.append(f"{'implementation'.ljust(width)}  {'ms/step':>9}  {'ratio':>6}")
        lines.append(f"{'-' * width}  {'-' * 9}  {'-' * 6}")
        for row in result["rows"]:
            if row["case"] == name:
                lines.append(f"{row['impl'].ljust(width)}  {row['ms_per_step']:9.2f}  "
                             f"{row['ratio_to_torch_adamw']:5.2f}x")
    for missing in result["peers_missing"]:
        lines.append(f"peer missing: {missing}")
    if not all(result["fused_kernels"].values()):
        lines.append(f"NOTE: compiled kernels for {result['device']}: {result['fused_kernels']} (missing ones fall "
                     "back to the foreach path)")
    return "\n".join(lines)


def format_training(result: dict) -> str:
    train = result["train"]
    c = train["config"]
    lines = [f"Training run: LLaMA-style {c['layers']} layers, hidden {c['hidden']}, FFN {c['ffn']}, {c['heads']} "
             f"heads, vocab {c['vocab']}, {train['params'] / 1e6:.2f}M params; {train['steps']} steps of "
             f"{train['batch']} x {c['seq']} tokens; {train['data']}; {train['schedule']}", ""]
    adamw = next((r for r in result["train_rows"] if r["method"] == "AdamW"), None)
    header = f"{'method':<11} {'lr':>8} {'period':>6} {'train loss':>10} {'val loss':>9} {'wall s':>8} " \
             f"{'ms/step':>8} {'x AdamW':>8}"
    lines += [header, "-" * len(header)]
    for row in result["train_rows"]:
        ratio = (row["wall_s"] / adamw["wall_s"]) if adamw and adamw["wall_s"] and row["steps"] == adamw["steps"] \
            else None
        val = "diverged" if row["diverged"] else f"{row['val_loss']:.4f}"
        lines.append(f"{row['method']:<11} {row['lr']:>8g} {row['update_period'] or '-':>6} "
                     f"{row['final_train_loss']:>10.4f} {val:>9} {row['wall_s']:>8.1f} {row['ms_per_step']:>8.2f} "
                     f"{'-' if ratio is None else f'{ratio:.2f}x':>8}")
    lines += ["", "train loss: mean of the last 10 steps; val loss: mean over the validation batches at the end; "
              "wall s: training steps only (evaluation excluded); period: curvature refresh period.",
              "lr: " + "; ".join(f"{r['method']} {r['lr']:g} ({r['lr_picked_by']})" for r in result["train_rows"])]
    for row in result["train_rows"]:
        if row["diverged"]:
            lines.append(f"{row['method']} diverged at {row['diverged']}")
    if result.get("png"):
        lines.append(f"loss curves: {result['png']}")
    return "\n".join(lines)
