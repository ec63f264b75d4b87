"""Multi-tensor optimizer steps shared by every family (their ops live in ``_ops.py``)."""

from ._ops import fused_adamw_, fused_adamw_reference
from .adamw import AdamW

__all__ = ["AdamW", "fused_adamw_", "fused_adamw_reference"]
