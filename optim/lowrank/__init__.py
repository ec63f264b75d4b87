"""Low-rank pre-training (issue #6): ``LowRankLinear`` layers W = scale·B·A trained from scratch, with periodic
weight refactorization, momentum reset and LR recovery (Glentis et al. 2025), and a memory report."""

from . import _ops
from .adamw import LowRankAdamW
from .layers import DEFAULT_TARGETS, LowRankLinear, find_targets, merge, to_low_rank
from .memory import MemoryReport, memory_report
from .refactorizer import Refactorizer, refactorize, reset_moments

__all__ = ["DEFAULT_TARGETS", "LowRankAdamW", "LowRankLinear", "MemoryReport", "Refactorizer", "find_targets",
           "memory_report", "merge", "refactorize", "reset_moments", "to_low_rank"]
