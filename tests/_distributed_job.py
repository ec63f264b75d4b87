"""The training runs of ``tests/test_distributed.py``, in one process or as one rank of a 2-process gloo job.

``python -m tests._distributed_job OUT_DIR HOST PORT RANK WORLD_SIZE`` joins the job through the TCPStore that the
test holds at HOST:PORT, runs the cases named in ``OPTIM_JOB_CASES`` (comma-separated; default every case of
``DDP_CASES``, ``FSDP_CASES``, ``RESHARD_CASES`` and ``HSDP_CASES``; DCP checkpoints under
``OPTIM_JOB_CHECKPOINTS``, default OUT_DIR) and writes
``OUT_DIR/<case>.rank<RANK>.pt`` per case: the final parameters (whole, also under FSDP2), the Hutchinson probes the
optimizer drew, or the error the case raised (a failing case does not stop the others, so one launch serves every
test). ``run_ddp_case(name, None, 1)`` is the single-process run on the whole global batch that the ranks are
compared with.

Each rank of the distributed runs takes one half of every global batch; the loss is a mean over the batch, so the
mean of the ranks' gradients (and Hessian-vector products) is the single-process one, up to the rounding of the
summation order. Everything runs in float64 so that this rounding stays near 1e-16.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import optim

STEPS = 4
GLOBAL_BATCH = 8
IN_FEATURES, CLASSES = 6, 3
DTYPE = torch.float64


class TinyMLP(nn.Module):
    """Two hidden projections (``fc1``, ``fc2``: default low-rank targets) and a classifier ``head``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class PartlyUsedNet(TinyMLP):
    """A TinyMLP with ``extra``, a logit offset that only the samples flagged by ``uses_extra`` get (so on a rank
    without such samples it has no gradient at all), and ``never``, used by no sample."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Parameter(torch.zeros(CLASSES))
        self.never = nn.Parameter(torch.ones(2))

    def forward(self, x, uses_extra):
        logits = super().forward(x)
        if uses_extra.any():
            logits = logits + uses_extra[:, None].to(logits.dtype) * self.extra
        return logits


class TinyConvNet(nn.Module):
    """A 3×3 convolution (AdaHessian's spatial averaging) and a linear head, on 1×4×4 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 2 * 2, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.view(-1, 1, 4, 4))).flatten(1))


class OrthogonalNet(nn.Module):
    """``proj.weight`` (4×6, orthonormal rows: the constrained matrix) and an unconstrained head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, 4, bias=False, dtype=DTYPE)  # orthonormal in float64, not just float32
        optim.stiefel.orthogonal_(self.proj.weight.data)
        self.head = nn.Linear(4, CLASSES, dtype=DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def global_batches(in_features: int = IN_FEATURES, dtype: torch.dtype = DTYPE) -> list[tuple[torch.Tensor,
                                                                                           torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, in_features, generator=generator, dtype=torch.float64).to(dtype),
             torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator)) for _ in range(STEPS)]


def train_cross_entropy(net, optimizer, steps: int, rank: int | None, world_size: int, dtype: torch.dtype,
                        after_step=None) -> None:
    """``steps`` first-order steps of the cross-entropy over the global batches (this rank's part of each)."""
    batches = global_batches(dtype=dtype)
    for step in range(steps):
        x, y = local_part(batches[step % len(batches)], rank, world_size)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def local_part(batch, rank: int | None, world_size: int):
    """Rank ``rank``'s contiguous share of a global batch (the whole batch for the single-process run)."""
    if rank is None:
        return batch
    size = GLOBAL_BATCH // world_size
    return tuple(t[rank * size:(rank + 1) * size] for t in batch)


def record_probes(optimizer, probes: list) -> None:
    """Keep a copy of every probe list the second-order optimizer draws (in the order it draws them)."""
    draw = optimizer._draw_probes

    def recording(params):
        drawn, counters = draw(params)
        probes.append([z.clone() for z in drawn])
        return drawn, counters

    optimizer._draw_probes = recording


def run_ddp_case(name: str, rank: int | None, world_size: int) -> dict:
    """Train case ``name`` for ``STEPS`` steps; with ``rank`` set, as that rank of a DDP job over the default group.

    Returns ``{"params": [...], "probes": [...]}`` (parameters in ``model.parameters()`` order, detached copies).
    """
    distributed = rank is not None
    torch.manual_seed(0)
    group = torch.distributed.group.WORLD if distributed else None
    probes: list = []
    net = TinyConvNet() if name == "adahessian" else OrthogonalNet() if name in ("rsdm", "riemannian_adam") \
        else PartlyUsedNet() if name == "sophia_partly_used" else TinyMLP()
    net = net.to(DTYPE)
    if name == "lowrank":  # converts net in place: before DDP registers the parameters
        optimizer = optim.LowRankAdamW(net, lr=2e-2, rank=3, every=2, recovery_steps=1)
    model = nn.parallel.DistributedDataParallel(net) if distributed else net
    if name in ("sophia", "adahessian") and distributed and rank != 0:
        torch.manual_seed(1000 + rank)  # the ranks draw different probe seeds: the optimizer must agree on rank 0's
    if name == "adamw":
        optimizer = optim.AdamW(model.parameters(), lr=2e-2)
    elif name == "sophia":
        optimizer = optim.SophiaH(model.parameters(), lr=2e-2, rho=0.05, weight_decay=0.1, update_period=2,
                                  process_group=group)
    elif name == "sophia_partly_used":
        optimizer = optim.SophiaH(model.parameters(), lr=2e-2, rho=0.05, update_period=1, seed=3,
                                  process_group=group)
    elif name == "adahessian":
        optimizer = optim.AdaHessian(model.parameters(), lr=0.1, update_period=1, process_group=group)
    elif name == "rsdm":
        optimizer = optim.RSDM([{"params": [net.proj.weight], "manifold": "stiefel"},
                                {"params": list(net.head.parameters()), "manifold": None}],
                               lr=0.2, rank=2, momentum=0.5)
    elif name == "riemannian_adam":
        optimizer = optim.RiemannianAdam([{"params": [net.proj.weight], "manifold": "stiefel"},
                                          {"params": list(net.head.parameters()), "manifold": None}], lr=2e-2)
    elif name != "lowrank":
        raise ValueError(f"unknown case {name!r}")
    if name in ("sophia", "adahessian"):
        record_probes(optimizer, probes)

    in_features = 16 if name == "adahessian" else IN_FEATURES
    for step, batch in enumerate(global_batches(in_features)):
        x, y = local_part(batch, rank, world_size)
        if name == "sophia" and step % 2 == 1:
            # Between curvature refreshes, the usual closure: DDP's backward averages p.grad, used as it is.
            def closure():
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            optimizer.step(closure)
        elif name in ("sophia", "adahessian"):
            # The closure returns the loss; the optimizer differentiates it and averages gradient and Hz.
            optimizer.step(lambda: F.cross_entropy(model(x), y))
        elif name == "sophia_partly_used":
            # Only the first half of the global batch (rank 0's) uses net.extra: rank 1 has no gradient for it.
            uses_extra = local_part((torch.arange(GLOBAL_BATCH) < GLOBAL_BATCH // 2,), rank, world_size)[0]
            optimizer.step(lambda: F.cross_entropy(model(x, uses_extra), y))
        else:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    result = {"params": [p.detach().clone() for p in net.parameters()], "probes": probes}
    if name == "sophia_partly_used":
        result["stepped"] = [p in optimizer.state for p in net.parameters()]
    if name == "lowrank":
        result["refactorizations"] = optimizer.refactorizer.refactorizations
    return result


DDP_CASES = ("adamw", "sophia", "adahessian", "rsdm", "riemannian_adam", "lowrank", "sophia_partly_used")


def seed_mismatch(rank: int, world_size: int) -> dict:
    """SophiaH with explicitly different seeds on the ranks: the error message of each rank (None: no error)."""
    p = nn.Parameter(torch.randn(3, dtype=DTYPE))
    try:
        optim.SophiaH([p], seed=rank, process_group=torch.distributed.group.WORLD)
    except ValueError as error:
        return {"message": str(error)}
    return {"message": None}


def shard(net: nn.Module, mesh=None) -> nn.Module:
    """FSDP2 on every child with parameters, then on ``net``; ``mesh`` None: the default 1-D mesh of every rank."""
    from torch.distributed.fsdp import fully_shard

    for module in net.children():
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def hsdp_mesh():
    """HSDP's 2-D mesh of the 4 ranks: 2 replicas (outer dimension) of a model sharded over 2 ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


FSDP_ADAMW_STEPS = 20


def run_fsdp_adamw(rank: int | None, world_size: int, dtype: torch.dtype = DTYPE, mesh=None,
                   **adamw_options) -> dict:
    """optim.AdamW on a TinyMLP sharded with FSDP2 (rank set; ``mesh``: HSDP's) or whole (rank None), 20 steps over
    the global batches; whole final parameters."""
    torch.manual_seed(0)
    net = TinyMLP().to(dtype)
    if rank is not None:
        shard(net, mesh)
    optimizer = optim.AdamW(net.parameters(), lr=2e-2, **adamw_options)
    train_cross_entropy(net, optimizer, FSDP_ADAMW_STEPS, rank, world_size, dtype)
    whole = [p.full_tensor() if rank is not None else p for p in net.parameters()]
    local = [p.to_local().shape for p in net.parameters()] if rank is not None else []
    kinds = [type(optimizer.state[p]["exp_avg"]).__name__ for p in net.parameters()]
    placements = [str(tuple(p.placements)) for p in net.parameters()] if rank is not None else []
    return {"params": [p.detach().clone() for p in whole], "local_shapes": local, "state_types": kinds,
            "placements": placements}


FSDP_LOWRANK_STEPS = 20


def run_fsdp_lowrank(rank: int | None, world_size: int, dtype: torch.dtype = DTYPE, mesh=None) -> dict:
    """LowRankAdamW (refactorizing every 4 steps, one LR-recovery step) on a low-rank TinyMLP sharded with FSDP2
    (rank set; ``mesh``: HSDP's) or whole (rank None), 20 steps over the global batches; whole final parameters.
    Under ``"torch_adamw"``: the same with ``optim.Refactorizer`` driving ``torch.optim.AdamW`` (whose sharded
    moments the refactorizer zeroes in place)."""
    out = {}
    for name in ("lowrank_adamw", "torch_adamw"):
        torch.manual_seed(0)
        net = optim.to_low_rank(TinyMLP().to(dtype), 3)
        if rank is not None:
            shard(net, mesh)
        if name == "lowrank_adamw":
            optimizer = optim.LowRankAdamW(net, lr=2e-2, rank=None, every=4, recovery_steps=1)
            refactorizer = optimizer.refactorizer
        else:
            optimizer = torch.optim.AdamW(net.parameters(), lr=2e-2)
            refactorizer = optim.Refactorizer(net, optimizer, every=4, recovery_steps=1)
        train_cross_entropy(net, optimizer, FSDP_LOWRANK_STEPS, rank, world_size, dtype,
                            after_step=refactorizer.step if name == "torch_adamw" else None)
        whole = [(p.full_tensor() if rank is not None else p).detach().clone() for p in net.parameters()]
        out[name] = {"params": whole, "refactorizations": refactorizer.refactorizations,
                     "sharded": [type(p).__name__ for p in net.parameters()]}
    return {**out["lowrank_adamw"], "torch_adamw": out["torch_adamw"]}


class StiefelNet(nn.Module):
    """Three constrained parameters as FSDP2 shards them by rows: ``wide`` (4×6: the oriented rows RSDM samples are
    its columns), ``tall`` (10×4: its rows) and ``stack`` (4 matrices of 10×3: sharded across the batch), and an
    unconstrained ``head``."""

    def __init__(self, dtype: torch.dtype = DTYPE):
        super().__init__()
        self.wide = nn.Parameter(optim.stiefel.orthogonal_(torch.empty(4, IN_FEATURES, dtype=dtype)))
        self.tall = nn.Parameter(optim.stiefel.orthogonal_(torch.empty(10, 4, dtype=dtype)))
        self.stack = nn.Parameter(optim.stiefel.orthogonal_(torch.empty(4, 10, 3, dtype=dtype)))
        self.head = nn.Linear(3, CLASSES, dtype=dtype)

    def forward(self, x):
        h = torch.tanh(torch.tanh(x @ self.wide.mT) @ self.tall.mT)
        return self.head(torch.tanh(torch.einsum("bn,knp->bp", h, self.stack)))


FSDP_STIEFEL_STEPS = 20
FSDP_STIEFEL_OPTIMIZERS = {
    "rsdm_permutation": lambda c, u: optim.RSDM([c, u], lr=0.2, rank=3, momentum=0.5, reorthonormalize_every=7),
    "rsdm_orthogonal": lambda c, u: optim.RSDM([c, u], lr=0.2, rank=3, sampling="orthogonal", seed=5),
    "riemannian_sgd": lambda c, u: optim.RiemannianSGD([c, u], lr=0.1, momentum=0.5),
    "riemannian_adam": lambda c, u: optim.RiemannianAdam([c, u], lr=2e-2),
    "riemannian_adam_matrix": lambda c, u: optim.RiemannianAdam([c, u], lr=2e-2, second_moment="matrix"),
}


def run_fsdp_stiefel(rank: int | None, world_size: int, dtype: torch.dtype = DTYPE, mesh=None) -> dict:
    """Each optimizer of FSDP_STIEFEL_OPTIMIZERS for 20 steps on StiefelNet, sharded by FSDP2 (rank set; ``mesh``:
    HSDP's) or whole; the whole final parameters of each."""
    out = {}
    batches = global_batches(dtype=dtype)
    for name, make in FSDP_STIEFEL_OPTIMIZERS.items():
        torch.manual_seed(0)
        net = StiefelNet(dtype)
        if rank is not None:
            from torch.distributed.fsdp import fully_shard
            fully_shard(net, mesh=mesh)
        constrained = {"params": [net.wide, net.tall, net.stack], "manifold": "stiefel"}
        free = {"params": list(net.head.parameters()), "manifold": None}
        torch.manual_seed(1)
        optimizer = make(constrained, free)
        for step in range(FSDP_STIEFEL_STEPS):
            x, y = local_part(batches[step % len(batches)], rank, world_size)
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        out[name] = [(p.full_tensor() if rank is not None else p).detach().clone() for p in net.parameters()]
    return out


FSDP_SECOND_ORDER_STEPS = 20


SECOND_ORDER_CASES = ("sophia", "adahessian", "sophia_ggn", "adahessian_ggn")


def run_fsdp_second_order(rank: int | None, world_size: int, dtype: torch.dtype = DTYPE, mesh=None) -> dict:
    """SophiaH (refresh every 3 steps) and AdaHessian (every step) for 20 steps with finite-difference curvature:
    the Hessian (rank set: hessian="auto" picks "fd"; whole: hessian="fd") and the Gauss-Newton matrix
    (``*_ggn``: hessian="ggn-fd", the closure returning (outputs, targets)); on FSDP2 shards (``mesh``: HSDP's) or
    whole (rank None). Whole final parameters."""
    out = {}
    for name in SECOND_ORDER_CASES:
        torch.manual_seed(0)
        ggn = name.endswith("_ggn")
        adahessian = name.startswith("adahessian")
        net = (TinyConvNet() if adahessian else TinyMLP()).to(dtype)
        if rank is not None:
            from torch.distributed.fsdp import fully_shard
            fully_shard(net, mesh=mesh)
        curvature = dict(hessian="ggn-fd", loss_fn=F.cross_entropy) if ggn else \
            dict(hessian="auto" if rank is not None else "fd")
        if adahessian:
            optimizer = optim.AdaHessian(net.parameters(), lr=0.1, update_period=1, seed=11, **curvature)
        else:
            optimizer = optim.SophiaH(net.parameters(), lr=2e-2, rho=0.05, update_period=3, seed=11, **curvature)
        in_features = 16 if adahessian else IN_FEATURES
        batches = global_batches(in_features, dtype)
        for step in range(FSDP_SECOND_ORDER_STEPS):
            x, y = local_part(batches[step % len(batches)], rank, world_size)
            optimizer.step((lambda: (net(x), y)) if ggn else (lambda: F.cross_entropy(net(x), y)))
        out[name] = [(p.full_tensor() if rank is not None else p).detach().clone() for p in net.parameters()]
    return out


CHECKPOINT_DIR: list[str] = []  # set by main(): where the DCP cases save


DCP_CASES = ("adamw", "lowrank", "sophia", "adahessian", "rsdm", "riemannian_sgd", "riemannian_adam")


def _make_fsdp_optimizer(name: str, net: nn.Module):
    if name == "adamw":
        return optim.AdamW(net.parameters(), lr=2e-2)
    if name == "lowrank":
        return optim.LowRankAdamW(net, lr=2e-2, rank=None, every=3, recovery_steps=2)
    if name == "sophia":
        return optim.SophiaH(net.parameters(), lr=2e-2, rho=0.05, update_period=2, seed=4)
    if name == "adahessian":
        return optim.AdaHessian(net.parameters(), lr=0.1, update_period=2, seed=4)
    groups = [{"params": [net.wide, net.tall, net.stack], "manifold": "stiefel"},
              {"params": list(net.head.parameters()), "manifold": None}]
    if name == "rsdm":
        return optim.RSDM(groups, lr=0.2, rank=3, momentum=0.5, seed=9)
    if name == "riemannian_sgd":
        return optim.RiemannianSGD(groups, lr=0.1, momentum=0.5)
    return optim.RiemannianAdam(groups, lr=2e-2)


def _fsdp_net(name: str, sharded: bool = True) -> nn.Module:
    """The model of DCP case ``name``, sharded by FSDP2 (or whole, for one process's state bytes)."""
    torch.manual_seed(0)
    if name in ("rsdm", "riemannian_sgd", "riemannian_adam"):
        from torch.distributed.fsdp import fully_shard
        return fully_shard(StiefelNet()) if sharded else StiefelNet()
    net = TinyMLP().to(DTYPE)
    net = optim.to_low_rank(net, 3) if name == "lowrank" else net
    return shard(net) if sharded else net


def single_process_state_bytes(name: str) -> int:
    """The optimizer-state bytes of DCP case ``name`` in one process (unsharded model), after one step."""
    net = _fsdp_net(name, sharded=False)
    optimizer = _make_fsdp_optimizer(name, net)
    _train_steps(net, optimizer, range(1), None, 1)
    return _state_bytes(optimizer)


def _train_steps(net, optimizer, steps, rank, world_size) -> None:
    batches = global_batches()
    for step in steps:
        x, y = local_part(batches[step % len(batches)], rank, world_size)
        if isinstance(optimizer, (optim.SophiaH, optim.AdaHessian)):
            optimizer.step(lambda: F.cross_entropy(net(x), y))
            continue
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()


def fsdp_dcp_resume(rank: int, world_size: int) -> dict:
    """For each optimizer of DCP_CASES on FSDP2: 5 steps, a torch.distributed.checkpoint save of model and optimizer,
    5 more steps; then a fresh model and optimizer load the checkpoint and take the same 5 steps. Both final
    parameter sets (whole), the optimizer-state bytes this rank holds and those of one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = {}

    def train(net, optimizer, steps):
        _train_steps(net, optimizer, steps, rank, world_size)

    for name in DCP_CASES:
        path = os.path.join(CHECKPOINT_DIR[0], f"dcp_{name}")
        net = _fsdp_net(name)
        optimizer = _make_fsdp_optimizer(name, net)
        train(net, optimizer, range(5))
        model_state, optimizer_state = get_state_dict(net, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
        train(net, optimizer, range(5, 10))
        straight = [p.full_tensor().detach().clone() for p in net.parameters()]
        state_bytes = _state_bytes(optimizer)

        net = _fsdp_net(name)
        optimizer = _make_fsdp_optimizer(name, net)
        model_state, optimizer_state = get_state_dict(net, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        train(net, optimizer, range(5, 10))
        resumed = [p.full_tensor().detach().clone() for p in net.parameters()]
        out[name] = {"straight": straight, "resumed": resumed, "state_bytes": state_bytes,
                     "single_state_bytes": single_process_state_bytes(name)}
    return out


def _state_bytes(optimizer) -> int:
    """Bytes of the optimizer-state tensors this rank holds (a DTensor counts its local shard)."""
    total = 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                local = t.to_local() if hasattr(t, "to_local") else t
                total += local.numel() * local.element_size()
    return total


def fsdp_dcp_reshard(rank: int, world_size: int) -> dict:
    """On 4 ranks: load the step-5 checkpoints that ``fsdp_dcp_resume`` saved on 2 ranks, take steps 5..9 on this
    rank's quarter of each global batch; the whole final parameters, the rows of the first parameter held here, and
    the optimizer-state bytes this rank holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = {}
    for name in DCP_CASES:
        net = _fsdp_net(name)
        optimizer = _make_fsdp_optimizer(name, net)
        model_state, optimizer_state = get_state_dict(net, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(CHECKPOINT_DIR[0], f"dcp_{name}"))
        set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        _train_steps(net, optimizer, range(5, 10), rank, world_size)
        first = next(net.parameters())
        out[name] = {"resumed": [p.full_tensor().detach().clone() for p in net.parameters()],
                     "local_rows": first.to_local().shape[0],
                     "expected_local_rows": len(torch.arange(first.shape[0]).chunk(world_size)[rank]),
                     "state_bytes": _state_bytes(optimizer)}
    return out


def run_every_fsdp_optimizer(rank: int | None, world_size: int, dtype: torch.dtype = DTYPE, mesh=None) -> dict:
    """Every FSDP2 training run above (AdamW fused and foreach, LowRankAdamW, Refactorizer with torch.optim.AdamW,
    the Stiefel optimizers, SophiaH and AdaHessian) in ``dtype``, sharded over ``mesh`` (None: the 1-D mesh of every rank) or whole (rank None):
    ``{optimizer name: whole final parameters}``, plus the placements of the AdamW model's parameters."""
    adamw = run_fsdp_adamw(rank, world_size, dtype, mesh, fused=True)
    out = {"adamw_fused": adamw["params"],
           "adamw_foreach": run_fsdp_adamw(rank, world_size, dtype, mesh, foreach=True)["params"]}
    lowrank = run_fsdp_lowrank(rank, world_size, dtype, mesh)
    out["lowrank"] = lowrank["params"]
    out["refactorizer_torch_adamw"] = lowrank["torch_adamw"]["params"]
    out.update(run_fsdp_stiefel(rank, world_size, dtype, mesh))
    out.update(run_fsdp_second_order(rank, world_size, dtype, mesh))
    return {"params": out, "placements": adamw["placements"], "refactorizations": lowrank["refactorizations"]}


def run_hsdp(rank: int, world_size: int) -> dict:
    """HSDP on 4 ranks (``hsdp_mesh``: 2 replicas of 2 shards), float64: every optimizer of
    ``run_every_fsdp_optimizer``."""
    return run_every_fsdp_optimizer(rank, world_size, DTYPE, hsdp_mesh())


# The 4-rank job: the resharded checkpoints, and the FSDP2 training cases again on 4 ranks (shards of one row, and
# of none: a 3-row factor over 4 ranks).
RESHARD_CASES = {"fsdp_dcp_reshard": fsdp_dcp_reshard,
                 "fsdp4_lowrank": run_fsdp_lowrank, "fsdp4_stiefel": run_fsdp_stiefel,
                 "fsdp4_second_order": run_fsdp_second_order,
                 "fsdp4_adamw": lambda rank, world: run_fsdp_adamw(rank, world, fused=True),
                 "fsdp4_float32": lambda rank, world: run_every_fsdp_optimizer(rank, world, torch.float32)}
HSDP_CASES = {"hsdp": run_hsdp}  # a 4-rank job of its own


def fsdp_errors(rank: int, world_size: int) -> dict:
    """The ValueError message of each optimizer that cannot work on FSDP2-sharded parameters (None: no error)."""
    messages = {}

    def message_of(build):
        try:
            build()
        except ValueError as error:
            return str(error)
        return None

    torch.manual_seed(0)
    mlp = shard(TinyMLP().to(DTYPE))
    messages["sophia"] = message_of(lambda: optim.SophiaH(mlp.parameters(), seed=0, hessian="exact"))
    messages["adahessian"] = message_of(lambda: optim.AdaHessian(mlp.parameters(), seed=0, hessian="exact"))
    messages["sophia_ggn"] = message_of(lambda: optim.SophiaH(mlp.parameters(), seed=0, hessian="ggn",
                                                              loss_fn=F.cross_entropy))
    # The curvature operators gave zero products on FSDP2 shards (the functional call bypasses the unsharding)
    batch = local_part(global_batches()[0], rank, world_size)
    for name, operator_class in (("hessian_operator", optim.HessianOperator), ("ggn_operator", optim.GGNOperator),
                                 ("fisher_operator", optim.EmpiricalFisherOperator)):
        messages[name] = message_of(lambda operator_class=operator_class: operator_class(mlp, F.cross_entropy, batch))
    messages["sharpness_monitor"] = message_of(lambda: optim.SharpnessMonitor(mlp, F.cross_entropy))
    # A constrained matrix sharded by columns (tensor parallelism's Shard(1)) is refused: the methods gather rows.
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    orthogonal = OrthogonalNet().to(DTYPE)
    fully_shard(orthogonal.proj, shard_placement_fn=lambda param: Shard(1))
    messages["rsdm"] = message_of(lambda: optim.RSDM([{"params": [orthogonal.proj.weight], "manifold": "stiefel"}],
                                                     lr=0.1, rank=2))
    messages["riemannian_adam"] = message_of(
        lambda: optim.RiemannianAdam([{"params": [orthogonal.proj.weight], "manifold": "stiefel"}], lr=0.1))
    # Factors sharded by columns: the refactorizer gathers row shards only.
    low_rank = optim.to_low_rank(TinyMLP().to(DTYPE), 4)  # rank 4: every factor has an even number of columns
    for module in (low_rank.fc1, low_rank.fc2):
        fully_shard(module, shard_placement_fn=lambda param: Shard(1) if param.dim() == 2 else None)
    adamw = optim.AdamW(low_rank.parameters(), lr=1e-3)
    messages["refactorizer"] = message_of(lambda: optim.Refactorizer(low_rank, adamw, every=2))

    # optim.AdamW steps local shards only when a parameter's DTensors are sharded alike: a gradient redistributed to
    # another placement must raise, parameters untouched, instead of pairing mismatched shards.
    from torch.distributed.tensor import Replicate

    x, y = local_part(global_batches()[0], rank, world_size)
    F.cross_entropy(mlp(x), y).backward()
    weight = mlp.fc1.weight
    weight.grad = weight.grad.redistribute(placements=[Replicate()])
    before = [p.to_local().clone() for p in mlp.parameters()]
    messages["adamw_mismatched_grad"] = message_of(optim.AdamW(mlp.parameters(), lr=1e-2, fused=True).step)
    messages["adamw_params_untouched"] = all(torch.equal(p.to_local(), b) for p, b in zip(mlp.parameters(), before))

    # RSDM on sharded matrices needs one seed on every rank (the ranks gather and step the same sampled rows): given
    # seeds that differ raise on every rank; seed=None, drawn from RNGs that differ here, takes rank 0's.
    torch.manual_seed(0)
    stiefel = fully_shard(StiefelNet())
    constrained = {"params": [stiefel.wide, stiefel.tall, stiefel.stack], "manifold": "stiefel"}
    messages["rsdm_seed_mismatch"] = message_of(lambda: optim.RSDM([constrained], lr=0.1, rank=2, seed=rank))
    torch.manual_seed(100 + rank)
    drawn = optim.RSDM([constrained], lr=0.1, rank=2)
    messages["rsdm_drawn_seed"] = drawn.param_groups[0]["seed"]
    messages["rsdm_drawn_state_seeds"] = []
    x, y = local_part(global_batches()[0], rank, world_size)
    drawn.zero_grad()
    F.cross_entropy(stiefel(x), y).backward()
    drawn.step()
    messages["rsdm_drawn_state_seeds"] = [drawn.state[p]["seed"] for p in constrained["params"]]
    messages["rsdm_drawn_params"] = [p.full_tensor() for p in constrained["params"]]
    # SophiaH and AdaHessian on FSDP2 shards likewise (the probe seeds): one process has one seed.
    messages["sophia_seed_mismatch"] = message_of(lambda: optim.SophiaH(mlp.parameters(), seed=rank))
    messages["adahessian_seed_mismatch"] = message_of(lambda: optim.AdaHessian(mlp.parameters(), seed=rank))
    torch.manual_seed(200 + rank)
    messages["sophia_drawn_seed"] = optim.SophiaH(mlp.parameters()).param_groups[0]["seed"]
    return messages


def run_curvature(rank: int | None, world_size: int) -> dict:
    """The curvature operators, the estimators and SharpnessMonitor of a DDP model, each rank holding an uneven
    share of one global batch (3 rows and 5), then one DDP training step. Rank None: the single process, with the
    shares as a list of batches (weighted by rows: the whole batch's curvature)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    net = TinyMLP().to(DTYPE)
    x, y = global_batches()[0]
    shares = [(x[:3], y[:3]), (x[3:], y[3:])]
    model, data = (net, shares) if rank is None else (DistributedDataParallel(net), shares[rank])
    n = sum(p.numel() for p in net.parameters())
    generator = torch.Generator().manual_seed(3)
    block = torch.randn(3, n, generator=generator, dtype=DTYPE)
    result = {}
    for name, operator_class in (("hessian", optim.HessianOperator), ("ggn", optim.GGNOperator),
                                 ("fisher", optim.EmpiricalFisherOperator)):
        operator = operator_class(model, F.cross_entropy, data)
        result[name] = operator @ block
        result[f"{name}_vector"] = operator @ block[0]
        result[f"{name}_empty_block"] = operator @ block[:0]
    # a rank whose share is empty adds nothing (and raises nowhere: the rows are counted over the group)
    whole = [(x, y)] if rank is None else [(x, y) if rank == 0 else (x[:0], y[:0])]
    for name, operator_class in (("hessian", optim.HessianOperator), ("fisher", optim.EmpiricalFisherOperator)):
        result[f"{name}_one_share_empty"] = operator_class(model, F.cross_entropy, whole) @ block
    # targets ignored (-100) in one share: each rank's weight is its counted targets, so the ranks' operator is
    # that of the whole batch as one batch, the mean over all its counted targets
    ignored = y.clone()
    ignored[4:6] = -100
    counted = (x, ignored) if rank is None else [(x[:3], ignored[:3]), (x[3:], ignored[3:])][rank]
    for name, operator_class in (("hessian", optim.HessianOperator), ("ggn", optim.GGNOperator)):
        result[f"{name}_ignored_targets"] = operator_class(model, F.cross_entropy, counted) @ block
    H = optim.HessianOperator(model, F.cross_entropy, data)
    result["loss_and_grad"] = H.loss_and_grad()
    result["quadratic_forms"] = H.quadratic_forms(block)
    result["top_eigenvalues"] = optim.top_eigenvalues(H, k=2, tol=1e-10).eigenvalues
    result["trace"] = optim.trace(H, num_probes=8).estimate
    result["diagonal"] = optim.diagonal(H, num_probes=4).estimate
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    record = optim.SharpnessMonitor(model, F.cross_entropy, lr_from=sgd, probes=4, lanczos_iters=20).measure(0, data)
    result["monitor"] = {key: record[key] for key in ("lambda_max", "trace", "stability_limit")}
    if rank is not None:
        # the plain module with an explicit group, this rank's share as two batches of its own
        halves = [(t[:1], u[:1]) for t, u in [data]] + [(t[1:], u[1:]) for t, u in [data]]
        result["explicit_group"] = optim.HessianOperator(net, F.cross_entropy, halves,
                                                         process_group=dist.group.WORLD) @ block
    # DDP still trains: the operators never ran its forward, so its reducer waits for no backward. DDP averages
    # the ranks' gradients, so a rank's share of the global mean loss is weighted by world_size · rows / N.
    for share in (shares if rank is None else [data]):
        weight = share[1].shape[0] / x.shape[0] * (1 if rank is None else world_size)
        (F.cross_entropy(model(share[0]), share[1]) * weight).backward()
    sgd.step()
    result["params"] = [p.detach().clone() for p in net.parameters()]
    return result


CURVATURE_CASES = {"curvature_ddp": run_curvature}


FSDP_CASES = {
    "fsdp_adamw_fused": lambda rank, world: run_fsdp_adamw(rank, world, fused=True),
    "fsdp_adamw_default": lambda rank, world: run_fsdp_adamw(rank, world),
    "fsdp_adamw_foreach": lambda rank, world: run_fsdp_adamw(rank, world, foreach=True),
    "fsdp_lowrank": run_fsdp_lowrank,
    "fsdp_stiefel": run_fsdp_stiefel,
    "fsdp_second_order": run_fsdp_second_order,
    "fsdp_float32": lambda rank, world: run_every_fsdp_optimizer(rank, world, torch.float32),
    "fsdp_dcp_resume": fsdp_dcp_resume,
    "fsdp_errors": fsdp_errors,
    "seed_mismatch": seed_mismatch,
}


def main(out_dir: str, host: str, port: int, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=60)  # a collective that waits longer fails instead of hanging
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    CHECKPOINT_DIR.append(os.environ.get("OPTIM_JOB_CHECKPOINTS", out_dir))
    cases = {name: (lambda name=name: run_ddp_case(name, rank, world_size)) for name in DDP_CASES}
    cases.update({name: (lambda run=run: run(rank, world_size))
                  for name, run in {**CURVATURE_CASES, **FSDP_CASES, **RESHARD_CASES, **HSDP_CASES}.items()})
    chosen = os.environ.get("OPTIM_JOB_CASES")
    if chosen:
        cases = {name: cases[name] for name in chosen.split(",")}
    for name, run in cases.items():
        try:
            result = run()
        except Exception:  # reported by the test of this case; the other cases still run
            result = {"error": traceback.format_exc()}
        torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        dist.barrier()  # a case that failed on one rank only must not leave the other inside a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
