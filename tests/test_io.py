"""skd.save / skd.load and the lower-level save_tensors / load_tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import skd
from skd import DropoutList, ElasticViT, Subnet
from skd.io import load_tensors, save_tensors

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)


def _elastic() -> ElasticViT:
    model = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    return ElasticViT(model).eval()


def test_round_trip_identical_outputs_subnet_and_dropout_list(tmp_path: Path) -> None:
    elastic = _elastic()
    elastic.dropout_list = DropoutList([(1, "mlp"), (0, "attn")], elastic.head_dims, elastic.hiddens)
    elastic.set_subnet(subnet=Subnet(attn=[7, 0, 16], mlp=[192, 33, 1]))
    path = tmp_path / "m.safetensors"
    skd.save(elastic, path)
    loaded = skd.load(path).eval()
    assert loaded.subnet == elastic.subnet and loaded.dropout_list == elastic.dropout_list
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), elastic(x))
        assert torch.equal(loaded.set_subnet(keep=1.0)(x), elastic.set_subnet(keep=1.0)(x))
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_bare_model_saves_head_major_and_loads_elastic(tmp_path: Path) -> None:
    model = timm.create_model("deit_tiny_distilled_patch16_224", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    skd.save(model, tmp_path / "bare.safetensors")
    _, meta = load_tensors(tmp_path / "bare.safetensors")
    assert meta["layout"] == "timm" and meta["architecture"] == "deit_tiny_distilled_patch16_224"
    with torch.no_grad():
        torch.testing.assert_close(skd.load(tmp_path / "bare.safetensors").eval()(x), expected, rtol=1e-5, atol=1e-6)


def test_truncated_or_garbage_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    skd.save(_elastic(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        skd.load(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        skd.load(path)


def test_mismatched_metadata_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    elastic = _elastic()
    skd.save(elastic, path)
    tensors, meta = load_tensors(path)
    save_tensors(path, tensors, dict(meta, model_args=dict(meta["model_args"], embed_dim=96)))
    with pytest.raises(ValueError, match="wrong shape"):
        skd.load(path)
    save_tensors(path, tensors, dict(meta, model_args=dict(meta["model_args"], depth=2)))
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.2"):
        skd.load(path)
    save_tensors(path, tensors, dict(meta, layout=99))
    with pytest.raises(ValueError, match="layout 99"):
        skd.load(path)
    save_tensors(path, tensors, {"format": "something else"})
    with pytest.raises(ValueError, match="not an skd model file"):
        skd.load(path)
    save_tensors(path, tensors, dict(meta, subnet={"attn": [17, 16, 16], "mlp": [1, 1, 1]}))
    with pytest.raises(ValueError, match=r"subnet\.attn\[0\]=17"):
        skd.load(path)


def test_save_tensors_round_trip_atomic_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).t()}  # non-contiguous
    save_tensors(path, tensors, {"step": 3, "lr": [0.1, 0.2]})
    loaded, meta = load_tensors(path)
    assert meta == {"step": 3, "lr": [0.1, 0.2]}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="JSON"):
        save_tensors(path, tensors, {"bad": object()})
    with pytest.raises(ValueError, match=r"tensors\['x'\]"):
        save_tensors(path, {"x": [1, 2]}, {})
    assert path.read_bytes() == before  # a failed save leaves the old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_model_not_from_create_model_is_refused(tmp_path: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ValueError, match=r"timm\.create_model"):
        skd.save(ElasticViT(VisionTransformer(**TINY)), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="obj must be"):
        skd.save({"a": 1}, tmp_path / "x.safetensors")
    elastic = _elastic()
    with elastic.standard_layout(), pytest.raises(ValueError, match="inside standard_layout"):
        skd.save(elastic, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_metadata_is_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    skd.save(_elastic(), path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8: 8 + header_len])
    meta = json.loads(header["__metadata__"]["skd"])
    assert meta["skd_version"] == skd.__version__ and meta["layout"] == 1 and meta["kind"] == "elastic"


def test_extracted_model_round_trip(tmp_path: Path) -> None:
    elastic = _elastic().set_subnet(subnet=Subnet(attn=[5, 0, 16], mlp=[100, 7, 0]))
    small = elastic.extract()
    assert small.skd_subnet == elastic.subnet.to_dict()  # plain data: pickles without skd
    path = tmp_path / "small.safetensors"
    skd.save(small, path)
    loaded = skd.load(path)
    assert not isinstance(loaded, ElasticViT) and loaded.blocks[0].attn.head_dim == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), small(x))


SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 3), num_classes=5)


@pytest.mark.parametrize(("arch", "kwargs"), [("vit_tiny_patch16_224", TINY), ("swin_tiny_patch4_window7_224", SWIN)])
def test_bf16_model_loads_back_as_bf16(tmp_path: Path, arch: str, kwargs: dict) -> None:
    """A bf16 super-network and its extract come back in bf16 with the same outputs: the saved tensors are
    not copied into the rebuilt model's fp32 parameters, and buffers the file does not hold (Swin's
    shifted-window attn_mask) follow the file's dtype."""
    elastic = ElasticViT(timm.create_model(arch, **kwargs).to(torch.bfloat16).eval()).eval()
    elastic.set_subnet(macs=0.6)
    small = elastic.extract()
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    for obj, name in ((elastic, "elastic"), (small, "small")):
        skd.save(obj, tmp_path / f"{name}.safetensors")
        loaded = skd.load(tmp_path / f"{name}.safetensors").eval()
        floats = [t for t in (*loaded.parameters(), *loaded.buffers()) if t.is_floating_point()]
        assert {t.dtype for t in floats} == {torch.bfloat16}, name
        with torch.no_grad():
            assert torch.equal(loaded(x), obj(x)), name


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_tensor_byte_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    skd.save(_elastic(), path)
    _flip_byte(path, 3)  # inside the last tensor's payload: still a valid safetensors file
    with pytest.raises(ValueError, match=r"does not match its SHA-256 \(1 of \d+ differ\)"):
        skd.load(path)


def test_edited_metadata_without_its_tensors_is_refused(tmp_path: Path) -> None:
    """A layout tag changed by hand (the tensors stay rank-major) must not load as head-major weights."""
    path = tmp_path / "m.safetensors"
    skd.save(_elastic(), path)
    data = path.read_bytes()
    edited = data.replace(b'\\"layout\\": 1', b'\\"layout\\": 0')
    assert edited != data and len(edited) == len(data)
    path.write_bytes(edited)
    with pytest.raises(ValueError, match="metadata does not match its SHA-256"):
        load_tensors(path)


def test_non_finite_weights_are_refused_on_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match=r"tensor 'w' holds NaN or Inf"):
        save_tensors(path, {"w": torch.tensor([1.0, float("nan")])}, {})
    assert not path.exists()
    # a file written without the check (an old skd, or another tool) is refused on load
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.tensor([float("inf"), 2.0])}, str(path), metadata={"skd": "{}"})
    with pytest.raises(ValueError, match=r"tensor 'w' holds NaN or Inf"):
        load_tensors(path)


def test_file_without_digests_still_loads(tmp_path: Path) -> None:
    """Files from before the SHA-256 record (the landed format) load unchanged."""
    import safetensors.torch

    path = tmp_path / "m.safetensors"
    elastic = _elastic()
    skd.save(elastic, path)
    tensors, meta = load_tensors(path)
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file(tensors, str(old), metadata={"skd": json.dumps(meta)})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(skd.load(old).eval()(x), elastic.eval()(x))


def test_extra_metadata_round_trip_and_malformed_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    extra = {"class_names": ["cat", "dog"], "history": [{"epoch": 1, "loss": 0.5}]}
    skd.save(_elastic(), path, extra=extra)
    assert load_tensors(path)[1]["extra"] == extra
    with pytest.raises(ValueError, match="extra must be a dict"):
        skd.save(_elastic(), tmp_path / "x.safetensors", extra=[1, 2])
    save_tensors(path, {"a": torch.ones(1)}, [1, 2])
    with pytest.raises(ValueError, match="metadata must be a JSON object, got list"):
        load_tensors(path)


OLD_TIMM_CASES = [("vit_digits", {}), ("deit_tiny_patch16_224", dict(img_size=64, num_classes=3, global_pool="avg"))]


@pytest.mark.parametrize(("arch", "kwargs"), OLD_TIMM_CASES)
def test_older_timm_records_what_the_model_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str,
                                                 kwargs: dict) -> None:
    """A timm without get_model_args (1.0.29, as on the lent GPU): skd records the arguments the model shows, the
    same ones get_model_args gives for a model built with only those, and the super-network and an extract
    load back to the same outputs (the extract once failed skd's own rebuild check: the device's CLI test)."""
    import timm.models

    import skd.digits  # registers vit_digits

    elastic = ElasticViT(timm.create_model(arch, **kwargs).eval()).eval()
    expected = timm.models.get_model_args(elastic.model)
    small = elastic.set_subnet(macs=0.5).extract()
    monkeypatch.delattr(timm.models, "get_model_args")
    x = torch.randn(2, 3, *expected["img_size"])
    for obj in (elastic, small):
        path = tmp_path / f"{type(obj).__name__}.safetensors"
        with pytest.warns(UserWarning, match="keeps no record"):
            skd.save(obj, path)
        _, meta = load_tensors(path)
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_args"].items()} == expected
        with torch.no_grad():
            torch.testing.assert_close(skd.load(path).eval()(x), obj(x), rtol=1e-5, atol=1e-5)


def test_older_timm_refuses_arguments_it_cannot_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model built with arguments it does not show (embed_dim, depth): the architecture's defaults would not
    rebuild it, so neither it nor its extract is saved."""
    import timm.models

    monkeypatch.delattr(timm.models, "get_model_args")
    elastic = _elastic()
    for obj in (elastic, elastic.extract()):
        with pytest.warns(UserWarning, match="upgrade timm"), pytest.raises(ValueError, match="load rebuilds another"):
            skd.save(obj, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_save_refuses_a_record_that_does_not_rebuild_the_model(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the adapter: a record load would rebuild into other shapes is refused before anything is written
    (here the record names another depth)."""
    from skd.models.timm_vit import ViTAdapter

    record = ViTAdapter.record
    monkeypatch.setattr(ViTAdapter, "record", lambda self: {**record(self), "model_args": {
        **record(self)["model_args"], "depth": 2}})
    with pytest.raises(ValueError, match=r"rebuilds another \(missing \[\], unexpected \['blocks\.2\."):
        skd.save(_elastic(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
