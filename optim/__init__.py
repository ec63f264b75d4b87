"""optim: second-order and structured PyTorch optimizers with fused C++/CUDA kernels.

Families: ``optim.fused`` (multi-tensor steps), ``optim.hessian``, ``optim.stiefel``, ``optim.lowrank``.
"""

from . import _library
from . import fused, hessian, lowrank, stiefel  # define every op before the kernels that implement them load
from ._library import has_kernel
from .fused import AdamW
from .hessian import (AdaHessian, EmpiricalFisherOperator, GGNOperator, HessianOperator, SharpnessMonitor, SophiaH,
                      diagonal, hvp, spectral_density, top_eigenvalues, trace)
from .lowrank import LowRankAdamW, LowRankLinear, Refactorizer, to_low_rank
from .stiefel import RSDM, RiemannianAdam, RiemannianSGD

_library.load_extension()

__version__ = "0.1.0"
__all__ = [
    # fused multi-tensor steps
    "AdamW",
    # Hessian family
    "AdaHessian", "EmpiricalFisherOperator", "GGNOperator", "HessianOperator", "SharpnessMonitor", "SophiaH", "diagonal", "hvp", "spectral_density",
    "top_eigenvalues", "trace",
    # low-rank family
    "LowRankAdamW", "LowRankLinear", "Refactorizer", "to_low_rank",
    # Stiefel family
    "RSDM", "RiemannianAdam", "RiemannianSGD",
    # library
    "has_kernel",
]
