"""skd.models.residual: residual adds fused with the norm that reads each sum, against the two-op loop."""

from __future__ import annotations

import pytest
import torch
from timm.layers import LayerNorm as TimmLayerNorm
from torch import nn

import skd_kernels
from skd.models.residual import _fused_params, add_norm, pre_norm_stream


def _naive(x: torch.Tensor, sublayers: list, final_norm: nn.Module) -> torch.Tensor:
    for norm, f in sublayers:
        x = x + f(norm(x))
    return final_norm(x)


def _sublayers(d: int, norms: list[nn.Module]) -> list:
    torch.manual_seed(1)
    return [(norm, nn.Linear(d, d)) for norm in norms]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pre_norm_stream_equals_the_two_op_loop(dtype: torch.dtype) -> None:
    """Plain LayerNorms (fused), an RMSNorm and an Identity (not fused) in one stream, the final norm of each kind,
    and no sublayer at all."""
    d = 24
    x = torch.randn(2, 5, d, dtype=dtype)
    norms = [nn.LayerNorm(d), TimmLayerNorm(d), nn.RMSNorm(d), nn.LayerNorm(d), nn.Identity()]
    for norm in norms:
        if isinstance(norm, nn.LayerNorm):
            nn.init.normal_(norm.weight)
            nn.init.normal_(norm.bias)
    sublayers = [(n.to(dtype), f.to(dtype)) for n, f in _sublayers(d, norms)]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        for final in (nn.LayerNorm(d).to(dtype), nn.Identity(), nn.RMSNorm(d).to(dtype)):
            for subset in (sublayers, sublayers[2:], sublayers[:1], []):
                got, want = pre_norm_stream(x, subset, final), _naive(x, subset, final)
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                assert got.dtype == dtype and err <= tol, (type(final).__name__, len(subset), err)


def test_add_norm_falls_back_where_it_cannot_fuse() -> None:
    """Mixed dtypes (type promotion), a broadcast y and a norm over two dims take the two-op form."""
    d = 8
    x = torch.randn(3, d)
    ln = nn.LayerNorm(d)
    for y in (torch.randn(3, d).bfloat16(), torch.randn(1, d)):
        s, out = add_norm(x, y, ln)
        assert torch.equal(s, x + y) and torch.equal(out, ln(x + y))
    ln2 = nn.LayerNorm((3, d))
    s, out = add_norm(x, x, ln2)
    assert torch.equal(out, ln2(x + x))


def test_add_norm_fuses_exactly_what_the_op_accepts() -> None:
    """The per-call check (_fused_params) says yes for a plain LayerNorm over x's last dim and no otherwise: a
    norm over another width (then the two-op form raises PyTorch's own error), timm's fast-norm path, params of
    another dtype. Where it says yes the fused result equals the two-op one."""
    d = 8
    x, y = torch.randn(3, d), torch.randn(3, d)
    ln = nn.LayerNorm(d)
    fused = "cpu" in skd_kernels.available_backends("cpu")
    assert (_fused_params(x, y, ln) is not None) == fused
    s, out = add_norm(x, y, ln)
    assert torch.equal(s, x + y) and torch.allclose(out, ln(x + y), atol=1e-6)
    assert _fused_params(x, y, nn.LayerNorm(d + 1)) is None
    with pytest.raises(RuntimeError):
        add_norm(x, y, nn.LayerNorm(d + 1))
    fast = TimmLayerNorm(d)
    fast._fast_norm = True
    assert _fused_params(x, y, fast) is None
    assert _fused_params(x, y, nn.LayerNorm(d).double()) is None


def test_a_hooked_norm_runs_itself_so_its_hooks_fire() -> None:
    d = 8
    x, y = torch.randn(3, d), torch.randn(3, d)
    ln, seen = nn.LayerNorm(d), []
    ln.register_forward_hook(lambda m, args, out: seen.append(out))
    assert _fused_params(x, y, ln) is None
    _, out = add_norm(x, y, ln)
    assert len(seen) == 1 and seen[0] is out and torch.equal(out, nn.functional.layer_norm(x + y, (d,)))
