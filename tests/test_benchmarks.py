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
