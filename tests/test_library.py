"""optim._library: loading the extension, the fallback to the references, and has_kernel."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import optim

from .test_compile import OP_CASES, _flat, op_call


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_an_op_in_an_autocast_region_computes_as_outside_it(name, dtype):
    # Autocast reached the ATen calls inside the kernels: the refactorization's matrix products came out in
    # bfloat16 and met its float32 factors ("expected scalar type Float but found BFloat16"), the attention
    # backward's tiles too. Each op decides its own precision, so autocast stops at its boundary (a kernel of the
    # dispatcher's autocast key, before the compiled kernel or the reference is chosen): bit for bit the results
    # outside the region.
    inputs, constants = OP_CASES[name]()
    call = op_call(name, constants)
    outside_inputs, autocast_inputs = copy.deepcopy(inputs), copy.deepcopy(inputs)
    expected = call(**outside_inputs)
    with torch.autocast("cpu", dtype=dtype):
        got = call(**autocast_inputs)
    if expected is not None:
        for a, b in zip(_flat(list(got) if isinstance(got, tuple) else got),
                        _flat(list(expected) if isinstance(expected, tuple) else expected)):
            assert a.dtype == b.dtype and torch.equal(a, b)
    for key in inputs:
        for a, b in zip(_flat(autocast_inputs[key]), _flat(outside_inputs[key])):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_manifold_functions_in_an_autocast_region_compute_as_outside_it(dtype):
    # A retraction or a projection called from a training step: autocast made their products bfloat16 (a tangent
    # off by 7e-3), and the polar factor of a float32 point came back as a bfloat16 matrix.
    S = optim.stiefel
    generator = torch.Generator().manual_seed(0)
    for shape in [(40, 10), (3, 12, 30)]:  # tall; a batch of wide matrices
        x = S.orthogonal_(torch.empty(shape), generator=generator)
        y = S.orthogonal_(torch.empty(shape), generator=generator)
        z = torch.randn(shape, generator=generator)
        xi = 0.05 * S.project_tangent(x, z)
        calls = {
            "distance_to_manifold": lambda: S.distance_to_manifold(x + 0.1 * z),
            "project_tangent": lambda: S.project_tangent(x, z),
            "riemannian_gradient canonical": lambda: S.riemannian_gradient(x, z, metric="canonical"),
            "riemannian_gradient grassmann": lambda: S.riemannian_gradient(x, z, manifold="grassmann"),
            "project_to_manifold polar": lambda: S.project_to_manifold(x + 0.1 * z),
            "project_to_manifold qr": lambda: S.project_to_manifold(x + 0.1 * z, method="qr"),
            "grassmann_distance": lambda: S.grassmann_distance(x, y),
            "polar_newton_schulz": lambda: S.polar_newton_schulz(x + xi),
            **{f"retract {method}": (lambda method=method: S.retract(x, xi, method=method))
               for method in ("qr", "polar", "cayley")},
        }
        for name, call in calls.items():
            outside = call()
            with torch.autocast("cpu", dtype=dtype):
                inside = call()
            assert inside.dtype == outside.dtype and torch.equal(inside, outside), (name, shape)


def test_an_optimizer_step_in_an_autocast_region_steps_as_outside_it():
    # Lightning's manual optimization steps inside the training step's autocast region: RSDM's orthogonal sampling
    # rotated in bfloat16 there (orthogonality defect 3e-6 against 4e-7), and LowRankAdamW's refactorization raised.
    from tests._models import TanhMLP

    def run(make, autocast):
        torch.manual_seed(0)
        model = TanhMLP()
        with torch.no_grad():
            optim.stiefel.orthogonal_(model.fc1.weight)
        opt, model = make(model)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 3, generator=generator)
            loss = torch.nn.functional.mse_loss(model(x), y)  # the same gradients either way
            opt.zero_grad()
            loss.backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.step()
        return [p.detach().clone() for p in model.parameters()]

    def stiefel(cls, **kwargs):
        return lambda model: (cls([{"params": [model.fc1.weight]}, {"params": [p for n, p in model.named_parameters()
                                   if n != "fc1.weight"], "manifold": None}], lr=1e-2, **kwargs), model)

    makers = {
        "RSDM-P": stiefel(optim.RSDM, rank=3, seed=0),
        "RSDM-O": stiefel(optim.RSDM, rank=3, seed=0, sampling="orthogonal"),
        "RiemannianSGD": stiefel(optim.RiemannianSGD, momentum=0.9),
        "RiemannianAdam": stiefel(optim.RiemannianAdam),
        "AdamW": lambda model: (optim.AdamW(model.parameters(), lr=1e-2), model),
        "LowRankAdamW": lambda model: (lambda m: (optim.LowRankAdamW(m, lr=1e-2, rank=None, every=1), m))(
            optim.to_low_rank(model, 2, target=["fc2"])),
    }
    for name, make in makers.items():
        for a, b in zip(run(make, True), run(make, False)):
            assert torch.equal(a, b), name
