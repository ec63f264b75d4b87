"""Test set-up shared by every family.

* ``OPTIM_REQUIRE_EXTENSION`` defaults to 1 here: a test run without the compiled kernels is an error, not a quiet
  run of the references against themselves. Set it to 0 explicitly to test a pure-Python install.
* ``DEVICES`` parametrizes a test over CPU and CUDA; the CUDA case carries the ``cuda`` marker and is skipped without
  a GPU, unless ``OPTIM_REQUIRE_CUDA=1`` (set on the GPU machine) turns that skip into a failure.
"""

import os

os.environ.setdefault("OPTIM_REQUIRE_EXTENSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import optim  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
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
