"""The differentiable compiled ops' C++ Autograd kernel (csrc/registration.cpp): without a gradient to record
the op runs straight below autograd, never reaching the Python autograd registered on its twin
(`skd_kernels._ops.autograd_twin`); with one, the twin's backward gives the reference's gradients."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from skd_kernels import _ops, reference

pytestmark = pytest.mark.skipif(_ops.LOAD_ERROR is not None, reason=f"no compiled extension: {_ops.LOAD_ERROR}")

H, R, N, S = 3, 5, 7, 2


def _cases(grad: bool) -> dict[str, tuple]:
    """op -> (compiled op, reference, its tensor inputs, its other arguments), fresh random inputs."""
    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape).requires_grad_(grad)

    bias = t(S, H, N, N)
    return {
        "prefix_linear": (torch.ops.skd_kernels.prefix_linear.default, reference.prefix_linear,
                          (t(4, 9), t(8, 9), t(8)), (7, 6, "gelu")),
        "prefix_attention": (torch.ops.skd_kernels.prefix_attention.default, reference.prefix_attention,
                             (t(S, N, R * 3 * H),), (H, 0.3, bias)),
        "prefix_attention_separate": (torch.ops.skd_kernels.prefix_attention_separate.default,
                                      reference.prefix_attention_separate,
                                      (t(S, N, R * H), t(S, N, R * H), t(S, N, R * H)), (H, 0.3, bias)),
    }


def _op_names(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("name", list(_cases(False)))
def test_without_a_gradient_the_twin_is_not_reached(name: str) -> None:
    op, _, tensors, rest = _cases(True)[name]
    twin = _ops.autograd_twin(name)
    with torch.no_grad():
        names = _op_names(lambda: op(*tensors, *rest))
        out = op(*tensors, *rest)
    assert f"skd_kernels::{name}" in names and twin not in names
    assert out.grad_fn is None and not out.requires_grad
    _, _, plain, plain_rest = _cases(False)[name]  # grad mode on, nothing requires grad
    assert twin not in _op_names(lambda: op(*plain, *plain_rest))
    assert twin in _op_names(lambda: op(*tensors, *rest))


@pytest.mark.parametrize("name", list(_cases(False)))
def test_with_a_gradient_the_twin_gives_the_reference_gradients(name: str) -> None:
    op, ref, tensors, rest = _cases(True)[name]
    leaves = [*tensors, *(a for a in rest if isinstance(a, torch.Tensor))]
    out = op(*tensors, *rest)
    assert out.requires_grad and "autograd" in type(out.grad_fn).__name__
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    copies = [x.detach().clone().requires_grad_() for x in leaves]
    n = len(tensors)
    other = [copies[n] if isinstance(a, torch.Tensor) else a for a in rest]
    expected_out = ref(*copies[:n], *other)
    expected = torch.autograd.grad(expected_out, copies, grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected, strict=True):
        assert float(e.abs().max()) > 0
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
