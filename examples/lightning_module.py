"""Train a small classifier with PyTorch Lightning and the optimizers of ``optim``.

Run from the checkout, with the package installed with its ``lightning`` extra
(``pip install --no-build-isolation -e ".[lightning]"``; an existing ``pytorch_lightning`` works too); CPU,
synthetic data::

    python examples/lightning_module.py --optimizer adamw     # or rsdm | sophia | adahessian
    python examples/lightning_module.py --optimizer rsdm --steps 80

The data come from a random teacher (an orthogonal 32→64 feature map, tanh, a linear read-out to 4 classes); the
student has the same shape and starts from another random point. The script prints the training loss and the loss
on held-out samples before and after training.

How each optimizer plugs into Lightning
---------------------------------------
* ``adamw``, ``rsdm``: **automatic optimization**. ``configure_optimizers`` returns the optimizer (and a scheduler);
  Lightning calls ``opt.step(closure)`` with a closure that runs ``training_step`` and ``backward()``, which any
  ``torch.optim``-style optimizer accepts. ``optim.AdamW`` is a drop-in for ``torch.optim.AdamW``.
  ``optim.RSDM`` keeps the encoder's weight (64×32) on the Stiefel manifold (orthonormal columns): the constrained
  matrix goes in a param group ``{"params": [W], "manifold": "stiefel"}``, everything else in a group with
  ``"manifold": None`` (plain SGD with momentum). W must be orthonormal when the optimizer is built
  (``optim.stiefel.orthogonal_``), and ``optim.stiefel.distance_to_manifold(W)`` stays at rounding level.
* ``sophia``, ``adahessian``: **manual optimization** (``self.automatic_optimization = False``).
  ``optim.SophiaH`` and ``optim.AdaHessian`` differentiate the loss themselves, with a second-order graph on the
  steps that refresh their curvature estimate, so the closure must *return* the loss without calling
  ``backward()``. Lightning's automatic closure always calls ``backward()``; in manual optimization the
  ``training_step`` passes its own closure: ``loss = self.optimizers().step(closure=lambda:
  F.cross_entropy(self(x), y))``. No ``manual_backward()`` and no ``zero_grad()``: the optimizer sets ``p.grad``
  to the gradient of this step. The module must be twice differentiable (no ``torch.compile`` on refresh steps) and
  trained in full precision (``precision="32-true"``: a GradScaler or autocast would act on a backward the
  optimizer does not run).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

import optim

try:
    import lightning as L
except ImportError:  # the older package name
    import pytorch_lightning as L

OPTIMIZERS = ("adamw", "rsdm", "sophia", "adahessian")
SECOND_ORDER = ("sophia", "adahessian")
IN_FEATURES, HIDDEN, CLASSES = 32, 64, 4


def teacher_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` samples (x, label) of a fixed random teacher (the same teacher for every ``seed``)."""
    teacher = torch.Generator().manual_seed(12345)
    encoder = optim.stiefel.orthogonal_(torch.empty(HIDDEN, IN_FEATURES), generator=teacher)
    readout = torch.randn(CLASSES, HIDDEN, generator=teacher) * 2.0
    sampler = torch.Generator().manual_seed(seed)
    x = torch.randn(count, IN_FEATURES, generator=sampler)
    return x, (torch.tanh(x @ encoder.T * 2.0) @ readout.T).argmax(dim=1)


class Classifier(L.LightningModule):
    """encoder (Linear 32→64, orthonormal columns under RSDM) → tanh → head (Linear 64→4)."""

    def __init__(self, optimizer: str = "adamw", steps: int = 60, seed: int = 0):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer_name, self.steps, self.seed = optimizer, steps, seed
        self.encoder = nn.Linear(IN_FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():
            # The constrained weight must start on the manifold; scale 2 stays in the forward, not in W.
            optim.stiefel.orthogonal_(self.encoder.weight)
        # The closure protocol of the second-order optimizers needs the training_step to call opt.step itself.
        self.automatic_optimization = optimizer not in SECOND_ORDER
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(2.0 * self.encoder(x)))

    def configure_optimizers(self):
        name = self.optimizer_name
        if name == "adamw":
            opt = optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if name == "rsdm":
            return optim.RSDM([{"params": [self.encoder.weight], "manifold": "stiefel", "lr": 0.3},
                               {"params": [self.encoder.bias, *self.head.parameters()], "manifold": None}],
                              lr=0.05, rank=16, momentum=0.9, seed=self.seed)
        if name == "sophia":
            return optim.SophiaH(self.parameters(), lr=3e-3, rho=0.05, weight_decay=0.0, update_period=2,
                                 seed=self.seed)
        return optim.AdaHessian(self.parameters(), lr=0.05, seed=self.seed)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            loss = F.cross_entropy(self(x), y)  # Lightning runs backward() and opt.step(closure)
        else:
            # The closure returns the loss without backward(): the optimizer differentiates it (twice on the
            # steps that refresh the curvature) and returns it.
            loss = self.optimizers().step(closure=lambda: F.cross_entropy(self(x), y))
        self.losses.append(float(loss.detach()))
        return loss


@torch.no_grad()
def held_out_loss(model: Classifier, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float(F.cross_entropy(model(data[0]), data[1]))


def main(optimizer: str = "adamw", steps: int = 60, seed: int = 0, batch_size: int = 64,
         verbose: bool = True) -> dict:
    """Train for ``steps`` optimizer steps; returns the training losses, the held-out loss before and after, and
    the encoder's distance to the Stiefel manifold ‖WᵀW − I‖ at the end."""
    torch.manual_seed(seed)  # the student's initialization and the loader's shuffling
    model = Classifier(optimizer, steps, seed)
    train_x, train_y = teacher_data(steps * batch_size, seed)
    held_out = teacher_data(1024, seed + 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x, train_y), batch_size=batch_size,
                                         shuffle=True, num_workers=0)
    initial = held_out_loss(model, held_out)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, loader)
    model.eval()
    final = held_out_loss(model, held_out)
    result = {"optimizer": optimizer, "steps": steps, "train_losses": model.losses, "initial_loss": initial,
              "final_loss": final, "optimizer_steps": trainer.global_step,
              "stiefel_distance": float(optim.stiefel.distance_to_manifold(model.encoder.weight.detach()))}
    if verbose:
        for step, loss in enumerate(model.losses, start=1):
            if step == 1 or step % 10 == 0 or step == len(model.losses):
                print(f"step {step:4d}  train loss {loss:.4f}")
        print(f"{optimizer}: held-out loss {initial:.4f} -> {final:.4f}"
              + (f", encoder ‖WᵀW − I‖ = {result['stiefel_distance']:.2e}" if optimizer == "rsdm" else ""))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    cli = parser.parse_args()
    outcome = main(cli.optimizer, cli.steps, cli.seed)
    if cli.json:
        print(json.dumps(outcome))
