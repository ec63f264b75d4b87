"""``benchmarks/gpu_check.sh`` before it ever meets a GPU: the dry run of every stage on CPU, the deadlines, the
CUDA build preflight.

The dry run is the script itself (``GPU_CHECK_DRY=1``): the build without nvcc, CPU op tests for the CUDA ones,
the headline benchmarks at ``--quick`` sizes. What is asserted is what the GPU call relies on: every stage ends ok
inside the budget, each leaves its log, the records arrive one per line as the benchmarks finish, the summary
names every stage, and at most 8 files come back (the device tool's limit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import BENCHMARKS
from benchmarks.gpu_check import HEADLINE_ORDER, OUTPUT_FILES, cuda_build_paths, junit_counts, run_logged

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DRY_BUDGET_S = 180  # the bound for the dry run


def _run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY="1", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=DRY_BUDGET_S + 60)


def _stage_rows(summary: str) -> dict[str, str]:
    rows = {}
    for line in summary.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("stage", "---"):
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.slow
@pytest.mark.benchmark
def test_dry_run_runs_every_stage_inside_the_budget(tmp_path):
    started = time.monotonic()
    result = _run_script(tmp_path, GPU_CHECK_BUDGET_S=str(DRY_BUDGET_S))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert elapsed < DRY_BUDGET_S + 15, f"the dry run took {elapsed:.0f} s"

    summary = (tmp_path / "summary.md").read_text()
    assert _stage_rows(summary) == {"build": "ok", "tests": "ok", **{f"bench:{n}": "ok" for n in HEADLINE_ORDER}}
    assert "dry run" in summary and "## Headline comparisons" in summary
    assert "| steps |" in summary and "% of copy bandwidth" in summary  # the ratio against the copy bandwidth

    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["benchmark"] for r in records] == list(HEADLINE_ORDER)
    assert all(r["headline"] is True and r["quick"] is True and r["device"] == "cpu" for r in records)
    by_name = {r["benchmark"]: r for r in records}
    assert {row["impl"] for row in by_name["sophia"]["kernel_rows"]} >= {
        "torch.optim.AdamW step", "fused_sophia_ between refreshes", "fused_adahessian_ between refreshes"}
    assert "train_rows" not in by_name["sophia"] and "gap_rows" not in by_name["stiefel"]
    assert [case["name"] for case in by_name["hvp"]["cases"]] == ["gpt"]
    assert {row["probes"] for row in by_name["hvp"]["cases"][0]["rows"]} == {1, 8}

    counts = junit_counts(str(tmp_path / "tests.xml"))
    assert counts["passed"] > 0 and counts["failed"] == 0
    for log in ("build.log", "tests.log", "bench.log"):
        assert (tmp_path / log).stat().st_size > 0
    produced = sorted(p.name for p in tmp_path.iterdir())
    assert set(produced) <= set(OUTPUT_FILES) and len(produced) <= 8, produced


@pytest.mark.slow
def test_a_stage_past_its_deadline_is_cut_and_the_rest_still_reported(tmp_path):
    # A one-second benchmark deadline: torch alone takes longer to import, so the benchmark is killed; the summary
    # says so, what finished before it (build, tests) is kept, and the exit code reports the cut.
    result = _run_script(tmp_path, "steps", GPU_CHECK_BENCH_S="1",
                         GPU_CHECK_DRY_TESTS="tests/test_gpu_check.py -k cuda_build_paths")
    assert result.returncode == 1, result.stdout[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert _stage_rows(summary) == {"build": "ok", "tests": "ok", "bench:steps": "cut by the deadline"}
    assert "killed at the deadline" in (tmp_path / "bench.log").read_text()
    assert not (tmp_path / "results.jsonl").exists()


def test_no_time_left_runs_nothing_and_says_so(tmp_path):
    result = _run_script(tmp_path, "steps", GPU_CHECK_BUDGET_S="5")  # below the summary reserve
    assert result.returncode == 1
    assert _stage_rows((tmp_path / "summary.md").read_text()) == {
        "build": "not run", "tests": "skipped", "bench:steps": "skipped"}


def test_unknown_benchmark_name_is_refused_before_anything_runs(tmp_path):
    result = _run_script(tmp_path, "nope")
    assert result.returncode == 2 and "unknown headline benchmark" in result.stderr
    assert not any(tmp_path.iterdir())


def test_run_logged_kills_the_whole_process_group_at_the_deadline(tmp_path):
    log = tmp_path / "log"
    marker = tmp_path / "child-survived"
    # a child that would outlive its parent if only the parent were killed
    command = ["bash", "-c", f"(sleep 4; touch {marker}) & echo started; sleep 60"]
    started = time.monotonic()
    code, seconds = run_logged(command, str(log), timeout_s=1.0, env=dict(os.environ))
    assert code is None and seconds < 10 and time.monotonic() - started < 15
    text = log.read_text()
    assert "started" in text and "killed at the deadline" in text
    time.sleep(4.5)
    assert not marker.exists()


def test_run_logged_returns_the_exit_code_and_appends(tmp_path):
    log = tmp_path / "log"
    assert run_logged(["bash", "-c", "echo one"], str(log), 10, dict(os.environ))[0] == 0
    assert run_logged(["bash", "-c", "echo two; exit 3"], str(log), 10, dict(os.environ))[0] == 3
    text = log.read_text()
    assert text.index("one") < text.index("two") and "exit 3" in text


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


def test_cuda_build_paths_finds_pip_headers_and_a_versioned_cudart(tmp_path):
    # The layout that broke a build: CUDA_HOME with nvcc and cudart's headers only, cuBLAS/cuSPARSE/cuSOLVER and
    # libcudart.so.13 (no unversioned link) in the pip package nvidia/cu13.
    home, site = tmp_path / "cuda", tmp_path / "site"
    _touch(home / "include" / "cuda_runtime.h")
    for header in ("cusparse.h", "cublas_v2.h", "cusolverDn.h"):
        _touch(site / "nvidia" / "cu13" / "include" / header)
    _touch(site / "nvidia" / "cu13" / "lib" / "libcudart.so.13")
    paths = cuda_build_paths(str(home), [str(site)])
    assert paths.problem is None
    assert paths.cpath == [str(site / "nvidia" / "cu13" / "include")]
    assert paths.cudart_soname == str(site / "nvidia" / "cu13" / "lib" / "libcudart.so.13")


def test_cuda_build_paths_adds_nothing_for_a_full_toolkit(tmp_path):
    home = tmp_path / "cuda"
    for header in ("cusparse.h", "cublas_v2.h", "cusolverDn.h"):
        _touch(home / "include" / header)
    _touch(home / "lib64" / "libcudart.so")
    paths = cuda_build_paths(str(home), [])
    assert (paths.cpath, paths.library_path, paths.cudart_soname, paths.problem) == ([], [], None, None)


def test_cuda_build_paths_names_what_is_missing(tmp_path):
    home = tmp_path / "cuda"
    _touch(home / "include" / "cublas_v2.h")
    paths = cuda_build_paths(str(home), [str(tmp_path / "site")])
    assert paths.problem.startswith("missing cusparse.h, cusolverDn.h, libcudart.so")
    assert str(home) in paths.problem


def test_every_headline_benchmark_is_registered():
    assert set(HEADLINE_ORDER) <= set(BENCHMARKS)


def test_peer_wheels_file_pins_every_peer():
    lines = [line.split("#")[0].strip() for line in (ROOT / "benchmarks" / "peer-wheels.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line)
    assert {"geoopt", "pytorch-optimizer", "pyhessian", "galore-torch", "curvlinops-for-pytorch",
            "hessian-eigenthings"} <= set(pins)
    assert pins["curvlinops-for-pytorch"] == "3.0.1" and all(pins.values())
