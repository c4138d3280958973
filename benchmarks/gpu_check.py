"""The device check: one call of under 10 minutes on a lent GPU, always leaving a complete report.

On a lent device (a 15-minute lease: machine start, this call and idle time together), from the repository root:

    make gpu-check GPU_PY=python3     # with OUT set: python3 -m benchmarks.gpu_check --out $OUT/gpu-check-report.md
    python -m benchmarks.gpu_check --dry              # the same steps on CPU, tiny sizes, what needs CUDA skipped

The report's junit XML (every test's outcome) lands beside it as gpu-check-report-junit.xml.

Sections, most valuable first so that a run cut short keeps what matters; every step under its own time limit
(LIMITS; never past TOTAL_LIMIT, 580 s) and recorded (status, seconds, output) even when it fails:
  1. Environment: python, torch, CUDA, device, nvcc, compute-sanitizer, the pytest plugins;
  2. Build: `setup.py build_ext --inplace` for the present GPU's arch alone (TORCH_CUDA_ARCH_LIST
     when set), which setup.py records beside the library for tests/test_gpu.py's arch test;
  3. Tests: tests/test_gpu.py and tests/test_triton_kernels.py without the gpu_sweep cases (tests/kernel_helpers.py:
     sweep), on pytest-xdist workers when installed (the device_long tests started first), each test under
     pytest-timeout when installed; junit XML lands beside the report, and so does a test log (tests/conftest.py,
     SKD_TEST_LOG) written as tests end: the report names the failures with their tracebacks and the slowest
     tests even when the step is stopped at its limit;
  4. Elastic: benchmarks/elastic_latency.py on ViT-S and ViT-B, batch 64, bf16 (ELASTIC_ARGS, ELASTIC_EXTRA_ARGS);
     benchmarks/elastic_profile.py at ViT-S batch 64 (host vs GPU time per forward); benchmarks/column_major.py's
     gemm table (F.linear on ElasticViT's weight views vs contiguous blocks, batch 1 and 64); benchmarks/sdpa_routes.py
     (SDPA on head-major copies of the activations vs of the kept weights, ViT-S and ViT-B batch 64, bf16);
     benchmarks/elastic_capture.py (ElasticViT.capture's CUDA graphs, plain and frozen, vs eager and vs the captured
     extracted model, batch 1 and 64); benchmarks/piad_step.py (a 1/3-MACs PIAD step vs a full one, ViT-S batch 64
     and 256, bf16 autocast, against the dense models of both widths, and its kernel time by kind of work);
     benchmarks/elastic_profile.py --train (a training step's host vs GPU time);
     benchmarks/elastic_compile.py at batch 1 under CUDA graphs (graph count, compiled vs eager and vs the
     compiled extracted model); benchmarks/wpac_cost.py (WPAC on 1024 samples vs a plain forward+backward, ViT-S,
     and its peak memory at 1024 vs 256 samples);
  5. Profile: torch.profiler per op at ViT-B sizes: kernel time vs the call's wall time (the gap is launch and
     host overhead), achieved GB/s (taylor_scores) or TFLOP/s (weighted_covariance, prefix_linear, the attention
     ops: prefix_attention on the fused qkv and prefix_attention_separate, on Triton's one kernel and on the
     automatic choice, copies + SDPA);
  6. Benchmarks: the table of benchmarks/kernels.py (ratios to copy bandwidth and cuBLAS, and the attention ops'
     to the copy + SDPA path);
  7. Sanitizer: compute-sanitizer memcheck and racecheck side by side over benchmarks/sanitizer_driver.py (tail
     shapes): the CUDA C++ backend in every dtype, Triton in SANITIZER_TRITON_DTYPE only.
The report goes to benchmarks/gpu-check-report.md (or --out), rewritten after every section. The gpu_sweep cases
left out of step 3, on a lease of their own: `python3 -m pytest -n 8 -m gpu_sweep tests/test_gpu.py
tests/test_triton_kernels.py` after a build.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.metadata
import importlib.util
import io
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = Path(__file__).with_name("gpu-check-report.md")
SECTIONS = ("Environment", "Build", "Tests", "Elastic", "Profile", "Benchmarks", "Sanitizer")
# Seconds per step on the GPU. Measured on an H200 (session 5, 16 cores): the build for sm_90 alone 32 s, the
# profile 8 s, the benchmark table 26 s; the tests did not finish in 180 s with every sweep case (serial: 44 %;
# 8 xdist workers: 78 % in 150 s), nor memcheck/racecheck in 60 s each over every backend and dtype.
# Session 10 (H200): build 29 s, the quick tests ~99 % done at 160 s, elastic latency 12 s, memcheck 62 s and
# racecheck 69 s; elastic_compile's batch-1 CUDA-graph run ~45 s. Session 11 (H200, a fresh machine): the build
# was stopped at 45 s with 6 of 9 objects built (34 s more finished it), test_gpu.py alone on 16 workers took
# 135 s, elastic_compile with 2 repeats ~50 s. Session 13 (H200, a fresh machine): build 42 s; the tests stopped
# at 185 s with 136 not started (the device="cpu" twins, 18-48 s each, are now left to CI); elastic steps 11-16 s
# each (gemm and sdpa routes ~20 s), compile 57 s; memcheck 70 s and racecheck 77 s side by side. The elastic
# section's steps share its limit; the sanitizer, last, gets what is left. Session 15 (H200): build 41 s, tests
# 159 s, the elastic steps 146 s in all, memcheck 63 s and racecheck 72 s side by side (the sanitizer's limit gave
# 10 s, and the tests' 10 s, to the elastic section: its new WPAC cost step and ViT-B's SDPA routes).
LIMITS = {"build": 80, "tests": 160, "elastic": 210, "profile": 15, "bench": 30, "sanitizer": 85}
# within LIMITS["elastic"], in this order; a step gets what is left of the section's limit if less
ELASTIC_LIMITS = {"elastic latency": 25, "elastic profile": 25, "gemm routes": 25, "sdpa routes": 35,
                  "elastic capture": 25, "piad step": 30, "train profile": 30, "elastic compile": 70,
                  "wpac cost": 40}
# The whole call, well inside a 15-minute lease that also pays for the machine's start; a step never runs
# past it (its limit shrinks to what is left, or it is skipped).
TOTAL_LIMIT = 580
# A step with less time than this left is skipped.
MIN_STEP = 10
# A command past its time gets SIGINT this long before its limit, SIGKILL at it (run_process).
STOP_GRACE = 5
TAIL_CHARS = 3000
TEST_FILES = ("tests/test_gpu.py", "tests/test_triton_kernels.py")
# One test's limit (pytest-timeout, when installed): a hung kernel fails its test instead of eating the step.
TEST_TIMEOUT = 90
# Tests still running this long before the step's limit finish; those not started are skipped (tests/conftest.py
# reads SKD_TEST_DEADLINE), so pytest still prints its summary and writes the junit file.
TEST_GRACE = 25
ELASTIC_ARGS = ["--device", "cuda", "--models", "vit_small", "vit_base", "--batches", "64", "--dtypes", "bf16",
                "--repeats", "3"]
DRY_ELASTIC_ARGS = ["--device", "cpu", "--models", "vit_digits", "--batches", "1", "--dtypes", "fp32",
                    "--repeats", "1", "--threads", "1"]
PROFILE_ARGS = ["--device", "cuda", "--model", "vit_small_patch16_224", "--batch", "64", "--dtype", "bf16",
                "--iters", "20"]
DRY_PROFILE_ARGS = ["--iters", "5", "--rows", "5"]
# A training step's host vs GPU time and op counts, elastic vs extracted: is PIAD's step host-bound? 4 steps: the
# profiler's parsing of 10 took more than the step's 20 s on the H200 (session 14)
TRAIN_PROFILE_ARGS = [*PROFILE_ARGS[:-1], "4", "--train"]
DRY_TRAIN_PROFILE_ARGS = ["--iters", "3", "--rows", "5", "--train"]
# F.linear on ElasticViT's weight views vs on contiguous blocks: at batch 1 the host's cost per GEMM (an elastic
# forward's addmm took 26 µs of CPU to the extracted model's 17 on the H200, session 11), at batch 64 the GPU's.
GEMM_ARGS = ["--device", "cuda", "--tables", "gemm", "--dtypes", "bf16", "--batches", "1", "64", "--repeats", "3"]
DRY_GEMM_ARGS = ["--tables", "gemm", "--dtypes", "fp32", "--batches", "1", "--repeats", "1", "--threads", "1"]
CAPTURE_ARGS = ["--models", "vit_small", "--batches", "1", "64", "--dtype", "bf16", "--repeats", "3"]
# Issue 14's PIAD target (a 1/3-MACs step <= 0.4x a full one, ViT-S) in PIAD's GPU setting, bf16 autocast
# (host-bound on the H200: 0.98x at batch 64, 0.85x at 256, session 14). Its --compile (PIADTrainer(compile=True))
# compiles for minutes there, more than this check has: run it on its own.
PIAD_STEP_ARGS = ["--device", "cuda", "--amp", "--model", "vit_small_patch16_224", "--batch", "64", "256",
                  "--repeats", "3", "--kernels", "--dense"]
DRY_PIAD_STEP_ARGS = ["--model", "vit_digits", "--batch", "8", "--repeats", "1", "--threads", "1", "--kernels",
                      "--dense"]
# ViT-B too since session 15: GPU-bound at batch 64, where the activation copies' bytes count more than launches
SDPA_ROUTES_ARGS = ["--device", "cuda", "--models", "vit_small_patch16_224", "vit_base_patch16_224", "--batches", "64",
                    "--dtypes", "bf16", "--repeats", "3"]
DRY_SDPA_ROUTES_ARGS = ["--models", "vit_digits", "--batches", "8", "--repeats", "1", "--threads", "1"]
# Batch 1 under CUDA graphs (reduce-overhead): torch 2.11's Dynamo once broke it into 27 graphs (H200).
COMPILE_ARGS = ["--device", "cuda", "--dtype", "bf16", "--batch", "1", "--mode", "reduce-overhead", "--repeats", "2"]
DRY_COMPILE_ARGS = ["--model", "digits", "--batch", "1", "--repeats", "1", "--compile-backend", "eager"]
# WPAC's cost on the design's sizes (1024 samples vs a plain forward+backward; peak memory 4x256 vs 256 samples),
# last in the section: it gets what the others leave (session 15: 146 s of them)
WPAC_COST_ARGS = ["--device", "cuda", "--samples", "1024", "--memory-samples", "256", "--batch", "64", "--repeats", "2"]
DRY_WPAC_COST_ARGS = ["--device", "cpu", "--model", "vit_digits", "--samples", "32", "--memory-samples", "16",
                      "--batch", "8", "--repeats", "1", "--threads", "1"]
# Further elastic_latency.py arguments for both runs: the budget widths unaligned (1, floor-uniform) and in multiples
# of 8 side by side, the comparison the H200's slow odd-width dense models asked for (RESULTS.md, "GPU").
ELASTIC_EXTRA_ARGS: list[str] = ["--multiple-of", "1", "8"]
# Triton autotunes (compiles and runs every config) under the sanitizer too: one dtype keeps it in the limit.
SANITIZER_TRITON_DTYPE = "bfloat16"


@dataclass
class Step:
    """One step's outcome as the report shows it; markdown text goes in as is, other text in a code block."""

    name: str
    status: str  # ok, FAIL ..., TIMEOUT ..., partial (the benchmark budget ran out) or skipped
    seconds: float
    text: str
    markdown: bool = False


class Budget:
    """The call's clock: a step's limit is its own (LIMITS) or what is left of TOTAL_LIMIT, if less."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def limit(self, step: str) -> float:
        return max(0.0, min(LIMITS[step], TOTAL_LIMIT - self.elapsed()))


def _tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "…" + text[-TAIL_CHARS:]


@dataclass
class Ran:
    """A finished (or killed) command: its status, seconds and output."""

    status: str
    seconds: float
    stdout: str
    stderr: str


# Runs argv[1:] with SIGINT at its default action (exec keeps it; an ignored signal would stay ignored). Not
# Popen's preexec_fn: the sanitizer's two checks start from threads, where preexec_fn is unsafe.
_SIGINT_DEFAULT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execvp(sys.argv[1], sys.argv[1:])"]


def run_process(cmd: list[str], limit: float, env: dict[str, str] | None = None) -> Ran:
    """Runs cmd in the repository root, output captured; never raises for a failing or hanging command.

    cmd runs in its own process group. STOP_GRACE seconds before `limit` the group gets SIGINT (pytest then
    prints its summary and writes its junit file; the sanitizer's target stops), and at `limit` SIGKILL: the
    xdist workers and the sanitizer's target are children that would otherwise outlive it and hold its pipes.
    cmd starts with SIGINT's default action: a check run in the background (where the shell ignores SIGINT, and
    children inherit that) would otherwise never see it, and pytest would die at the kill without its summary.
    """
    t0 = time.monotonic()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        p = subprocess.Popen([*_SIGINT_DEFAULT, *cmd], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    except OSError as e:
        return Ran("FAIL", time.monotonic() - t0, "", str(e))
    with p:
        try:
            out, err = p.communicate(timeout=max(limit - STOP_GRACE, 0.0))
            status = "ok" if p.returncode == 0 else f"FAIL (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            status = f"TIMEOUT ({limit:.0f} s)"
            _signal_group(p.pid, signal.SIGINT)
            try:
                out, err = p.communicate(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(p.pid, signal.SIGKILL)
                out, err = p.communicate()  # everything printed before the stop
            _signal_group(p.pid, signal.SIGKILL)  # children the interrupt left running
    return Ran(status, time.monotonic() - t0, out, err)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def run_command(name: str, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> Step:
    """run_process as a report step: the command and its output's tail."""
    r = run_process(cmd, limit, env)
    return Step(name, r.status, r.seconds, f"$ {' '.join(cmd)}\n{_tail(r.stdout + r.stderr)}")


def run_here(name: str, fn: Callable[[], object]) -> Step:
    """Runs fn in this process (the dry run: no interpreter start-up per step), its output captured."""
    t0 = time.monotonic()
    buf = io.StringIO()
    status = "ok"
    with contextlib.redirect_stdout(buf):
        try:
            fn()
        except Exception:  # the report records any failure and the check goes on
            status = "FAIL"
            buf.write(traceback.format_exc())
    return Step(name, status, time.monotonic() - t0, _tail(buf.getvalue()))


def skipped(name: str, why: str) -> Step:
    return Step(name, "skipped", 0.0, why)


def out_of_time(name: str) -> Step:
    return skipped(name, f"the check's {TOTAL_LIMIT} s were spent before this step")


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, under CUDA_HOME/bin, or in the usual toolkit folders."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", "/opt/nvidia"]
    for root in filter(None, roots):
        for cand in (Path(root) / "bin" / name, *Path(root).glob(f"*/{name}"), *Path(root).glob(f"*/*/{name}")):
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return None


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _installed(distribution: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version(distribution: str) -> tuple[int, ...]:
    """An installed distribution's (major, minor), (0,) when it is not installed."""
    installed = _installed(distribution)
    return tuple(int(p) for p in re.findall(r"\d+", installed)[:2]) if installed else (0,)


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for the build: the environment's, else the present GPU's alone (one arch compiles
    in about a third of the default list's time; the default list is for wheels and `make`)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def environment(cuda: bool) -> Step:
    t0 = time.monotonic()
    lines = [f"python {platform.python_version()} ({sys.executable})", f"torch {torch.__version__}, "
             f"CUDA runtime {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}"]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s); "
                     f"build arch list: {cuda_arch_list()}")
    else:
        lines.append("device: none (dry run on CPU)")
    lines.append(f"CPUs: {os.cpu_count()}; " + ", ".join(f"{d} {_installed(d) or 'not installed'}" for d in
                                                          ("triton", "timm", "transformers", "pytest-xdist",
                                                           "pytest-timeout")))
    for tool in ("nvcc", "compute-sanitizer"):
        lines.append(f"{tool}: {find_tool(tool) or 'not found'}")
    nvcc = find_tool("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        lines.append(f"nvcc version: {out[-1] if out else '?'}")
    return Step("environment", "ok", time.monotonic() - t0, "\n".join(lines))


def build(cuda: bool, budget: Budget) -> Step:
    if not cuda:
        return skipped("build", "dry run: not rebuilt (rebuilding in place would replace the CUDA build of this "
                       "checkout); the importable skd_kernels._C is used")
    nvcc = find_tool("nvcc")
    env = {"MAX_JOBS": str(os.cpu_count() or 4), "TORCH_CUDA_ARCH_LIST": cuda_arch_list()}
    if nvcc:
        env["CUDA_HOME"] = str(Path(nvcc).resolve().parent.parent)
    # torch's ninja build always runs (ninja recompiles the objects whose command line, arch flags included,
    # changed) and setup.py records the arch list beside the library.
    step = run_command("build", [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], budget.limit("build"),
                       env)
    step.text = f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}\n{step.text}"
    return step


def pytest_command(cuda: bool, junit: Path) -> list[str]:
    """The tests' pytest call: -v names each test as it ends (a killed run still shows which failed), -rfE
    lists failures and errors at the end, the junit file has every result."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "--durations=15", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-m", "not gpu_sweep"]
    if importable("xdist"):
        cmd += ["-n", str(min(16, os.cpu_count() or 1))]  # the tests are mostly Triton compiles: CPU-bound
        if _version("pytest-xdist") >= (2, 5):  # xdist_group (the 40 GiB tests, one at a time) needs loadgroup
            cmd += ["--dist", "loadgroup"]
    if importable("pytest_timeout"):
        cmd += [f"--timeout={TEST_TIMEOUT}"]
    return cmd + list(TEST_FILES if cuda else TEST_FILES[:1])


# A failed or erroring test in pytest -v output: "tests/x.py::t[p] FAILED", xdist's "FAILED tests/x.py::t[p]",
# the -rfE summary's "FAILED tests/x.py::t[p] - message", and a file that failed to collect ("ERROR tests/x.py").
_FAILED = re.compile(r"(?:(?:FAILED|ERROR) (tests/\S+\.py(?:::\S+)?))|(?:(tests/\S+\.py(?:::\S+)?) (?:FAILED|ERROR))")


def failing_tests(output: str) -> list[str]:
    """The failed or erroring tests named in pytest -v output, in order of appearance, each once."""
    return list(dict.fromkeys(a or b for a, b in _FAILED.findall(output)))


# A line of tests/conftest.py's SKD_TEST_LOG: "PASSED tests/x.py::t[p] (call) 12.3 s", a failure's traceback below it.
_LOGGED = re.compile(r"^(PASSED|FAILED|SKIPPED) (tests/.+?) \((\w+)\) ([\d.]+) s$", flags=re.M)


def log_summary(logged: str, slowest: int = 8) -> str:
    """Counts and the slowest tests from the test log, which is written as tests finish (a killed run has it)."""
    rows = _LOGGED.findall(logged)
    if not rows:
        return "empty"
    counts = dict.fromkeys(("PASSED", "FAILED", "SKIPPED"), 0)
    for outcome, *_ in rows:
        counts[outcome] += 1
    slow = sorted(rows, key=lambda r: -float(r[3]))[:slowest]
    return (", ".join(f"{n} {o.lower()}" for o, n in counts.items() if n) + "; slowest: "
            + ", ".join(f"{r[1].split('::', 1)[-1]} {float(r[3]):.0f} s" for r in slow))


def logged_failures(logged: str) -> list[str]:
    """The failed tests in the test log, in order, each once."""
    return list(dict.fromkeys(m.group(2) for m in _LOGGED.finditer(logged) if m.group(1) == "FAILED"))


def _failure_tracebacks(logged: str) -> str:
    """The failures' tracebacks from the test log (pytest prints its own only in its summary, at the end)."""
    heads = list(_LOGGED.finditer(logged))
    failures = [logged[h.start():nxt.start() if nxt else len(logged)].strip()
                for h, nxt in zip(heads, [*heads[1:], None], strict=True) if h.group(1) == "FAILED"]
    return "" if not failures else "\n\nFailures, as logged:\n" + _tail("\n\n".join(failures))


def junit_summary(junit: Path) -> str:
    """Counts from a pytest junit file: tests, passed, failed, errors, skipped (and how many for the time)."""
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    outcome = {"failure": 0, "error": 0, "skipped": 0, "passed": 0}
    for_time = 0
    for case in cases:
        kind = next((c.tag for c in case if c.tag in outcome), "passed")
        outcome[kind] += 1
        for_time += kind == "skipped" and "time budget" in (case.find("skipped").get("message") or "")
    return (f"{sum(outcome.values())} tests: {outcome['passed']} passed, {outcome['failure']} failed, "
            f"{outcome['error']} errors, {outcome['skipped']} skipped ({for_time} of them: the step's time spent)")


def tests(cuda: bool, budget: Budget, junit: Path) -> list[Step]:
    limit = budget.limit("tests")
    cmd = pytest_command(cuda, junit)
    log = junit.with_name(junit.name.replace("-junit.xml", "") + "-tests.log")
    for path in (junit, log):
        path.unlink(missing_ok=True)  # only this run's
    env = {"SKD_TEST_DEADLINE": str(time.time() + limit - TEST_GRACE), "SKD_TEST_LOG": str(log)}
    if cuda:  # tests/conftest.py leaves out the device="cpu" cases (CI runs them): 18-48 s each on the H200
        env["SKD_DEVICE_ONLY"] = "1"
    r = run_process(cmd, limit, env)
    output = r.stdout + r.stderr
    logged = log.read_text() if log.exists() else ""
    # The log names a failure when its test ends (ids with spaces whole); -v output is the fallback.
    failed = logged_failures(logged) if _LOGGED.search(logged) else failing_tests(output)
    lines = [f"$ {' '.join(cmd)}", f"failed: {', '.join(failed) if failed else 'none'}",
             f"junit ({junit.name}): " + (junit_summary(junit) if junit.exists() else "not written (killed)"),
             f"test log ({log.name}): {log_summary(logged)}"]
    status = f"{r.status}; {len(failed)} tests failed" if failed else r.status
    steps = [Step(" ".join(TEST_FILES if cuda else TEST_FILES[:1]), status, r.seconds,
                  "\n".join(lines) + "\n\n" + _tail(output) + _failure_tracebacks(logged))]
    if not cuda:
        steps.append(skipped(TEST_FILES[1], "dry run: the Triton tests need CUDA here (on CPU they are the "
                                            "interpreter's, run by the ordinary test suite)"))
    return steps


def _below_steps(markdown: str) -> str:
    """A benchmark's markdown with its headings demoted below the report's step headings (###)."""
    return re.sub(r"^#{1,3} ", "#### ", markdown, flags=re.M)


def elastic(cuda: bool, budget: Budget) -> list[Step]:
    """ElasticViT against its extracted dense model: benchmarks/elastic_latency.py's table (ms per forward),
    benchmarks/elastic_profile.py (host ms to enqueue vs the GPU's kernel ms: is it host-bound?),
    benchmarks/column_major.py's gemm routes (the GEMMs on weight views), benchmarks/sdpa_routes.py (attention on
    copied activations vs reordered weights: training, no-grad and captured), benchmarks/elastic_capture.py (CUDA
    graphs, plain and frozen), benchmarks/piad_step.py (a training step at 1/3 of the MACs vs a full one, batch 64
    and 256, each against the dense model of its width, and what kind of kernels each spends its time in),
    elastic_profile.py --train (a training step's host vs GPU time), benchmarks/elastic_compile.py (graphs for
    three widths, the compiled and CUDA-graph speeds) and benchmarks/wpac_cost.py (WPAC's time vs a plain
    forward+backward, its peak memory vs samples)."""
    steps, section_end = [], budget.elapsed() + budget.limit("elastic")
    for name, module, args, dry_args in (
            ("elastic latency", "elastic_latency", [*ELASTIC_ARGS, *ELASTIC_EXTRA_ARGS],
             [*DRY_ELASTIC_ARGS, *ELASTIC_EXTRA_ARGS]),
            ("elastic profile", "elastic_profile", PROFILE_ARGS, DRY_PROFILE_ARGS),
            ("gemm routes", "column_major", GEMM_ARGS, DRY_GEMM_ARGS),
            ("sdpa routes", "sdpa_routes", SDPA_ROUTES_ARGS, DRY_SDPA_ROUTES_ARGS),
            ("elastic capture", "elastic_capture", CAPTURE_ARGS, None),
            ("piad step", "piad_step", PIAD_STEP_ARGS, DRY_PIAD_STEP_ARGS),
            ("train profile", "elastic_profile", TRAIN_PROFILE_ARGS, DRY_TRAIN_PROFILE_ARGS),
            ("elastic compile", "elastic_compile", COMPILE_ARGS, DRY_COMPILE_ARGS),
            ("wpac cost", "wpac_cost", WPAC_COST_ARGS, DRY_WPAC_COST_ARGS)):
        limit = min(ELASTIC_LIMITS[name], section_end - budget.elapsed())
        if not cuda and dry_args is None:
            steps.append(skipped(name, "CUDA graphs need a CUDA device (dry run)"))
            continue
        if limit < MIN_STEP:
            steps.append(out_of_time(name))
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{module}", *(args if cuda else dry_args)]
        r = run_process(cmd, limit, None if cuda else {"OMP_NUM_THREADS": "1"})
        if r.status != "ok":
            steps.append(Step(name, r.status, r.seconds, f"$ {' '.join(cmd)}\n{_tail(r.stdout + r.stderr)}"))
            continue
        note = "" if cuda else "\n\nDry run: the digits ViT on a shared CPU, a check that the step runs."
        steps.append(Step(name, "ok", r.seconds, f"`{' '.join(cmd)}`\n\n{_below_steps(r.stdout.strip())}{note}",
                          markdown=True))
    return steps


def sanitizer_plan(device: torch.device) -> list[str]:
    """benchmarks/sanitizer_driver.py's --backend values: every backend on `device`, Triton in one dtype."""
    from benchmarks import sanitizer_driver

    return [f"{b}:{SANITIZER_TRITON_DTYPE}" if b == "triton" else b for b in sanitizer_driver.backends_for(device)]


def sanitizer(cuda: bool, budget: Budget) -> list[Step]:
    if not cuda:
        from benchmarks import sanitizer_driver

        cpu = torch.device("cpu")
        plan = dict(map(sanitizer_driver.parse_backend, sanitizer_plan(cpu)))
        return [run_here("sanitizer driver (CPU, no sanitizer)", lambda: sanitizer_driver.run(cpu, list(plan), plan)),
                skipped("memcheck", "compute-sanitizer needs a CUDA device"),
                skipped("racecheck", "compute-sanitizer needs a CUDA device")]
    tool = find_tool("compute-sanitizer")
    if tool is None:
        return [skipped(t, "compute-sanitizer not found") for t in ("memcheck", "racecheck")]
    driver = [sys.executable, "-m", "benchmarks.sanitizer_driver", "--device", "cuda"]
    for spec in sanitizer_plan(torch.device("cuda")):
        driver += ["--backend", spec]
    limit = budget.limit("sanitizer")
    cmds = {}
    for check in ("memcheck", "racecheck"):
        cmd = [tool, "--tool", check, "--error-exitcode", "3"]
        if check == "racecheck":
            cmd += ["--racecheck-report", "all"]
        cmds[check] = cmd + driver
    # Side by side: under the sanitizer the driver is CPU-bound (instrumentation, Triton's JIT), the GPU idle.
    # Without the caching allocator every tensor is its own allocation, so memcheck sees a read past a
    # tensor's end instead of into a neighbour in the same cached block.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {c: pool.submit(run_command, c, cmd, limit, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
                   for c, cmd in cmds.items()}
        return [f.result() for f in futures.values()]


def _profile_cases(device: str, dry: bool) -> list[tuple[str, Callable[[], object], float, str]]:
    """(name, call, work, unit): work is bytes that must move (GB/s) or floating-point operations (TFLOP/s)."""
    import skd_kernels  # after the build step
    from benchmarks import kernels
    from skd_kernels import _dispatch

    b, t, c, n, d, heads = (1, 17, 48, 64, 48, 3) if dry else (64, 197, 3072, 64 * 197, 768, 12)
    dtype = torch.bfloat16
    act = torch.randn(b, t, c, device=device, dtype=dtype)
    grad = torch.randn(b, t, c, device=device, dtype=dtype)
    x = torch.randn(n, d, device=device, dtype=dtype)
    w = torch.rand(n, device=device)
    weight = torch.randn(4 * d, d, device=device, dtype=dtype) / d**0.5
    bias = torch.randn(4 * d, device=device, dtype=dtype)
    r = d // heads
    k_out = 2 * d
    elt = act.element_size()
    qkv = torch.randn(b, t, 3 * d, device=device, dtype=dtype)  # rank-major: every head's full width r
    q, k, v = (torch.randn(b, t, d, device=device, dtype=dtype) for _ in range(3))
    attention_flops = 4 * b * heads * t * t * r  # q kᵀ and p v
    return [
        ("taylor_scores bf16", lambda: skd_kernels.taylor_scores(act, grad), 2 * act.numel() * elt, "GB/s"),
        (f"weighted_covariance bf16 G={heads}", lambda: skd_kernels.weighted_covariance(x, w, heads),
         2 * n * heads * r * r, "TFLOP/s"),
        ("weighted_covariance bf16 G=1", lambda: skd_kernels.weighted_covariance(x, w, 1), 2 * n * d * d, "TFLOP/s"),
        ("prefix_linear bf16 gelu", lambda: skd_kernels.prefix_linear(x, weight, bias, d, k_out, "gelu"),
         2 * n * d * k_out, "TFLOP/s"),
    ] + [
        # on CUDA Triton's kernel (forced) and the automatic choice, copies + SDPA (`via_sdpa`)
        (f"{op} bf16 H={heads} ({backend})", kernels._with_backend(backend, getattr(skd_kernels, op), *inputs, heads,
                                                                    r**-0.5), attention_flops, "TFLOP/s")
        for op, inputs in (("prefix_attention", (qkv,)), ("prefix_attention_separate", (q, k, v)))
        for backend in (_dispatch.select(qkv.device, dtype, op).name,) + (() if dry else ("triton",))
    ]


def profile(cuda: bool, budget: Budget) -> Step:
    """Per op: kernel time and wall time per call from torch.profiler, and the achieved rate; ops left when
    the step's time runs out are listed as not run (a step in this process cannot be killed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t0, limit = time.monotonic(), budget.limit("profile")
    device = "cuda" if cuda else "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    reps = 3 if not cuda else 20
    rows = ["| op | calls | wall / call (µs) | kernel / call (µs) | gap (µs) | kernels | achieved |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    status = "ok"
    try:
        cases = _profile_cases(device, dry=not cuda)
        for i, (name, fn, work, unit) in enumerate(cases):
            if time.monotonic() - t0 > limit:
                rows.append(f"\nTime budget ({limit:.0f} s) spent: {len(cases) - i} ops not profiled.")
                status = "partial"
                break
            fn()  # warm-up: autotuning, allocator, cuBLAS handles
            if cuda:
                torch.cuda.synchronize()
            with torch_profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / reps
            if cuda:
                kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / reps  # µs -> s
                names = sorted({e.name[:40] for e in kernels})
                rate = work / busy / (1e9 if unit == "GB/s" else 1e12) if busy else float("nan")
                rows.append(f"| {name} | {reps} | {wall * 1e6:.1f} | {busy * 1e6:.1f} | {(wall - busy) * 1e6:.1f} "
                            f"| {len(kernels) // reps}: {', '.join(names)} | {rate:.2f} {unit} |")
            else:
                rows.append(f"| {name} | {reps} | {wall * 1e6:.1f} | n/a (CPU) | n/a | n/a | n/a |")
    except Exception as e:  # the report records any failure and the check goes on
        return Step("profile", f"FAIL ({type(e).__name__})", time.monotonic() - t0, "\n".join(rows) + f"\n\n{e}",
                    markdown=True)
    note = "" if cuda else ("\n\nDry run: CUDA kernel times skipped (no CUDA device); wall times are CPU calls "
                            "at tiny sizes.")
    return Step("profile", status, time.monotonic() - t0, "\n".join(rows) + note, markdown=True)


def benchmarks(cuda: bool, budget: Budget) -> Step:
    """benchmarks/kernels.py's cases (ViT-B on the GPU, fp32 and bf16; ViT-S fp32 at batch 1 in the dry run),
    timed one by one, each row kept as it comes: cases left when the time budget runs out are listed as not run.
    """
    from benchmarks import kernels, sanitizer_driver

    t0, limit = time.monotonic(), budget.limit("bench")
    device = torch.device("cuda" if cuda else "cpu")
    backends = sanitizer_driver.backends_for(device)
    f32, bf16 = torch.float32, torch.bfloat16
    if cuda:
        model, batch, dtypes, fractions, prefix_dtypes = "vit_b", 64, [f32, bf16], (0.5, 1.0), [bf16]
    else:
        model, batch, dtypes, fractions, prefix_dtypes = "vit_s", 1, [f32], (1.0,), [f32]
    cases = (kernels.taylor_cases(device, backends, [model], dtypes, batch)
             + kernels.covariance_cases(device, backends, [model], dtypes, [batch])
             + kernels.prefix_cases(device, backends, [model], fractions, prefix_dtypes, batch)
             + kernels.attention_cases(device, backends, [model], fractions, prefix_dtypes, batch))
    targets = kernels.GPU_TARGETS if cuda else kernels.CPU_TARGETS
    note = "" if cuda else " Dry run: tiny sizes on a shared CPU, a check that the step runs, not a measurement."
    rows = [f"Device: {kernels.device_name(device)}. Ratio = baseline time / op time at p50 (higher is better).{note}",
            "",
            "| op | backend | dtype | shape | baseline | base ms | op ms | ratio | target |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    status = "ok"
    for i, case in enumerate(cases):
        if time.monotonic() - t0 > limit:
            rows.append(f"\nTime budget ({limit:.0f} s) spent: {len(cases) - i} cases not run.")
            status = "partial"
            break
        try:
            t = kernels.time_side_by_side({"op": case.run, "base": case.run_baseline}, 7 if cuda else 2, device)
        except Exception as e:  # the report records any failure and the check goes on
            rows.append(f"| {case.op} | {case.backend} | {case.dtype} | {case.shape} | FAIL: {e} | | | | |")
            status = "FAIL"
            continue
        ratio, target = t["base"].p50 / t["op"].p50, targets[case.op]
        rows.append(f"| {case.op} | {case.backend} | {str(case.dtype).removeprefix('torch.')} | {case.shape} | "
                    f"{case.baseline} | {t['base'].p50:.4f} | {t['op'].p50:.4f} | {ratio:.2f} | "
                    f">= {target:g} {'ok' if ratio >= target else 'MISS'} |")
    return Step("benchmark table", status, time.monotonic() - t0, "\n".join(rows), markdown=True)


def write_report(path: Path, dry: bool, sections: dict[str, list[Step]], total: float) -> None:
    out = ["# GPU check report", "",
           f"Mode: {'dry run on CPU (tiny sizes; steps needing CUDA are skipped)' if dry else 'CUDA device'}; "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {total:.0f} s in all.", "",
           "| section | step | status | seconds |", "| --- | --- | --- | --- |"]
    out += [f"| {sec} | {s.name} | {s.status} | {s.seconds:.1f} |" for sec, steps in sections.items() for s in steps]
    for sec, steps in sections.items():
        out += ["", f"## {sec}"]
        for s in steps:
            out += ["", f"### {s.name}: {s.status}", ""]
            out += [s.text] if s.markdown else ["```", s.text.rstrip(), "```"]
    path.write_text("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="run every step on CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_REPORT, help="the report file")
    args = parser.parse_args(argv)
    cuda = not args.dry
    if args.dry:
        torch.set_num_threads(1)  # a shared CPU: the dry run checks that the steps run, not speed
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry, or on the GPU machine")
    budget = Budget()
    if cuda:
        # Triton keeps autotuning results on disk (with the compiled kernels): a key tuned once, by one xdist
        # worker or step, is not compiled and timed config by config again by the others.
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    junit = args.out.resolve().with_name(args.out.stem + "-junit.xml")  # pytest runs in ROOT
    steps: dict[str, Callable[[], list[Step]]] = {
        "Environment": lambda: [environment(cuda)], "Build": lambda: [build(cuda, budget)],
        "Tests": lambda: tests(cuda, budget, junit), "Elastic": lambda: elastic(cuda, budget),
        "Profile": lambda: [profile(cuda, budget)], "Benchmarks": lambda: [benchmarks(cuda, budget)],
        "Sanitizer": lambda: sanitizer(cuda, budget)}
    assert tuple(steps) == SECTIONS
    sections: dict[str, list[Step]] = {}
    for section, run in steps.items():
        sections[section] = run() if budget.elapsed() < TOTAL_LIMIT - MIN_STEP else [out_of_time(section.lower())]
        # After every section: a check cut short (the lease's time limit) still leaves what it found.
        write_report(args.out, args.dry, sections, budget.elapsed())
    failed = [s.name for steps in sections.values() for s in steps if s.status not in ("ok", "skipped", "partial")]
    print(args.out.read_text().split("\n## ", 1)[0])  # the summary table, for a caller that sees only stdout
    print(f"report: {args.out}; " + (f"failed: {', '.join(failed)}" if failed else "every step ok or skipped"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
