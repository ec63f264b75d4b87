"""What the optimizers need from ``torch.distributed``: DTensor detection and unwrapping, and gradient averaging.

* FSDP2 (``torch.distributed.fsdp.fully_shard``) turns parameters, their gradients and (through ``zeros_like``) the
  optimizer state into DTensors. An elementwise step is correct on the local shards when every tensor of a
  parameter has the same mesh and placements (``local_tensors``); the compiled ops have no DTensor sharding rule,
  so the optimizers hand them the local shards. Optimizers that need whole matrices reject DTensor parameters
  (``reject_dtensors``) instead of computing on a shard.
* ``gather_whole`` / ``write_whole_``: a matrix op (QR, SVD) on a parameter that FSDP2 shards by rows runs on
  the all-gathered whole, then each rank writes back the rows it owns (``check_row_sharded`` says which
  placements allow it).
* ``average_`` is the all-reduce of the data-parallel recipe of the second-order optimizers (``optim.SophiaH``,
  ``optim.AdaHessian``): one flat buffer per dtype and device, summed over the group and divided by its size.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["agree_over_mesh", "average_", "check_row_sharded", "gather_whole", "is_dtensor", "local_rows", "local_tensors",
           "reject_dtensors", "sum_", "write_whole_"]

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensors(lists: Sequence[Sequence[torch.Tensor]], *, caller: str) -> list[list[torch.Tensor]]:
    """The lists with every DTensor replaced by its local shard, for an elementwise in-place op.

    ``lists[k][i]`` are the tensors of parameter i (param, grad, moments, ...). Correct only when all DTensors of a
    parameter share the mesh and the placements and none is ``Partial`` (a partial sum is not an elementwise
    operand); anything else raises instead of stepping on mismatched shards. Plain tensors (the step counts) pass
    through. Without DTensors the lists are returned as they are.
    """
    # by the set of types (C speed), not an isinstance per tensor: this runs on every fused step
    if DTensor is None or not any(issubclass(cls, DTensor)
                                  for cls in set(map(type, itertools.chain.from_iterable(lists)))):
        return [list(tensors) for tensors in lists]
    out: list[list[torch.Tensor]] = [[] for _ in lists]
    for i in range(len(lists[0])):
        specs = {(t.device_mesh, tuple(t.placements)) for tensors in lists if is_dtensor(t := tensors[i])}
        if len(specs) > 1 or any(placement.is_partial() for _, placements in specs for placement in placements):
            described = ", ".join(sorted(str(placements) for _, placements in specs))
            raise ValueError(
                f"{caller}: the DTensors of parameter {i} (the parameter, its gradient and its optimizer state) have "
                f"different or partial placements ({described}); the fused step works on local shards and needs "
                "them all sharded alike. Redistribute the gradient to the parameter's placements, or pass "
                "foreach=True (DTensor's own dispatch)")
        for k, tensors in enumerate(lists):
            t = tensors[i]
            out[k].append(t.to_local() if is_dtensor(t) else t)
    return out


def reject_dtensors(params: Sequence[torch.Tensor], *, caller: str, why: str) -> None:
    """Raise a ValueError naming ``caller`` and ``why`` if any parameter is a DTensor (FSDP2, tensor parallel)."""
    for i, p in enumerate(params):
        if is_dtensor(p):
            raise ValueError(
                f"{caller}: parameter {i} (shape {tuple(p.shape)}) is a DTensor with placements {tuple(p.placements)} "
                f"(FSDP2's fully_shard or tensor parallelism); {why}")


def check_row_sharded(params: Sequence[torch.Tensor], *, caller: str, why: str) -> None:
    """Raise a ValueError naming ``caller`` and ``why`` unless every DTensor among ``params`` is sharded by rows at
    most once (``Shard(0)`` on one mesh dimension, ``Replicate`` on the others: FSDP2, HSDP) and not ``Partial``."""
    for i, p in enumerate(params):
        if not is_dtensor(p):
            continue
        shards = [placement for placement in p.placements if placement.is_shard()]
        others = [placement for placement in p.placements if not placement.is_shard() and not placement.is_replicate()]
        if others or len(shards) > 1 or any(placement.dim != 0 for placement in shards):
            raise ValueError(
                f"{caller}: parameter {i} (shape {tuple(p.shape)}) is a DTensor with placements {tuple(p.placements)}; "
                f"{why} only for parameters sharded by rows (FSDP2's Shard(0), optionally with Replicate: HSDP). "
                "Shard it with fully_shard's default placement, or keep it unsharded")


def local_rows(t: torch.Tensor) -> tuple[int | None, int, int]:
    """``(mesh dim, start, stop)``: the rows start..stop of dim 0 that this rank holds of a row-sharded DTensor
    (see :func:`check_row_sharded`), cut as ``Shard(0)`` cuts them (``torch.chunk``: chunks of ⌈n/size⌉ rows, the
    last ones short or empty); ``(None, 0, n)`` for a plain or replicated tensor."""
    n = t.shape[0] if t.dim() else 1
    shards = [i for i, placement in enumerate(t.placements) if placement.is_shard()] if is_dtensor(t) else []
    if not shards:
        return None, 0, n
    mesh_dim = shards[0]
    chunk = -(-n // t.device_mesh.size(mesh_dim))
    start = min(t.device_mesh.get_local_rank(mesh_dim) * chunk, n)
    return mesh_dim, start, min(start + chunk, n)


def gather_whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank: ``t`` itself when it is a plain tensor, the all-gather of a DTensor."""
    return t.full_tensor() if is_dtensor(t) else t


def write_whole_(t: torch.Tensor, whole: torch.Tensor) -> None:
    """Write ``whole`` (shaped like ``t``'s global shape) into ``t``: for a DTensor sharded by rows (see
    :func:`check_row_sharded`), the rows this rank holds, cut as ``Shard(0)`` cuts them (``torch.chunk``); a plain
    ``t`` that is not ``whole`` itself is copied into."""
    if not is_dtensor(t):
        if t is not whole:
            t.copy_(whole)
        return
    _, start, stop = local_rows(t)
    part = whole[start:stop]
    local = t.to_local()
    if local.shape != part.shape:  # a layout other than torch.chunk's (padding kept in the local tensor)
        raise ValueError(f"write_whole_: the local shard has shape {tuple(local.shape)} but Shard(0) of "
                         f"{tuple(whole.shape)} gives this rank {tuple(part.shape)} rows")
    local.copy_(part)


def agree_over_mesh(values: Sequence[int], mesh, device: torch.device, *, given: bool, caller: str,
                    why: str) -> list[int]:
    """``values`` (ints) as the first rank of ``mesh`` (coordinates 0, ..., 0) holds them, on every rank of the mesh:
    one broadcast per mesh dimension. ``given``: the values were passed explicitly, so a rank whose values differ
    from the first rank's makes every rank raise a ValueError naming ``caller`` and ``why`` (drawn values are simply
    replaced). Every rank of the mesh must call this in the same order."""
    local = torch.tensor(list(values), dtype=torch.int64, device=device)
    first = local.clone()
    for dim in range(mesh.ndim):  # along each dimension from its coordinate 0: the origin's values everywhere
        group = mesh.get_group(dim)
        dist.broadcast(first, src=dist.get_global_rank(group, 0), group=group)
    mismatch = torch.tensor([int(given and bool((local != first).any()))], dtype=torch.int64, device=device)
    for dim in range(mesh.ndim):
        dist.all_reduce(mismatch, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    if int(mismatch.item()):
        raise ValueError(f"{caller}: the seeds differ between the ranks of the DTensor parameters' mesh (this rank: "
                         f"{local.tolist()}, its first rank: {first.tolist()}); pass the same seed on every rank (or "
                         f"seed=None, and the first rank's is used): {why}")
    return [int(v) for v in first.tolist()]


@contextlib.contextmanager
def resharding_fsdp_modules():
    """Reshard, on exit, every FSDP2 module that ran a forward inside the block.

    A module built with ``reshard_after_forward=False`` (FSDP2's choice for the root module) keeps its gathered,
    unsharded parameters after a forward until a backward reshards them, and its next forward reuses them without
    gathering again. A forward with no backward after it (under ``torch.no_grad()``) followed by an in-place change
    of the sharded parameters would so run the next forward on stale values; resharding makes it gather the shards
    anew. The modules are found by a global forward pre-hook, registered for the block only.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed support
        yield
        return
    ran: dict[int, FSDPModule] = {}

    def remember(module, args):
        if isinstance(module, FSDPModule):
            ran[id(module)] = module

    handle = torch.nn.modules.module.register_module_forward_pre_hook(remember)
    try:
        yield
    finally:
        handle.remove()
        for module in ran.values():
            module.reshard()


def check_process_group(process_group, *, caller: str) -> None:
    if process_group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{caller}: process_group was given but torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group(...) first, or pass process_group=None")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"{caller}: process_group must be a torch.distributed.ProcessGroup (for example "
                         f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}")


@torch.no_grad()
def sum_(tensors: Sequence[torch.Tensor], process_group) -> None:
    """Replace every tensor by its sum over the ranks of ``process_group``, in place: one all-reduce of a flat
    buffer per (device, dtype); every rank passes tensors of the same shapes, dtypes and devices in one order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    for index in groups.values():
        chosen = [tensors[i] for i in index]
        flat = torch.cat([t.reshape(-1) for t in chosen])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        start = 0
        for t in chosen:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()


@torch.no_grad()
def average_(tensors: Sequence[torch.Tensor], process_group) -> None:
    """Replace every tensor by its mean over the ranks of ``process_group``, in place.

    One all-reduce (sum) of a flat buffer per (device, dtype), then a division by the group size; every rank must
    pass tensors of the same shapes, dtypes and devices in the same order. The result is the same on every rank
    (the sum is one collective), but it differs from a single-process computation on the whole batch in the last
    bits: the sum of per-rank means is rounded in another order.
    """
    world = dist.get_world_size(process_group)
    if world == 1 or not tensors:
        return
    sum_(tensors, process_group)
    for t in tensors:
        t.div_(world)
