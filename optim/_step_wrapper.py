"""The ``step`` wrapper of the package's optimizers: torch's, except that it skips the profiler range when nothing
can observe it.

``torch.optim.Optimizer`` wraps every class's ``step`` (``profile_hook_step``) to run the step pre and post hooks
and to open a ``record_function`` range named ``Optimizer.step#<class>.step``. The range costs two dispatcher calls
and a RecordFunction object on every step even when no profiler is on: ~17 µs warm, and ~250 µs on a CPU whose
caches the forward and backward passes just evicted (measured on one thread of a 2-core Intel Xeon VM; a one-matrix
RSDM step is ~0.6 ms). :class:`LeanStepMixin` runs torch's own wrapper whenever the range or a hook could be seen:
a profiler is on (``torch.autograd._profiler_enabled()``: ``torch.profiler.profile``, the autograd profiler,
``emit_nvtx``), a step hook is registered (on the optimizer or globally), or dynamo is tracing the step. Otherwise
it calls the step directly, with ``_optimizer_step_code`` after it as torch does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer


def _global_step_hooks() -> bool:
    """Whether a global step hook is registered (``register_optimizer_step_pre_hook`` and its post twin); True
    where this torch keeps them elsewhere, so that torch's wrapper then always runs."""
    pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
    post = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
    return pre is None or post is None or bool(pre) or bool(post)


class LeanStepMixin:
    """Put before ``torch.optim.Optimizer`` in a class's bases: its ``step`` gets the wrapper of the module
    docstring."""

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        observed = Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def step(*args, **kwargs):
            self = args[0]
            if (torch.compiler.is_compiling() or torch.autograd._profiler_enabled()
                    or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_step_hooks()):
                return observed(*args, **kwargs)
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            return out

        return step
