"""`python -m benchmarks.gpu_check --dry`: the device check runs to completion on CPU and writes its report;
its pieces that decide what runs on the device (limits, pytest flags, failing-test names, the sanitizer's plan)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEVICE_LONG_TIMEOUT

from benchmarks import gpu_check, piad_step, sanitizer_driver, sdpa_routes

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(report)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    text = report.read_text()
    print(text)
    assert p.returncode == 0, p.stdout + p.stderr
    headings = re.findall(r"^## (\w+)$", text, flags=re.M)
    assert tuple(headings) == gpu_check.SECTIONS, headings  # every section, most valuable first
    # The summary table: one row per step, each ok, or skipped with its reason in the step's section.
    summary = text.split("\n## ", 1)[0]
    steps = re.findall(r"^\| (\w+) \| (.+?) \| (.+?) \| [\d.]+ \|$", summary, flags=re.M)
    assert {sec for sec, _, _ in steps} == set(gpu_check.SECTIONS)
    for sec, name, status in steps:
        assert status in ("ok", "skipped"), f"{sec} / {name}: {status}"
    skipped = [name for _, name, status in steps if status == "skipped"]
    assert set(skipped) == {"build", "tests/test_triton_kernels.py", "elastic capture", "memcheck", "racecheck"}
    for name in skipped:
        reason = text.split(f"### {name}: skipped", 1)[1].split("###", 1)[0]
        assert "CUDA" in reason or "dry run" in reason, f"{name} is skipped without a reason: {reason!r}"
    section = {sec: text.split(f"\n## {sec}\n", 1)[1].split("\n## ", 1)[0] for sec in gpu_check.SECTIONS}
    assert "failed: none" in section["Tests"] and "-m not gpu_sweep" in section["Tests"]
    junit = tmp_path / "report-junit.xml"
    assert junit.exists() and re.search(r"junit \(report-junit.xml\): \d+ tests: [1-9]\d* passed, 0 failed",
                                        section["Tests"])
    assert re.search(r"test log \(report-tests.log\): [1-9]\d* passed, [1-9]\d* skipped; slowest: ", section["Tests"])
    # Elastic on CPU at the digits ViT's size: its markdown table, one row per MACs fraction and width granularity.
    extra = gpu_check.ELASTIC_EXTRA_ARGS
    granularities = len(extra[extra.index("--multiple-of") + 1:]) if "--multiple-of" in extra else 1
    rows = re.findall(r"^\| vit_digits \| 1 \| fp32 \|", section["Elastic"], flags=re.M)
    assert len(rows) == 5 * granularities
    # the profile's op tables of both models, and the compile table: a graph count per MACs fraction
    assert section["Elastic"].count("| op | self µs/forward |") == 2
    assert section["Elastic"].count("| op | self µs/step |") == 2  # the training step's profile
    # the PIAD step at batch 8, eager, 1/3 of the MACs: the elastic model over its dense one, and the dense one
    piad = r"^\| 8 \| elastic \| eager \| 0\.333 \| 0\.3\d\d \| [\d.]+ \| [\d.]+ \| 1\.00 \| [\d.]+ \|$"
    assert re.search(piad, section["Elastic"], flags=re.M)
    assert re.search(r"^\| 8 \| dense \| eager \| 0\.333 \| 0\.3\d\d \| [\d.]+ \| [\d.]+ \| 1\.00 \| 1\.00 \|$",
                     section["Elastic"], flags=re.M)
    # and its time by kind of work: both models at both widths, and each narrower one over its full one
    cells = len(piad_step.KINDS) + 1
    kinds = rf"^\| (elastic|dense) \| eager \| (1\.000|0\.333|/ full)( \| [\d.]+){{{cells}}} \|$"
    assert len(re.findall(kinds, section["Elastic"], flags=re.M)) == 6
    # WPAC's cost: its time over a plain forward+backward, and its peak memory at 4x the samples
    assert re.search(r"^time, 32 samples .* ratio median [\d.]+, best-of-each [\d.]+ \(target <= 1\.5\)$",
                     section["Elastic"], flags=re.M)
    assert re.search(r"^peak memory, 64 vs 16 samples .* \(ratio [\d.]+\); target <= 1\.15$", section["Elastic"],
                     flags=re.M)
    # the gemm routes: one row per layer shape and fraction, each route a ratio to the contiguous block
    assert len(re.findall(r"^\| vit_[sb]\.(proj|fc2) \(\d+, \d+\) \| fp32 \| 197 \| [\d.]+ \|( [\d.]+ \|){6}$",
                          section["Elastic"], flags=re.M)) == 12
    assert len(re.findall(r"^\| (0\.250|0\.500|1\.000) \| [\d.]+ \| \d+ \|", section["Elastic"], flags=re.M)) == 3
    # the SDPA routes: a training step per MACs fraction, both routes and their ratio
    assert len(re.findall(r"^\| vit_digits \| 8 \| fp32 \| [\d.]+ \| train fwd\+bwd( \| [\d.]+){3} \|$",
                          section["Elastic"], flags=re.M)) == len(sdpa_routes.FRACTIONS)
    assert "driver ok" in section["Sanitizer"]  # the sanitizer's driver ran every op on the tail shapes
    assert "taylor_scores" in section["Benchmarks"]  # the benchmark table has rows
    assert "CUDA kernel times skipped" in section["Profile"]


@pytest.mark.parametrize(("name", "expected"), [
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coo", "gemm"),  # cuBLAS's GEMMs on an H200 (the report's profile)
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("aten::addmm", "gemm"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("triton_per_fused__to_copy_add_native_layer_norm_native_layer_norm_backward_7", "norm"),  # inductor's
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("aten::_fused_adamw_", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "copy/fill"),
    ("triton_poi_fused__to_copy_3", "copy/fill"),
    ("triton_poi_fused_add_gelu_gelu_backward_12", "other"),
])
def test_piad_step_kinds_name_the_work(name: str, expected: str) -> None:
    assert piad_step.kind(name) == expected


def test_limits_fit_the_lease() -> None:
    """The steps' limits and the whole call's fit in 580 s, leaving a 15-minute lease room for the machine's
    start (~35 s) and another start for a short rerun (none starts with under 240 s left)."""
    lease, start, second_start, transfers = 900, 35, 240, 45  # seconds
    assert sum(gpu_check.LIMITS.values()) <= gpu_check.TOTAL_LIMIT <= lease - start - second_start - transfers
    assert max(gpu_check.ELASTIC_LIMITS.values()) <= gpu_check.LIMITS["elastic"]
    assert gpu_check.TEST_GRACE < gpu_check.LIMITS["tests"] // 4


def test_pytest_command_uses_the_plugins_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    assert gpu_check._version("pytest") >= (7,) and gpu_check._version("no-such-distribution") == (0,)
    monkeypatch.setattr(gpu_check, "importable", lambda module: True)
    monkeypatch.setattr(gpu_check, "_version", lambda distribution: (3, 8))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cmd = gpu_check.pytest_command(True, junit)
    assert cmd[cmd.index("-n") + 1] == "16" and f"--timeout={gpu_check.TEST_TIMEOUT}" in cmd
    assert "--dist loadgroup" in " ".join(cmd)
    assert {"-v", "-rfE", f"--junitxml={junit}"} <= set(cmd) and "-m not gpu_sweep" in " ".join(cmd)
    assert cmd[-2:] == list(gpu_check.TEST_FILES)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(gpu_check, "_version", lambda distribution: (2, 4))  # before loadgroup
    older = gpu_check.pytest_command(True, junit)
    assert older[cmd.index("-n") + 1] == "2" and "--dist" not in older
    monkeypatch.setattr(gpu_check, "importable", lambda module: False)
    bare = gpu_check.pytest_command(False, junit)
    assert "-n" not in bare and not any(a.startswith("--timeout") for a in bare)
    assert bare[-1] == gpu_check.TEST_FILES[0]


def test_failing_tests_are_named_from_verbose_output() -> None:
    """xdist's lines, plain -v lines and the -rfE summary; each test once, in order; passes ignored."""
    output = "\n".join([
        "[gw3] [ 12%] PASSED tests/test_gpu.py::test_a[cuda-float32]",
        "[gw1] [ 13%] FAILED tests/test_gpu.py::test_b[triton-bfloat16-1x0x1-none-False]",
        "tests/test_triton_kernels.py::test_c[float16] FAILED                   [ 50%]",
        "tests/test_gpu.py::test_d ERROR",
        "tests/test_gpu.py::test_e SKIPPED (no CUDA device)",
        "ERROR tests/test_broken.py",
        "FAILED tests/test_gpu.py::test_b[triton-bfloat16-1x0x1-none-False] - AssertionError: x",
    ])
    assert gpu_check.failing_tests(output) == ["tests/test_gpu.py::test_b[triton-bfloat16-1x0x1-none-False]",
                                               "tests/test_triton_kernels.py::test_c[float16]",
                                               "tests/test_gpu.py::test_d", "tests/test_broken.py"]


def test_tests_past_the_deadline_are_skipped_and_counted(tmp_path: Path) -> None:
    """tests/conftest.py skips tests once SKD_TEST_DEADLINE has passed; the junit summary counts them."""
    junit = tmp_path / "j.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SKD_TEST_DEADLINE": "0"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        "tests/test_gpu.py::test_default_arch_list_ships_ptx_for_newer_gpus"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert gpu_check.junit_summary(junit) == "1 tests: 0 passed, 0 failed, 0 errors, 1 skipped (1 of them: the " \
                                             "step's time spent)"


def test_device_only_leaves_out_the_cpu_cases() -> None:
    """SKD_DEVICE_ONLY (the device check's tests): the device="cpu" cases of test_gpu.py are deselected, the others
    kept (collected here even without CUDA: the cuda cases skip only when they run)."""
    def collected(**env: str) -> list[str]:
        p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            "tests/test_gpu.py", "-k", "wpac_on_the_device"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
        return [line for line in p.stdout.splitlines() if "::" in line]

    every, device_only = collected(), collected(SKD_DEVICE_ONLY="1")
    assert any(t.endswith("-cpu]") for t in every) and device_only
    assert device_only == [t for t in every if not t.endswith("-cpu]")]


def test_sanitizer_runs_triton_in_one_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sanitizer_driver, "backends_for", lambda device: ["cuda", "triton"])
    plan = gpu_check.sanitizer_plan(torch.device("cuda"))
    assert plan == ["cuda", f"triton:{gpu_check.SANITIZER_TRITON_DTYPE}"]
    parsed = dict(map(sanitizer_driver.parse_backend, plan))
    assert parsed == {"cuda": sanitizer_driver.DTYPES, "triton": (torch.bfloat16,)}
    with pytest.raises(ValueError, match="unknown dtype"):
        sanitizer_driver.parse_backend("triton:bf16")


def test_a_command_past_its_limit_is_stopped_with_its_children() -> None:
    """run_process returns at the limit with what the command printed, even when a child of it (an xdist
    worker, the sanitizer's target) would hold the output pipe open; an interrupted python prints its
    KeyboardInterrupt (pytest: its summary) before the kill."""
    child = "import time; time.sleep(60)"
    script = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print('started', flush=True); time.sleep(60)")
    t0 = time.monotonic()
    r = gpu_check.run_process([sys.executable, "-c", script], limit=gpu_check.STOP_GRACE + 2)
    assert time.monotonic() - t0 < gpu_check.STOP_GRACE + 10
    assert r.status.startswith("TIMEOUT") and "started" in r.stdout and "KeyboardInterrupt" in r.stderr
    ok = gpu_check.run_process([sys.executable, "-c", "print('x')"], limit=60)
    assert (ok.status, ok.stdout) == ("ok", "x\n")
    assert gpu_check.run_process([sys.executable, "-c", "raise SystemExit(3)"], limit=60).status == "FAIL (exit 3)"


def test_build_targets_the_present_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device's own arch unless TORCH_CUDA_ARCH_LIST says otherwise (the command is captured, not run)."""
    ran = []
    monkeypatch.setattr(gpu_check, "run_command", lambda name, cmd, limit, env: ran.append((cmd, env))
                        or gpu_check.Step(name, "ok", 0.0, ""))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    step = gpu_check.build(True, gpu_check.Budget())
    cmd, env = ran[-1]
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and step.text.startswith("TORCH_CUDA_ARCH_LIST=9.0")
    assert cmd[-3:] == ["-q", "build_ext", "--inplace"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    gpu_check.build(True, gpu_check.Budget())
    assert ran[-1][1]["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"


def test_sanitizer_steps_run_side_by_side(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """memcheck and racecheck start together, each on the driver's reduced plan, without the caching allocator
    (a stand-in compute-sanitizer prints its arguments and sleeps)."""
    tool = tmp_path / "compute-sanitizer"
    tool.write_text('#!/bin/sh\necho "$@" "caching=$PYTORCH_NO_CUDA_MEMORY_CACHING"\nsleep 2\n')
    tool.chmod(0o755)
    monkeypatch.setattr(gpu_check, "find_tool", lambda name: str(tool))
    monkeypatch.setattr(sanitizer_driver, "backends_for", lambda device: ["cuda", "triton"])
    t0 = time.monotonic()
    memcheck, racecheck = gpu_check.sanitizer(True, gpu_check.Budget())
    assert time.monotonic() - t0 < 3.5  # side by side: not 2 + 2 s
    for step, check in ((memcheck, "memcheck"), (racecheck, "racecheck")):
        assert (step.name, step.status) == (check, "ok")
        printed = step.text.splitlines()[-1]
        assert f"--tool {check} --error-exitcode 3" in printed and printed.endswith("caching=1")
        assert "-m benchmarks.sanitizer_driver --device cuda --backend cuda --backend triton:bfloat16" in printed
    assert "--racecheck-report all" in racecheck.text and "--racecheck-report" not in memcheck.text


def test_the_test_log_names_failures_and_times_as_tests_end(tmp_path: Path) -> None:
    """tests/conftest.py's SKD_TEST_LOG: a line per test as it ends and each failure's traceback (whole, blank lines
    included), the device_long tests first and with a longer timeout; gpu_check reads failures, counts and the
    slowest tests from it."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "tests" / "test_some.py").write_text(
        "import pytest\n\n"
        "def test_passes():\n    pass\n\n"
        "@pytest.mark.skip(reason='no such device')\ndef test_skipped():\n    pass\n\n"
        "@pytest.mark.parametrize('p', ['a b'])\n"
        "def test_fails(p):\n    assert False, 'first line\\n\\nafter a blank line'\n\n"
        "@pytest.mark.device_long\ndef test_long(request):\n"
        f"    assert request.node.get_closest_marker('timeout').args == ({DEVICE_LONG_TIMEOUT},)\n")
    log = tmp_path / "tests.log"
    env = {**os.environ, "SKD_TEST_LOG": str(log), "PYTHONPATH": str(ROOT)}  # the conftest imports benchmarks
    env.pop("PYTEST_XDIST_WORKER", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "tests"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr  # one test failed
    logged = log.read_text()
    heads = gpu_check._LOGGED.findall(logged)
    assert [(outcome, name.split("::")[1]) for outcome, name, _, _ in heads] == [
        ("PASSED", "test_long"), ("PASSED", "test_passes"), ("SKIPPED", "test_skipped"), ("FAILED", "test_fails[a b]")]
    assert gpu_check.logged_failures(logged) == ["tests/test_some.py::test_fails[a b]"]
    assert gpu_check.log_summary(logged).startswith("2 passed, 1 failed, 1 skipped; slowest: ")
    tracebacks = gpu_check._failure_tracebacks(logged)
    assert "first line" in tracebacks and "after a blank line" in tracebacks and "test_passes" not in tracebacks
