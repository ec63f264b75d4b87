"""The GPU check: build, CUDA tests and headline benchmarks in one budgeted call (``bash benchmarks/gpu_check.sh``).

Made for a lent GPU machine with 15 minutes of device time in all and 10 minutes per command: one call finishes
within ``GPU_CHECK_BUDGET_S`` seconds of wall time (default 480). Stages run in order of value, each under its own
deadline (never past the overall one), and each appends its log and results under ``$OUT`` (else ``./bench_out``) as
it goes, so a stage that runs out of time still leaves what it finished:

1. ``build``: ``pip install --no-build-isolation --no-deps -e .`` for ``TORCH_CUDA_ARCH_LIST=9.0a`` only, with
   ``MAX_JOBS=16``, after a preflight that finds the CUDA headers the ATen CUDA headers include (cuBLAS, cuSPARSE,
   cuSOLVER) and ``libcudart`` (under ``CUDA_HOME`` or a pip-installed ``nvidia`` package) and fails in plain words
   before nvcc would; the build time goes into the summary.
2. ``tests``: ``pytest -m cuda`` with ``OPTIM_REQUIRE_CUDA=1`` (a skipped CUDA test fails) and a per-test timeout;
   a crash or a hang ends this stage, not the script. JUnit XML gives the counts and the failures.
3. ``bench:<name>``: ``python -m benchmarks <name> --gpu-headline`` for each name of :data:`HEADLINE_ORDER` (each
   benchmark's headline size set takes <= 45 s on an H200); each finished record is appended to ``results.jsonl``.
4. ``summary.md``: what ran, what failed and what the deadline cut, the test counts, the headline table (ours, the
   peer, the ratio, from :mod:`benchmarks._report`). Written after every stage, so it is there even if the call is
   killed.

Files under ``$OUT`` (the device tool brings back at most 8): ``summary.md``, ``build.log``, ``tests.log``,
``tests.xml``, ``bench.log``, ``results.jsonl``.

``GPU_CHECK_DRY=1`` runs the same stages on a CPU machine with CPU stand-ins: the build without nvcc
(``OPTIM_NO_CUDA=1``, ``setup.py build_ext`` into a scratch folder, incremental through ``build/temp``), the CPU op tests instead of the CUDA ones (``GPU_CHECK_DRY_TESTS``), the benchmarks at their
``--quick`` headline sizes on ``--device cpu``. ``tests/test_gpu_check.py`` runs it in CI, so that the script is never
first tried on the GPU.

Peers: the wheels listed in ``benchmarks/peer-wheels.txt``, downloaded into ``.whl/`` (command in that file) and
carried to the machine, are installed from there (``--no-index``) into ``/tmp/site`` when ``.whl/`` holds any.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

# Most valuable first: what is cut by the deadline is what matters least.
HEADLINE_ORDER = ("steps", "sophia", "hvp", "stiefel", "lowrank")
DEFAULT_BUDGET_S = 480.0
# Per-stage caps (seconds), each further capped by what is left of the budget.
STAGE_CAPS_S = {"build": 240.0, "tests": 150.0, "bench": 75.0}
# Left at the end for the summary and for killing a stage that overran.
RESERVE_S = 10.0
PER_TEST_TIMEOUT_S = 60
DRY_TESTS = "tests/fused/test_ops.py tests/lowrank/test_ops.py"
# The headers ATen/cuda/CUDAContextLight.h includes, which a toolkit from pip packages keeps outside CUDA_HOME.
CUDA_HEADERS = ("cusparse.h", "cublas_v2.h", "cusolverDn.h")
OUTPUT_FILES = ("summary.md", "build.log", "tests.log", "tests.xml", "bench.log", "results.jsonl")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Stage:
    name: str
    status: str = "not run"  # ok | failed | cut by the deadline | skipped | not run
    seconds: float = 0.0
    note: str = ""


@dataclass
class Check:
    out: str
    budget_s: float
    dry: bool
    started: float = field(default_factory=time.monotonic)
    stages: list[Stage] = field(default_factory=list)
    device: str = ""
    env: dict = field(default_factory=lambda: dict(os.environ))

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started) - RESERVE_S

    def deadline(self, kind: str) -> float:
        cap = float(os.environ.get(f"GPU_CHECK_{kind.upper()}_S", STAGE_CAPS_S[kind]))
        return min(cap, self.remaining())

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)


def run_logged(command: list[str], log_path: str, timeout_s: float, env: dict) -> tuple[int | None, float]:
    """Run ``command`` in its own process group, appending its output to ``log_path`` and echoing it.

    Returns (exit code, seconds); the code is None when the deadline killed the group (SIGTERM, then SIGKILL).
    """
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        if timeout_s <= 0:
            log.write("not started: no time left in the budget\n")
            return None, 0.0
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, text=True, errors="replace", bufsize=1)

        def copy_output():
            for line in process.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=5.0)
        seconds = time.monotonic() - started
        log.write(f"[{'killed at the deadline' if code is None else f'exit {code}'} after {seconds:.1f} s]\n")
    return code, seconds


def _finish(stage: Stage, code: int | None, seconds: float, timeout_s: float) -> None:
    stage.seconds = seconds
    if code is None:
        stage.status = "cut by the deadline" if timeout_s > 0 else "not run"
        stage.note = (f"stopped after {timeout_s:.0f} s" if timeout_s > 0 else "no time left") + \
            (f"; {stage.note}" if stage.note else "")
    else:
        stage.status = "ok" if code == 0 else "failed"
        if code != 0:
            stage.note = f"exit code {code}" + (f"; {stage.note}" if stage.note else "")


# ------------------------------------------------------------------------------------------------------ stages


@dataclass
class BuildPaths:
    """What the CUDA build needs beyond ``CUDA_HOME``: extra include and library folders, and a link to make."""

    cpath: list[str] = field(default_factory=list)
    library_path: list[str] = field(default_factory=list)
    cudart_soname: str | None = None  # a versioned libcudart.so.N with no libcudart.so beside it (pip's layout)
    problem: str | None = None


def cuda_build_paths(cuda_home: str | None, site_packages: list[str]) -> BuildPaths:
    """Find the headers of :data:`CUDA_HEADERS` and ``libcudart`` under ``cuda_home``, then the pip ``nvidia``
    packages in ``site_packages`` (``nvidia/<pkg>/include`` and ``lib``; CUDA 13's single ``nvidia/cu13``).

    Folders outside ``cuda_home`` go to ``cpath`` / ``library_path``; ``problem`` names what is found nowhere.
    """
    home_include = [os.path.join(cuda_home, "include")] if cuda_home else []
    home_lib = [os.path.join(cuda_home, d) for d in ("lib64", "lib")] if cuda_home else []
    pip_include = [d for site in site_packages for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))]
    pip_lib = [d for site in site_packages for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))]
    paths, missing = BuildPaths(), []
    for header in CUDA_HEADERS:
        found = next((d for d in home_include + pip_include if os.path.exists(os.path.join(d, header))), None)
        if found is None:
            missing.append(header)
        elif found in pip_include and found not in paths.cpath:
            paths.cpath.append(found)
    cudart = next((d for d in home_lib + pip_lib if os.path.exists(os.path.join(d, "libcudart.so"))), None)
    if cudart is None:
        versioned = sorted(f for d in home_lib + pip_lib for f in glob.glob(os.path.join(d, "libcudart.so.*")))
        if versioned:
            paths.cudart_soname = versioned[0]
        else:
            missing.append("libcudart.so")
    elif cudart in pip_lib:
        paths.library_path.append(cudart)
    if missing:
        where = [cuda_home or "(no CUDA_HOME)"] + [os.path.join(site, "nvidia") for site in site_packages]
        paths.problem = (f"missing {', '.join(missing)} (looked in {', '.join(where)}): install the CUDA toolkit's "
                         "cuBLAS, cuSPARSE and cuSOLVER headers and cudart, or point CUDA_HOME at a full toolkit")
    return paths


def link_cudart(versioned: str, folder: str = "/tmp/gpu_check_cudart") -> str:
    """A folder holding ``libcudart.so`` -> ``versioned``, for ``-lcudart`` (pip ships only the versioned name)."""
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, "libcudart.so")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(versioned, link)
    return folder


def stage_build(check: Check) -> None:
    stage = Stage("build")
    check.stages.append(stage)
    env = dict(check.env)
    env.setdefault("MAX_JOBS", "16")
    if check.dry:
        env["OPTIM_NO_CUDA"] = "1"
        stage.note = "dry run: CPU kernels only (OPTIM_NO_CUDA=1)"
    else:
        env["TORCH_CUDA_ARCH_LIST"] = env.get("GPU_CHECK_ARCH", "9.0a")
        preflight = subprocess.run(
            [sys.executable, "-c", "import site, torch, torch.utils.cpp_extension as c; "
             "import json; print(json.dumps([torch.version.cuda, c.CUDA_HOME, site.getsitepackages()]))"],
            capture_output=True, text=True, env=env)
        if preflight.returncode != 0:
            stage.status, stage.note = "failed", "preflight: torch does not import: " + preflight.stderr[-300:]
            return
        torch_cuda, cuda_home, sites = json.loads(preflight.stdout)
        if not torch_cuda:
            stage.status, stage.note = "failed", "preflight: this torch is a CPU build; no CUDA kernel can be built"
            return
        if not cuda_home:
            # setup.py would quietly build the CPU kernels only, and every CUDA test would then fail on a missing kernel
            stage.status, stage.note = "failed", "preflight: no CUDA toolkit (CUDA_HOME unset, no nvcc on PATH)"
            return
        paths = cuda_build_paths(cuda_home, sites)
        if paths.problem:
            stage.status, stage.note = "failed", f"preflight: {paths.problem}"
            return
        if paths.cudart_soname:
            paths.library_path.append(link_cudart(paths.cudart_soname))
        extra = {key: dirs for key, dirs in (("CPATH", paths.cpath), ("LIBRARY_PATH", paths.library_path)) if dirs}
        for key, dirs in extra.items():
            env[key] = os.pathsep.join(dirs + ([env[key]] if env.get(key) else []))
        stage.note = f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={env['MAX_JOBS']}" + \
            "".join(f", {key} += {os.pathsep.join(dirs)}" for key, dirs in extra.items())
    timeout_s = check.deadline("build")
    if check.dry:
        # Compiles (incrementally, in build/temp) into a scratch folder: reinstalling would rewrite optim/_C*.so in
        # place while the process that runs this dry run (pytest, in CI) has it loaded.
        command = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib",
                   os.path.join("/tmp", f"gpu_check_build_lib_{os.getpid()}")]
    else:
        command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    code, seconds = run_logged(command, check.path("build.log"), timeout_s, env)
    _finish(stage, code, seconds, timeout_s)
    if stage.status == "ok":
        stage.note = f"built in {seconds:.0f} s; " + stage.note
        check.env = env  # the tests and benchmarks import what was just built, with the same paths
        device = "cpu" if check.dry else "cuda"
        probe = subprocess.run([sys.executable, "-c", f"import optim; print(optim.has_kernel('fused_adamw_', "
                                f"'{device}'))"], capture_output=True, text=True, env=env)
        if probe.stdout.strip() != "True":
            stage.status = "failed"
            stage.note += f"; built, but optim has no compiled {device} kernel: {probe.stderr.strip()[-300:]}"


def _has_module(name: str, env: dict) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True).returncode == 0


def stage_tests(check: Check) -> Stage:
    stage = Stage("tests")
    check.stages.append(stage)
    env = dict(check.env, OPTIM_REQUIRE_EXTENSION="1", PYTHONUNBUFFERED="1")
    xml = check.path("tests.xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15", f"--junitxml={xml}"]
    if check.dry:
        command += shlex.split(os.environ.get("GPU_CHECK_DRY_TESTS", DRY_TESTS)) + ["-m", "not cuda"]
        stage.note = "dry run: CPU op tests instead of the CUDA ones"
    else:
        env["OPTIM_REQUIRE_CUDA"] = "1"
        command += ["-m", "cuda"]
    if _has_module("pytest_timeout", env):
        command.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    else:
        stage.note += ("; " if stage.note else "") + "pytest-timeout missing: the stage deadline is the only timeout"
    timeout_s = check.deadline("tests")
    code, seconds = run_logged(command, check.path("tests.log"), timeout_s, env)
    _finish(stage, code, seconds, timeout_s)
    counts = junit_counts(xml)
    if counts:
        stage.note = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
                      + (f"; failed: {', '.join(counts['failures'][:20])}" if counts["failures"] else "")
                      + (f"; {stage.note}" if stage.note else ""))
    return stage


def junit_counts(path: str) -> dict | None:
    """Passed / failed (errors included) / skipped counts and failed test ids from pytest's JUnit XML."""
    if not os.path.exists(path):
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return None
    passed = failed = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        outcome = {child.tag for child in case}
        if outcome & {"failure", "error"}:
            failed += 1
            failures.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        elif "skipped" in outcome:
            skipped += 1
        else:
            passed += 1
    return {"passed": passed, "failed": failed, "skipped": skipped, "failures": failures}


def stage_benchmark(check: Check, name: str, json_dir: str) -> None:
    stage = Stage(f"bench:{name}")
    check.stages.append(stage)
    device = "cpu" if check.dry else "cuda"
    command = [sys.executable, "-m", "benchmarks", name, "--gpu-headline", "--device", device, "--out", json_dir]
    if check.dry:
        command.append("--quick")
    env = dict(check.env, PYTHONUNBUFFERED="1")
    if check.dry:
        env.setdefault("OMP_NUM_THREADS", "1")
    timeout_s = check.deadline("bench")
    record_path = os.path.join(json_dir, f"{name}.json")
    if os.path.exists(record_path):
        os.remove(record_path)
    code, seconds = run_logged(command, check.path("bench.log"), timeout_s, env)
    _finish(stage, code, seconds, timeout_s)
    if code == 0 and os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as file:
            record = json.load(file)
        with open(check.path("results.jsonl"), "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
    elif code == 0:
        stage.status, stage.note = "failed", f"exit 0 but no {name}.json was written"


# ----------------------------------------------------------------------------------------------------- summary


def read_records(path: str) -> dict[str, dict]:
    records = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            for line in file:
                if line.strip():
                    record = json.loads(line)
                    records[record["benchmark"]] = record
    return records


def write_summary(check: Check) -> str:
    from ._report import headlines, markdown

    elapsed = time.monotonic() - check.started
    lines = ["# GPU check" + (" (dry run on CPU: stand-ins, not a GPU measurement)" if check.dry else ""), "",
             f"Device: {check.device or '?'}", "",
             f"Budget {check.budget_s:.0f} s, used {elapsed:.0f} s. Command: `bash benchmarks/gpu_check.sh`"
             + (" with GPU_CHECK_DRY=1" if check.dry else "") + ".", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    for stage in check.stages:
        note = stage.note.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {stage.name} | {stage.status} | {stage.seconds:.0f} | {note} |")
    counts = {status: sum(s.status == status for s in check.stages)
              for status in ("ok", "failed", "cut by the deadline", "not run", "skipped")}
    lines += ["", "Stages: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n), ""]
    records = read_records(check.path("results.jsonl"))
    if records:
        table = markdown([row for row in headlines(records)], records)
        lines += ["## Headline comparisons", "", *table.splitlines()[2:]]
    text = "\n".join(lines) + "\n"
    with open(check.path("summary.md"), "w", encoding="utf-8") as file:
        file.write(text)
    return text


def describe_device(check: Check) -> str:
    probe = ("import torch, platform; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "
             "platform.processor() or platform.machine(); print(f'{d}; torch {torch.__version__} cuda "
             "{torch.version.cuda}; python {platform.python_version()}')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=check.env)
    text = result.stdout.strip() or f"torch does not import: {result.stderr.strip()[-200:]}"
    if not check.dry:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        if smi.returncode == 0:
            text += f"; nvidia-smi: {smi.stdout.strip()}"
    return text


def install_peer_wheels(check: Check) -> None:
    wheels = sorted(glob.glob(".whl/*.whl"))
    if not wheels:
        return
    stage = Stage("peers")
    check.stages.append(stage)
    target = "/tmp/site"
    code, seconds = run_logged([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--no-compile", "--no-cache-dir", "--upgrade", "--target", target, *wheels],
                               check.path("build.log"), min(60.0, check.remaining()), check.env)
    _finish(stage, code, seconds, 60.0)
    stage.note = f"{len(wheels)} wheels from .whl/" + (f"; {stage.note}" if stage.note else "")
    if code == 0:
        path = check.env.get("PYTHONPATH")
        check.env["PYTHONPATH"] = target + (os.pathsep + path if path else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = argv or list(HEADLINE_ORDER)
    unknown = [n for n in names if n not in HEADLINE_ORDER]
    if unknown:
        print(f"gpu_check: unknown headline benchmark(s) {unknown}; choose from {list(HEADLINE_ORDER)}",
              file=sys.stderr)
        return 2
    out = os.environ.get("OUT") or "bench_out"
    os.makedirs(out, exist_ok=True)
    for name in OUTPUT_FILES:  # a rerun into the same folder starts clean
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    check = Check(out=out, budget_s=float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                  dry=_flag("GPU_CHECK_DRY"))
    check.env.update(PYTHONUNBUFFERED="1")
    json_dir = os.path.join("/tmp", f"gpu_check_json_{os.getpid()}")
    os.makedirs(json_dir, exist_ok=True)
    print(f"== gpu_check: budget {check.budget_s:.0f} s{' (dry run on CPU)' if check.dry else ''}; output in {out}",
          flush=True)
    if not check.dry:
        install_peer_wheels(check)
    check.device = describe_device(check)
    print(f"== device: {check.device}", flush=True)
    print("== build", flush=True)
    stage_build(check)
    write_summary(check)
    if check.stages[-1].status != "ok":
        for skipped in ["tests", *(f"bench:{n}" for n in names)]:
            check.stages.append(Stage(skipped, "skipped", note="the build did not finish"))
    else:
        print("== tests", flush=True)
        stage_tests(check)
        write_summary(check)
        for name in names:
            print(f"== benchmark {name} (headline sizes)", flush=True)
            stage_benchmark(check, name, json_dir)
            write_summary(check)
    text = write_summary(check)
    print("\n" + text, flush=True)
    return 0 if all(stage.status == "ok" for stage in check.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
