"""``python -m benchmarks lowrank --fsdp N``: low-rank pre-training with refactorization under FSDP2, against one
process on the same global batches.

The model and data are ``benchmarks/lowrank.py``'s (the LLaMA-style decoder of ``benchmarks/_text.py`` with
``optim.to_low_rank``; byte tokens of the Python documentation). ``optim.LowRankAdamW`` (refactorize every
``every`` steps, LR recovery) trains it for the same steps from the same initial weights:

* **one process** on the whole global batch (``torch.get_num_threads()`` threads);
* **N gloo processes** on CPU (NCCL on CUDA, one GPU per rank), each with ``fully_shard`` on every decoder block
  and on the model, each taking 1/N of every global batch, one thread per rank on CPU (so that N ranks use the
  cores one process does when N equals its thread count).

Reported per run: tokens/s of the median step (global tokens over the step's wall time, the first step untimed),
the final loss, and per rank the bytes of its parameters, gradients and optimizer state (a DTensor counts its local
shard), and the largest difference of the final parameters from the one-process run (float32: the ranks sum their
gradients in another order, so it is rounding, growing with the steps, not zero).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import optim

from ._text import Llama, corpus, make_batches
from ._timing import device_name, synchronize

# (config name of benchmarks.lowrank.CONFIGS, steps, global batch, every, recovery steps)
QUICK = ("tiny", 13, 4, 4, 2)
FULL = ("60M", 21, 4, 10, 3)


def _setup(config_name: str, steps: int, batch: int):
    from .lowrank import CONFIGS

    c = CONFIGS[config_name]
    tokens, _ = corpus()
    batches = make_batches(tokens[: int(0.9 * tokens.numel())], steps, batch, c.seq, seed=0)
    return c, batches


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def train(config_name: str, steps: int, batch: int, every: int, recovery: int, device: torch.device,
          rank: int | None = None, world: int = 1) -> dict:
    """LowRankAdamW for ``steps`` steps; with ``rank`` set, as one rank of an FSDP2 job on 1/world of each batch."""
    c, batches = _setup(config_name, steps, batch)
    torch.manual_seed(0)
    model = optim.to_low_rank(Llama(c).to(device), c.rank)
    if rank is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    optimizer = optim.LowRankAdamW(model, lr=1e-3, weight_decay=0.0, rank=None, every=every,
                                   recovery_steps=recovery)
    share = batch // world
    seconds, losses, memory = [], [], None
    for step, whole in enumerate(batches):
        part = whole if rank is None else whole[rank * share:(rank + 1) * share]
        part = part.to(device)
        synchronize(device)
        start = time.perf_counter()
        logits = model(part[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, c.vocab), part[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        if step == len(batches) - 1:
            params = list(model.parameters())
            memory = {"params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
                      "optimizer_state": _local_bytes(t for state in optimizer.state.values()
                                                      for t in state.values())}
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step:
            seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    whole_params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
                    for p in model.parameters()]
    return {"tokens_per_s": batch * c.seq / statistics.median(seconds), "losses": losses, "memory": memory,
            "refactorizations": optimizer.refactorizer.refactorizations, "params": whole_params}


def _rank_main(argv: list[str]) -> None:
    out, port, rank, world, config_name, steps, batch, every, recovery, device = argv
    import torch.distributed as dist

    device = torch.device(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank_index := int(rank))
        device = torch.device("cuda", rank_index)
    timeout = datetime.timedelta(seconds=300)
    store = dist.TCPStore("127.0.0.1", int(port), int(world), is_master=False, timeout=timeout)
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=store, rank=int(rank),
                            world_size=int(world), timeout=timeout)
    result = train(config_name, int(steps), int(batch), int(every), int(recovery), device, int(rank), int(world))
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_fsdp(world: int, device: torch.device, quick: bool) -> dict:
    import torch.distributed as dist

    config_name, steps, batch, every, recovery = QUICK if quick else FULL
    if batch % world:
        batch = world * max(1, batch // world)
    single = train(config_name, steps, batch, every, recovery, device)
    with tempfile.TemporaryDirectory() as out:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=300))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        workers = [subprocess.Popen([sys.executable, "-m", "benchmarks.lowrank_fsdp", out, str(store.port), str(r),
                                     str(world), config_name, str(steps), str(batch), str(every), str(recovery),
                                     device.type], env=env, cwd=root) for r in range(world)]
        codes = [w.wait() for w in workers]
        del store
        if any(codes):
            raise RuntimeError(f"benchmarks lowrank --fsdp {world}: a rank exited with status {codes}")
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    difference = max(float((a - b).abs().max()) for a, b in zip(ranks[0]["params"], single["params"]))
    scale = max(float(b.abs().max()) for b in single["params"])
    rows = [{"run": "one process", "threads": torch.get_num_threads(), "tokens_per_s": single["tokens_per_s"],
             "final_loss": single["losses"][-1], "memory": single["memory"],
             "refactorizations": single["refactorizations"]}]
    for r, result in enumerate(ranks):
        rows.append({"run": f"FSDP2 rank {r} of {world}", "threads": 1 if device.type == "cpu" else None,
                     "tokens_per_s": result["tokens_per_s"], "final_loss": result["losses"][-1],
                     "memory": result["memory"], "refactorizations": result["refactorizations"]})
    return {"world": world, "config": config_name, "steps": steps, "global_batch": batch, "every": every,
            "recovery_steps": recovery, "device": str(device), "device_name": device_name(device), "rows": rows,
            "max_abs_param_difference": difference, "max_abs_param": scale}


def format_table(result: dict) -> str:
    mib = 1 << 20
    lines = [f"LowRankAdamW under FSDP2, {result['world']} ranks vs one process: LLaMA {result['config']}, "
             f"{result['steps']} steps of {result['global_batch']} sequences, refactorize every {result['every']} "
             f"({result['device_name']})",
             f"{'run':<22}{'tokens/s':>10}{'params MiB':>12}{'grads MiB':>11}{'opt. state MiB':>16}{'last loss':>10}"]
    for row in result["rows"]:
        m = row["memory"]
        lines.append(f"{row['run']:<22}{row['tokens_per_s']:>10.0f}{m['params'] / mib:>12.2f}"
                     f"{m['grads'] / mib:>11.2f}{m['optimizer_state'] / mib:>16.2f}{row['final_loss']:>10.4f}")
    lines.append("last loss: of the run's last batch, each rank on its share of it; MiB: what the rank holds")
    lines.append(f"final parameters: max |FSDP2 - one process| = {result['max_abs_param_difference']:.2e} "
                 f"(max |param| {result['max_abs_param']:.2f}; float32, gradient sums in another order)")
    return "\n".join(lines)


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
