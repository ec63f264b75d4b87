"""optim._library: loading the extension, the fallback to the references, and has_kernel."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import optim


def run_python(code: str, *, hide_extension: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the extension loads once per process).

    ``hide_extension`` makes ``import optim._C`` fail, as on a machine where it was never built.
    """
    prelude = "import sys; sys.modules['optim._C'] = None\n" if hide_extension else ""
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, timeout=120)


def test_missing_extension_warns_once_and_falls_back_to_the_reference():
    result = run_python("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import optim
            import optim.fused
        messages = [str(w.message) for w in caught if w.category is optim._library.ExtensionWarning]
        assert len(messages) == 1, messages
        assert "pip install --no-build-isolation" in messages[0], messages[0]
        assert not optim.has_kernel("fused_adamw_", "cpu")
        import torch
        p = torch.nn.Parameter(torch.randn(10))
        p.grad = torch.randn(10)
        before = p.detach().clone()
        optim.AdamW([p], lr=0.1).step()
        assert not torch.equal(before, p.detach())
        print("ok")
        """, hide_extension=True, OPTIM_REQUIRE_EXTENSION="0")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_required_extension_missing_is_an_import_error():
    result = run_python("import optim\n", hide_extension=True, OPTIM_REQUIRE_EXTENSION="1")
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "OPTIM_REQUIRE_EXTENSION=1" in result.stderr


def test_disabled_extension_uses_references_silently():
    result = run_python("""
        import warnings
        warnings.simplefilter("error")
        import optim
        assert not optim.has_kernel("fused_adamw_", "cpu")
        print("ok")
        """, OPTIM_DISABLE_EXTENSION="1", OPTIM_REQUIRE_EXTENSION="0")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize("op", ["fused_adamw_", "optim::fused_adamw_", torch.ops.optim.fused_adamw_,
                                torch.ops.optim.fused_adamw_.default])
def test_has_kernel_accepts_names_and_ops(op):
    expected = optim._library.extension_loaded()
    assert optim.has_kernel(op, "cpu") is expected
    assert optim.has_kernel(op, torch.device("cpu")) is expected
    assert optim.has_kernel(op, "meta") is False
