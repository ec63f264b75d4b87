"""Ops of the low-rank family: schemas, fake kernels and references. Empty until refactorization lands (#6)."""
