"""Optimization on the Stiefel manifold St(n, p) = {X: XᵀX = I} and its Grassmann quotient (issue #5).

Optimizers: :class:`RSDM` (random-submanifold descent, fused permutation step), :class:`RiemannianSGD`,
:class:`RiemannianAdam`. Utilities: :func:`orthogonal_`, :func:`distance_to_manifold`, :func:`project_tangent`,
:func:`riemannian_gradient`, :func:`riemannian_gradient_norm`, :func:`project_to_manifold`, :func:`retract`,
:func:`grassmann_distance`. Ops: ``torch.ops.optim.rsdm_step_`` and ``torch.ops.optim.rsdm_sample_rows_``.
"""

from . import _ops
from .manifold import (check_on_manifold, distance_to_manifold, grassmann_distance, orient, orthogonal_,
                       polar_newton_schulz, project_tangent, project_to_manifold, retract, riemannian_gradient,
                       riemannian_gradient_norm)
from .optimizers import RSDM, RiemannianAdam, RiemannianSGD, orthogonal_sampling_step_

__all__ = ["RSDM", "RiemannianAdam", "RiemannianSGD", "check_on_manifold", "distance_to_manifold",
           "grassmann_distance", "orient", "orthogonal_", "orthogonal_sampling_step_", "polar_newton_schulz",
           "project_tangent", "project_to_manifold", "retract", "riemannian_gradient", "riemannian_gradient_norm"]
