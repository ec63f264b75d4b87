"""The Stiefel family's problems are tiny: on a busy 2-core machine LAPACK's thread pool makes a 12×6 QR take
milliseconds instead of microseconds, so the family runs on one thread (the multi-threaded kernel path has its own
test in test_ops.py)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
