"""The numerics every cuda-marked test runs under (conftest.cuda_numerics): set inside, restored after."""

import pytest
import torch

from .conftest import cuda_numerics


def _settings():
    cudnn = torch.backends.cudnn
    return (cudnn.deterministic, cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32)


def test_cuda_numerics_sets_and_restores_even_on_error():
    cudnn = torch.backends.cudnn
    before = _settings()
    try:
        cudnn.deterministic, cudnn.benchmark = False, True
        torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32 = True, True
        with pytest.raises(RuntimeError, match="inside"):
            with cuda_numerics():
                assert _settings() == (True, False, False, False)
                raise RuntimeError("inside")
        assert _settings() == (False, True, True, True)
    finally:
        cudnn.deterministic, cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32 = before


def test_plain_tests_keep_torchs_defaults():
    """Not cuda-marked: the fixture leaves torch's defaults (cuDNN may use TF32, not forced deterministic)."""
    assert _settings() == (False, False, False, True)


@pytest.mark.cuda
def test_cuda_tests_run_deterministic_without_tf32():
    assert _settings() == (True, False, False, False)
