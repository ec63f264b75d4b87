"""Hessian-vector products and the estimators built on them (issue #3)."""

from . import _attention_ops, _ops
from .adahessian import AdaHessian
from .attention import scaled_dot_product_attention
from .routing import curvature_context_fn, sdpa_curvature
from .fisher import EmpiricalFisherOperator
from .ggn import GGNOperator
from .hvp import hvp
from .losses import causal_lm_loss, cross_entropy, model_loss
from .monitor import SharpnessMonitor
from .operator import HessianOperator
from .probes import rademacher, rademacher_like
from .sophia import SophiaH
from .spectrum import (DiagonalEstimate, Eigenpairs, LinearOperator, MatrixOperator, SpectralDensity, TraceEstimate,
                       diagonal, plot_density, spectral_density, top_eigenvalues, trace)

__all__ = ["AdaHessian", "DiagonalEstimate", "Eigenpairs", "EmpiricalFisherOperator", "GGNOperator", "HessianOperator",
           "LinearOperator", "MatrixOperator", "SharpnessMonitor", "SophiaH", "SpectralDensity", "TraceEstimate",
           "causal_lm_loss", "cross_entropy", "curvature_context_fn", "diagonal", "hvp", "model_loss", "plot_density",
           "rademacher", "rademacher_like", "scaled_dot_product_attention", "sdpa_curvature", "spectral_density",
           "top_eigenvalues", "trace"]
