"""Test set-up shared by every family.

* ``OPTIM_REQUIRE_EXTENSION`` defaults to 1 here: a test run without the compiled kernels is an error, not a quiet
  run of the references against themselves. Set it to 0 explicitly to test a pure-Python install.
* ``DEVICES`` parametrizes a test over CPU and CUDA; the CUDA case carries the ``cuda`` marker and is skipped without
  a GPU, unless ``OPTIM_REQUIRE_CUDA=1`` (set on the GPU machine) turns that skip into a failure.
* Every ``cuda``-marked test runs with deterministic cuDNN algorithms and without TF32 (``cuda_numerics``), so that
  a computation repeated in one test gives the same bits and float32 convolutions and matmuls keep float32
  precision against the float64 references; the previous settings are restored afterwards.
"""

import contextlib
import os

os.environ.setdefault("OPTIM_REQUIRE_EXTENSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import optim  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def batch_split_sizes(large: int = 21_000_000) -> list[int]:
    """Tensor sizes for one multi-tensor call that csrc/common/multi_tensor_apply.cuh must split into several launches.

    A launch holds at most 24-56 tensors (by list depth) and 320 chunks of 65536 elements, and a tensor that does not
    fit is carried into the next launch. 60 small tensors, one of 3 chunks at position 29 (the 30th tensor, where a
    4-list launch is full before its last chunk) and, at position 58, one of ``large`` elements (21M: 321 chunks, more
    than one launch holds) after the first launches were cut by the tensor count, so that a launch ends inside it and
    it continues in slot 0 of the next one.
    """
    sizes = [(i * 1237) % 4000 + 1 for i in range(60)]
    sizes[29] = 2 * 65536 + 3
    sizes.insert(58, large)
    return sizes


REQUIRE_EXTENSION = optim._library._env_flag("OPTIM_REQUIRE_EXTENSION")
REQUIRE_CUDA = optim._library._env_flag("OPTIM_REQUIRE_CUDA")


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        if REQUIRE_CUDA:
            pytest.fail("OPTIM_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@contextlib.contextmanager
def cuda_numerics():
    """cuDNN deterministic and not benchmarking (benchmark mode may pick another algorithm per call, and some
    algorithms accumulate with atomics in any order), TF32 off for cuBLAS and cuDNN (float32 would round its inputs
    to 10 mantissa bits); the previous values come back on exit."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32)
    cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = True, False, False, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _cuda_numerics(request):
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    with cuda_numerics():
        yield
