"""The model port (skd.models): the registry, UnsupportedModelError, a new family as one new class (a
pure-PyTorch BERT-like encoder: separate q/k/v, post-LayerNorm, padding), and the single door: the
model-agnostic modules import neither timm nor transformers."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import skd
from skd import ElasticViT, Subnet, UnsupportedModelError
from skd.models import BlockSpec, ModelAdapter, adapter_for, head_rows, register, truncated_linear
from skd.models.timm_vit import ViTAdapter
from skd.stats import CONTEXT, calibrate
from tests.elastic_oracle import random_subnets, rel_err

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab=50, max_len=12, dim=24, heads=3, head_dim=6, hidden=40, depth=3)


# ------------------------------------------------------------------------------- the fake family
class TinyOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor  # (B, D): mean over the non-padding tokens


class TinyLayer(nn.Module):
    """A post-LayerNorm encoder layer like BERT's: separate q/k/v (H*hd may differ from D), o, fc1, fc2."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, head_dim ** -0.5
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim)

    def attention(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        ctx = torch.softmax(q @ k.transpose(-1, -2) * self.scale + bias, dim=-1) @ v
        return self.o(ctx.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attention(x, bias))
        return self.ln2(x + self.fc2(self.act(self.fc1(x))))


class TinyEncoder(nn.Module):
    def __init__(self, vocab: int, max_len: int, dim: int, heads: int, head_dim: int, hidden: int,
                 depth: int) -> None:
        super().__init__()
        self.config = dict(vocab=vocab, max_len=max_len, dim=dim, heads=heads, head_dim=head_dim, hidden=hidden,
                           depth=depth)
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(TinyLayer(dim, heads, head_dim, hidden) for _ in range(depth))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        return x, (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e9  # additive bias (B, 1, 1, T)

    @staticmethod
    def output(x: torch.Tensor, attention_mask: torch.Tensor) -> TinyOutput:
        m = attention_mask[..., None].to(x.dtype)
        return TinyOutput(x, (x * m).sum(1) / m.sum(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TinyOutput:
        x, bias = self.embed(input_ids, attention_mask)
        for layer in self.layers:
            x = layer(x, bias)
        return self.output(x, attention_mask)


@register(TinyEncoder)
class TinyAdapter(ModelAdapter):
    """The whole family: one class, nothing else in skd changes."""

    source = "tiny-test"

    def __init__(self, model: TinyEncoder) -> None:
        blocks = [BlockSpec(name=f"layers.{i}", block=ly, q=ly.q, k=ly.k, v=ly.v, proj=ly.o, fc1=ly.fc1,
                            fc2=ly.fc2, act=ly.act, num_heads=ly.heads, head_dim=ly.head_dim,
                            hidden=ly.fc1.out_features, tokens=model.config["max_len"], sequences=1)
                  for i, ly in enumerate(model.layers)]
        super().__init__(model, blocks)

    def run(self, args: tuple, kwargs: dict[str, Any], subnet: Subnet, attn_fn: Any, mlp_fn: Any) -> TinyOutput:
        m, mask = self.model, kwargs["attention_mask"]
        x, bias = m.embed(kwargs["input_ids"], mask)
        for i, ly in enumerate(m.layers):  # post-norm: a skipped branch is a zero residual before the norm
            x = ly.ln1(x + attn_fn(i, x, bias) if subnet.attn[i] else x)
            x = ly.ln2(x + mlp_fn(i, x) if subnet.mlp[i] else x)
        return m.output(x, mask)

    def token_weights(self, batch: Any) -> torch.Tensor:
        return batch["attention_mask"].float()

    def default_loss(self, output: TinyOutput, batch: Any, reduction: str = "mean") -> torch.Tensor:
        per_sample = output.pooled.float().square().sum(-1)
        return per_sample.sum() if reduction == "sum" else per_sample.mean()

    def other_macs(self) -> int:
        return 0

    def shrink(self, subnet: Subnet) -> None:
        for spec, r, h in zip(self.blocks, subnet.attn, subnet.mlp, strict=True):
            # width 0: one all-zero dim per head (the branch then adds exactly 0)
            ly, rows = spec.block, head_rows(spec.num_heads, spec.head_dim, max(r, 1))
            ly.q, ly.k, ly.v = (truncated_linear(lin, rows, zero=r == 0) for lin in (ly.q, ly.k, ly.v))
            ly.o = truncated_linear(ly.o, cols=rows, zero=r == 0)
            ly.head_dim = max(r, 1)  # ly.scale keeps the full head's 1/sqrt(hd)
            ly.fc1, ly.fc2 = truncated_linear(ly.fc1, torch.arange(h)), truncated_linear(ly.fc2, cols=torch.arange(h),
                                                                                          zero=h == 0)

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "config": self.model.config}

    @classmethod
    def rebuild(cls, record: dict[str, Any]) -> nn.Module:
        return TinyEncoder(**record["config"])


def _tiny(seed: int = 0) -> TinyEncoder:
    torch.manual_seed(seed)
    model = TinyEncoder(**CONFIG).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines and biases
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(n: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = CONFIG["max_len"]
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": torch.randint(0, CONFIG["vocab"], (n, t), generator=g), "attention_mask": mask}


def _masked_copy(model: TinyEncoder, s: Subnet) -> TinyEncoder:
    """Oracle: a copy with everything outside `s` zeroed, run through the model's own forward."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for ly, r, h in zip(m.layers, s.attn, s.mlp, strict=True):
            for lin in (ly.q, ly.k, ly.v):
                lin.weight.view(ly.heads, ly.head_dim, -1)[:, r:] = 0
                lin.bias.view(ly.heads, ly.head_dim)[:, r:] = 0
            ly.o.weight.view(-1, ly.heads, ly.head_dim)[:, :, r:] = 0
            ly.fc1.weight[h:], ly.fc1.bias[h:], ly.fc2.weight[:, h:] = 0, 0, 0
            if r == 0:
                ly.o.bias.zero_()
            if h == 0:
                ly.fc2.bias.zero_()
    return m


def _assert_tokens_close(out: TinyOutput, ref: TinyOutput, mask: torch.Tensor, tol: float = 1e-5) -> None:
    keep = mask.bool()
    assert rel_err(out.last_hidden_state[keep], ref.last_hidden_state[keep]) <= tol
    assert rel_err(out.pooled, ref.pooled) <= tol


# ------------------------------------------------------------------------------------ registry
def test_registry_finds_the_family_and_names_unsupported_classes() -> None:
    assert type(adapter_for(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3))) \
        is ViTAdapter
    assert type(adapter_for(_tiny())) is TinyAdapter
    with pytest.raises(UnsupportedModelError, match=r"torch\.nn\.modules\.linear\.Linear is not supported"):
        adapter_for(nn.Linear(3, 3))
    with pytest.raises(UnsupportedModelError, match=r"must be a torch\.nn\.Module"):
        adapter_for("bert")
    with pytest.raises(ValueError, match="already served by TinyAdapter"):
        register(TinyEncoder)(type("Other", (TinyAdapter,), {}))
    with pytest.raises(ValueError, match="either the fused qkv Linear or all of q, k and v"):
        ly = TinyLayer(4, 2, 2, 8)
        BlockSpec(name="x", block=ly, q=ly.q, proj=ly.o, fc1=ly.fc1, fc2=ly.fc2, act=ly.act, num_heads=2,
                  head_dim=2, hidden=8, tokens=1, sequences=1)


# -------------------------------------------------------------------- a new family, end to end
def test_new_family_elastic_matches_masking_oracle_with_padding() -> None:
    model = _tiny()
    bare = copy.deepcopy(model)
    elastic = ElasticViT(model)
    batch = _batch()
    hd, hid = elastic.head_dims, elastic.hiddens
    assert hd == (6,) * 3 and hid == (40,) * 3
    for s in random_subnets(hd, hid, 10, seed=3):
        with torch.no_grad():
            out = elastic(**batch, subnet=s)
            ref = _masked_copy(bare, s)(**batch)
        assert isinstance(out, TinyOutput), "the model's own output type"
        _assert_tokens_close(out, ref, batch["attention_mask"])
    assert elastic.subnet == Subnet(attn=hd, mlp=hid), "subnet= does not change the active subnet"


def test_masks_equal_truncation_separate_and_fused() -> None:
    batch = _batch()
    elastic = ElasticViT(_tiny())
    s = Subnet(attn=[4, 6, 2], mlp=[30, 11, 40])
    full = Subnet(attn=elastic.head_dims, mlp=elastic.hiddens)
    masks = {(b, "attn"): (torch.arange(6) < r).float() for b, r in enumerate(s.attn)}
    masks.update({(b, "mlp"): (torch.arange(40) < h).float() for b, h in enumerate(s.mlp)})
    with torch.no_grad():
        _assert_tokens_close(elastic(**batch, subnet=full, masks=masks), elastic(**batch, subnet=s),
                             batch["attention_mask"])
    vit = ElasticViT(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                       num_classes=5).eval())
    x = torch.randn(4, 3, 32, 32)
    s = Subnet(attn=[5, 16], mlp=[100, 7])
    masks = {(0, "attn"): (torch.arange(16) < 5).float(), (1, "mlp"): (torch.arange(192) < 7).float(),
             (0, "mlp"): (torch.arange(192) < 100).float()}
    with torch.no_grad():
        assert rel_err(vit(x, masks=masks), vit(x, subnet=s)) < 1e-5
    with pytest.raises(ValueError, match=r"masks\[\(0, 'attn'\)\] must be a tensor of shape \(16,\)"):
        vit(x, masks={(0, "attn"): torch.ones(3)})
    with pytest.raises(ValueError, match="masks key"):
        vit(x, masks={(7, "attn"): torch.ones(16)})


def test_new_family_extract_wpac_save_load(tmp_path: Path) -> None:
    batch = _batch()
    elastic = ElasticViT(_tiny())
    with torch.no_grad():
        before = elastic(**batch)
    calib = [_batch(8, seed=k) for k in range(3)]
    skd.wpac(elastic, calib, num_samples=24, progress=False)
    with torch.no_grad():
        _assert_tokens_close(elastic(**batch), before, batch["attention_mask"])  # function preserving
    assert elastic.skd_report.blocks[0].vo_spectrum.shape == (3, 6)
    s = Subnet(attn=[3, 0, 6], mlp=[0, 17, 40])
    small = elastic.extract(s)
    assert small.layers[0].q.out_features == 9 and small.layers[1].fc1.out_features == 17
    with torch.no_grad():
        _assert_tokens_close(small(**batch), elastic(**batch, subnet=s), batch["attention_mask"])
    skd.save(elastic.set_subnet(subnet=s), tmp_path / "tiny.safetensors")
    loaded = skd.load(tmp_path / "tiny.safetensors")
    assert isinstance(loaded, ElasticViT) and loaded.subnet == s
    with torch.no_grad():
        _assert_tokens_close(loaded(**batch), elastic(**batch), batch["attention_mask"], tol=0)


def test_padding_tokens_carry_no_weight_in_statistics() -> None:
    """Statistics do not change when the padding tokens' ids change (uniform covariance, Taylor, Fisher);
    a frozen model with integer inputs still gets gradients (and stays frozen)."""
    model = _tiny().requires_grad_(False)
    adapter = adapter_for(model)
    data = [_batch(8, seed=k) for k in range(2)]
    other = [{**b, "input_ids": torch.where(b["attention_mask"].bool(), b["input_ids"],
                                            (b["input_ids"] + 7) % CONFIG["vocab"])} for b in data]
    kw = dict(num_samples=16, covariance="uniform", fisher=True, context=True, progress=False,
              loss_fn=lambda out, b: adapter.default_loss(out, b, reduction="sum"), token_weights=adapter.token_weights)
    a = calibrate(model, adapter.blocks, data, **kw)
    b = calibrate(model, adapter.blocks, other, **kw)
    without = calibrate(model, adapter.blocks, data, **{**kw, "token_weights": None})
    assert not any(p.requires_grad for p in model.parameters())
    for fa, fb, fw in zip(a.blocks, b.blocks, without.blocks, strict=True):
        assert set(fa) == {"q", "k", "v", "hidden", CONTEXT}
        for name in ("q", "v", CONTEXT):
            torch.testing.assert_close(fa[name].cov.covariance(), fb[name].cov.covariance(), rtol=1e-9, atol=1e-9)
        for name in ("q", "v", "hidden"):
            torch.testing.assert_close(fa[name].taylor, fb[name].taylor, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(fa[name].fisher, fb[name].fisher, rtol=1e-9, atol=1e-12)
            assert float(fa[name].taylor.sum()) > 0
        assert fa[CONTEXT].taylor is None, "the context is forward only"
        n_tokens = sum(int(d["attention_mask"].sum()) for d in data)
        assert float(fa["v"].cov.weight_sum) == n_tokens == float(fa[CONTEXT].cov.weight_sum)
        assert float(fw["v"].cov.weight_sum) == 16 * CONFIG["max_len"], "without weights every token counts"


def test_context_statistics_match_direct_computation() -> None:
    """The context feature (o's input), whatever the q/k/v covariance mode: its uniform per-head covariance
    by definition."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5).eval()
    adapter = adapter_for(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    stats = calibrate(model, adapter.blocks, [(x, y)], num_samples=8, covariance="weighted", context=True,
                      progress=False)
    ctx = {}
    handles = [s.proj.register_forward_pre_hook(lambda m, a, i=i: ctx.__setitem__(i, a[0].detach()))
               for i, s in enumerate(adapter.blocks)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    for i, feats in enumerate(stats.blocks):
        a = ctx[i].double().reshape(-1, 3, 16)
        xc = a - a.mean(0)
        direct = torch.einsum("nhi,nhj->hij", xc, xc) / len(a)
        torch.testing.assert_close(feats[CONTEXT].cov.covariance().double(), direct, rtol=1e-4, atol=1e-7)
    assert CONTEXT not in calibrate(model, adapter.blocks, [(x, y)], num_samples=8, covariance="uniform",
                                    progress=False).blocks[0], "off by default"


# ------------------------------------------------------------------------------ the single door
LIBRARIES = {"timm", "transformers"}
AGNOSTIC = ["elastic", "stats", "wpac", "importance", "evaluate", "io", "batches", "subnet", "errors", "timing",
            "_checks", "_atomic", "models"]


def _source(name: str) -> Path | None:
    """skd/<name>.py or skd/<name>/__init__.py for a dotted name relative to skd; None if neither."""
    base = ROOT / "skd" / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if name and path.is_file():
            return path
    return None


def _skd_modules_reached(start: list[str]) -> dict[str, set[str]]:
    """Every skd module reachable from `start` through imports (skd/__init__ and the family files, which
    the registry imports by name, are not reached), with the top-level packages each one imports
    anywhere in its source, function bodies included."""
    out: dict[str, set[str]] = {}
    todo = list(start)
    while todo:
        name = todo.pop()
        path = _source(name)
        if name in out or path is None:
            continue
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tops: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    todo.append(".".join([*base, node.module]))
                else:
                    todo += [".".join([*base, a.name]) for a in node.names]
        out[name] = tops
    return out


def test_model_agnostic_modules_import_no_model_library() -> None:
    reached = _skd_modules_reached(AGNOSTIC)
    assert {"elastic.module", "elastic.layout", "elastic.budget", "stats", "wpac", "io"} <= set(reached)
    leaks = {m: sorted(t & LIBRARIES) for m, t in reached.items() if t & LIBRARIES}
    assert not leaks, f"model libraries imported outside the adapters: {leaks}"
    # and the check can fail: the timm adapter does import timm
    assert "timm" in _skd_modules_reached(["models.timm_vit"])["models.timm_vit"]


def test_rebuild_names_a_missing_source() -> None:
    with pytest.raises(ValueError, match="no adapter rebuilds models of source 'nope'"):
        skd.models.rebuild({"source": "nope"})


# ------------------------------------------------------------------------------------- batches
def test_batches_vocabulary() -> None:
    from skd import batches

    x, y = torch.randn(5, 3, 4, 4), torch.randint(0, 3, (5,))
    d = {**_batch(5), "labels": y}
    assert batches.model_inputs((x, y))[0][0] is x and batches.labels((x, y)) is y
    args, kwargs = batches.model_inputs(d)
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"} and batches.labels(d) is y
    assert batches.labels(x) is None and batches.batch_size(x) == 5 and batches.batch_size(d) == 5
    half = batches.to_device((x, y), "cpu", torch.float64)
    assert half[0].dtype == torch.float64 and half[1].dtype == torch.int64, "labels are not cast"
    parts = list(batches.take([d, d], 7))
    assert [batches.batch_size(p) for p in parts] == [5, 2]
    joined = batches.concat(parts)
    assert torch.equal(joined["input_ids"], torch.cat([d["input_ids"], d["input_ids"][:2]]))
    bad = (x.clone(), y)
    bad[0][1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 3: images contain NaN or Inf"):
        batches.check_finite(bad, "batch 3")
    with pytest.raises(ValueError, match="a batch must be"):
        batches.model_inputs(["text"])
    with pytest.raises(ValueError, match="map names to tensors"):
        batches.model_inputs({"input_ids": [1, 2]})
