"""skd.score_fit's storage and math: set_score_fit refuses bad fits with one clear error, q_map and corrected_q
equal the module docstring's formulas written out per head (and keep the promised score identity), and the
file helpers restore fits only onto q-producing Linears, all checked before any is set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from skd import score_fit as sf

H, HD, D = 3, 10, 7
R = sf.fit_ranks(HD)  # 5


def _fit(big_r: int = R, heads: int = H, scale: float = 0.5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, big_r, big_r + 1, big_r, generator=gen, dtype=torch.float64) * scale \
        * sf.block_mask(big_r)


def _qkv(bias: bool = True) -> nn.Linear:
    return nn.Linear(D, 3 * H * HD, bias=bias).double()


# ------------------------------------------------------------------------------------------- storage
def test_set_score_fit_stores_a_non_persistent_cast_copy_and_removes_it() -> None:
    lin = nn.Linear(D, 3 * H * HD)  # fp32
    fit = _fit()
    sf.set_score_fit(lin, fit, H, HD)
    stored = sf.score_fit(lin)
    assert stored.dtype == torch.float32 and stored.data_ptr() != fit.data_ptr()
    torch.testing.assert_close(stored, fit.float())
    assert sf.BUFFER not in lin.state_dict()  # outside the state_dict: skd.save stores it by name
    sf.set_score_fit(lin, None, H, HD)
    assert sf.score_fit(lin) is None
    sf.set_score_fit(lin, None, H, HD)  # removing twice is fine


@pytest.mark.parametrize(("make", "bias", "message"), [
    (lambda: _fit()[0], True, r"shape \(H, R, R \+ 1, R\)"),
    (lambda: _fit(heads=H + 1), True, r"H = 3"),
    (lambda: _fit(big_r=HD), True, r"1 <= R < 10"),
    (lambda: torch.zeros(H, 2, 2, 2), True, r"got \(3, 2, 2, 2\)"),
    (lambda: _fit().index_put_((torch.tensor(0),) * 4, torch.tensor(float("nan"), dtype=torch.float64)), True,
     "NaN or Inf"),
    (lambda: _fit() + 0.1, True, "outside each width's"),
    (lambda: _fit(), False, "no bias to absorb"),
])
def test_set_score_fit_refuses_bad_fits(make, bias: bool, message: str) -> None:
    lin = _qkv(bias)
    with pytest.raises(ValueError, match=message):
        sf.set_score_fit(lin, make(), H, HD)
    assert sf.score_fit(lin) is None


def test_a_fit_without_constant_rows_needs_no_bias() -> None:
    fit = _fit()
    fit[:, :, 0] = 0
    lin = _qkv(bias=False)
    sf.set_score_fit(lin, fit, H, HD)
    assert sf.score_fit(lin) is not None


def test_fit_ranks_and_fitted_widths() -> None:
    assert [sf.fit_ranks(hd) for hd in (1, 2, 9, 64, 128)] == [0, 1, 4, 16, 16]
    fit = _fit()
    assert [sf.fitted(fit, r) for r in range(HD + 1)] == [False] + [True] * R + [False] * (HD - R)
    assert not sf.fitted(None, 1)
    assert sf.q_map(fit, 0) is None and sf.q_map(fit, R + 1) is None


# ---------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("r", range(1, R + 1))
def test_q_map_and_corrected_q_are_the_docstring_formulas(r: int) -> None:
    fit = _fit(seed=r)
    gen = torch.Generator().manual_seed(10 + r)
    weight = torch.randn(H, r, D, generator=gen, dtype=torch.float64)
    bias = torch.randn(H, r, generator=gen, dtype=torch.float64)
    m, c = sf.q_map(fit, r)
    new_w, new_b = sf.corrected_q(weight, bias, fit, r)
    assert new_w.shape == weight.shape and new_b.shape == bias.shape
    q = torch.randn(5, D, generator=gen, dtype=torch.float64)  # tokens
    k_kept = torch.randn(4, r, generator=gen, dtype=torch.float64)  # kept key dims of 4 tokens
    for h in range(H):
        x = fit[h, r - 1, : r + 1, :r]  # X = [x_0^T; X_q]
        torch.testing.assert_close(m[h], torch.eye(r, dtype=torch.float64) + x[1:].T)
        torch.testing.assert_close(c[h], x[0])
        q_k = q @ weight[h].T + bias[h]  # (5, r): the head's kept q dims
        q_new = q @ new_w[h].T + new_b[h]
        torch.testing.assert_close(q_new, q_k @ m[h].T + c[h])
        # the promised identity: q_k' . k_k = q_k . k_k + [1; q_k]^T X k_k
        ones_q = torch.cat((torch.ones(5, 1, dtype=torch.float64), q_k), 1)
        torch.testing.assert_close(q_new @ k_kept.T, q_k @ k_kept.T + ones_q @ x @ k_kept.T)


def test_corrected_q_without_bias_without_fit_and_its_gradient() -> None:
    fit = _fit()
    fit[:, :, 0] = 0  # no constant: what set_score_fit holds for a Linear without bias
    weight = torch.randn(H, 3, D, dtype=torch.float64, requires_grad=True)
    new_w, new_b = sf.corrected_q(weight, None, fit, 3)
    assert new_b is None
    torch.testing.assert_close(new_w, torch.einsum("hij,hjd->hid", sf.q_map(fit, 3)[0], weight))
    bias = torch.randn(H, R + 1, dtype=torch.float64)
    wide = torch.randn(H, R + 1, D, dtype=torch.float64)
    out_w, out_b = sf.corrected_q(wide, bias, fit, R + 1)  # no fit for r > R: the inputs themselves
    assert out_w is wide and out_b is bias
    assert torch.autograd.gradcheck(lambda w: sf.corrected_q(w, None, fit, 3)[0], (weight,))


# --------------------------------------------------------------------------------------------- files
def _model() -> nn.Module:
    """Two 'blocks' whose q-producing Linears the restore helper is told about."""
    return nn.ModuleDict({"a": _qkv(), "b": _qkv(), "fc": nn.Linear(D, D).double(), "act": nn.GELU()})


class _Spec:
    """What restore_fits reads of a BlockSpec: the fused qkv, H and hd."""

    fused = True

    def __init__(self, qkv: nn.Linear) -> None:
        self.qkv, self.num_heads, self.head_dim = qkv, H, HD


def test_fits_pop_and_restore_round_trip() -> None:
    model = _model()
    sf.set_score_fit(model["b"], _fit(), H, HD)
    stored = sf.fits(model)
    assert list(stored) == ["skd_score_fit:b"]
    tensors = {"a.weight": model["a"].weight, **stored}
    popped = sf.pop_fits(tensors)
    assert list(tensors) == ["a.weight"] and list(popped) == ["skd_score_fit:b"]
    fresh = _model()
    sf.restore_fits(fresh, [_Spec(fresh["a"]), _Spec(fresh["b"])], popped)
    torch.testing.assert_close(sf.score_fit(fresh["b"]), _fit())
    assert sf.score_fit(fresh["a"]) is None


@pytest.mark.parametrize(("name", "value", "message"), [
    ("missing", _fit(), "'missing': the model has no q-producing Linear"),
    ("act", _fit(), "'act': the model has no q-producing Linear"),
    ("fc", _fit(), "'fc': the model has no q-producing Linear"),
    ("b", _fit()[:, :, :, :2], r"'b': score fit must have shape"),
])
def test_restore_refuses_bad_fits_and_sets_none_of_them(name: str, value: torch.Tensor, message: str) -> None:
    model = _model()
    stored = {"skd_score_fit:a": _fit(), f"skd_score_fit:{name}": value}  # the good one comes first
    with pytest.raises(ValueError, match=message):
        sf.restore_fits(model, [_Spec(model["a"]), _Spec(model["b"])], stored)
    assert sf.fits(model) == {}  # nothing half-loaded
