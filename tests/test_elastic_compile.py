"""torch.compile of an ElasticViT: one graph serves every width (the widths are symbolic), and the
compiled model computes what the eager one does at each width."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import hf_helpers
import pytest
import torch
from elastic_oracle import compiled_counting, rel_err
from timm.models.swin_transformer import SwinTransformer
from torch.profiler import ProfilerActivity, profile

import skd_kernels
from benchmarks import compiled_gradients
from skd import ElasticViT, Subnet
from skd.compensation import set_input_mean

KEEPS = (0.25, 0.5, 0.75, 1.0)


def _elastic() -> ElasticViT:
    """benchmarks/compiled_gradients.py's model: 2 blocks of ViT-Ti width (head_dim 64, hidden 768), 32 px, eval."""
    return compiled_gradients.tiny_elastic()


def test_one_graph_serves_four_widths_and_any_subnet() -> None:
    elastic = _elastic()
    x = torch.randn(2, 3, 32, 32)
    for dynamic in (True, None):  # dynamic=None: torch.compile's default
        compiled, counter = compiled_counting(elastic, dynamic=dynamic, fullgraph=True)
        with torch.no_grad():
            for keep in KEEPS:
                elastic.set_subnet(keep=keep)
                err = rel_err(compiled(x), elastic(x))
                print(f"dynamic={dynamic} keep={keep} widths={elastic.subnet.attn}: rel err {err:.1e}")
                assert err <= 1e-6
            assert counter.frame_count == 1
            # per-block widths differing within the subnet reuse the graph: each width is its own symbol
            elastic.set_subnet(subnet=Subnet(attn=[5, 37], mlp=[100, 7]))
            assert rel_err(compiled(x), elastic(x)) <= 1e-6
            assert counter.frame_count == 1
    assert all(type(w) is int for w in (*elastic.subnet.attn, *elastic.subnet.mlp))  # the public subnet is plain


def test_skipped_branch_compiles_its_own_graph_and_matches() -> None:
    """Width 0 skips a branch (other control flow): a second graph, still equal to eager."""
    elastic = _elastic()
    x = torch.randn(2, 3, 32, 32)
    compiled, counter = compiled_counting(elastic)
    with torch.no_grad():
        for subnet in (Subnet(attn=[16, 16], mlp=[192, 192]), Subnet(attn=[0, 9], mlp=[100, 0]),
                       Subnet(attn=[0, 40], mlp=[7, 0])):
            elastic.set_subnet(subnet=subnet)
            assert rel_err(compiled(x), elastic(x)) <= 1e-6
    assert counter.frame_count == 2



def _swin() -> tuple[ElasticViT, Callable[[torch.nn.Module], torch.Tensor]]:
    """Shifted windows (masks, relative position bias) and patch merging: 2 stages of 2 blocks."""
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 3),
                            num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 32, 32)
    return ElasticViT(model.eval()).eval(), lambda m: m(x)


def _hf(name: str) -> tuple[ElasticViT, Callable[[torch.nn.Module], torch.Tensor]]:
    inputs = hf_helpers.inputs(name)
    return ElasticViT(hf_helpers.tiny(name)).eval(), lambda m: hf_helpers.main_output(m(**inputs))


# family -> (its ElasticViT, model -> the output tensor on a fixed batch)
FAMILIES = {"timm_swin": _swin, "hf_bert": lambda: _hf("BertModel"),
            "hf_vit": lambda: _hf("ViTForImageClassification")}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_compiles_once_for_four_widths(family: str) -> None:
    elastic, out = FAMILIES[family]()
    compiled, counter = compiled_counting(elastic)
    with torch.no_grad():
        for keep in KEEPS:
            elastic.set_subnet(keep=keep)
            assert rel_err(out(compiled), out(elastic)) <= 1e-6
    assert counter.frame_count == 1


def test_bias_compensation_compiles_at_most_two_graphs() -> None:
    """With stored input means (skd.compensation) the compensated bias is exactly the bias at full width, a
    branch of its own: one graph for the narrower widths, one for full width; outputs equal eager's."""
    elastic = _elastic()
    for spec in elastic.adapter.blocks:
        for lin in (spec.proj, spec.fc2):
            set_input_mean(lin, torch.randn(lin.in_features))
    x = torch.randn(2, 3, 32, 32)
    compiled, counter = compiled_counting(elastic, fullgraph=True)
    with torch.no_grad():
        for keep in KEEPS:
            elastic.set_subnet(keep=keep)
            assert rel_err(compiled(x), elastic(x)) <= 1e-6
    assert counter.frame_count <= 2

def test_subnet_per_call_compiles_at_most_two_graphs() -> None:
    """forward(subnet=...) passes plain ints from the caller: Dynamo's automatic dynamic shapes compile the
    first widths as constants and the next as symbols, so four subnets need two graphs."""
    elastic = _elastic()
    x = torch.randn(2, 3, 32, 32)
    compiled, counter = compiled_counting(elastic)
    with torch.no_grad():
        for keep in KEEPS:
            subnet = elastic.uniform(keep)
            assert rel_err(compiled(x, subnet=subnet), elastic(x, subnet=subnet)) <= 1e-6
    assert counter.frame_count <= 2



@pytest.mark.parametrize(("batch", "route"), [(2, "_sdpa_copying_activations"), (12, "_sdpa_reordering_weights")])
def test_training_compiles_at_most_two_graphs_with_eager_gradients(batch: int, route: str,
                                                                    request: pytest.FixtureRequest) -> None:
    """Forward and backward (AOTAutograd traces the ops' backward with symbolic widths), on each SDPA route (the
    kept weights are reordered from S*N >= D tokens: 12 * 17 >= 192): gradients equal eager's, in one graph
    (fullgraph) per call. Full width takes a second graph in training (a contiguity check on the full-size views
    guards `width != full`), so four widths need two."""
    elastic = _elastic().train()
    x = torch.randn(batch, 3, 32, 32)
    compiled, counter = compiled_counting(elastic, "aot_eager", fullgraph=True)
    for keep in KEEPS:
        elastic.set_subnet(keep=keep)
        grads = []
        for model in (compiled, elastic):
            elastic.zero_grad()
            model(x).square().sum().backward()
            grads.append([p.grad.clone() for p in elastic.parameters()])
        assert any(g.abs().sum() > 0 for g in grads[1])
        for got, want in zip(*grads, strict=True):
            if want.any():
                assert rel_err(got, want) <= 1e-6
            else:  # outside the subnet's blocks
                assert not got.any()
    assert counter.frame_count <= 2
    routes_taken = request.getfixturevalue("routes_taken")  # only now: Dynamo would guard on the spy's list
    elastic(x)
    assert set(routes_taken) == {route}

def test_autocast_training_compiles_one_inductor_graph_for_full_narrow_and_mixed_widths() -> None:
    """PIAD's compiled step on a GPU (inductor, bf16 autocast, forward and backward), here on CPU: full width,
    narrower ones and subnets mixing full-width and narrower MLPs share one graph. prefix_linear's autocast cast
    slices a column-major weight (fc2) through its transpose, so the backward's zero-filled buffer holds a dense
    block at every width and inductor does not guard on the width being full (it did: a graph per pattern of
    full-width MLPs, the full width's own on the H200). The gradients equal eager's."""
    assert_autocast_training_is_one_graph(_elastic().train(), torch.randn(2, 3, 32, 32))


def assert_autocast_training_is_one_graph(elastic: ElasticViT, x: torch.Tensor) -> None:
    """torch.compile(elastic) (inductor) trained under bf16 autocast on x's device at full width, narrower widths
    and two mixes of full-width and narrower MLPs (a 2-block model): one graph, and each subnet's gradients those
    of the eager model (tests/test_gpu.py runs it on CUDA)."""
    torch._dynamo.reset()
    compiled = torch.compile(elastic, backend="inductor", dynamic=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    full, (r, m) = Subnet(attn=elastic.head_dims, mlp=elastic.hiddens), (elastic.head_dims[0], elastic.hiddens[0])
    for subnet in (full, Subnet(attn=[r // 4] * 2, mlp=[m // 3] * 2), Subnet(attn=[r // 4, r], mlp=[m, m // 3]),
                   Subnet(attn=[r, r // 2], mlp=[m // 2, m])):
        elastic.set_subnet(subnet=subnet)
        grads = []
        for model in (compiled, elastic):
            elastic.zero_grad()
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                loss = model(x).float().square().sum()
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in elastic.parameters() if p.grad is not None]))
        err = rel_err(*grads)
        print(f"{subnet}: gradients rel err {err:.1e}")
        assert err <= 2e-2  # bf16 GEMMs, fused differently
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1


def test_inductor_compiles_once_for_four_widths() -> None:
    """The real compiler (inductor, C++ codegen on CPU) with symbolic widths: one graph, eager's outputs."""
    elastic = _elastic()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(elastic, backend="inductor", fullgraph=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    with torch.no_grad():
        for keep in KEEPS:
            elastic.set_subnet(keep=keep)
            err = rel_err(compiled(x), elastic(x))
            print(f"inductor keep={keep}: rel err {err:.1e}")
            assert err <= 1e-5
    print(f"inductor: {time.perf_counter() - start:.1f} s for four widths")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1


def test_one_graph_where_the_forced_backend_is_a_trace_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch < 2.13 runs (skd_kernels/_dispatch.py: its Dynamo cannot trace ContextVar.get and broke the
    graph at every op, 27 graphs on an H200 with torch 2.11): the forced backend's name is read through
    torch.compiler.assume_constant_result. Still one graph for four widths, equal to eager, and a backend
    forced while tracing is the one the graph runs."""
    from skd_kernels import _dispatch

    def constant_name() -> str | None:
        return _dispatch._forced.get() or _dispatch._env_backend() or None

    monkeypatch.setattr(_dispatch, "_forced_name", torch.compiler.assume_constant_result(constant_name))
    elastic = _elastic()
    x = torch.randn(2, 3, 32, 32)
    compiled, counter = compiled_counting(elastic, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for keep in KEEPS:
            elastic.set_subnet(keep=keep)
            assert rel_err(compiled(x), elastic(x)) <= 1e-6
        assert counter.frame_count == 1
        compiled, counter = compiled_counting(elastic, dynamic=True, fullgraph=True)
        with skd_kernels.use_backend("reference"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                y = compiled(x)
            assert counter.frame_count == 1 and rel_err(y, elastic(x)) <= 1e-6
    assert not [e.key for e in prof.events() if e.key.startswith("skd_kernels::")]  # the references' aten ops


def test_compiled_gradients_reports_each_variant(tmp_path: Path) -> None:
    """benchmarks/compiled_gradients.py (the device's diagnosis of compiled bf16 training) run on CPU with its exact
    control, aot_eager (Dynamo's graph and AOT autograd without inductor): per subnet the output and every gradient
    equal eager's, the report written to --out; a variant past its time limit is a row saying so."""
    out = tmp_path / "report.md"
    (row,) = compiled_gradients.main(["--device", "cpu", "--variants", "aot_eager", "--jobs", "1", "--out", str(out)])
    assert row["error"] is None and row["missing"] == [] and len(row["subnets"]) == 2
    assert all(s["out_err"] == s["grad_err"] == 0 and s["entry"] is None for s in row["subnets"]), row
    assert "every subnet: aot_eager@12." in out.read_text()
    stopped = compiled_gradients._child("inductor", 3, "cpu", 1, 0.5)
    assert stopped["error"] == "stopped at its 0.5 s limit" and stopped["subnets"] == []


def test_compiled_gradients_overrides_only_what_this_torch_has() -> None:
    """A variant's config overrides hold inside the block and are undone after; names this torch lacks are
    returned, not set."""
    import torch._functorch.config
    import torch._inductor.config

    variant = compiled_gradients.Variant(inductor={"triton.persistent_reductions": False, "no_such.option": 1},
                                         functorch={"backward_pass_autocast": "off"})
    before = (torch._inductor.config.triton.persistent_reductions, torch._functorch.config.backward_pass_autocast)
    with compiled_gradients._config(variant) as missing:
        assert missing == ["no_such.option"]
        assert torch._inductor.config.triton.persistent_reductions is False
        assert torch._functorch.config.backward_pass_autocast == "off"
    assert (torch._inductor.config.triton.persistent_reductions,
            torch._functorch.config.backward_pass_autocast) == before != (False, "off")


def test_compiled_gradients_narrows_where_the_failing_case_is_wrong() -> None:
    """A plain run's plan once the failing case has run on both routes: wrong on the weights route, the queued
    variants stay; right there but wrong on the activations route, they move there; right on both, none run."""
    cg = compiled_gradients

    def row(grad_err: float) -> dict:
        return {"error": None, "subnets": [{"grad_err": grad_err}, {"grad_err": 1e-3}]}

    wrong, fine = row(0.4), row(1e-3)
    weights, activations = cg.BASELINES
    assert cg._narrowed({weights: wrong, activations: wrong}) == (None, "")
    moved, note = cg._narrowed({weights: fine, activations: wrong})
    assert moved == [(v, cg.ACTIVATIONS_ROUTE_BATCH) for v in cg.VARIANTS if v != "inductor"] and "activations" in note
    assert cg._narrowed({weights: fine, activations: fine})[0] == []
    assert not cg.right({"error": "exit 1: boom", "subnets": []})
