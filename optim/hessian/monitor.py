"""``SharpnessMonitor``: the top Hessian eigenvalue and the Hessian trace along a training run.

Gradient descent with step size η is linearly stable at a minimum only while λ_max(H) ≤ 2/η (and tr(H) ≤ 2/η
bounds the mean over directions, for SGD); heavy-ball momentum β moves the limit to (2 + 2β)/η (Cohen et al. 2021,
"Gradient descent on neural networks typically occurs at the edge of stability"). The monitor records, every
``every`` steps, λ_max (Lanczos), the trace (Hutchinson or Hutch++, with its standard error), the learning rate and
that stability limit, so a run's progressive sharpening and edge-of-stability phase can be read off its curves.
The limit is the optimizer's (dampening, Nesterov; :mod:`.stability`). For an adaptive method (Adam, AdamW,
NAdam, RAdam, Adamax, RMSprop, Adagrad, AdaHessian, SophiaH) it bounds the preconditioned Hessian P⁻¹H (P the
diagonal the method divides by, Adam's diag(√v̂ + ε); Cohen et al. 2022), which the monitor then measures instead
of H (records say ``preconditioned``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable

import torch

from .._wrappers import unwrap_optimizer
from .stability import ScaledOperator, check_lr_from, is_preconditioned, learning_rate_and_limit, preconditioner

__all__ = ["SharpnessMonitor"]

CURVATURES = ("hessian", "ggn", "fisher")
_OPERATORS = {"hessian": "HessianOperator", "ggn": "GGNOperator", "fisher": "EmpiricalFisherOperator"}

FIELDS = ("step", "lambda_max", "trace", "trace_std_error", "lr", "stability_limit", "num_matvecs", "preconditioned")


TRACE_METHODS = ("hutchinson", "hutch++")

SEED_LIMIT = 1 << 64  # the estimators' seeds are in [0, 2**64)


def _check_count(name: str, value: Any, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SharpnessMonitor: {name} must be an integer >= {minimum} ({meaning}), got {value!r}")


class SharpnessMonitor:
    """Measures λ_max and the trace of the Hessian (or GGN, or empirical Fisher) of ``loss_fn(model(inputs), targets)``
    every ``every`` steps.

    Args:
        model: the ``nn.Module`` being trained.
        loss_fn: ``loss_fn(output, target)`` like a PyTorch criterion, or :func:`optim.hessian.model_loss` (the
            loss the model returns when called with the batch's labels; not with ``curvature="ggn"``).
        every: measure when ``step % every == 0``.
        lr_from: an optimizer (its first param group's ``lr`` and momentum settings give the limit: SGD's
            momentum, dampening and Nesterov; for an adaptive method, Adam, AdamW, NAdam, RAdam, Adamax,
            RMSprop, Adagrad (torch's), ``optim.AdamW``, ``optim.AdaHessian`` and ``optim.SophiaH``, the limit is
            of the preconditioned matrix P⁻¹H, P the diagonal it divides the gradient by, read from its state
            (Adam's √v̂ + ε), which is then measured instead of H) or a number >= 0 (the learning rate of gradient
            descent). The table is in :mod:`optim.hessian.stability`. A framework's wrapper (Accelerate's
            ``AcceleratedOptimizer``, what the Hugging Face Trainer passes its callbacks) is read as the optimizer it
            wraps; an ``optim.Refactorizer``'s LR ramp on it counts (the lr of the next step).
        probes: Hutchinson probes for the trace (0 skips the trace).
        top_k: eigenvalues to compute (λ_max is the first); ``lanczos_iters`` bounds the Hessian-vector products.
        eval_mode: measure with ``model.eval()`` (deterministic: dropout off, BatchNorm running stats), restoring the
            previous mode afterwards; ``False`` measures in the model's current mode.
        param_filter: ``(name, param) -> bool`` to restrict to a subset of parameters.
        writer: an optional ``torch.utils.tensorboard.SummaryWriter`` (or any object with
            ``add_scalar(tag, value, step)``); each record is also written there.
        seed: probes of the measurement at step s use seed ``seed + s`` (reproducible, identical on all ranks); an
            int in [0, 2**64), the estimators' seed range (``step`` is an int >= 0 that keeps ``seed + step`` in it).
        curvature: the matrix measured: ``"hessian"`` (default, :class:`~optim.hessian.operator.HessianOperator`),
            ``"ggn"`` (the generalized Gauss-Newton ``JᵀH_loss J``, :class:`~optim.hessian.ggn.GGNOperator`,
            positive semi-definite for a convex loss) or ``"fisher"`` (the empirical Fisher ``(1/N) Σ g_i g_iᵀ``,
            :class:`~optim.hessian.fisher.EmpiricalFisherOperator`). The stability limit 2/η is a statement about
            the Hessian; for the GGN it is the usual proxy (GGN and Hessian agree near a minimum with small
            residuals), for the empirical Fisher only a reference.
        process_group: data-parallel measurement: ``batch`` is this rank's share and the matrix is that of the
            batches of every rank (``HessianOperator``'s ``process_group``); every rank calls ``step`` with the same
            ``step``, and all get the same record. Default: the group of a ``DistributedDataParallel`` model (its
            ``.module`` is measured, and ``param_filter`` sees its names), else None (this process's batch only).
        compile: products through the operator's compiled function (``compile=True`` of ``HessianOperator``,
            ``GGNOperator`` or ``EmpiricalFisherOperator``), compiled at the first measurement and reused by every
            later one; ``compile_seconds`` reports the time.

    Call ``monitor.step(step, batch)`` after ``optimizer.step()``; ``batch`` is ``(inputs, targets)``, a Hugging Face
    collator's mapping with ``"labels"``, or an iterable of batches (averaged; ``HessianOperator``'s ``data``).
    Records are in ``monitor.records`` (a list of dicts with keys ``FIELDS``; ``preconditioned`` says whether
    λ_max and the trace are of P⁻¹H).
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
        process_group=None,
    ):
        # Every argument is checked here, before anything is stored: a measurement hundreds of steps into a run is
        # no place to learn that an argument was wrong.
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"SharpnessMonitor: model must be a torch.nn.Module, got a {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"SharpnessMonitor: loss_fn must be callable as loss_fn(output, target), got a "
                             f"{type(loss_fn).__name__}")
        _check_count("every", every, 1, "measure when step % every == 0")
        _check_count("probes", probes, 0, "Hutchinson probes for the trace; 0 skips the trace")
        _check_count("top_k", top_k, 1, "the eigenvalues to compute")
        if isinstance(lanczos_iters, bool) or not isinstance(lanczos_iters, int):
            raise TypeError(f"SharpnessMonitor: lanczos_iters must be an int >= top_k, got {lanczos_iters!r}")
        if lanczos_iters < top_k:
            raise ValueError(f"SharpnessMonitor: lanczos_iters ({lanczos_iters}) must be >= top_k ({top_k})")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"SharpnessMonitor: tol (the Lanczos convergence tolerance) must be a finite number "
                             f">= 0, got {tol!r}")
        if not isinstance(trace_method, str) or trace_method not in TRACE_METHODS:
            raise ValueError(f"SharpnessMonitor: trace_method must be one of {TRACE_METHODS}, got {trace_method!r}")
        if trace_method == "hutch++" and 0 < probes < 3:
            raise ValueError(f"SharpnessMonitor: trace_method='hutch++' needs probes >= 3 (or 0 for no trace), got "
                             f"{probes}")
        if not isinstance(curvature, str) or curvature not in CURVATURES:
            raise ValueError(
                f"SharpnessMonitor: curvature must be one of {', '.join(repr(c) for c in CURVATURES)}, got "
                f"{curvature!r}"
            )
        for name, flag in (("eval_mode", eval_mode), ("compile", compile)):
            if not isinstance(flag, bool):
                raise ValueError(f"SharpnessMonitor: {name} must be True or False, got {flag!r}")
        # seed + step seeds the estimators, which take seeds in [0, 2**64) (spectrum.top_eigenvalues, trace)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"SharpnessMonitor: seed must be an int in [0, 2**64) (measurement s uses seed + s), "
                             f"got {seed!r}")
        lr_from = unwrap_optimizer(lr_from)  # the HF Trainer's callbacks get Accelerate's wrapper
        check_lr_from(lr_from)
        from .losses import model_loss
        from .operator import check_model_loss, data_parallel, reject_sharded

        # unwrapped here, so that param_filter sees the names the operators do (no "module." prefix)
        model, process_group = data_parallel(model, process_group, "SharpnessMonitor")
        if loss_fn is model_loss:
            check_model_loss(model, "SharpnessMonitor", _OPERATORS[curvature], compile)
        reject_sharded(list(model.named_parameters()), "SharpnessMonitor")
        if param_filter is not None:
            if not callable(param_filter):
                raise ValueError(f"SharpnessMonitor: param_filter must be None or callable as param_filter(name, "
                                 f"param) -> bool, got a {type(param_filter).__name__}")
            if not any(p.requires_grad and param_filter(name, p) for name, p in model.named_parameters()):
                raise ValueError("SharpnessMonitor: param_filter selects no parameter that requires grad; the "
                                 "measured matrix would have no rows (check the names in model.named_parameters())")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ValueError(f"SharpnessMonitor: writer must be None or an object with add_scalar(tag, value, step) "
                             f"(a torch.utils.tensorboard.SummaryWriter), got a {type(writer).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.every, self.lr_from, self.probes, self.top_k = every, lr_from, probes, top_k
        self.lanczos_iters, self.tol, self.trace_method = lanczos_iters, tol, trace_method
        self.eval_mode, self.param_filter, self.writer, self.seed = eval_mode, param_filter, writer, seed
        self.curvature = curvature
        self.compile = compile
        self.process_group = process_group
        self.records: list[dict[str, float]] = []

    def learning_rate_and_limit(self) -> tuple[float, float]:
        """The current lr and the stability limit (:func:`~optim.hessian.stability.learning_rate_and_limit`: 2/lr
        for gradient descent, (2 + 2β)/lr with heavy-ball momentum, ...); NaN without lr_from."""
        return learning_rate_and_limit(self.lr_from)

    def step(self, step: int, batch: Any) -> dict[str, float] | None:
        """Measure if ``step`` is a multiple of ``every``; returns the new record or None."""
        self._check_step(step)
        if step % self.every != 0:
            return None
        return self.measure(step, batch)

    def _check_step(self, step: Any) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or self.seed + step >= SEED_LIMIT:
            raise ValueError(f"SharpnessMonitor: step must be an int >= 0 with seed + step < 2**64 (the probes of "
                             f"the measurement at step s use seed + s; seed is {self.seed}), got {step!r}")

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first calls of the compiled products (compilation included); 0 without compile."""
        from .fisher import fisher_compile_seconds
        from .ggn import ggn_compile_seconds
        from .hvp import compile_seconds

        seconds = {"hessian": compile_seconds, "ggn": ggn_compile_seconds, "fisher": fisher_compile_seconds}
        return seconds[self.curvature](self.model)

    def measure(self, step: int, batch: Any) -> dict[str, float]:
        """Measure now, whatever the step."""
        self._check_step(step)
        from .fisher import EmpiricalFisherOperator
        from .ggn import GGNOperator
        from .operator import HessianOperator
        from .spectrum import top_eigenvalues, trace

        operator_class = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": EmpiricalFisherOperator}[
            self.curvature]

        preconditioned = is_preconditioned(self.lr_from)
        was_training = self.model.training
        if self.eval_mode:
            self.model.eval()
        try:
            options = {"compile": self.compile} if self.compile else {}
            operator = operator_class(self.model, self.loss_fn, batch, param_filter=self.param_filter,
                                      process_group=self.process_group, **options)
            measured = operator
            if preconditioned:  # P^(-1/2) C P^(-1/2): the eigenvalues and trace of P⁻¹C
                measured = ScaledOperator(operator, preconditioner(self.lr_from, operator.params, operator.names,
                                                                   operator.dtype, operator.device))
            eigenvalues, _ = top_eigenvalues(measured, k=self.top_k, tol=self.tol, max_iter=self.lanczos_iters,
                                             seed=self.seed + step)
            trace_estimate = trace_error = math.nan
            if self.probes:
                estimate = trace(measured, num_probes=self.probes, method=self.trace_method, seed=self.seed + step)
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
            "preconditioned": preconditioned,
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
            axis.plot(steps, [r["stability_limit"] for r in self.records], linestyle="--", label="stability limit")
        axis.set_xlabel("step")
        axis.set_ylabel("λ_max(P⁻¹H)" if any(r.get("preconditioned") for r in self.records) else "λ_max")
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
