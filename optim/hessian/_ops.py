"""Ops of the Hessian family: schemas, fake kernels and references. Empty until the Hessian engine lands (#3)."""
