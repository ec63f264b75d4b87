"""Low-rank pre-training (issue #6): ``LowRankLinear`` layers W = scale·B·A, trained from scratch, with periodic
weight refactorization, momentum reset and LR recovery (Glentis et al. 2025)."""

from . import _ops
from .layers import DEFAULT_TARGETS, LowRankLinear, find_targets, merge, to_low_rank

__all__ = ["DEFAULT_TARGETS", "LowRankLinear", "find_targets", "merge", "to_low_rank"]
