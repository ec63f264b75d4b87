"""``python -m benchmarks.refactorize_tsqr [--world N] [--repeats K]``: refactorizing one FSDP2-sharded low-rank
layer (B m×r and A r×n, both ``Shard(0)``) two ways, on N gloo ranks of this CPU, one thread each.

* **gather** (what ``optim.lowrank.refactorize`` does): all-gather B and A, run ``optim::lowrank_refactorize_`` on
  the whole on every rank, keep this rank's rows.
* **TSQR on B**: QR of this rank's rows of B (m/N × r), all-gather of the N r×r R factors, QR of their stack
  (N·r × r) gives R_B and each rank's block of Q_B without B ever moving. A (r×n) is sharded by its r rows, which
  are columns of the Aᵀ that the refactorization factors, so TSQR does not apply to it: A is still all-gathered and
  QR(Aᵀ) taken whole. Then SVD(R_B R_Aᵀ) (r×r) on every rank, B's rows ← Q_B's rows·U·√Σ locally, and the
  sign convention of ``canonical_signs`` (the sign of each column's largest entry of Q_B U) needs one more
  all-gather of r numbers per rank.

Reported per (m, n, r): the median and the minimum wall time over the repeats (each the slowest rank's; the two
methods interleaved, so that both see the same load), the bytes each rank receives in the collectives (payloads:
gather (N−1)/N·(m·r + r·n) elements; TSQR (N−1)·(r² + r) + (N−1)/N·r·n), and the largest relative difference of
TSQR's factors and of their product from the gathered ones (the QR of a stack rounds differently from the QR of the
whole, and the SVD turns that into a rotation of nearly equal singular directions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (m, n, r): the layers of the LLaMA 60M of benchmarks/lowrank.py (dim 512, MLP 1376, rank 128), then larger ones
SIZES = [(512, 512, 128), (1376, 512, 128), (512, 1376, 128), (1024, 1024, 64), (4096, 4096, 128),
         (4096, 11008, 128), (11008, 4096, 128), (4096, 4096, 512)]


@torch.no_grad()
def tsqr_refactorize_(B, A) -> None:
    """The balanced factors of ``optim::lowrank_refactorize_`` (float32 work) for row-sharded DTensors B, A, with
    B's QR taken by TSQR; writes each rank's rows."""
    from optim.fused.distributed import gather_whole, write_whole_
    from optim.lowrank._ops import working_dtype

    group = B.device_mesh.get_group(0)
    world = dist.get_world_size(group)
    work = working_dtype(B.dtype)
    b = B.to_local().to(work)
    r = b.shape[1]
    q_local, r_local = torch.linalg.qr(b)  # (m_i × k, k × r), k = min(m_i, r)
    if r_local.shape[0] < r:  # a shard of fewer than r rows: pad its R (and Q) to r rows
        r_local = torch.cat([r_local, r_local.new_zeros(r - r_local.shape[0], r)])
        q_local = torch.cat([q_local, q_local.new_zeros(q_local.shape[0], r - q_local.shape[1])], dim=1)
    stacked = r_local.new_empty(world * r, r)
    dist.all_gather_single(stacked, r_local.contiguous(), group=group)
    q_stack, r_b = torch.linalg.qr(stacked)
    me = dist.get_rank(group)
    q_b = q_local @ q_stack[me * r:(me + 1) * r]
    a = gather_whole(A).to(work)
    q_a, r_a = torch.linalg.qr(a.mT)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)
    left = q_b @ u
    # canonical_signs over the whole column: each rank's largest-magnitude entries, then the largest of those
    largest = left.gather(0, left.abs().argmax(dim=0, keepdim=True)).squeeze(0) if left.shape[0] else \
        left.new_zeros(r)
    every = largest.new_empty(world * r)
    dist.all_gather_single(every, largest.contiguous(), group=group)
    every = every.view(world, r)
    chosen = every.gather(0, every.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    root = s.sqrt() * torch.where(chosen < 0, -1.0, 1.0).to(work)
    B.to_local().copy_(left * root)
    write_whole_(A, root[:, None] * (vh @ q_a.mT))


def _worker(rank: int, world: int, init: str, repeats: int, out: str, dtype: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard

    import optim
    from optim.lowrank import refactorize

    rows = []
    for m, n, r in SIZES:
        torch.manual_seed(0)
        layer = optim.LowRankLinear(n, m, r, bias=False, dtype=getattr(torch, dtype))
        fully_shard(layer)
        start = {"B": layer.B.detach().clone(), "A": layer.A.detach().clone()}

        @torch.no_grad()
        def reset():
            layer.B.to_local().copy_(start["B"].to_local())
            layer.A.to_local().copy_(start["A"].to_local())

        def once(method) -> float:
            reset()
            dist.barrier()
            t0 = time.perf_counter()
            method()
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            return elapsed.item()

        methods = {"gather": lambda: refactorize([layer]), "tsqr": lambda: tsqr_refactorize_(layer.B, layer.A)}
        times: dict[str, list[float]] = {name: [] for name in methods}
        for repeat in range(repeats + 1):  # interleaved, so that both see the same load; the first is a warm-up
            for name, method in methods.items():
                elapsed = once(method)
                if repeat:
                    times[name].append(elapsed)
        reset()  # the factors of each method from the same start, for the comparison
        methods["gather"]()
        gathered = (layer.B.full_tensor(), layer.A.full_tensor())
        reset()
        methods["tsqr"]()
        tsqr = (layer.B.full_tensor(), layer.A.full_tensor())
        diff = max((x - y).abs().max().item() / y.abs().max().item() for x, y in zip(tsqr, gathered))
        whole = gathered[0] @ gathered[1]
        product = (tsqr[0] @ tsqr[1] - whole).abs().max().item() / whole.abs().max().item()
        element = layer.B.element_size()
        rows.append({"m": m, "n": n, "r": r, **{f"{name}_s": statistics.median(t) for name, t in times.items()},
                     **{f"{name}_min_s": min(t) for name, t in times.items()},
                     "gather_bytes": (world - 1) * (m * r + r * n) * element // world,
                     "tsqr_bytes": ((world - 1) * (r * r + r) + (world - 1) * r * n // world) * element,
                     "max_rel_diff": diff, "product_diff": product})
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args.world, f"file://{tmp}/store", args.repeats, out, args.dtype), nprocs=args.world)
        rows = torch.load(out)
    print(f"torch {torch.__version__}, {args.world} gloo ranks, 1 thread each, {args.dtype}, median of {args.repeats}")
    print("| B m×r, A r×n: m, n, r | gather: median (min) | gather: received / rank | TSQR on B: median (min) | "
          "TSQR: received / rank | TSQR / gather, median (min) | TSQR vs gather: max rel. diff of B, A | of B·A |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['m']}, {row['n']}, {row['r']} | "
              f"{row['gather_s'] * 1e3:.1f} ({row['gather_min_s'] * 1e3:.1f}) ms | "
              f"{row['gather_bytes'] / 2**20:.2f} MiB | "
              f"{row['tsqr_s'] * 1e3:.1f} ({row['tsqr_min_s'] * 1e3:.1f}) ms | "
              f"{row['tsqr_bytes'] / 2**20:.2f} MiB | {row['tsqr_s'] / row['gather_s']:.2f} "
              f"({row['tsqr_min_s'] / row['gather_min_s']:.2f}) | "
              f"{row['max_rel_diff']:.1e} | {row['product_diff']:.1e} |")


if __name__ == "__main__":
    main()
