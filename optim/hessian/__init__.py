"""Hessian-vector products and the estimators built on them (issue #3)."""

from . import _ops
from .losses import cross_entropy
from .probes import rademacher, rademacher_like

__all__ = ["cross_entropy", "rademacher", "rademacher_like"]
