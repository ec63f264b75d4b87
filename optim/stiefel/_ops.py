"""Ops of the Stiefel family: schemas, fake kernels and references. Empty until the RSDM step lands (#5)."""
