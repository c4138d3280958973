"""What is specific to the Triton backend: the custom op's registration (opcheck), its autograd against
the reference, k = 0, tile tails and multi-tile paths (mirrored covariance tiles, N-splits, atomics).

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (set by conftest.py before the kernels are imported).
The general per-backend correctness sweep lives in tests/test_{weighted_covariance,taylor_scores,
prefix_linear,prefix_attention,prefix_attention_separate}.py.
"""

import importlib
import os

import pytest
import torch
from kernel_helpers import sweep

from skd_kernels import reference

triton_backend = pytest.importorskip("skd_kernels.triton")
if not triton_backend.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol) per output dtype; fp32 dots on GPU are tf32x3 (about fp32). Covariance and Taylor
# outputs are fp32 sums of exactly representable products, so they get the fp32 tolerance for every
# input dtype, relative to the largest entry of the reference.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 5e-3), torch.bfloat16: (1e-2, 5e-2)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
covariance_module = importlib.import_module("skd_kernels.triton.weighted_covariance")


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, relative_to_max: bool = False) -> None:
    rtol, atol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    if diff.numel():
        print(f"max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}")
    if relative_to_max and want.numel():
        atol *= max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def _prefix_args(dtype: torch.dtype, k_in: int, k_out: int, activation: str = "gelu") -> tuple:
    """x (3, 5, 47) sliced to a non-contiguous (3, 5, 41); weight (37, 41) as a transposed view."""
    x = torch.randn(3, 5, 47, device=DEVICE, dtype=dtype)[..., 6:]
    weight = (torch.randn(41, 37, device=DEVICE, dtype=dtype) / 41**0.5).t()
    bias = torch.randn(37, device=DEVICE, dtype=dtype)
    return x, weight, bias, k_in, k_out, activation


@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
def test_prefix_linear_opcheck(activation: str) -> None:
    args = _prefix_args(torch.float32, 19, 23, activation)
    for a in args[:3]:
        a.requires_grad_(True)
    torch.library.opcheck(torch.ops.skd_kernels.triton_prefix_linear.default, args)


def test_covariance_and_taylor_opcheck() -> None:
    """The Triton statistics ops are registered custom ops too (schema, fake kernel, no aliased outputs)."""
    x, w = torch.randn(37, 40, device=DEVICE)[:, ::2], torch.rand(37, device=DEVICE)
    for args in ((x, w, 4), (x.half(), w, 2), (x[:0], w[:0], 5)):
        torch.library.opcheck(torch.ops.skd_kernels.triton_weighted_covariance.default, args)
    act, grad = torch.randn(2, 5, 7, device=DEVICE), torch.randn(2, 5, 7, device=DEVICE)
    for args in ((act, grad), (act.bfloat16(), grad.bfloat16()), (act[:, :0], grad[:, :0])):
        torch.library.opcheck(torch.ops.skd_kernels.triton_taylor_scores.default, args)


# On a GPU every (k bucket, activation, dtype) autotunes 8 configs: the device check's quick set rotates the
# activation (the interpreter's single config makes every case cheap on CPU, where all run).
@pytest.mark.parametrize(*sweep({"dtype": DTYPES, "k_in,k_out": [(41, 37), (19, 23), (1, 1), (0, 5), (7, 0)],
                                 "activation": ["none", "gelu", "gelu_tanh"]}, rotated=1))
def test_prefix_linear_matches_reference(dtype: torch.dtype, k_in: int, k_out: int, activation: str) -> None:
    args = _prefix_args(dtype, k_in, k_out, activation)
    _close(triton_backend.prefix_linear(*args), reference.prefix_linear(*args), dtype)


def test_prefix_linear_k_in_zero_gives_act_of_bias() -> None:
    x, weight, bias, *_ = _prefix_args(torch.float32, 0, 9)
    y = triton_backend.prefix_linear(x, weight, bias, 0, 9, "gelu")
    torch.testing.assert_close(y, torch.nn.functional.gelu(bias[:9]).expand(3, 5, 9))


def test_prefix_linear_reads_only_the_leading_block() -> None:
    """NaN outside weight[:k_out, :k_in] (and x[..., k_in:]) must not reach the output."""
    x, weight, bias, *_ = _prefix_args(torch.float32, 19, 23)
    poisoned_w, poisoned_x = weight.clone(), x.clone()
    poisoned_w[23:] = float("nan")
    poisoned_w[:, 19:] = float("nan")
    poisoned_x[..., 19:] = float("nan")
    got = triton_backend.prefix_linear(poisoned_x, poisoned_w, bias, 19, 23, "gelu")
    _close(got, reference.prefix_linear(x, weight, bias, 19, 23, "gelu"), torch.float32)


@pytest.mark.parametrize(("k_in", "k_out"), [(41, 37), (19, 23), (0, 5)])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_prefix_linear_autograd_matches_reference(k_in: int, k_out: int, activation: str) -> None:
    base = _prefix_args(torch.float32, k_in, k_out, activation)
    grads = []
    for fn in (triton_backend.prefix_linear, reference.prefix_linear):
        x, weight, bias = (t.detach().clone().requires_grad_(True) for t in base[:3])
        y = fn(x, weight, bias, k_in, k_out, activation)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        grads.append((x.grad, weight.grad, bias.grad))
    for got, want in zip(*grads, strict=True):
        _close(got, want, torch.float32)


def test_prefix_linear_grads_vanish_outside_the_block() -> None:
    x, weight, bias, *_ = _prefix_args(torch.float32, 13, 11, "gelu")
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    y = triton_backend.prefix_linear(x, weight, bias, 13, 11, "gelu")
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), g)
    assert torch.all(gw[11:] == 0) and torch.all(gw[:, 13:] == 0) and torch.all(gb[11:] == 0)
    assert torch.all(gx[..., 13:] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "groups", "r"), [(1, 1, 1), (7, 3, 7), (129, 2, 33), (150, 1, 70), (0, 2, 4)])
def test_covariance_tails_and_mirrored_tiles(dtype: torch.dtype, n: int, groups: int, r: int) -> None:
    """r = 70 spans several BLOCK_R tiles, so the mirrored (below-diagonal) stores are exercised."""
    x = torch.randn(n, 2 * groups * r, device=DEVICE, dtype=dtype)[:, ::2]  # non-contiguous columns
    w = torch.rand(n, device=DEVICE)
    w[::5] = 0.0
    for got, want in zip(triton_backend.weighted_covariance(x, w, groups),
                         reference.weighted_covariance(x, w, groups), strict=True):
        _close(got, want, torch.float32, relative_to_max=True)


def test_covariance_split_n_partials_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The N-split path (partials summed) is what a GPU takes; force it here with 3 splits."""
    monkeypatch.setattr(covariance_module, "_num_splits", lambda x, groups, r: 3)
    x = torch.randn(600, 2 * 20, device=DEVICE)
    w = torch.rand(600, device=DEVICE)
    for got, want in zip(triton_backend.weighted_covariance(x, w, 2),
                         reference.weighted_covariance(x, w, 2), strict=True):
        _close(got, want, torch.float32, relative_to_max=True)


def test_covariance_is_symmetric_off_the_diagonal_tiles() -> None:
    x = torch.randn(90, 70, device=DEVICE)
    _, _, outer = triton_backend.weighted_covariance(x, torch.rand(90, device=DEVICE), 1)
    torch.testing.assert_close(outer[0], outer[0].t(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "t", "c"), [(1, 1, 1), (2, 7, 129), (3, 70, 300), (2, 0, 3), (2, 3, 0)])
def test_taylor_tails_and_token_blocks(dtype: torch.dtype, b: int, t: int, c: int) -> None:
    """t = 70 spans several token blocks, whose channel partials meet in the atomic adds."""
    act = torch.randn(b, t, 2 * c, device=DEVICE, dtype=dtype)[..., 1::2]
    grad = torch.randn(t, b, c, device=DEVICE, dtype=dtype).transpose(0, 1)
    for got, want in zip(triton_backend.taylor_scores(act, grad), reference.taylor_scores(act, grad),
                         strict=True):
        _close(got, want, torch.float32, relative_to_max=True)


@pytest.mark.parametrize(("w_value", "x_scale"), [(1e3, 100.0), (1e-6, 1e-2)], ids=["w·x>fp16-max", "w·x<fp16-min"])
def test_covariance_fp16_split_product_keeps_fp16_out_of_range_products(w_value: float, x_scale: float) -> None:
    """w·x = 1e5 overflows fp16 and 1e-8 flushes to zero in it: the hi/lo split must not round w·x to fp16's
    range (it once gave Inf, a false "overflows float32" error, and 82 % error in sum_outer)."""
    x = (torch.randn(150, 24, device=DEVICE) * x_scale).half()
    w = w_value * (1 + torch.rand(150, device=DEVICE))  # fp32 weights, as the front end passes them
    for got, want in zip(triton_backend.weighted_covariance(x, w, 2), reference.weighted_covariance(x, w, 2),
                         strict=True):
        diff = (got.double() - want.double()).abs().max().item()
        print(f"max diff {diff:.3e}, max |want| {want.abs().max().item():.3e}")
        assert torch.isfinite(got).all()
        assert diff <= 2e-5 * want.abs().max().item()


def _far_view(shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A small view whose element offsets pass 2^31, filled with random values.

    The storage is a lazily mapped allocation of ~2^32 elements (only the pages of the view's few elements
    are ever touched) and the view starts at element 2^31, so an int32 offset that wraps lands inside the
    allocation: a kernel that wraps reads the zeros there instead of crashing, and the test fails on values.
    """
    start = 2**31
    end = start + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
    view = torch.empty(end, dtype=dtype, device=DEVICE).as_strided(shape, strides, start)
    view.copy_(torch.randn(shape))
    return view


@pytest.mark.skipif(DEVICE == "cuda", reason="allocates 8 GB: the CPU allocation is lazily mapped, a GPU one is not")
def test_offsets_past_2_pow_31_do_not_wrap() -> None:
    """Stride products pass 2^31 (feature stride 2^30 + 64, three features): offsets must be int64."""
    far = 2**30 + 64
    x = _far_view((40, 3), (1, far))
    w = torch.rand(40, device=DEVICE)
    for got, want in zip(triton_backend.weighted_covariance(x, w, 1),
                         reference.weighted_covariance(x.contiguous(), w, 1), strict=True):
        _close(got, want, torch.float32, relative_to_max=True)
    act = _far_view((2, 3, 3), (3, 1, far))
    grad = torch.randn(2, 3, 3, device=DEVICE, dtype=torch.float16)
    for got, want in zip(triton_backend.taylor_scores(act, grad),
                         reference.taylor_scores(act.contiguous(), grad), strict=True):
        _close(got, want, torch.float32, relative_to_max=True)
    xp = _far_view((4, 3), (1, far))
    weight = torch.randn(5, 3, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(5, device=DEVICE, dtype=torch.float16)
    _close(triton_backend.prefix_linear(xp, weight, bias, 3, 5, "none"),
           reference.prefix_linear(xp.contiguous(), weight, bias, 3, 5), torch.float16)


@pytest.mark.parametrize("x", [torch.randn(3, 0), torch.randn(0, 0), torch.randn(2, 0, 0)], ids=["3x0", "0x0", "2x0x0"])
def test_prefix_linear_zero_size_x_with_k_in_zero(x: torch.Tensor) -> None:
    """reshape(-1, 0) is ambiguous for a zero-size x: the row count must come from the leading dims."""
    x = x.to(DEVICE)
    weight, bias = torch.randn(4, 5, device=DEVICE), torch.randn(4, device=DEVICE)
    got = triton_backend.prefix_linear(x, weight, bias, 0, 4, "gelu")
    _close(got, reference.prefix_linear(x, weight, bias, 0, 4, "gelu"), torch.float32)


def test_grids_keep_large_counts_on_axis_0() -> None:
    """CUDA grid axes 1 and 2 take at most 65535 programs: r = 8192 covariance tiles (65536 at BLOCK_R = 32,
    x 12 groups) and taylor's token blocks at T > 1M must go on axis 0 (2^31 - 1)."""
    from skd_kernels.triton import _utils

    taylor_module = importlib.import_module("skd_kernels.triton.taylor_scores")
    prefix_module = importlib.import_module("skd_kernels.triton.prefix_linear")
    grids = [covariance_module.grid(12, 8192, 40, 32), covariance_module.grid(1, 8192, 65535, 32),
             taylor_module.grid(64, 4_000_000, 16), taylor_module.grid(100_000, 197, 16),
             prefix_module.grid(4_000_000, 3072, 32, 32)]
    for g in grids:
        assert all(0 < n <= limit for n, limit in zip(g, _utils.MAX_GRID, strict=False)), g
    assert covariance_module.grid(12, 8192, 40, 32)[0] == 12 * 256**2  # every (group, tile pair) launched
    assert taylor_module.grid(64, 4_000_000, 16)[0] == 64 * 250_000
    with pytest.raises(ValueError, match="axis 1"):  # more than CUDA can launch is an error, not a bad launch
        covariance_module.grid(1, 64, 70_000, 64)


def test_autotune_drops_configs_over_shared_memory_or_spilling() -> None:
    """fp32 tiles take twice the shared memory of fp16 ones: configs over the target's shared memory are
    pruned per dtype (227 KB on sm_90, 163 KB on sm_80), and so are those measured to spill there."""
    import triton.language as tl

    from skd_kernels.triton import _utils

    prefix_module = importlib.import_module("skd_kernels.triton.prefix_linear")
    for module, kernel in ((covariance_module, covariance_module._covariance_kernel),
                           (prefix_module, prefix_module._prefix_linear_kernel)):
        for target in _utils.TARGETS.values():
            for operand_bytes in (4, 2):
                kept = kernel.early_config_prune.keep(module._GPU_CONFIGS, operand_bytes, target)
                assert kept
                assert all(module._shared_bytes(c, operand_bytes) <= target.shared_bytes for c in kept)
                assert not set(kept) & set(module._SPILLS.get((target.major, operand_bytes), []))
        for spilling in module._SPILLS.values():  # the measurements name configs that are in the list
            assert set(spilling) <= set(module._GPU_CONFIGS)
    # the autotuner's call: no tensor arguments means sm_90's limits
    assert prefix_module._prefix_linear_kernel.early_config_prune(prefix_module._GPU_CONFIGS, {},
                                                                   DOT_DTYPE=tl.float16) == prefix_module._GPU_CONFIGS
    # the known case: prefix (128, 128, 64), 4 stages: 256 KB of fp32 tiles (pruned), 128 KB of fp16 (kept)
    big = prefix_module._cfg(128, 128, 64, 4, 8)
    assert prefix_module._shared_bytes(big, 4) > _utils.TARGETS[90].shared_bytes >= prefix_module._shared_bytes(big, 2)
    assert big in prefix_module._GPU_CONFIGS
    assert big not in prefix_module._prefix_linear_kernel.early_config_prune(
        prefix_module._GPU_CONFIGS, {}, DOT_DTYPE=tl.float32)


def test_prefix_linear_autotune_key_buckets_the_sizes() -> None:
    """A new batch size (M) or subnet width (N, K) within a power-of-two bucket reuses the tuning."""
    from skd_kernels.triton import _utils

    prefix_module = importlib.import_module("skd_kernels.triton.prefix_linear")
    assert prefix_module._prefix_linear_kernel.keys[:3] == ["M_BUCKET", "N_BUCKET", "K_BUCKET"]
    assert not {"M", "N", "K"} & set(prefix_module._prefix_linear_kernel.keys)
    assert _utils.bucket(8 * 197, 1 << 14) == _utils.bucket(10 * 197, 1 << 14) == 2048
    assert _utils.bucket(10**6, 1 << 14) == 1 << 14 and _utils.bucket(0, 64) == 1


def _split_product_emulation(x: torch.Tensor, w: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """sum_outer computed with the Triton kernel's SPLIT_PRODUCT arithmetic, in torch on CPU.

    Per (BLOCK_N rows, BLOCK_R columns) tile: w·x in fp32, scaled so its peak |w·x| is _SPLIT_SCALE, split
    into hi + lo in `dtype`, each multiplied by x (exact in `dtype`) with fp32 products and sums, unscaled.
    """
    meta = covariance_module._CONFIGS[0].kwargs
    bn, br = meta["BLOCK_N"], meta["BLOCK_R"]
    n, d = x.shape
    r = d // groups
    scale_to = float(covariance_module._SPLIT_SCALE.value)
    out = torch.zeros(groups, r, r)
    for g in range(groups):
        xg = x[:, g * r:(g + 1) * r]
        for n0 in range(0, n, bn):
            xj = xg[n0:n0 + bn].float()  # exact: x is already in `dtype`
            for c0 in range(0, r, br):
                xw = xg[n0:n0 + bn, c0:c0 + br].float() * w[n0:n0 + bn, None]
                scale = scale_to / max(xw.abs().max().item(), 1e-30)
                xs = xw * scale
                hi = xs.to(dtype)
                lo = (xs - hi.float()).to(dtype)
                out[g, c0:c0 + br] += (hi.float().t() @ xj + lo.float().t() @ xj) / scale
    return out


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU emulation of the GPU arithmetic is for machines without one")
def test_covariance_split_product_emulation() -> None:
    """The bf16 split product runs only on a GPU (the interpreter widens bf16 to fp32): its arithmetic,
    emulated on CPU, must meet the statistics tolerance; the same emulation for fp16 matches the kernel's
    real fp16 path under the interpreter, which shows the emulation is the kernel's arithmetic."""
    x32 = torch.randn(150, 2 * 70) + 0.3
    w = torch.rand(150) + 0.01
    for dtype in (torch.bfloat16, torch.float16):
        x = x32.to(dtype)
        want = reference.weighted_covariance(x.double(), w.double(), 2)[2]
        got = _split_product_emulation(x, w, 2, dtype)
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        print(f"{dtype}: emulated split product, max error {err:.2e} of max |sum_outer|")
        assert err <= 2e-5
    kernel_fp16 = triton_backend.weighted_covariance(x32.half(), w, 2)[2]
    torch.testing.assert_close(_split_product_emulation(x32.half(), w, 2, torch.float16), kernel_fp16,
                               rtol=1e-6, atol=1e-6 * kernel_fp16.abs().max().item())


@pytest.mark.parametrize("arch", [90, 80])
def test_largest_kept_configs_compile_without_spills(arch: int) -> None:
    """What the interpreter cannot show: each kernel's largest config that survives pruning, compiled for
    sm_90 / sm_80 by Triton's bundled ptxas (no GPU needed) in fp16 and fp32, fits in shared memory, spills
    no registers and (the GEMMs) pipelines its loads with async copies. Runs in a child process without
    TRITON_INTERPRET=1 (under it Triton's own jit helpers cannot be compiled). The tool lists prefix_attention
    too, whose configs are not pruned for spills yet (skd_kernels/triton/prefix_attention.py says which
    spill): not asserted here."""
    import json
    import subprocess
    import sys

    from skd_kernels.triton import _utils

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kernels = ["weighted_covariance", "prefix_linear", "taylor_scores"]
    out = subprocess.run([sys.executable, "-m", "benchmarks.triton_resources", "--largest", "--json", "--arch",
                          str(arch), "--dtypes", "fp16", "fp32", "--kernels", *kernels], capture_output=True,
                         text=True, env=env,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for k in kernels for d in ("fp16", "fp32")}
    for r in rows:
        print(r)
        assert "error" not in r, r
        assert r["spill_bytes"] == 0 and r["shared"] <= _utils.TARGETS[arch].shared_bytes, r
        assert r["async_copies"] > 0 or r["kernel"] == "taylor_scores", r


def test_attention_pruning_follows_the_launch_head_width() -> None:
    """prefix_attention's tiles are BLOCK_D (the launch's head width) wide: the pruner sizes them with the
    launch's BLOCK_D, so narrow heads keep every config while r = 128 in fp32 drops the tiles over the
    target's shared memory; without a launch (the tools) it assumes the widest, MAX_BLOCK_D."""
    import triton.language as tl

    from skd_kernels.triton import _utils

    module = importlib.import_module("skd_kernels.triton.prefix_attention")
    pruner = module._prefix_attention_kernel.early_config_prune
    configs = module._GPU_CONFIGS
    assert pruner(configs, {}, DOT_DTYPE=tl.float16, BLOCK_D=16) == configs
    for target in _utils.TARGETS.values():
        wide = pruner.keep(configs, 4, target, BLOCK_D=128)
        assert wide and len(wide) < len(configs)
        assert all(module._shared_bytes(c, 4, BLOCK_D=128) <= target.shared_bytes for c in wide)
        assert pruner.keep(configs, 4, target) == wide  # no launch: MAX_BLOCK_D = 128
    assert module.MAX_BLOCK_D == 128


def test_attention_kernel_compiles_for_sm90() -> None:
    """benchmarks/triton_resources.py's launch spec of the attention kernel (shared by prefix_attention and
    prefix_attention_separate) matches its signature: the largest kept fp16 config compiles for sm_90 at
    BLOCK_D = 128 within its shared memory. (Its spills are not asserted: see the kernel's config notes.)"""
    import json
    import subprocess
    import sys

    from skd_kernels.triton import _utils

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.triton_resources", "--largest", "--json", "--arch", "90",
                          "--dtypes", "fp16", "--kernels", "prefix_attention"], capture_output=True, text=True,
                         env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    print(rows)
    assert [(r["kernel"], r["dtype"]) for r in rows] == [("prefix_attention", "fp16")]
    assert "error" not in rows[0] and 0 < rows[0]["shared"] <= _utils.TARGETS[90].shared_bytes, rows[0]
