"""Builds optim._C: the C++ CPU kernels always, the CUDA kernels when CUDA can be compiled.

CUDA kernels are compiled when the installed torch is a CUDA build (torch.version.cuda) and a CUDA toolkit is found
(CUDA_HOME); whether a GPU is visible is irrelevant, so a GPU-less build machine produces the same extension.

Environment switches:
  OPTIM_NO_EXTENSION=1   pure-Python install: no compiled kernels, every op uses its reference.
  OPTIM_NO_CUDA=1        build only the CPU kernels even where CUDA could be compiled.
  OPTIM_DEBUG=1          -O0 -g (and -G for device code) instead of optimized code.
  TORCH_CUDA_ARCH_LIST   CUDA targets; default "9.0a;8.0+PTX": Hopper machine code (sm_90a) plus PTX that any
                         GPU from Ampere on can JIT-compile.
"""

import glob
import os
import sys

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def get_extensions():
    if _flag("OPTIM_NO_EXTENSION"):
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = _flag("OPTIM_DEBUG")
    root = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and not _flag("OPTIM_NO_CUDA")

    optimization = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-math-errno: sqrt need not set errno; -fno-trapping-math: a comparison may run speculatively (no code here
    # reads floating-point exception flags). Without them the update loops (sqrt, clamps, selects) stay scalar.
    # -ffp-contract=off: no fused multiply-add where the source has a multiply and an add. The CPU kernels run
    # baseline, AVX2 or AVX-512 code chosen at run time (csrc/common/cpu_isa.h); without contraction all three give
    # the same bits, and paths that must agree bit for bit (a reset step vs zeroing the state then stepping) do.
    extra_compile_args = {"cxx": optimization + ["-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                                                 "-fdiagnostics-color=always"]}
    extra_link_args = []
    # at::parallel_for is header code: without -fopenmp its `omp parallel` is ignored and every CPU kernel runs on
    # one thread. Only where torch itself runs on OpenMP (Linux wheels; macOS clang has no -fopenmp).
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    define_macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a;8.0+PTX")
        extra_compile_args["nvcc"] = optimization + ["--expt-relaxed-constexpr", "-lineinfo"]
        if debug:
            extra_compile_args["nvcc"].append("-G")
        define_macros.append(("OPTIM_WITH_CUDA", None))
        extension = CUDAExtension
        sources = cpp_sources + cuda_sources
    else:
        extension = CppExtension
        sources = cpp_sources
    return [
        extension(
            name="optim._C",
            sources=sources,
            include_dirs=[os.path.join(root, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            define_macros=define_macros,
        )
    ]


def get_cmdclass():
    if _flag("OPTIM_NO_EXTENSION"):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    class PersistentBuildExtension(BuildExtension):
        # pip's editable install compiles in a throwaway folder, so every reinstall recompiled every translation unit
        # (minutes on 2 cores); in build/temp ninja recompiles only what changed (seconds when nothing did).
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "temp")

    return {"build_ext": PersistentBuildExtension.with_options(use_ninja=True)}


setup(ext_modules=get_extensions(), cmdclass=get_cmdclass())
