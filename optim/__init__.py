"""optim: second-order and structured PyTorch optimizers with fused C++/CUDA kernels.

Families: ``optim.fused`` (multi-tensor steps), ``optim.hessian``, ``optim.stiefel``, ``optim.lowrank``.
"""

from . import _library
from . import fused, hessian, lowrank, stiefel  # define every op before the kernels that implement them load
from ._library import has_kernel
from .fused import AdamW
from .stiefel import RSDM, RiemannianAdam, RiemannianSGD
from .hessian import HessianOperator, SharpnessMonitor, diagonal, hvp, spectral_density, top_eigenvalues, trace

_library.load_extension()

__version__ = "0.1.0"
__all__ = ["AdamW", "HessianOperator", "RSDM", "RiemannianAdam", "RiemannianSGD", "SharpnessMonitor", "diagonal",
           "has_kernel", "hvp", "spectral_density", "top_eigenvalues", "trace"]
