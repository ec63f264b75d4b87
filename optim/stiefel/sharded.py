"""Constrained matrices that FSDP2 shards by rows (``Shard(0)`` DTensors): what each method gathers.

* **RSDM, permutation sampling** moves only the r sampled rows of the oriented matrix X̃ (N×P, N >= P). Every rank
  draws the same index set I from (seed, offset), gathers X̃_I and D̃_I (r×P each, D the gradient or momentum
  buffer: each rank fills the entries it holds, zeros elsewhere, and one all-reduce sums them, exactly), runs the
  fused ``rsdm_step_`` on them (the same kernel, the same rows in the same order as one process: the same numbers),
  and writes back the entries it holds. Communication per step: 2·r·P numbers (3 with momentum transport), against
  the N·P of the matrix. When X is stored wide (n < p) the oriented rows are stored columns, which every rank
  holds a slice of; the same gather applies.
* **Batched** ``(B, ..., n, p)`` parameters are sharded along the batch dimension: each rank holds whole matrices
  and steps them with the index sets drawn for their global batch positions, without communication.
* **RSDM with orthogonal sampling, RiemannianSGD and RiemannianAdam** mix every row and column of X at every step
  (a Haar basis of the whole space, a full retraction): the step all-gathers X, its gradient and its state
  (the matrix size per tensor, every step), updates the whole on every rank and keeps its rows. So does the
  periodic re-orthonormalization of every method (a QR of X).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .._library import has_kernel
from ..fused.distributed import gather_whole, is_dtensor, local_rows, write_whole_
from ._ops import rotates_in_float64, rsdm_sample_rows_, rsdm_step_, rsdm_step_reference

__all__ = ["rsdm_permutation_step_sharded_", "whole_matrix_update_"]


def _gather_rows(local: torch.Tensor, start: int, stop: int, indices: torch.Tensor, flip: bool, n_stored: int,
                 group) -> torch.Tensor:
    """Rows ``indices`` of the whole oriented matrix (r×P), from every rank's stored rows start..stop."""
    r = indices.numel()
    if flip:  # oriented rows are stored columns: this rank holds their entries start..stop
        rows = local.new_zeros(r, n_stored)
        rows[:, start:stop] = local[:, indices].mT
    else:
        rows = local.new_zeros(r, local.shape[-1])
        held = (indices >= start) & (indices < stop)
        rows[held] = local[indices[held] - start]
    dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)
    return rows


def _scatter_rows_(local: torch.Tensor, start: int, stop: int, indices: torch.Tensor, flip: bool,
                   rows: torch.Tensor) -> None:
    if flip:
        local[:, indices] = rows[:, start:stop].mT
    else:
        held = (indices >= start) & (indices < stop)
        local[indices[held] - start] = rows[held]


@torch.no_grad()
def rsdm_permutation_step_sharded_(p: torch.Tensor, direction: torch.Tensor, *, rank: int, seed: int, offset: int,
                                   lr: float, core: str, transport: bool) -> None:
    """One RSDM step with permutation sampling on a row-sharded DTensor ``p`` (and ``direction``, sharded alike),
    equal to ``rsdm_step_(whole p, whole direction, None, ...)`` of one process. See the module docstring."""
    local, direction_local = p.to_local(), direction.to_local()
    step = rsdm_step_ if has_kernel("rsdm_step_", local.device) else rsdm_step_reference
    flip = p.shape[-2] < p.shape[-1]
    n_rows = max(p.shape[-2:])
    indices = torch.empty(*p.shape[:-2], rank, dtype=torch.int64, device=local.device)
    rsdm_sample_rows_(indices, n_rows, seed, offset)
    mesh_dim, start, stop = local_rows(p)
    if p.dim() > 2:  # whole matrices on each rank: their own index sets, no communication
        if local.shape[0]:
            step(local, direction_local, indices[start:stop].contiguous(), rank=rank, seed=seed, offset=offset,
                 lr=lr, core=core, transport=transport)
        return
    group = p.device_mesh.get_group(mesh_dim)
    indices = indices.reshape(-1)
    x_rows = _gather_rows(local, start, stop, indices, flip, p.shape[0], group)
    d_rows = _gather_rows(direction_local, start, stop, indices, flip, p.shape[0], group)
    n_cols = x_rows.shape[-1]
    # The rows as the first r rows of a tall matrix, stepped at the indices 0..r-1: the kernel then computes exactly
    # what it computes on the whole.
    height = gathered_height(local.dtype, rank, n_rows, n_cols, local.device, core)
    x_tall, d_tall = x_rows.new_zeros(height, n_cols), x_rows.new_zeros(height, n_cols)
    x_tall[:rank], d_tall[:rank] = x_rows, d_rows
    step(x_tall, d_tall, torch.arange(rank, device=local.device), rank=rank, seed=seed, offset=offset, lr=lr,
         core=core, transport=transport)
    _scatter_rows_(local, start, stop, indices, flip, x_tall[:rank])
    if transport:
        _scatter_rows_(direction_local, start, stop, indices, flip, d_tall[:rank])


def gathered_height(dtype: torch.dtype, rank: int, n_rows: int, n_cols: int, device: torch.device, core: str) -> int:
    """The height of the matrix that holds the r gathered rows of an oriented ``n_rows`` × ``n_cols`` matrix for
    ``rsdm_step_``: at least r and at least as many rows as columns (so the op keeps its orientation), and with the
    whole matrix's answer to ``rotates_in_float64`` (so the op rounds as on the whole)."""
    height = max(rank, n_cols)
    if rotates_in_float64(dtype, rank, height, n_cols, device, core=core) != \
            rotates_in_float64(dtype, rank, n_rows, n_cols, device, core=core):
        height = max(rank, 2 * n_cols + 1)
    return height


def _sharded_like(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """A new DTensor sharded like the row-sharded DTensor ``p`` (its mesh and placements), holding this rank's rows
    of ``whole`` (shaped like ``p``)."""
    from torch.distributed.tensor import DTensor

    _, start, stop = local_rows(p)
    local = whole[start:stop].clone(memory_format=torch.contiguous_format)
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                              stride=torch.empty(p.shape, device="meta").stride(), run_check=False)


@torch.no_grad()
def whole_matrix_update_(p: torch.Tensor, state: dict, update: Callable[[torch.Tensor, dict], None]) -> None:
    """``update(x, state)`` of a step that needs the whole matrix, for a row-sharded DTensor ``p``: X, its gradient
    and its DTensor state are all-gathered, ``update`` runs on the whole (``x.grad`` set) on every rank, and each
    rank writes back its rows. A plain state tensor of the parameter's shape (one that ``update`` creates, such as
    RiemannianSGD's momentum buffer on the first step) is kept sharded like ``p``, so that each rank holds its rows
    only, as of the state created before the step; other plain values (counters) are kept as they come back."""
    if not is_dtensor(p):
        update(p, state)
        return
    whole = gather_whole(p)
    if p.grad is not None:
        whole.grad = gather_whole(p.grad)
    whole_state = {key: gather_whole(value) if is_dtensor(value) else value for key, value in state.items()}
    update(whole, whole_state)
    write_whole_(p, whole)
    for key, value in whole_state.items():
        if is_dtensor(state.get(key)):
            write_whole_(state[key], value)
        elif isinstance(value, torch.Tensor) and not is_dtensor(value) and value.shape == p.shape:
            state[key] = _sharded_like(p, value)
        else:
            state[key] = value
