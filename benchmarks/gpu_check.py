"""The device check: a lent GPU's first ten minutes, in one report file.

    python -m benchmarks.gpu_check            # on the GPU machine (`make gpu-check`), its own python/torch
    python -m benchmarks.gpu_check --dry      # the same steps on CPU, tiny sizes, what needs CUDA skipped

Steps, each under its own time limit, each recorded (status, seconds, output tail) in the report even when
it fails, so one failure does not hide the rest:
  1. environment: python, torch, CUDA, device, nvcc, compute-sanitizer;
  2. build: `setup.py build_ext --inplace` against this python's torch (the default arch list);
  3. tests: tests/test_gpu.py and tests/test_triton_kernels.py on the GPU;
  4. compute-sanitizer memcheck and racecheck over benchmarks/sanitizer_driver.py (tail shapes);
  5. torch.profiler per op at ViT-B sizes: kernel time vs the call's wall time (the gap is launch and host
     overhead), achieved GB/s (taylor_scores) or TFLOP/s (weighted_covariance, prefix_linear, the attention
     ops: prefix_attention on the fused qkv and prefix_attention_separate, both Triton's one kernel);
  6. the benchmark table of benchmarks/kernels.py (ratios to copy bandwidth and cuBLAS, and the attention ops'
     to the copy + SDPA path).
The report goes to benchmarks/gpu-check-report.md (or --out), rewritten after every section. On a lent device:
    python3 -m benchmarks.gpu_check --out $OUT/gpu-check-report.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = Path(__file__).with_name("gpu-check-report.md")
SECTIONS = ("Environment", "Build", "Tests", "Sanitizer", "Profile", "Benchmarks")
# Seconds per step on the GPU, caps that add up to 10 minutes: nvcc for sm_80, sm_90 and PTX is the largest.
LIMITS = {"build": 240, "tests": 180, "memcheck": 60, "racecheck": 60, "bench": 60}
TAIL_CHARS = 3000


@dataclass
class Step:
    """One step's outcome as the report shows it."""

    name: str
    status: str  # ok, FAIL ..., TIMEOUT ..., partial (the benchmark budget ran out) or skipped
    seconds: float
    text: str


def _tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "…" + text[-TAIL_CHARS:]


def run_command(name: str, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> Step:
    """Runs cmd in the repository root, output captured; never raises for a failing or hanging command."""
    t0 = time.monotonic()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=limit)
        status, out = ("ok" if p.returncode == 0 else f"FAIL (exit {p.returncode})"), p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:  # what the command printed before it was killed (bytes or str)
        out = "".join(t.decode(errors="replace") if isinstance(t, bytes) else t for t in (e.stdout, e.stderr) if t)
        status = f"TIMEOUT ({limit:.0f} s)"
    except OSError as e:
        status, out = "FAIL", str(e)
    return Step(name, status, time.monotonic() - t0, f"$ {' '.join(cmd)}\n{_tail(out)}")


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


def environment(cuda: bool) -> Step:
    lines = [f"python {platform.python_version()} ({sys.executable})", f"torch {torch.__version__}, "
             f"CUDA runtime {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}"]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s)")
    else:
        lines.append("device: none (dry run on CPU)")
    for tool in ("nvcc", "compute-sanitizer"):
        lines.append(f"{tool}: {find_tool(tool) or 'not found'}")
    nvcc = find_tool("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        lines.append(f"nvcc version: {out[-1] if out else '?'}")
    return Step("environment", "ok", 0.0, "\n".join(lines))


def build(cuda: bool) -> Step:
    if not cuda:
        return skipped("build", "dry run: not rebuilt (rebuilding in place would replace the CUDA build of this "
                       "checkout); the importable skd_kernels._C is used")
    nvcc = find_tool("nvcc")
    env = {"MAX_JOBS": str(os.cpu_count() or 4)}
    if nvcc:
        env["CUDA_HOME"] = str(Path(nvcc).resolve().parent.parent)
    return run_command("build", [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], LIMITS["build"], env)


def tests(cuda: bool) -> list[Step]:
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if cuda:
        return [run_command("tests/test_gpu.py tests/test_triton_kernels.py",
                            [*pytest_cmd, "tests/test_gpu.py", "tests/test_triton_kernels.py"], LIMITS["tests"])]
    return [run_command("tests/test_gpu.py", [*pytest_cmd, "tests/test_gpu.py"], LIMITS["tests"]),
            skipped("tests/test_triton_kernels.py",
                    "dry run: the Triton tests need CUDA here (on CPU they are the interpreter's, run by the ordinary "
                    "test suite)")]


def sanitizer(cuda: bool) -> list[Step]:
    driver = [sys.executable, "-m", "benchmarks.sanitizer_driver"]
    if not cuda:
        from benchmarks import sanitizer_driver

        cpu = torch.device("cpu")
        return [run_here("sanitizer driver (CPU, no sanitizer)",
                         lambda: sanitizer_driver.run(cpu, sanitizer_driver.backends_for(cpu))),
                skipped("memcheck", "compute-sanitizer needs a CUDA device"),
                skipped("racecheck", "compute-sanitizer needs a CUDA device")]
    tool = find_tool("compute-sanitizer")
    if tool is None:
        return [skipped(t, "compute-sanitizer not found") for t in ("memcheck", "racecheck")]
    steps = []
    for check in ("memcheck", "racecheck"):
        cmd = [tool, "--tool", check, "--error-exitcode", "3"]
        if check == "racecheck":
            cmd += ["--racecheck-report", "all"]
        # Without the caching allocator every tensor is its own allocation, so memcheck sees a read past a
        # tensor's end instead of into a neighbour in the same cached block.
        steps.append(run_command(check, [*cmd, *driver, "--device", "cuda"], LIMITS[check],
                                 {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    return steps


def _profile_cases(device: str, dry: bool) -> list[tuple[str, Callable[[], object], float, str]]:
    """(name, call, work, unit): work is bytes that must move (GB/s) or floating-point operations (TFLOP/s)."""
    import skd_kernels  # after the build step

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
        (f"prefix_attention bf16 H={heads}", lambda: skd_kernels.prefix_attention(qkv, heads, r**-0.5),
         attention_flops, "TFLOP/s"),
        (f"prefix_attention_separate bf16 H={heads}",
         lambda: skd_kernels.prefix_attention_separate(q, k, v, heads, r**-0.5), attention_flops, "TFLOP/s"),
    ]


def profile(cuda: bool) -> Step:
    """Per op: kernel time and wall time per call from torch.profiler, and the achieved rate."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t0 = time.monotonic()
    device = "cuda" if cuda else "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    reps = 3 if not cuda else 20
    rows = ["| op | calls | wall / call (µs) | kernel / call (µs) | gap (µs) | kernels | achieved |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    try:
        for name, fn, work, unit in _profile_cases(device, dry=not cuda):
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
        return Step("profile", f"FAIL ({type(e).__name__})", time.monotonic() - t0, "\n".join(rows) + f"\n\n{e}")
    note = "" if cuda else ("\n\nDry run: CUDA kernel times skipped (no CUDA device); wall times are CPU calls "
                            "at tiny sizes.")
    return Step("profile", "ok", time.monotonic() - t0, "\n".join(rows) + note)


def benchmarks(cuda: bool) -> Step:
    """benchmarks/kernels.py's cases (ViT-B on the GPU, fp32 and bf16; ViT-S fp32 at batch 1 in the dry run),
    timed one by one, each row kept as it comes: cases left when the time budget runs out are listed as not run.
    """
    from benchmarks import kernels, sanitizer_driver

    t0 = time.monotonic()
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
        if time.monotonic() - t0 > LIMITS["bench"]:
            rows.append(f"\nTime budget ({LIMITS['bench']} s) spent: {len(cases) - i} cases not run.")
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
    return Step("benchmark table", status, time.monotonic() - t0, "\n".join(rows))


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
            out += [s.text] if "\n| --- |" in s.text else ["```", s.text.rstrip(), "```"]
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
    t0 = time.monotonic()
    steps: dict[str, Callable[[bool], list[Step]]] = {
        "Environment": lambda c: [environment(c)], "Build": lambda c: [build(c)], "Tests": tests,
        "Sanitizer": sanitizer, "Profile": lambda c: [profile(c)], "Benchmarks": lambda c: [benchmarks(c)]}
    assert tuple(steps) == SECTIONS
    sections: dict[str, list[Step]] = {}
    for section, run in steps.items():
        sections[section] = run(cuda)
        # After every section: a check cut short (the lease's time limit) still leaves what it found.
        write_report(args.out, args.dry, sections, time.monotonic() - t0)
    failed = [s.name for steps in sections.values() for s in steps if s.status not in ("ok", "skipped", "partial")]
    print(f"report: {args.out}; " + (f"failed: {', '.join(failed)}" if failed else "every step ok or skipped"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
