"""Optimization on the Stiefel manifold and its Grassmann quotient (issue #5). Nothing is public yet."""
