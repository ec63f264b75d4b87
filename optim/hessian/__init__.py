"""Hessian-vector products and the estimators built on them (issue #3)."""

from . import _ops
from .probes import rademacher, rademacher_like

__all__ = ["rademacher", "rademacher_like"]
