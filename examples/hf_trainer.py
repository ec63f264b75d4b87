"""Train a tiny causal language model with ``transformers.Trainer`` and the optimizers of ``optim``.

Run from the checkout, with the package installed with its ``hf`` extra (transformers and accelerate:
``pip install --no-build-isolation -e ".[hf]"``); CPU, no network, nothing downloaded::

    python examples/hf_trainer.py --optimizer adamw      # or sophia | adahessian | lowrank
    python examples/hf_trainer.py --optimizer sophia --steps 60
    python examples/hf_trainer.py --optimizer adamw --monitor 5   # and the sharpness every 5 steps

The model is a randomly initialized 2-layer LLaMA (hidden size 64, byte-level vocabulary of 256) and the text is
the docstrings of a few standard-library modules, read as bytes: nothing is downloaded. The script prints the
training loss of every step and the loss on a held-out slice of the text before and after training.

How each optimizer plugs into the Trainer
-----------------------------------------
The Trainer accepts a ready optimizer and scheduler, ``Trainer(..., optimizers=(opt, sched))``; it then calls
``loss.backward()`` (through accelerate), ``opt.step()``, ``sched.step()`` and ``model.zero_grad()`` once per step.

* ``adamw``: ``optim.AdamW`` is a drop-in for ``torch.optim.AdamW`` (same arguments, state keys and schedulers),
  here with ``transformers.get_cosine_schedule_with_warmup``.

* ``lowrank``: ``optim.to_low_rank(model, rank)`` replaces the attention and MLP projections (``q_proj`` ...
  ``down_proj``) by ``optim.LowRankLinear`` layers W = B·A *before* the optimizer is built; ``optim.AdamW`` steps
  the factors; an ``optim.Refactorizer`` rebalances the factors, resets their moments and ramps the learning rate
  back every ``every`` steps. The Trainer knows nothing of it: a ``TrainerCallback`` calls ``refactorizer.step()``
  in ``on_step_end`` (after each optimizer step). The LR ramp is applied inside ``opt.step()`` by optimizer hooks and
  composes with the Trainer's scheduler. One object does the same: ``opt = optim.LowRankAdamW(model, rank=16,
  every=10)`` converts the model and refactorizes inside its own ``step()``, with no callback.
  (GPT-2's projections, transformers' ``Conv1D``, are factored too, and ``optim.lowrank.merge`` turns them back
  into ``Conv1D`` layers, so a merged model saves and loads as a GPT-2.)

* ``sophia`` / ``adahessian``: ``optim.SophiaH`` and ``optim.AdaHessian`` need a Hessian-vector product on the
  steps that refresh their curvature estimate (every ``update_period`` steps). Their usual protocol is
  ``opt.step(closure)`` with a closure that returns the loss, but the Trainer calls ``opt.step()`` without a
  closure, after its own backward. Calling ``opt.step(closure)`` inside an overridden ``training_step`` would step
  twice per batch, since the Trainer then calls ``opt.step()`` anyway. What works is the optimizers' other protocol:
  ``loss.backward(create_graph=True)`` then ``step()`` with no closure, which takes Hz through the graph the
  gradients carry (and detaches ``p.grad`` afterwards). :class:`HessianTrainer` below overrides
  ``training_step`` to make the Trainer's backward ``create_graph=True`` on exactly the steps where
  ``opt.next_step_refreshes()`` is true, and leaves the others alone; loss scaling, gradient accumulation,
  clipping, logging and the scheduler stay the Trainer's. Two requirements: the model must be twice
  differentiable (with ``attn_implementation="sdpa"`` the refresh steps' forward and backward run inside
  ``optim.hessian.sdpa_curvature()``: torch's SDPA kernels have no double backward; no ``torch_compile``), and no mixed precision here (not tested with this subclass; ``fp16`` needs CUDA. The
  optimizers take the scale and the overflow flag from a ``GradScaler`` and unscale Hz too, but they reject
  ``scaler.unscale_`` before a refresh step, which the Trainer's gradient clipping calls: fp16 would need
  ``max_grad_norm=0``; see ``optim.hessian.second_order``, *Mixed precision*). The other route, an externally computed diagonal via
  ``opt.set_hessian_diagonal(...)`` from a ``on_pre_optimizer_step`` callback, needs a batch and a loss the
  callback does not get, so it is not shown.

* ``--monitor N``: a ``TrainerCallback`` runs ``optim.SharpnessMonitor`` every N optimizer steps on one held-out
  batch as the collator yields it (``{"input_ids", "labels"}``: the labels are the targets), with
  ``lr_from=`` the Trainer's optimizer. With AdamW the monitor measures the preconditioned Hessian P⁻¹H against
  Adam's limit (2 + 2β1)/(lr(1 − β1)); the records come back in the result and are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import textwrap
import warnings

import torch

import optim

OPTIMIZERS = ("adamw", "sophia", "adahessian", "lowrank")
SEQUENCE_LENGTH = 32


# ----------------------------------------------------------------------------------------------------------- data

def corpus() -> bytes:
    """The docstrings of a few standard-library modules as one byte string (generated text under ``python -OO``)."""
    import argparse as m1, collections as m2, functools as m3, json as m4, logging as m5, re as m6, textwrap as m7
    parts = []
    for module in (m1, m2, m3, m4, m5, m6, m7):
        parts.append(module.__doc__ or "")
        parts += [getattr(module, name).__doc__ or "" for name in sorted(vars(module)) if not name.startswith("_")
                  and callable(getattr(module, name))]
    text = "\n".join(textwrap.dedent(p).strip() for p in parts if p)
    if len(text) < 20_000:  # docstrings stripped (python -OO): a deterministic stand-in of common English words
        words = "the a of to and in is that for it with as on be by this are or from at which an".split()
        generator = torch.Generator().manual_seed(0)
        picks = torch.randint(len(words), (8000,), generator=generator).tolist()
        text = " ".join(words[i] for i in picks)
    return text.encode("utf-8")


class ByteWindows(torch.utils.data.Dataset):
    """Windows of ``SEQUENCE_LENGTH`` bytes of ``data`` as ``{"input_ids", "labels"}`` (the model shifts labels)."""

    def __init__(self, data: bytes, count: int, seed: int):
        self.tokens = torch.tensor(list(data), dtype=torch.long)
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(len(self.tokens) - SEQUENCE_LENGTH, (count,), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.tokens[self.starts[index]:self.starts[index] + SEQUENCE_LENGTH]
        return {"input_ids": window, "labels": window}


# ---------------------------------------------------------------------------------------------- model, optimizers

def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQUENCE_LENGTH,
                         attn_implementation="sdpa")  # twice differentiable inside optim.hessian.sdpa_curvature()
    return LlamaForCausalLM(config)


def build_optimizer(name: str, model, steps: int, seed: int):
    """``(optimizer, scheduler, refactorizer or None)`` for ``name``; ``lowrank`` converts ``model`` in place."""
    from transformers import get_constant_schedule, get_cosine_schedule_with_warmup

    if name == "adamw":
        opt = optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        return opt, get_cosine_schedule_with_warmup(opt, num_warmup_steps=steps // 10, num_training_steps=steps), None
    if name == "lowrank":
        optim.to_low_rank(model, rank=16)  # before building the optimizer: B and A are new parameters
        opt = optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        refactorizer = optim.Refactorizer(model, opt, every=max(steps // 3, 1), reset="factors", recovery_steps=2)
        return (opt, get_cosine_schedule_with_warmup(opt, num_warmup_steps=steps // 10, num_training_steps=steps),
                refactorizer)
    if name == "sophia":
        opt = optim.SophiaH(model.parameters(), lr=3e-3, rho=0.05, weight_decay=0.01, update_period=5, seed=seed)
    elif name == "adahessian":
        opt = optim.AdaHessian(model.parameters(), lr=0.15, weight_decay=0.01, update_period=1, seed=seed)
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return opt, get_constant_schedule(opt), None


# ------------------------------------------------------------------------------------------- Trainer integration

def _trainer_classes():
    """The Trainer subclass and callbacks (defined lazily so that importing this file needs no transformers)."""
    from transformers import Trainer, TrainerCallback

    class HessianTrainer(Trainer):
        """A Trainer for ``optim.SophiaH`` / ``optim.AdaHessian``: on the steps that refresh the curvature its
        backward builds the second-order graph (``create_graph=True``), through which the optimizer's
        ``step()`` (called by the Trainer without a closure) takes the Hessian-vector product."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            second_order = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap accelerate's wrapper
            if not second_order.next_step_refreshes():
                return super().training_step(model, inputs, num_items_in_batch)
            # Trainer.training_step runs self.accelerator.backward(loss), which passes keyword arguments on to
            # loss.backward(); for this one call, make it build the graph of the gradients.
            accelerator = self.accelerator
            plain_backward = accelerator.backward
            accelerator.backward = lambda loss, **kwargs: plain_backward(loss, create_graph=True, **kwargs)
            try:
                with warnings.catch_warnings():
                    # torch warns that p.grad now references its own graph (a cycle through p); the optimizer's
                    # step() replaces p.grad by a detached copy, and the Trainer's zero_grad() drops it.
                    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                    # SDPA attention through optim's op family, whose backward is differentiable
                    with optim.hessian.sdpa_curvature():
                        return super().training_step(model, inputs, num_items_in_batch)
            finally:
                del accelerator.backward  # back to the class's method

    class RefactorizerCallback(TrainerCallback):
        """Counts optimizer steps for an ``optim.Refactorizer``, which acts every ``every``-th of them."""

        def __init__(self, refactorizer):
            self.refactorizer = refactorizer

        def on_step_end(self, args, state, control, **kwargs):
            self.refactorizer.step()

    class LossRecorder(TrainerCallback):
        """Keeps (and prints) the training loss the Trainer logs every step."""

        def __init__(self, verbose: bool):
            self.verbose = verbose
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                if self.verbose:
                    print(f"step {state.global_step:4d}  train loss {self.losses[-1]:.4f}  "
                          f"lr {logs.get('learning_rate', float('nan')):.3g}", flush=True)

    class SharpnessCallback(TrainerCallback):
        """``monitor.step(global_step, batch)`` after every optimizer step (it measures every ``every``-th), in the
        curvature routes' eval mode; the monitor reads the lr and its limit from ``lr_from``."""

        def __init__(self, monitor, batch):
            self.monitor, self.batch = monitor, batch

        def on_step_end(self, args, state, control, **kwargs):
            self.monitor.step(state.global_step, self.batch)

    return HessianTrainer, RefactorizerCallback, LossRecorder, SharpnessCallback


def curvature_norm(opt) -> float | None:
    """‖curvature state‖ of a second-order optimizer (Sophia's h, AdaHessian's v), None for the others: nonzero
    only if the Hessian-vector products of the refresh steps reached the optimizer through the Trainer."""
    key = {optim.SophiaH: "hessian", optim.AdaHessian: "exp_hessian_diag_sq"}.get(type(opt))
    if key is None:
        return None
    return math.sqrt(sum(float(state[key].double().square().sum()) for state in opt.state.values()))


@torch.no_grad()
def evaluation_loss(model, dataset: ByteWindows) -> float:
    was_training = model.training
    model.eval()
    batch = torch.stack([dataset[i]["input_ids"] for i in range(len(dataset))])
    loss = float(model(input_ids=batch, labels=batch).loss)
    model.train(was_training)
    return loss


def main(optimizer: str = "adamw", steps: int = 40, seed: int = 0, batch_size: int = 16,
         verbose: bool = True, monitor_every: int = 0) -> dict:
    """Train for ``steps`` optimizer steps; returns the per-step training losses, the held-out loss before and
    after, for ``lowrank`` the refactorizer's count of refactorizations, and with ``monitor_every`` > 0 the
    sharpness records of every ``monitor_every``-th step."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    HessianTrainer, RefactorizerCallback, LossRecorder, SharpnessCallback = _trainer_classes()
    data = corpus()
    split = int(0.9 * len(data))
    train_set = ByteWindows(data[:split], count=steps * batch_size, seed=seed)
    held_out = ByteWindows(data[split:], count=64, seed=seed + 1)

    model = tiny_llama(seed)
    opt, scheduler, refactorizer = build_optimizer(optimizer, model, steps, seed)
    initial = evaluation_loss(model, held_out)
    recorder = LossRecorder(verbose)
    callbacks = [recorder] + ([RefactorizerCallback(refactorizer)] if refactorizer is not None else [])
    monitor = None
    if monitor_every > 0:
        # 8 held-out windows as the collator stacks them; the optimizer itself gives the lr and the limit
        batch = {key: torch.stack([held_out[i][key] for i in range(8)]) for key in ("input_ids", "labels")}
        monitor = optim.SharpnessMonitor(model, optim.hessian.causal_lm_loss, every=monitor_every, lr_from=opt,
                                         probes=4, lanczos_iters=20, seed=seed)
        callbacks.append(SharpnessCallback(monitor, batch))
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, logging_steps=1,
            report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=seed, data_seed=seed,
            dataloader_num_workers=0, max_grad_norm=1.0,
        )
        trainer_class = HessianTrainer if optimizer in ("sophia", "adahessian") else Trainer
        trainer = trainer_class(model=model, args=args, train_dataset=train_set, optimizers=(opt, scheduler),
                                callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # LossRecorder prints the losses instead of the raw log dicts
        trainer.train()
    final = evaluation_loss(model, held_out)
    result = {"optimizer": optimizer, "steps": steps, "train_losses": recorder.losses, "initial_loss": initial,
              "final_loss": final, "optimizer_steps": trainer.state.global_step,
              "low_rank_layers": sum(isinstance(m, optim.LowRankLinear) for m in model.modules()),
              "refactorizations": refactorizer.refactorizations if refactorizer is not None else None,
              "curvature_norm": curvature_norm(opt), "sharpness": monitor.records if monitor is not None else None}
    if verbose and monitor is not None:
        for record in monitor.records:
            matrix = "P⁻¹H" if record["preconditioned"] else "H"
            print(f"step {record['step']:4d}  λ_max({matrix}) {record['lambda_max']:9.3f}  trace {record['trace']:9.1f}"
                  f"  stability limit {record['stability_limit']:9.1f}")
    if verbose:
        print(f"{optimizer}: held-out loss {initial:.4f} -> {final:.4f} (ln 256 = {math.log(256):.4f})"
              + (f", {result['refactorizations']} refactorizations" if refactorizer is not None else ""))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--monitor", type=int, default=0, metavar="N",
                        help="measure the sharpness every N optimizer steps (0: never)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    cli = parser.parse_args()
    outcome = main(cli.optimizer, cli.steps, cli.seed, monitor_every=cli.monitor)
    if cli.json:
        print(json.dumps(outcome))
