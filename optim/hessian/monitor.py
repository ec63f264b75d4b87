"""``SharpnessMonitor``: the top Hessian eigenvalue and the Hessian trace along a training run.

Gradient descent with step size η is linearly stable at a minimum only while λ_max(H) ≤ 2/η (and tr(H) ≤ 2/η
bounds the mean over directions, for SGD); heavy-ball momentum β moves the limit to (2 + 2β)/η (Cohen et al. 2021,
"Gradient descent on neural networks typically occurs at the edge of stability"). The monitor records, every
``every`` steps, λ_max (Lanczos), the trace (Hutchinson or Hutch++, with its standard error), the learning rate and
that stability limit, so a run's progressive sharpening and edge-of-stability phase can be read off its curves.
For adaptive optimizers (Adam, ...) the limit applies to the preconditioned Hessian, not to H: the recorded line is
then only a reference.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable

import torch

__all__ = ["SharpnessMonitor"]

CURVATURES = ("hessian", "ggn", "fisher")

FIELDS = ("step", "lambda_max", "trace", "trace_std_error", "lr", "stability_limit", "num_matvecs")


TRACE_METHODS = ("hutchinson", "hutch++")


class SharpnessMonitor:
    """Measures λ_max and the trace of the Hessian (or GGN, or empirical Fisher) of ``loss_fn(model(inputs), targets)``
    every ``every`` steps.

    Args:
        model: the ``nn.Module`` being trained.
        loss_fn: ``loss_fn(output, target)`` like a PyTorch criterion.
        every: measure when ``step % every == 0``.
        lr_from: an optimizer (its first param group's ``lr`` and ``momentum``, if any, give the limit) or a float.
        probes: Hutchinson probes for the trace (0 skips the trace).
        top_k: eigenvalues to compute (λ_max is the first); ``lanczos_iters`` bounds the Hessian-vector products.
        eval_mode: measure with ``model.eval()`` (deterministic: dropout off, BatchNorm running stats), restoring the
            previous mode afterwards; ``False`` measures in the model's current mode.
        param_filter: ``(name, param) -> bool`` to restrict to a subset of parameters.
        writer: an optional ``torch.utils.tensorboard.SummaryWriter``; each record is also written there.
        seed: probes of the measurement at step s use seed ``seed + s`` (reproducible, identical on all ranks).
        curvature: the matrix measured: ``"hessian"`` (default, :class:`~optim.hessian.operator.HessianOperator`),
            ``"ggn"`` (the generalized Gauss-Newton ``JᵀH_loss J``, :class:`~optim.hessian.ggn.GGNOperator`,
            positive semi-definite for a convex loss) or ``"fisher"`` (the empirical Fisher ``(1/N) Σ g_i g_iᵀ``,
            :class:`~optim.hessian.fisher.EmpiricalFisherOperator`). The stability limit 2/η is a statement about
            the Hessian; for the GGN it is the usual proxy (GGN and Hessian agree near a minimum with small
            residuals), for the empirical Fisher only a reference.
        compile: products through the compiled forward-over-reverse function (``HessianOperator(compile=True)``;
            the Hessian only),
            compiled at the first measurement and reused by every later one; ``compile_seconds`` reports the time.

    Call ``monitor.step(step, batch)`` after ``optimizer.step()``; ``batch`` is ``(inputs, targets)`` or an
    iterable of batches (averaged). Records are in ``monitor.records`` (a list of dicts with keys ``FIELDS``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        every: int = 100,
        lr_from: torch.optim.Optimizer | float | None = None,
        probes: int = 10,
        top_k: int = 1,
        lanczos_iters: int = 30,
        tol: float = 1e-3,
        trace_method: str = "hutchinson",
        eval_mode: bool = True,
        param_filter: Callable[[str, torch.nn.Parameter], bool] | None = None,
        writer: Any = None,
        seed: int = 0,
        curvature: str = "hessian",
        compile: bool = False,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"SharpnessMonitor: every must be an integer >= 1, got {every!r}")
        if not isinstance(probes, int) or probes < 0:
            raise ValueError(f"SharpnessMonitor: probes must be an integer >= 0, got {probes!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"SharpnessMonitor: top_k must be an integer >= 1, got {top_k!r}")
        if lanczos_iters < top_k:
            raise ValueError(f"SharpnessMonitor: lanczos_iters ({lanczos_iters}) must be >= top_k ({top_k})")
        if curvature not in CURVATURES:
            raise ValueError(
                f"SharpnessMonitor: curvature must be one of {', '.join(repr(c) for c in CURVATURES)}, got "
                f"{curvature!r}"
            )
        if isinstance(lanczos_iters, bool) or not isinstance(lanczos_iters, int):
            raise TypeError(f"SharpnessMonitor: lanczos_iters must be an int >= top_k, got {lanczos_iters!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"SharpnessMonitor: tol (the Lanczos convergence tolerance) must be a finite number "
                             f">= 0, got {tol!r}")
        if trace_method not in TRACE_METHODS:
            raise ValueError(f"SharpnessMonitor: trace_method must be one of {TRACE_METHODS}, got {trace_method!r}")
        if trace_method == "hutch++" and 0 < probes < 3:
            raise ValueError(f"SharpnessMonitor: trace_method='hutch++' needs probes >= 3 (or 0 for no trace), got "
                             f"{probes}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SharpnessMonitor: seed must be an int >= 0 (measurement s uses seed + s), got "
                             f"{seed!r}")
        if lr_from is not None and not isinstance(lr_from, (torch.optim.Optimizer, float, int)):
            raise ValueError(f"SharpnessMonitor: lr_from must be an optimizer or a number, got {type(lr_from)}")
        self.model, self.loss_fn = model, loss_fn
        self.every, self.lr_from, self.probes, self.top_k = every, lr_from, probes, top_k
        self.lanczos_iters, self.tol, self.trace_method = lanczos_iters, tol, trace_method
        self.eval_mode, self.param_filter, self.writer, self.seed = eval_mode, param_filter, writer, seed
        self.curvature = curvature
        if not isinstance(compile, bool):
            raise ValueError(f"SharpnessMonitor: compile must be True or False, got {compile!r}")
        if compile and curvature != "hessian":
            raise ValueError(f"SharpnessMonitor: compile=True compiles Hessian products; curvature={curvature!r} has "
                             "no compiled product (use curvature='hessian', or compile=False)")
        self.compile = compile
        self.records: list[dict[str, float]] = []

    def learning_rate_and_limit(self) -> tuple[float, float]:
        """The current lr and the stability limit (2 + 2β)/lr (β = 0 without momentum); NaN without lr_from."""
        if self.lr_from is None:
            return math.nan, math.nan
        if isinstance(self.lr_from, torch.optim.Optimizer):
            group = self.lr_from.param_groups[0]
            lr, momentum = float(group["lr"]), float(group.get("momentum", 0.0) or 0.0)
        else:
            lr, momentum = float(self.lr_from), 0.0
        return lr, (2.0 + 2.0 * momentum) / lr if lr > 0 else math.inf

    def step(self, step: int, batch: Any) -> dict[str, float] | None:
        """Measure if ``step`` is a multiple of ``every``; returns the new record or None."""
        if step % self.every != 0:
            return None
        return self.measure(step, batch)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first calls of the compiled products (compilation included); 0 without compile."""
        from .hvp import compile_seconds

        return compile_seconds(self.model)

    def measure(self, step: int, batch: Any) -> dict[str, float]:
        """Measure now, whatever the step."""
        from .fisher import EmpiricalFisherOperator
        from .ggn import GGNOperator
        from .operator import HessianOperator
        from .spectrum import top_eigenvalues, trace

        operator_class = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": EmpiricalFisherOperator}[
            self.curvature]

        was_training = self.model.training
        if self.eval_mode:
            self.model.eval()
        try:
            options = {"compile": self.compile} if self.compile else {}
            operator = operator_class(self.model, self.loss_fn, batch, param_filter=self.param_filter, **options)
            eigenvalues, _ = top_eigenvalues(operator, k=self.top_k, tol=self.tol, max_iter=self.lanczos_iters,
                                             seed=self.seed + step)
            trace_estimate = trace_error = math.nan
            if self.probes:
                estimate = trace(operator, num_probes=self.probes, method=self.trace_method, seed=self.seed + step)
                trace_estimate, trace_error = estimate.estimate, estimate.std_error
        finally:
            self.model.train(was_training)
        lr, limit = self.learning_rate_and_limit()
        record = {
            "step": step,
            "lambda_max": float(eigenvalues[0]),
            "trace": float(trace_estimate),
            "trace_std_error": float(trace_error),
            "lr": lr,
            "stability_limit": limit,
            "num_matvecs": int(operator.num_matvecs),
        }
        for i in range(1, self.top_k):
            record[f"lambda_{i + 1}"] = float(eigenvalues[i])
        self.records.append(record)
        if self.writer is not None:
            for key in ("lambda_max", "trace", "stability_limit"):
                if math.isfinite(record[key]):
                    self.writer.add_scalar(f"sharpness/{key}", record[key], step)
        return record

    def to_csv(self, path: str | os.PathLike) -> None:
        columns = list(FIELDS) + [f"lambda_{i + 1}" for i in range(1, self.top_k)]
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.records)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as file:
            json.dump({"records": self.records, "every": self.every, "probes": self.probes,
                       "curvature": self.curvature}, file, indent=1)

    def plot(self, path: str | os.PathLike) -> None:
        """Save a PNG: λ_max and the stability limit against the step (and the trace on a second axis)."""
        try:
            import matplotlib
        except ImportError as error:
            raise ImportError("SharpnessMonitor.plot needs matplotlib: pip install matplotlib") from error
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.records]
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.plot(steps, [r["lambda_max"] for r in self.records], marker="o", label="λ_max")
        if any(math.isfinite(r["stability_limit"]) for r in self.records):
            axis.plot(steps, [r["stability_limit"] for r in self.records], linestyle="--", label="(2+2β)/lr")
        axis.set_xlabel("step")
        axis.set_ylabel("λ_max")
        if any(math.isfinite(r["trace"]) for r in self.records):
            trace_axis = axis.twinx()
            trace_axis.plot(steps, [r["trace"] for r in self.records], color="tab:green", alpha=0.6, label="trace")
            trace_axis.set_ylabel("trace")
            trace_axis.legend(loc="lower right")
        axis.legend(loc="upper left")
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        records = state.get("records")
        if not isinstance(records, list) or not all(isinstance(r, dict) and "step" in r for r in records):
            raise ValueError("SharpnessMonitor.load_state_dict: expected {'records': [{'step': ..., ...}, ...]}")
        self.records = [dict(r) for r in records]
