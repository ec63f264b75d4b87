"""Smoke test of every benchmark's ``--quick`` mode on CPU: it runs, prints its table and writes its JSON record.

Nothing timed is asserted (timings belong to the benchmarks); what is checked is that each entry point works for a
newcomer running the README's demo command, and that the record carries its provenance.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import BENCHMARKS
from benchmarks.__main__ import main


@pytest.mark.benchmark
@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_quick_benchmark_writes_its_record(name, tmp_path, capsys):
    # One thread: a smoke run measures nothing, and multi-threaded BLAS on a busy 2-core machine can take minutes
    # per call (a 1024² Cayley retraction took 1.15 s on 2 threads vs 0.1 s on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_and_check(name, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _run_and_check(name, tmp_path, capsys):
    assert main([name, "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["benchmark"] == name and record["quick"] is True and record["device"] == "cpu"
    assert record["command"].startswith("python -m benchmarks ")
    assert record["torch_version"] and record["date_utc"]
    assert capsys.readouterr().out.strip(), "the benchmark printed no table"


def test_summary_picks_the_headlines_and_their_ratios(tmp_path):
    """``all``'s summary: ratios are the peer's time over ours, and a record without a peer row adds no headline."""
    from benchmarks._report import write_summary

    common = {"device": "cpu", "device_name": "test CPU", "torch_version": "x", "date_utc": "now",
              "command": "python -m benchmarks all", "quick": True}
    records = {
        "steps": {**common, "rows": [
            {"set": "s", "dtype": "float32", "impl": "optim.AdamW", "median_ms": 2.0},
            {"set": "s", "dtype": "float32", "impl": "torch fused", "median_ms": 3.0},
        ]},
        "stiefel": {**common, "step_rows": [
            {"size": "8x4", "impl": "ours: RSDM-P step", "median_ms": 0.5},
            {"size": "8x4", "impl": "geoopt Stiefel (cayley)", "median_ms": 5.0},
        ], "gap_rows": []},
        "spectrum": {**common, "cases": [{"name": "mlp", "rows": [
            {"task": "top eigenvalue", "method": "optim (Lanczos)", "seconds": 2.0, "relative_error": 1e-6},
            {"task": "top eigenvalue", "method": "optim (Lanczos, tol=0.01)", "seconds": 1.0,
             "relative_error": 1e-4},
            {"task": "top eigenvalue", "method": "PyHessian (power)", "seconds": 4.0, "relative_error": 1e-3,
             "compared_with": "optim (Lanczos, tol=0.01)"},
        ]}]},
        "sophia": {**common, "rows": [], "kernel_case": {"description": "GPT-2 shapes"}, "kernel_rows": [
            {"impl": "torch.optim.AdamW step", "median_ms": 1.2, "fraction_of_copy_bandwidth": 0.8},
            {"impl": "fused_sophia_ between refreshes", "median_ms": 1.0, "fraction_of_copy_bandwidth": 0.9},
        ]},
    }
    for name, record in records.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    # no hvp.json: skipped
    summary = write_summary(str(tmp_path), ["steps", "hvp", "spectrum", "sophia", "stiefel"])
    ratios = {(row["benchmark"], row["peer"]): row["ratio"] for row in summary["rows"]}
    assert ratios == {("steps", "torch.optim.AdamW (fused)"): 1.5, ("stiefel", "geoopt Stiefel (cayley)"): 10.0,
                      ("spectrum", "PyHessian (power)"): 4.0,
                      ("sophia", "torch.optim.AdamW(fused=True).step()"): pytest.approx(1.2)}
    sophia_kernel = next(row for row in summary["rows"] if row["benchmark"] == "sophia")
    assert sophia_kernel["what"] == "update alone, between refreshes (90% of copy bandwidth)"
    table = (tmp_path / "summary.md").read_text()
    assert "test CPU" in table and "| 1.50× |" in table and "| 10.00× |" in table
    assert json.loads((tmp_path / "summary.json").read_text())["headlines"] == summary["rows"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_attention_saved_graph_counts_the_tokens_by_tokens_tensors_only_for_eager():
    pytest.importorskip("transformers")
    from benchmarks.attention import saved_graph

    sdpa, eager = saved_graph("sdpa", 64, 1), saved_graph("eager", 64, 1)
    assert "_AttentionBackward" in sdpa["by_node_mib"] and "SoftmaxBackwardDataBackward0" in eager["by_node_mib"]
    assert "SoftmaxBackwardDataBackward0" not in sdpa["by_node_mib"]
    assert 0 < sdpa["total_mib"] < eager["total_mib"]


@pytest.mark.benchmark
def test_sophia_step_race_writes_its_record(tmp_path, capsys):
    """``python -m benchmarks.sophia_step_race`` (not part of ``all``): three rows, the ratio to torch's, JSON."""
    from benchmarks.sophia_step_race import main as race_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert race_main(["--repeats", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "sophia_step_race.json").read_text())
    assert record["benchmark"] == "sophia_step_race" and record["quick"] is True and record["repeats"] == 2
    assert [row["impl"].split(" ")[0] for row in record["rows"]] == ["torch.optim.AdamW", "optim.SophiaH",
                                                                     "optim.AdaHessian"]
    assert all(row["torch_over_ours"] > 0 for row in record["rows"])
    assert capsys.readouterr().out.strip()
