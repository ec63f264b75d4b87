"""Hessian-vector products and the estimators built on them (issue #3). Nothing is public yet."""
