"""The op library of the package and the loader of its compiled kernels.

Every op of the package is defined here, in Python, in one ``torch.library.Library`` ("optim"): its schema, a fake
(meta) kernel for tracing, and a plain-PyTorch reference registered under ``CompositeExplicitAutograd``, i.e. as the
default kernel of every device. The compiled extension ``optim._C`` only adds ``TORCH_LIBRARY_IMPL`` kernels for
the ``CPU`` and ``CUDA`` dispatch keys, which the dispatcher prefers over the default. So ``import optim`` works
without the extension (slower, same numbers), and :func:`has_kernel` tells which implementation a call will use.

Environment switches read at import time:

``OPTIM_REQUIRE_EXTENSION=1``
    a missing or broken extension is an ``ImportError`` instead of a warning (CI and the test suite set it).
``OPTIM_DISABLE_EXTENSION=1``
    do not load the extension: every op runs its reference kernel (for debugging a kernel against its oracle).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import operator
import os
import warnings
from typing import Callable

import torch

NAMESPACE = "optim"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")

BUILD_COMMAND = 'pip install --no-build-isolation -e ".[test]"'


class ExtensionWarning(UserWarning):
    """The compiled kernels could not be loaded; the reference kernels are used instead."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def define_op(schema: str, *, reference: Callable, fake: Callable) -> torch._ops.OpOverloadPacket:
    """Define ``optim::<name>`` from its schema, with ``reference`` as the default kernel of every device.

    Returns ``torch.ops.optim.<name>``.
    """
    name = schema.split("(", 1)[0].strip()
    LIBRARY.define(schema)
    LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    op = getattr(getattr(torch.ops, NAMESPACE), name)
    for autocast_key in _AUTOCAST_KEYS:
        _run_outside_autocast(op, name, autocast_key)
    return op


AUTOCAST_DEVICES = ("cpu", "cuda")
_AUTOCAST_KEYS = tuple("Autocast" + torch._C._dispatch_key_for_device(device) for device in AUTOCAST_DEVICES)
_AUTOCAST_KEYSET = functools.reduce(operator.or_, (torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
                                                   for key in _AUTOCAST_KEYS))


def outside_autocast():
    """A block whose ATen calls run in their inputs' dtypes whatever autocast region it is in: an optimizer's
    update math (an RSDM rotation, a retraction), which a step inside the autocast region of a training step
    (Lightning's manual optimization) would otherwise compute in bfloat16. Nothing under ``torch.compile``."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._ExcludeDispatchKeyGuard(
        _AUTOCAST_KEYSET)


def without_autocast(function: Callable) -> Callable:
    """``function`` run in :func:`outside_autocast`: for the backward and JVP rules of the package's autograd
    Functions, whose forwards run outside autocast, as torch runs a backward in the dtypes its forward used
    (the engine would otherwise apply the autocast region of the ``backward()`` call to their matrix products),
    and for the public manifold functions, whose points must stay orthonormal to their own dtype's precision."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with outside_autocast():
            return function(*args, **kwargs)

    return run


def autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    """``(device type, on, dtype)`` of autocast for each device type the package runs on (a kept graph's key; what
    an estimator restores around a product)."""
    return tuple((device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
                 for device_type in AUTOCAST_DEVICES)


def _run_outside_autocast(op, name: str, autocast_key: str) -> None:
    """Register ``op``'s kernel for ``autocast_key``: the op runs with autocast off, in its inputs' dtypes.

    Autocast reaches every ATen call inside a kernel (C++ or reference) that runs while it is on: the matrix
    products of a refactorization or an attention backward came out in bfloat16 and met the kernel's float32
    tensors ("expected scalar type Float but found BFloat16"), and an update would lose its precision silently.
    The ops decide their own precision (bf16/fp16 parameters keep float32 state, attention accumulates in
    float32), so autocast stops at their boundary, as it does at an optimizer step outside the autocast region.
    """
    def kernel(keyset, *args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYSET):
            return op(*args, **kwargs)

    LIBRARY.impl(name, kernel, autocast_key, with_keyset=True)


_load_error: BaseException | None = None
_loaded = False


def load_extension() -> bool:
    """Import ``optim._C`` once, after every family has defined its ops. Returns whether it is loaded."""
    global _load_error, _loaded
    if _loaded or _load_error is not None:
        return _loaded
    if _env_flag("OPTIM_DISABLE_EXTENSION"):
        _load_error = RuntimeError("disabled by OPTIM_DISABLE_EXTENSION=1")
        return False
    try:
        importlib.import_module(f"{NAMESPACE}._C")
    except (ImportError, OSError) as error:
        _load_error = error
        message = (
            f"optim: the compiled kernels (optim._C) could not be loaded ({error}). Every op falls back to its "
            f"plain-PyTorch reference: same results, slower. To build them, run `{BUILD_COMMAND}` in the source "
            "checkout with the torch you use already installed (add OPTIM_DEBUG=1 for a debug build)."
        )
        if _env_flag("OPTIM_REQUIRE_EXTENSION"):
            raise ImportError(message + " (OPTIM_REQUIRE_EXTENSION=1 makes this an error.)") from error
        warnings.warn(message, ExtensionWarning, stacklevel=3)
        return False
    _loaded = True
    return True


def extension_loaded() -> bool:
    return _loaded


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@torch.compiler.assume_constant_result
def has_kernel(op: str | torch._ops.OpOverloadPacket | torch._ops.OpOverload, device: str | torch.device) -> bool:
    """Whether ``op`` has a compiled kernel (not the reference) for ``device``'s type.

    ``op`` is a name (``"fused_adamw_"`` or ``"optim::fused_adamw_"``) or ``torch.ops.optim.<name>``.
    The answer is fixed once the extension is loaded (at import), so ``torch.compile`` takes it as a constant
    instead of breaking the graph on the dispatcher query (which it cannot trace).
    """
    if isinstance(op, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        qualname = op._qualified_op_name if isinstance(op, torch._ops.OpOverloadPacket) else op.name()
        qualname = qualname.split(".", 1)[0]
    else:
        qualname = op if "::" in op else f"{NAMESPACE}::{op}"
    key = _DISPATCH_KEYS.get(torch.device(device).type)
    if key is None:
        return False
    answer = _has_kernel_cache.get((qualname, key))
    if answer is None:
        # the dispatcher query costs tens of µs, and the optimizers ask on every step
        answer = bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))
        if _loaded or _load_error is not None:  # remembered only once the extension had its chance to register
            _has_kernel_cache[(qualname, key)] = answer
    return answer


_has_kernel_cache: dict[tuple[str, str], bool] = {}
