"""The CPU kernels with per-instruction-set loops (csrc/common/cpu_isa.h): the update kernels give the same bits with
every instruction set they dispatch to, and the ops that reduce in vector lanes (the cross-entropy HVP, the layer norm's
double backward) match their float64 oracles with each.

The extension is built for baseline x86-64 and runs AVX2 or AVX-512 copies of the per-chunk loops where the CPU has
them, chosen as ATen chooses its CPU capability (``ATEN_CPU_CAPABILITY=default|avx2|avx512`` lowers the choice).
Without FMA contraction (``-ffp-contract=off``) every copy computes the same IEEE operations in the same order, so
``fused_adamw_``, ``fused_sophia_`` and ``fused_adahessian_`` must agree bit for bit across the capabilities, for
every dtype, on sizes with vector tails, tiles (512) and chunks (16384) cut short, and misaligned views. Each
capability runs in a subprocess (ATen reads the variable once per process); the float64-reference tests of the ops
(tests/fused/test_ops.py, tests/hessian/test_second_order_ops.py) run with whatever this machine picks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import optim

CAPABILITIES = ("default", "avx2", "avx512")

SCRIPT = r"""
import sys
import torch
import optim

torch.manual_seed(0)
SIZES = [1, 7, 513, 4097, 2 * 16384 + 5]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
out = {"capability": torch.backends.cpu.get_cpu_capability()}


def misaligned(t):
    # a view one element into a larger buffer: the vector loops start unaligned
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    return view


def tensors(dtype, scale=1.0, positive=False):
    values = [scale * torch.randn(n, dtype=torch.float64) for n in SIZES]
    values = [v.abs() + 1e-3 if positive else v for v in values]
    return [misaligned(v.to(dtype)) for v in values]


for dtype in DTYPES:
    state = torch.float64 if dtype == torch.float64 else torch.float32
    name = str(dtype).removeprefix("torch.")
    for reset in (None, [i % 2 == 0 for i in range(len(SIZES))]):
        p, g, m, v = tensors(dtype, 0.1), tensors(dtype), tensors(state, 0.1), tensors(state, 0.01, True)
        steps = [torch.tensor(float(3 + i)) for i in range(len(SIZES))]
        torch.ops.optim.fused_adamw_(p, g, m, v, steps, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1,
                                     eps=1e-8, maximize=False, reset=reset)
        out[f"adamw {name} reset={reset is not None}"] = [p, m, v, steps]
    for curvature in sorted({dtype, state}, key=str):
        for variant in ("between", "products", "probes", "counters"):
            p, g, m, h = tensors(dtype, 0.1), tensors(dtype), tensors(state, 0.1), tensors(state, 1.0, True)
            products = tensors(curvature) if variant != "between" else []
            probes = [misaligned(torch.randint(0, 2, (n,)).to(curvature) * 2 - 1) for n in SIZES] \
                if variant == "probes" else []
            counters = dict(probe_seeds=[5] * len(SIZES), probe_offsets=[sum(SIZES[:i]) for i in range(len(SIZES))]) \
                if variant == "counters" else {}
            torch.ops.optim.fused_sophia_(p, g, m, h, products, probes, lr=1e-2, beta1=0.965, beta2=0.99, rho=0.04,
                                          weight_decay=0.1, eps=1e-12, maximize=variant == "probes", **counters)
            out[f"sophia {name} curvature {curvature} {variant}"] = [p, m, h]
        for refresh in (False, True):
            for power in (1.0, 0.5):
                p, g, m, v = tensors(dtype, 0.1), tensors(dtype), tensors(state, 0.1), tensors(state, 0.01, True)
                diagonals = tensors(curvature) if refresh else []
                torch.ops.optim.fused_adahessian_(p, g, m, v, diagonals, lr=1e-2, beta1=0.9, beta2=0.999,
                                                  weight_decay=0.1, eps=1e-4, hessian_power=power, step=4,
                                                  hessian_step=3, maximize=False)
                out[f"adahessian {name} curvature {curvature} refresh={refresh} power={power}"] = [p, m, v]
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not all(optim.has_kernel(op, "cpu") for op in ("fused_adamw_", "fused_sophia_",
                                                                        "fused_adahessian_")),
                    reason="needs the compiled CPU kernels")
def test_every_instruction_set_gives_the_same_bits(tmp_path):
    results = {}
    for capability in CAPABILITIES:
        path = tmp_path / f"{capability}.pt"
        environment = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "2"}
        subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=environment, check=True, timeout=300)
        results[capability] = torch.load(path, weights_only=True)
    baseline = results["default"]
    assert baseline["capability"] == "DEFAULT"
    for capability in CAPABILITIES[1:]:
        other = results[capability]
        assert other.keys() == baseline.keys()
        for key, tensors in baseline.items():
            if key == "capability":
                continue
            for k, (want, got) in enumerate(zip(tensors, other[key])):
                for i, (w, o) in enumerate(zip(want, got)):
                    assert torch.equal(w, o), (f"{key}: output {k}, tensor {i} differs between the baseline "
                                               f"kernels and {other['capability']}'s")


# The ops whose sums are vector reductions with the instruction set's lane count (so their bits differ between the
# sets; they update no state): their float64 tests, run under each capability. op -> (test file, -k selection).
REDUCING_OPS = {
    "cross_entropy_hvp": (os.path.join("hessian", "test_ops.py"), "cross_entropy_hvp"),
    "layer_norm_double_backward": (os.path.join("hessian", "test_layer_norm_route.py"), "test_op_"),
}


@pytest.mark.parametrize("op", list(REDUCING_OPS))
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_reducing_ops_match_float64_with_every_instruction_set(op, capability):
    if not optim.has_kernel(op, "cpu"):
        pytest.skip("needs the compiled CPU kernels")
    path, selection = REDUCING_OPS[op]
    tests = os.path.join(os.path.dirname(__file__), path)
    environment = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, "-k", selection]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
