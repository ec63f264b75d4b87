"""Data-parallel training on CPU processes (gloo): DDP for every optimizer on 2; FSDP2 for every optimizer on 2
and 4 (float64 and float32), HSDP (a 2-D mesh) on 4, and DCP checkpoints.

Three jobs (``tests/_distributed_job.py``): 2 processes for the DDP and FSDP2 cases, 4 for the resharded
checkpoints and the 4-rank FSDP2 cases, 4 for HSDP; each runs its cases in one launch, so process start-up is paid
once per job. Each test below checks one case's output against the single-process run on the whole global batch,
computed here.

Why not bitwise: each rank averages the loss over its half of the batch and the ranks' gradients are summed and
halved, while the single process averages over the whole batch: the same numbers summed in another order. In
float64 the parameters agree to ~1e-15 relative after the steps; the tolerance below is loose enough for that and
far tighter than any real divergence (a rank stepping on its local gradient differs at ~1e-2). The ranks agree with
each other bitwise (the all-reduce gives every rank the same sum), which is what keeps DDP replicas identical.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import optim

from . import _distributed_job as job

WORLD_SIZE = 2
JOB_TIMEOUT_S = 300  # each job takes 20-120 s on a loaded 2-core machine; a hang fails the tests instead
REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def launch(out: Path, world_size: int, cases: tuple[str, ...], checkpoints: Path | None = None) -> dict:
    """Run ``cases`` of ``tests/_distributed_job.py`` as one job of ``world_size`` gloo processes writing to ``out``
    (DCP checkpoints read from ``checkpoints``, default ``out``); ``{case: [result per rank]}``, plus
    ``{"__failure__": text}`` when a rank failed or the job hung."""
    # The store lives in this process on a port the OS picked (port 0), so there is no race for a free port; the
    # workers join it as clients.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                                         ""),
               OPTIM_JOB_CASES=",".join(cases), OPTIM_JOB_CHECKPOINTS=str(checkpoints or out))
    logs = [open(out / f"rank{rank}.log", "w+") for rank in range(world_size)]
    workers = [subprocess.Popen([sys.executable, "-m", "tests._distributed_job", str(out), "127.0.0.1",
                                 str(store.port), str(rank), str(world_size)],
                                cwd=REPO_ROOT, env=env, stdout=logs[rank], stderr=subprocess.STDOUT)
               for rank in range(world_size)]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    failure = None
    for rank, worker in enumerate(workers):
        try:
            code = worker.wait(timeout=max(deadline - time.monotonic(), 1.0))
            if code != 0 and failure is None:
                failure = f"rank {rank} exited with status {code}"
        except subprocess.TimeoutExpired:
            failure = f"the job did not finish within {JOB_TIMEOUT_S} s (a hang in a collective?)"
            break
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    del store
    collected: dict = {}
    for name in cases:
        files = [out / f"{name}.rank{rank}.pt" for rank in range(world_size)]
        if all(f.exists() for f in files):
            collected[name] = [torch.load(f, weights_only=False) for f in files]
    if failure is not None:
        text = []
        for rank, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- rank {rank} ---\n{log.read()[-4000:]}")
        collected["__failure__"] = failure + "\n" + "\n".join(text)
    for log in logs:
        log.close()
    return collected


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def results(job_dir) -> dict:
    """The 2-process job, launched once for every case: ``{case: [rank 0 result, rank 1 result]}``."""
    return launch(job_dir, WORLD_SIZE, (*job.DDP_CASES, *job.CURVATURE_CASES, *job.FSDP_CASES))


@pytest.fixture(scope="module")
def resharded(results, job_dir, tmp_path_factory) -> dict:
    """A 4-process job that loads the DCP checkpoints the 2-process job saved and continues from them."""
    return launch(tmp_path_factory.mktemp("distributed4"), 4, tuple(job.RESHARD_CASES), checkpoints=job_dir)


@pytest.fixture(scope="module")
def hsdp_results(tmp_path_factory) -> dict:
    """A 4-process job of HSDP runs (a 2-D mesh: 2 replicas of 2 shards)."""
    return launch(tmp_path_factory.mktemp("hsdp"), 4, tuple(job.HSDP_CASES))


def case_results(results: dict, name: str) -> list[dict]:
    if name not in results:
        pytest.fail(f"case {name!r} produced no output. {results.get('__failure__', '')}")
    for rank, result in enumerate(results[name]):
        if "error" in result:
            pytest.fail(f"case {name!r} raised on rank {rank}:\n{result['error']}")
    return results[name]


def assert_close_to_single_process(ranks: list[dict], single: dict, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    for i, (p0, p1) in enumerate(zip(ranks[0]["params"], ranks[1]["params"])):
        assert torch.equal(p0, p1), f"parameter {i} differs between the ranks (the replicas diverged)"
    assert len(ranks[0]["params"]) == len(single["params"])
    for i, (p, expected) in enumerate(zip(ranks[0]["params"], single["params"])):
        torch.testing.assert_close(p, expected, rtol=rtol, atol=atol, msg=lambda m: f"parameter {i}: {m}")


@pytest.mark.parametrize("name", job.DDP_CASES)
def test_ddp_matches_single_process(results, name):
    """DDP on 2 ranks, each with half of every global batch, ends where one process on the whole batch does."""
    ranks = case_results(results, name)
    single = job.run_ddp_case(name, None, 1)
    # The run must have moved the parameters, or the comparison says nothing.
    torch.manual_seed(0)
    start = {"adahessian": job.TinyConvNet, "rsdm": job.OrthogonalNet, "riemannian_adam": job.OrthogonalNet,
             "sophia_partly_used": job.PartlyUsedNet}.get(name, job.TinyMLP)().to(job.DTYPE)
    if name != "lowrank":
        moved = max((p - q).abs().max().item() for p, q in zip(single["params"], start.parameters()))
        assert moved > 1e-3
    assert_close_to_single_process(ranks, single)
    if name == "lowrank":
        assert ranks[0]["refactorizations"] == ranks[1]["refactorizations"] == single["refactorizations"] == 2
    if name == "sophia_partly_used":
        # net.extra (used by rank 0's samples only) stepped on both ranks with the global gradient; net.never, used
        # by no sample, did not step anywhere, as in the single process.
        start_params = list(start.parameters())
        assert ranks[0]["stepped"] == ranks[1]["stepped"] == single["stepped"] == [True, False] + [True] * 6
        assert not torch.equal(ranks[1]["params"][0], start_params[0])  # extra
        assert torch.equal(ranks[1]["params"][1], start_params[1])  # never
    if name in ("rsdm", "riemannian_adam"):
        w = ranks[0]["params"][0]
        torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0], dtype=w.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["sophia", "adahessian"])
def test_ddp_hutchinson_probes_identical_on_every_rank(results, name):
    """Each rank drew different seeds (the job re-seeds rank 1); the optimizer's process_group made them agree on
    rank 0's, so every refresh used the same probes on both ranks, and the ones of the single-process run."""
    ranks = case_results(results, name)
    single = job.run_ddp_case(name, None, 1)
    refreshes = {"sophia": 2, "adahessian": job.STEPS}[name]  # update_period 2 and 1
    assert len(ranks[0]["probes"]) == len(ranks[1]["probes"]) == len(single["probes"]) == refreshes
    for draw0, draw1, expected in zip(ranks[0]["probes"], ranks[1]["probes"], single["probes"]):
        assert len(draw0) == len(draw1) == len(expected) > 0
        for z0, z1, z in zip(draw0, draw1, expected):
            assert torch.equal(z0, z1) and torch.equal(z0, z)
            assert set(z0.unique().tolist()) <= {-1.0, 1.0}
    assert not torch.equal(ranks[0]["probes"][0][0], ranks[0]["probes"][1][0])  # a fresh probe at every refresh


@pytest.mark.parametrize("name", ["fsdp_adamw_fused", "fsdp_adamw_default", "fsdp_adamw_foreach"])
def test_fsdp2_adamw_matches_single_process(results, name):
    """optim.AdamW on FSDP2-sharded parameters, 20 steps: the fused op steps the local shards (it has no DTensor
    sharding rule), the foreach path goes through DTensor; both match one process on the whole batch."""
    ranks = case_results(results, name)
    options = {"fsdp_adamw_fused": dict(fused=True), "fsdp_adamw_default": {},
               "fsdp_adamw_foreach": dict(foreach=True)}[name]
    single = job.run_fsdp_adamw(None, 1, **options)
    assert_close_to_single_process(ranks, single)
    # Really sharded: each rank held half of fc1's weight, and the moments are DTensors like the parameters.
    assert tuple(ranks[0]["local_shapes"][0]) == tuple(ranks[1]["local_shapes"][0]) == (8, job.IN_FEATURES)
    assert set(ranks[0]["state_types"]) == {"DTensor"}


@pytest.mark.parametrize("name", job.SECOND_ORDER_CASES)
def test_fsdp2_second_order_with_finite_differences_matches_single_process(results, name):
    """SophiaH and AdaHessian on FSDP2 shards (hessian="auto": finite differences of backward passes; ``*_ggn``:
    hessian="ggn-fd", the Gauss-Newton product with the Jacobian-vector product by finite differences of two
    forwards; each rank drawing the probe entries of its rows): 20 steps across refreshes, equal to one process
    with the same curvature on the whole batch to float64 rounding."""
    ranks = case_results(results, "fsdp_second_order")
    single = job.run_fsdp_second_order(None, 1)
    # The difference quotient divides the gradients' rounding (~1e-16, the reduction order) by h ~ 6e-6 in
    # float64: Hz agrees to ~1e-11, and 20 AdaHessian steps preconditioned by it to ~1e-8.
    assert_close_to_single_process([{"params": result[name]} for result in ranks], {"params": single[name]},
                                   rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name, words", [
    ("sophia", "hessian='fd'"),
    ("adahessian", "hessian='fd'"),
    ("sophia_ggn", "hessian='ggn-fd'"),
    ("rsdm", "sharded by rows"),
    ("riemannian_adam", "sharded by rows"),
    ("refactorizer", "sharded by rows"),
    ("hessian_operator", "unsharded copy"),
    ("ggn_operator", "unsharded copy"),
    ("fisher_operator", "unsharded copy"),
    ("sharpness_monitor", "unsharded copy"),
])
def test_fsdp2_unsupported_optimizers_raise(results, name, words):
    """What cannot work on FSDP2's shards is refused at construction: a second-order graph (no double backward
    through FSDP2's hooks), and matrices sharded by columns for the methods that gather rows."""
    messages = case_results(results, "fsdp_errors")[0]
    assert messages[name] is not None, f"{name} accepted FSDP2-sharded parameters"
    assert "DTensor" in messages[name] and words in messages[name]


def test_fsdp2_lowrank_refactorization_matches_single_process(results):
    """LowRankAdamW on FSDP2-sharded factors, 20 steps across five refactorizations (each layer's B and A gathered,
    refactorized whole on every rank, each rank keeping its rows; the moments of the shards reset; the LR ramp):
    one process on the whole batch, to float64 rounding."""
    ranks = case_results(results, "fsdp_lowrank")
    single = job.run_fsdp_lowrank(None, 1)
    assert ranks[0]["refactorizations"] == single["refactorizations"] == job.FSDP_LOWRANK_STEPS // 4
    assert set(ranks[0]["sharded"]) == {"DTensor"}
    assert_close_to_single_process(ranks, single)


def test_fsdp2_refactorizer_with_torch_adamw_matches_single_process(results):
    """optim.Refactorizer driving torch.optim.AdamW on FSDP2-sharded factors (its DTensor moments zeroed in place at
    each refactorization, the LR ramp through its step hooks): 20 steps, one process on the whole batch, to float64
    rounding."""
    ranks = [result["torch_adamw"] for result in case_results(results, "fsdp_lowrank")]
    single = job.run_fsdp_lowrank(None, 1)["torch_adamw"]
    assert ranks[0]["refactorizations"] == single["refactorizations"] == job.FSDP_LOWRANK_STEPS // 4
    assert set(ranks[0]["sharded"]) == {"DTensor"}
    assert_close_to_single_process(ranks, single)


@pytest.mark.parametrize("name", job.DCP_CASES)
def test_fsdp2_dcp_checkpoint_resumes_bit_exactly(results, name):
    """torch.distributed.checkpoint save and load of the sharded model and optimizer state of AdamW, LowRankAdamW
    (with its refactorizer's schedule and pending resets), SophiaH and AdaHessian (finite-difference curvature),
    RSDM (its sampling counters), RiemannianSGD and RiemannianAdam: the resumed run equals the uninterrupted one bit
    for bit."""
    ranks = case_results(results, "fsdp_dcp_resume")
    for rank, result in enumerate(ranks):
        for i, (a, b) in enumerate(zip(result[name]["straight"], result[name]["resumed"])):
            assert torch.equal(a, b), f"rank {rank}, parameter {i}: the resumed run differs"


@pytest.mark.parametrize("name", job.DCP_CASES)
def test_fsdp2_dcp_checkpoint_of_2_ranks_resumes_on_4(results, resharded, name):
    """The checkpoint saved by 2 ranks, loaded by 4 (DCP reshards every parameter and moment): the 4-rank run of
    the same steps ends where the uninterrupted 2-rank run does, to float64 rounding (the gradient sums are
    rounded in another order); the 4 ranks agree bitwise."""
    straight = case_results(results, "fsdp_dcp_resume")[0][name]["straight"]
    ranks = case_results(resharded, "fsdp_dcp_reshard")
    for rank, result in enumerate(ranks):
        assert result[name]["local_rows"] == result[name]["expected_local_rows"]
        for i, (a, b) in enumerate(zip(result[name]["resumed"], straight)):
            assert torch.equal(a, ranks[0][name]["resumed"][i]), f"rank {rank}, parameter {i}: ranks differ"
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"parameter {i}: {m}")


@pytest.mark.parametrize("case, name", [("fsdp4_adamw", None), ("fsdp4_lowrank", None),
                                        ("fsdp4_lowrank", "torch_adamw"),
                                        *[("fsdp4_stiefel", n) for n in job.FSDP_STIEFEL_OPTIMIZERS],
                                        *[("fsdp4_second_order", n) for n in job.SECOND_ORDER_CASES]])
def test_fsdp2_on_4_ranks_matches_single_process(resharded, case, name):
    """The FSDP2 cases on 4 gloo ranks (one row per rank for the small matrices, an empty shard for a 3-row
    factor): every rank equal, and equal to one process on the whole batch."""
    ranks = case_results(resharded, case)
    runs = {"fsdp4_adamw": lambda: job.run_fsdp_adamw(None, 1, fused=True),
            "fsdp4_lowrank": lambda: job.run_fsdp_lowrank(None, 1),
            "fsdp4_stiefel": lambda: job.run_fsdp_stiefel(None, 1),
            "fsdp4_second_order": lambda: job.run_fsdp_second_order(None, 1)}
    single = runs[case]()
    if name is None:
        results, expected = ranks, single
    elif name == "torch_adamw":  # Refactorizer with torch.optim.AdamW
        results, expected = [r[name] for r in ranks], single[name]
    else:
        results, expected = [{"params": r[name]} for r in ranks], {"params": single[name]}
    for rank in range(1, len(results)):
        for i, (a, b) in enumerate(zip(results[0]["params"], results[rank]["params"])):
            assert torch.equal(a, b), f"parameter {i} differs between ranks 0 and {rank}"
    loose = case == "fsdp4_second_order"  # the difference quotient magnifies the reduction's rounding
    assert_close_to_single_process(results[:2], expected, **(dict(rtol=1e-7, atol=1e-9) if loose else {}))


def test_fsdp2_optimizer_state_is_sharded(results):
    """Optimizer-state bytes per rank: about half of one process's (the moments are sharded like the
    parameters)."""
    ranks = case_results(results, "fsdp_dcp_resume")
    single = case_results(results, "fsdp_dcp_resume")[0]["adamw"]["single_state_bytes"]
    for result in ranks:
        assert result["adamw"]["state_bytes"] <= 0.6 * single


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", job.DCP_CASES)
def test_fsdp2_optimizer_state_bytes_per_rank_near_one_over_world(results, resharded, name, world_size):
    """Every optimizer's state bytes per rank, on 2 ranks (trained there) and on 4 (resharded from 2 by DCP): at
    most 1/world of one process's plus 0.1 (the tiny test matrices split unevenly: a 3-row factor gives ranks 2, 1
    or 1, 1, 1, 0 rows; the counters are whole on every rank)."""
    single = case_results(results, "fsdp_dcp_resume")[0][name]["single_state_bytes"]
    ranks = case_results(results, "fsdp_dcp_resume") if world_size == 2 else \
        case_results(resharded, "fsdp_dcp_reshard")
    assert len(ranks) == world_size and single > 0
    for rank, result in enumerate(ranks):
        share = result[name]["state_bytes"] / single
        assert share <= 1 / world_size + 0.1, f"rank {rank} holds {share:.2f} of one process's optimizer state"


@pytest.mark.parametrize("name", list(job.FSDP_STIEFEL_OPTIMIZERS))
def test_fsdp2_stiefel_optimizers_match_single_process(results, name):
    """RSDM (permutation sampling: only the sampled rows gathered; orthogonal sampling: the whole matrix),
    RiemannianSGD and RiemannianAdam on FSDP2 row shards of a wide, a tall and a batched constrained matrix:
    20 steps, equal to one process on the whole batch to float64 rounding."""
    ranks = case_results(results, "fsdp_stiefel")
    single = job.run_fsdp_stiefel(None, 1)
    assert_close_to_single_process([{"params": result[name]} for result in ranks], {"params": single[name]})


def test_fsdp2_adamw_refuses_mismatched_shards(results):
    """A gradient whose placements differ from its parameter's cannot be stepped shard by shard: clear error, and
    no parameter changed."""
    messages = case_results(results, "fsdp_errors")[0]
    assert messages["adamw_mismatched_grad"] is not None, "optim.AdamW stepped mismatched shards"
    assert "different or partial placements" in messages["adamw_mismatched_grad"]
    assert messages["adamw_params_untouched"] is True


def test_fsdp2_rsdm_seeds_agree_over_the_mesh(results):
    """RSDM on FSDP2 shards: seeds given differently on the ranks raise on every rank (the ranks would gather and
    step different sampled rows); seed=None drawn from RNGs that differ between the ranks takes rank 0's seed, so
    both ranks step the same rows and the matrices stay orthonormal."""
    ranks = case_results(results, "fsdp_errors")
    for rank, messages in enumerate(ranks):
        assert messages["rsdm_seed_mismatch"] is not None, f"rank {rank} accepted a seed that differs from rank 0's"
        assert "seeds differ between the ranks" in messages["rsdm_seed_mismatch"]
    assert ranks[0]["rsdm_drawn_seed"] == ranks[1]["rsdm_drawn_seed"]
    assert ranks[0]["rsdm_drawn_state_seeds"] == ranks[1]["rsdm_drawn_state_seeds"]
    for p in ranks[0]["rsdm_drawn_params"]:
        w = p if p.shape[-2] <= p.shape[-1] else p.mT
        torch.testing.assert_close(w @ w.mT, torch.eye(w.shape[-2], dtype=w.dtype).expand_as(w @ w.mT), rtol=0,
                                   atol=1e-12)


def test_fsdp2_second_order_seeds_agree_over_the_mesh(results):
    """SophiaH and AdaHessian on FSDP2 shards: probe seeds given differently on the ranks raise on every rank; a
    seed drawn from RNGs that differ between the ranks becomes rank 0's on both."""
    ranks = case_results(results, "fsdp_errors")
    for rank, messages in enumerate(ranks):
        for name in ("sophia", "adahessian"):
            assert messages[f"{name}_seed_mismatch"] is not None, f"{name} on rank {rank} accepted a differing seed"
            assert "seeds differ between the ranks" in messages[f"{name}_seed_mismatch"]
    assert ranks[0]["sophia_drawn_seed"] == ranks[1]["sophia_drawn_seed"]


def test_second_order_seeds_given_differently_on_the_ranks_raise_on_every_rank(results):
    for rank, result in enumerate(case_results(results, "seed_mismatch")):
        assert result["message"] is not None, f"rank {rank} accepted a seed that differs from rank 0's"
        assert "seeds differ between the ranks" in result["message"]


def test_process_group_needs_initialized_distributed():
    p = torch.nn.Parameter(torch.randn(3))
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="init_process_group"):
            optim.SophiaH([p], process_group=object())
        model = torch.nn.Linear(3, 2)
        batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
        for operator_class in (optim.HessianOperator, optim.GGNOperator, optim.EmpiricalFisherOperator):
            with pytest.raises(ValueError, match=f"{operator_class.__name__}: process_group was given but "
                                                 "torch.distributed is not initialized"):
                operator_class(model, torch.nn.functional.cross_entropy, batch, process_group=object())
        with pytest.raises(ValueError, match="SharpnessMonitor: process_group was given"):
            optim.SharpnessMonitor(model, torch.nn.functional.cross_entropy, process_group=object())


# float32 under FSDP2: the ranks reduce the gradients in another order than one process does, and the steps carry
# that rounding forward. Measured after 20 steps (2 and 4 gloo ranks, 2026-12-02; largest |parameter| ~0.9): at
# most 1.3e-6 for AdamW, LowRankAdamW (five refactorizations), the Stiefel optimizers and SophiaH; AdaHessian, whose
# finite-difference Hz divides the gradients' rounding by h ~ 5e-3 at every one of its 20 refreshes, 2.1e-4; with
# hessian="ggn-fd" (the difference is of the outputs, which every rank computes as one process does) 3.0e-6.
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
FLOAT32_FD_EVERY_STEP_TOLERANCE = dict(rtol=1e-3, atol=1e-3)  # AdaHessian, refreshed on every step


def assert_every_optimizer_matches(ranks: list[dict], single: dict, float32: bool) -> None:
    """Every optimizer of ``job.run_every_fsdp_optimizer``: the ranks bitwise equal, and equal to one process."""
    assert set(ranks[0]["params"]) == set(single["params"]) == {
        "adamw_fused", "adamw_foreach", "lowrank", "refactorizer_torch_adamw", *job.FSDP_STIEFEL_OPTIMIZERS,
        *job.SECOND_ORDER_CASES}
    assert ranks[0]["refactorizations"] == single["refactorizations"] == job.FSDP_LOWRANK_STEPS // 4
    for name, expected in single["params"].items():
        for rank in range(1, len(ranks)):
            for i, (a, b) in enumerate(zip(ranks[0]["params"][name], ranks[rank]["params"][name])):
                assert torch.equal(a, b), f"{name}: parameter {i} differs between ranks 0 and {rank}"
        if float32:
            tolerance = FLOAT32_FD_EVERY_STEP_TOLERANCE if name == "adahessian" else FLOAT32_TOLERANCE
        else:
            tolerance = dict(rtol=1e-7, atol=1e-9) if name in job.SECOND_ORDER_CASES else {}
        assert len(ranks[0]["params"][name]) == len(expected)
        for i, (p, e) in enumerate(zip(ranks[0]["params"][name], expected)):
            assert p.dtype == e.dtype == (torch.float32 if float32 else torch.float64)
            torch.testing.assert_close(p, e, **(tolerance or dict(rtol=1e-10, atol=1e-12)),
                                       msg=lambda m: f"{name}, parameter {i}: {m}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_float32_every_optimizer_matches_single_process(results, resharded, world_size):
    """Every optimizer in float32 on 2 and 4 gloo ranks, 20 steps (five refactorizations, SophiaH refreshed every
    3 steps, AdaHessian every step): equal to one float32 process on the global batch within FLOAT32_TOLERANCE."""
    ranks = case_results(results if world_size == 2 else resharded,
                         "fsdp_float32" if world_size == 2 else "fsdp4_float32")
    assert len(ranks) == world_size
    assert_every_optimizer_matches(ranks, job.run_every_fsdp_optimizer(None, 1, torch.float32), float32=True)


def test_hsdp_every_optimizer_matches_single_process(hsdp_results):
    """HSDP (fully_shard over a 2-D DeviceMesh ("replicate", "shard") of 4 gloo ranks: parameters
    (Replicate(), Shard(0)), each rank on a quarter of the batch): AdamW (fused and foreach), LowRankAdamW across five
    refactorizations, RSDM (both samplings), RiemannianSGD, RiemannianAdam, SophiaH and AdaHessian (hessian="fd"),
    20 steps in float64: every rank equal, and equal to one process on the global batch to float64 rounding."""
    ranks = case_results(hsdp_results, "hsdp")
    assert len(ranks) == 4
    assert set(ranks[0]["placements"]) == {"(Replicate(), Shard(dim=0))"}
    assert_every_optimizer_matches(ranks, job.run_every_fsdp_optimizer(None, 1), float32=False)


def test_curvature_of_a_ddp_model_is_that_of_the_global_batch_on_every_rank(results):
    # Each rank holds an uneven share (3 rows and 5); the operators of the DDP model all-reduce each product and
    # the row counts, so every rank gets the curvature of the whole batch: the single process given both shares.
    ranks = case_results(results, "curvature_ddp")
    single = job.run_curvature(None, WORLD_SIZE)
    for key, expected in single.items():
        for rank, result in enumerate(ranks):
            got = result[key]
            if key == "monitor":
                for field, value in expected.items():
                    assert got[field] == pytest.approx(value, rel=1e-9), f"rank {rank}: monitor {field}"
                continue
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, key=key, rank=rank: f"rank {rank}, {key}: {m}")
    for key in ("hessian", "ggn", "fisher", "top_eigenvalues", "params"):
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)  # one all-reduce, one result
    for rank, result in enumerate(ranks):  # the plain module with the group given: the same operator
        torch.testing.assert_close(result["explicit_group"], single["hessian"], rtol=1e-10, atol=1e-12)
