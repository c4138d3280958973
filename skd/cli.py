"""The `skd` command: demo, wpac, train, eval, extract, bench, info.

A bad argument (a budget outside (0, 1], a missing path, an unknown model, a file that is not an skd
file, an output that cannot be written, a dataset whose classes disagree with the model) prints one line
naming it and exits with status 2, before any compute and without writing anything. Every output file is
written atomically. Global options (--device, --seed, --workers, --no-progress) go before or after the
sub-command.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import __version__
from ._paths import check_out_dir, check_out_file

EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad command-line argument; main() prints it on one line and exits with status 2."""


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]")
    return f


def _budgets(text: str) -> list[float]:
    return [_fraction(t) for t in text.split(",") if t.strip()]


def _int_at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be >= {minimum}")
        return n

    return parse


_positive_int = _int_at_least(1)


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder or file")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


# ------------------------------------------------------------------------------------------ models
def _device(text: str | None) -> Any:
    """The torch.device for --device (default cuda if available, else cpu). A bare "cuda" under torchrun is
    this process's LOCAL_RANK GPU."""
    import torch

    text = text or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index
        if index >= count:
            raise UsageError(f"--device {text}: needs CUDA GPU {index}, but torch sees {count} CUDA GPU(s)")
        device = torch.device("cuda", index)
    return device


def _metadata(path: Path) -> dict[str, Any]:
    """The `extra` metadata the CLI keeps in an skd file (class names, training history), checked."""
    from .io import load_tensors

    extra = load_tensors(path)[1].get("extra") or {}
    ok = isinstance(extra, dict)
    names, history = (extra.get("class_names"), extra.get("history", [])) if ok else (None, [])
    ok = ok and (names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)))
    ok = ok and isinstance(history, list) and all(isinstance(h, dict) for h in history)
    if not ok:
        raise UsageError(f"{path}: malformed skd metadata: 'extra' must be an object whose class_names is a "
                         "list of strings and whose history is a list of objects")
    return extra


def open_file(path: Path, supernet: bool = True) -> tuple[Any, dict[str, Any]]:
    """(ElasticViT, extra metadata) of a saved skd file. With supernet=False an extracted model is accepted
    too (wrapped in an ElasticViT at its own size). Malformed metadata is a UsageError, not a traceback."""
    from .elastic import ElasticViT
    from .io import load

    extra = _metadata(path)
    try:
        loaded = load(path)
    except (TypeError, AttributeError, KeyError, IndexError) as e:  # metadata of the right JSON, wrong shape
        raise UsageError(f"{path}: malformed skd metadata ({type(e).__name__}: {e})") from e
    if isinstance(loaded, ElasticViT):
        return loaded, extra
    if supernet:
        raise UsageError(f"{path} holds an extracted standalone model; this command needs a super-network file")
    return ElasticViT(loaded), extra


def load_model(spec: str, pretrained: bool = False, progress: bool = True,
               **create_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """(ElasticViT, extra metadata) from a saved skd file, a HuggingFace model folder (its tokenizer's folder
    is recorded as extra["tokenizer"]), or a timm model name (with its pretrained weights; `create_kwargs`
    such as num_classes / img_size go to timm.create_model)."""
    import timm

    from .elastic import ElasticViT

    if create_kwargs and Path(spec).exists():
        raise UsageError(f"--{'/--'.join(k.replace('_', '-') for k in create_kwargs)} only apply to a timm "
                         f"model name; {spec} keeps the head and input size it was saved with")
    if Path(spec).is_file():
        return open_file(Path(spec))
    if Path(spec).is_dir():
        from .models.hf_folder import image_config, load_folder

        model, tokenizer = load_folder(spec, progress)
        if tokenizer is not None:
            return ElasticViT(model), {"tokenizer": str(Path(spec).resolve())}
        config = image_config(spec)
        return ElasticViT(model), ({} if config is None else {"image_config": config})
    if spec.endswith(".safetensors") or os.sep in spec:
        raise UsageError(f"{spec}: no such file")
    if not timm.is_model(spec):
        raise UsageError(f"unknown model {spec!r}: not a timm model name nor an skd file")
    if spec == "vit_digits" and pretrained:
        from .digits import pretrained_digits_vit  # trains and caches on first use: nothing to download

        return ElasticViT(pretrained_digits_vit(**create_kwargs)), {}
    try:
        return ElasticViT(timm.create_model(spec, pretrained=pretrained, **create_kwargs)), {}
    except OSError as e:  # huggingface_hub's offline / not-cached errors are OSErrors
        raise UsageError(f"cannot load pretrained weights for {spec!r}: not in the local cache and downloads "
                         f"are off (set HF_HUB_OFFLINE=0 with a network to fetch them) [{type(e).__name__}]") from e


def smallest_budget(elastic: Any) -> float:
    """The smallest MACs fraction that keeps a subnet with something in it: the end of the dropout list,
    or (uniform budgets) the smallest non-empty uniform subnet at the model's width granularity."""
    return elastic.macs(elastic.narrowest()) / elastic.full_macs


def _budget_widths(args: argparse.Namespace, elastic: Any) -> None:
    """--multiple-of, when given, replaces the file's (or the model's default) width granularity."""
    if args.multiple_of is not None:
        elastic.multiple_of = args.multiple_of


def _check_budgets(flag: str, budgets: list[float], elastic: Any) -> None:
    low = smallest_budget(elastic)
    below = [f for f in budgets if f < low]
    if below:
        where = ("the end of its dropout list" if elastic.dropout_list is not None else
                 f"the smallest non-empty uniform subnet at widths in multiples of {elastic.multiple_of}")
        raise UsageError(f"{flag} {below[0]:g} is below this model's smallest possible budget "
                         f"{math.ceil(low * 1e4) / 1e4:.4f} (fraction of the full model's MACs: {where})")


# -------------------------------------------------------------------------------------------- data
def _data(args: argparse.Namespace, root: Path | None, elastic: Any, split: str, extra: dict[str, Any]) -> Any:
    """The dataset for --data/--val-data `root`: for a text model (one with a tokenizer) a text file, one
    example per line (default: skd.text's calibration sentences for "train", evaluation ones for "test");
    for an image model an ImageFolder (default: the built-in digits)."""
    from .data import dataset_for

    if args.tokenizer is not None or extra.get("tokenizer") is not None:
        from . import text

        if root is not None and not root.is_file():
            raise UsageError(f"--data {root}: a text model reads a text file (one example per line), not a folder")
        tokenizer = _tokenizer(args.tokenizer or Path(extra["tokenizer"]))
        if root is None:
            sentences = text.calibration_sentences() if split == "train" else text.evaluation_sentences()
            return text.TextDataset(sentences, tokenizer, args.max_length)
        return text.TextDataset.from_file(root, tokenizer, args.max_length)
    if root is not None and not root.is_dir():
        raise UsageError(f"--data {root}: an image model reads an ImageFolder (one sub-folder per class), "
                         "not a file")
    return dataset_for(root, elastic.model, split, num_classes=elastic.adapter.num_classes,
                       class_names=extra.get("class_names"), skip_bad_images=args.skip_bad_images,
                       image_config=extra.get("image_config"))


def _tokenizer(folder: Path) -> Any:
    """The HuggingFace tokenizer in `folder` (the model folder a text model was made from, or --tokenizer)."""
    from .models.hf_folder import TOKENIZER_FILES, load_tokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); the text model's tokenizer "
                         "is read from its HuggingFace folder: pass --tokenizer FOLDER")
    return load_tokenizer(folder)


def _loader(args: argparse.Namespace, dataset: Any) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)


def _extra(dataset: Any, extra: dict[str, Any], **more: Any) -> dict[str, Any] | None:
    """The metadata to save with a model made from one with `extra`, on `dataset`: the class names its
    labels mean (an ImageFolder's, else those already recorded), the tokenizer's folder, a HF image model's
    mean/std, and `more`."""
    names = getattr(dataset, "class_names", None) or extra.get("class_names")
    kept = (("class_names", names), ("tokenizer", extra.get("tokenizer")), ("image_config", extra.get("image_config")))
    out = {k: v for k, v in kept if v is not None}
    return {**out, **more} or None


# ---------------------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(args.out, DemoConfig.quick() if args.quick else DemoConfig(), progress=not args.no_progress)


def cmd_wpac(args: argparse.Namespace) -> None:
    from .io import save
    from .wpac import wpac

    if args.cross_head and args.compensate not in ("all", "attn"):
        raise UsageError("--cross-head needs --compensate (or --compensate attn): it extends the attention part's "
                         "compensation")
    if args.joint_qk and args.criterion != "wpac+":
        raise UsageError("--joint-qk needs --criterion wpac+: it chooses wpac+'s Q/K rotation")
    create = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size)) if v is not None}
    elastic, extra = load_model(args.model, args.pretrained, not args.no_progress, **create)
    dataset = _data(args, args.data, elastic, "train", extra)
    elastic.to(args.device)
    wpac(elastic, _loader(args, dataset), num_samples=args.samples, criterion=args.criterion,
         compensate={None: False, "all": True}.get(args.compensate, args.compensate), cross_head=args.cross_head,
         joint_qk=args.joint_qk, score_fit=args.score_fit, progress=not args.no_progress)
    save(elastic, args.out, extra=_extra(dataset, extra))
    print(f"wrote {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    import copy

    from .io import save
    from .piad import CHECKPOINT_NAME, PIADTrainer

    _check_checkpoint(args, CHECKPOINT_NAME)
    elastic, extra = open_file(args.file)
    _budget_widths(args, elastic)
    train = _data(args, args.data, elastic, "train", extra)
    validate = args.val_data is not None or args.data is None  # default validation: the built-in test split
    val = _data(args, args.val_data, elastic, "test", extra) if validate else None
    elastic.to(args.device)
    teacher = copy.deepcopy(elastic).set_subnet(keep=1.0).requires_grad_(False) if args.distill else None
    trainer = PIADTrainer(elastic, _train_loader(args, train), val, teacher=teacher, target_macs=args.target_macs,
                          epochs=args.epochs, progressive_epochs=args.progressive_epochs, method=args.method,
                          batch_size=args.batch_size, lr=args.lr, amp=args.amp, compile=args.compile, seed=args.seed,
                          checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress=not args.no_progress,
                          verbose=True, log_path=args.log)  # --no-progress hides bars, not the epoch lines
    supernet = trainer.fit()
    if trainer.rank == 0:
        save(supernet, args.out, extra=_extra(train, extra, history=trainer.history))
        print(f"wrote {args.out}")


def _train_loader(args: argparse.Namespace, train: Any) -> Any:
    """`train` itself (PIAD batches it), or with --workers the same seeded global batches from worker
    processes."""
    if args.workers == 0:
        return train
    from torch.utils.data import DataLoader

    from ._dist import init_from_env, rank_world
    from .piad import GlobalBatchSampler

    init_from_env()
    rank, world = rank_world()
    return DataLoader(train, batch_sampler=GlobalBatchSampler(len(train), args.batch_size, rank, world, args.seed),
                      num_workers=args.workers)


def _check_checkpoint(args: argparse.Namespace, name: str) -> None:
    """--checkpoint-dir / --resume / --overwrite agree with what the folder holds, before any compute."""
    if args.checkpoint_dir is None:
        if args.resume or args.overwrite:
            raise UsageError(f"--{'resume' if args.resume else 'overwrite'} needs --checkpoint-dir")
        return
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the checkpoint, or replace it")
    checkpoint = args.checkpoint_dir / name
    if args.resume and not checkpoint.is_file():
        raise UsageError(f"--resume: no checkpoint {name} in {args.checkpoint_dir}; run without --resume to start")
    if not args.resume and not args.overwrite and checkpoint.exists():
        raise UsageError(f"--checkpoint-dir {args.checkpoint_dir} already holds {name}: pass --resume to continue "
                         "it or --overwrite to start over and replace it")


def cmd_eval(args: argparse.Namespace) -> None:
    from .demo import format_table
    from .evaluate import evaluate_budgets
    from .plots import plot_lines

    elastic, extra = open_file(args.file, supernet=False)
    _budget_widths(args, elastic)
    _check_budgets("--budgets", args.budgets, elastic)
    data = _data(args, args.data, elastic, "test", extra)
    elastic.to(args.device)
    name = Path(args.file).name
    if extra.get("tokenizer") is not None:  # unlabelled text: how close the sentence embeddings stay to full
        rows = _agreement_rows(elastic, _loader(args, data), args.budgets)
        print("| model | budget | MACs fraction | mean cosine | Spearman | top-1 agreement |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {name} | {r['budget']:.3f} | {r['macs_fraction']:.3f} | {r['mean_cosine']:.4f} | "
                  f"{r['spearman']:.4f} | {r['top1']:.3f} |")
        points, ylabel = [(r["macs_fraction"], r["mean_cosine"]) for r in rows], "mean cosine to the full model"
    else:
        rows = evaluate_budgets(elastic, _loader(args, data), args.budgets, progress=not args.no_progress)
        print(format_table({name: rows}))
        points, ylabel = [(r["macs_fraction"], 100 * r["accuracy"]) for r in rows], "top-1 accuracy (%)"
    if args.plot:
        plot_lines({name: points}, args.plot, xlabel="fraction of the full model's MACs", ylabel=ylabel)
        print(f"wrote {args.plot}")


def _agreement_rows(elastic: Any, loader: Any, budgets: list[float]) -> list[dict[str, float]]:
    """Per budget: {"budget", "macs_fraction", "mean_cosine", "spearman", "top1"} of the subnet's sentence
    embeddings against the full model's (skd.embeddings), over `loader`'s text batches."""
    from .embeddings import agreement, embed
    from .evaluate import eval_mode

    rows = []
    with eval_mode(elastic):
        full = embed(elastic.set_subnet(keep=1.0), loader)
        for f in budgets:
            elastic.set_subnet(macs=f)
            rows.append({"budget": f, "macs_fraction": elastic.macs() / elastic.full_macs,
                         **agreement(full, embed(elastic, loader))})
    return rows


def cmd_extract(args: argparse.Namespace) -> None:
    from .io import save

    elastic, extra = open_file(args.file)
    _budget_widths(args, elastic)
    _check_budgets("--macs", [args.macs], elastic)
    elastic.set_subnet(macs=args.macs)
    save(elastic.extract(), args.out, extra=extra or None)
    print(f"wrote {args.out}: {elastic.macs() / 1e6:.2f} M MACs per sample "
          f"({elastic.macs() / elastic.full_macs:.3f} of the full model), subnet {elastic.subnet}")


def cmd_bench(args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "kernels.py").is_file():
        raise UsageError("skd bench runs the benchmarks of a source checkout; none found next to this install")
    quick = {"benchmarks.kernels": ["--quick", "--no-csv"], "benchmarks.elastic_latency": ["--models", "vit_tiny",
                                                                                           "--repeats", "3"]}
    for module in ("benchmarks.kernels", "benchmarks.elastic_latency"):
        subprocess.run([sys.executable, "-m", module, *(quick[module] if args.quick else [])], cwd=root, check=True)


def cmd_info(args: argparse.Namespace) -> None:
    from .io import load_tensors

    elastic, extra = open_file(args.file, supernet=False)
    _budget_widths(args, elastic)
    _, meta = load_tensors(args.file)
    print(f"file:         {args.file}")
    source = meta.get("source", "timm")
    print(f"model:        {source} " + (f"{meta.get('architecture')} {meta.get('model_args')}" if source == "timm"
                                        else f"{meta.get('class')}"))
    print(f"kind:         {meta.get('kind')} (layout {meta.get('layout')}, skd {meta.get('skd_version')})")
    names = extra.get("class_names")
    print(f"classes:      {'not recorded' if names is None else f'{len(names)}: ' + ', '.join(names[:10])}"
          f"{' ...' if names and len(names) > 10 else ''}")
    print(f"subnet:       {elastic.subnet}")
    dl = elastic.dropout_list
    print(f"dropout list: {'none (uniform budgets)' if dl is None else f'{len(dl)} units'}")
    print(f"budget widths: multiples of {elastic.multiple_of} (or full, or 0)")
    print(f"full MACs:    {elastic.full_macs / 1e6:.2f} M per sample")
    for row in extra.get("history") or []:
        print("epoch:        " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()))
    print("budget  MACs (M)  fraction")
    low = smallest_budget(elastic)
    for f in (0.25, 1 / 3, 0.5, 2 / 3, 1.0):
        if f < low:
            print(f"{f:6.3f}  below the smallest subnetwork")
            continue
        m = elastic.set_subnet(macs=f).macs()
        print(f"{f:6.3f}  {m / 1e6:8.2f}  {m / elastic.full_macs:8.3f}")


# ------------------------------------------------------------------------------------------ parser
def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every sub-command takes; on sub-parsers (suppress=True) they only override when given,
    so `skd --device cpu eval F` and `skd eval F --device cpu` mean the same."""
    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--no-progress", action="store_true", default=d(False), help="no progress bars")
    parser.add_argument("--device", default=d(None), help="torch device (default: cuda if available, else cpu; "
                                                          "under torchrun each process its LOCAL_RANK GPU)")
    parser.add_argument("--seed", type=_int_at_least(0), default=d(0), help="random seed (default 0)")
    parser.add_argument("--workers", type=_int_at_least(0), default=d(0),
                        help="data-loading worker processes (default 0: load in the main process)")


def _multiple_of_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--multiple-of", type=_positive_int,
                        help="widths chosen by a MACs budget are multiples of this (or a module's full width, or 0); "
                             "1: floor-uniform widths (default: the file's, else 8 where every head dim and "
                             "hidden size is a multiple of 8 and head dims are >= 64, else 1)")


def _data_options(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--data", type=_existing_path,
                        help="an ImageFolder (one sub-folder of images per class; default: the built-in digits), "
                             "or for a text model a UTF-8 text file, one example per line (default: skd.text's "
                             "sentences)")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip (and count) images that cannot be decoded instead of stopping at the first")
    parser.add_argument("--max-length", type=_int_at_least(2), default=128,
                        help="text models: longer examples are truncated to this many tokens (default 128)")
    parser.add_argument("--tokenizer", type=_existing_dir,
                        help="text models: the folder of the tokenizer (default: the HF folder the model came from)")


def build_parser() -> argparse.ArgumentParser:
    """The `skd` argument parser; each sub-command sets `fn` to its cmd_* function."""
    p = argparse.ArgumentParser(prog="skd", description="Stratified knowledge-density super-networks for timm "
                                                        "and HuggingFace transformers.")
    p.add_argument("--version", action="version", version=f"skd {__version__}")
    _global_options(p, suppress=False)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help)
        _global_options(parser, suppress=True)
        parser.set_defaults(fn=fn)
        return parser

    d = command("demo", cmd_demo, "the whole method on the built-in digits: table, plots, report")
    d.add_argument("--out", type=Path, default=Path("skd-demo"), help="output folder (default skd-demo)")
    d.add_argument("--quick", action="store_true", help="a smoke run under a minute")

    w = command("wpac", cmd_wpac, "stratify a model with WPAC (function-preserving)")
    w.add_argument("model", help="a timm model name, a HuggingFace model folder (config.json inside) or a saved "
                                 "skd file")
    w.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights")
    _data_options(w, 64)
    w.add_argument("--num-classes", type=_positive_int, help="a new classifier head with this many classes (as "
                                                            "timm.create_model's num_classes; timm model names)")
    w.add_argument("--img-size", type=_positive_int, help="build the model for this input size (timm model names; "
                                                         "pretrained position embeddings are resampled)")
    w.add_argument("--samples", type=_positive_int, default=1024, help="calibration samples (default 1024)")
    w.add_argument("--criterion", default="wpac",
                   choices=("wpac", "wpac+", "pca", "taylor", "magnitude", "random", "hessian"))
    w.add_argument("--compensate", nargs="?", const="all", choices=("all", "attn", "mlp"),
                   help="bias compensation: truncated widths add the dropped dims' mean through the output bias, "
                        "in attention and MLP (no value or 'all'; for encoders read from all tokens, e.g. mean "
                        "pooling) or only 'attn' (e.g. classifiers reading one token) or 'mlp'")
    w.add_argument("--cross-head", action="store_true",
                   help="with --compensate [attn]: truncated attention widths also predict the dropped dims "
                        "linearly from the kept dims of all heads (stores each output projection's input "
                        "covariance in the file)")
    w.add_argument("--joint-qk", action="store_true",
                   help="with --criterion wpac+: rotate Q/K by the query and key covariances weighted by how much "
                        "each head's output moves with their scores (collected in the calibration pass; with "
                        "--compensate [all] or mlp that pass runs forward only: no backward, no labels needed)")
    w.add_argument("--score-fit", action="store_true",
                   help="store, per block and narrow width, a fit of the dropped q/k dims' score part from the "
                        "kept ones, absorbed by the kept q rows (replayed from the attention inputs --joint-qk's "
                        "pass records; without --joint-qk, one more pass over a quarter of the data)")
    w.add_argument("--out", type=Path, required=True, help="the skd file to write")

    t = command("train", cmd_train, "PIAD training of a stratified model (works under torchrun)")
    t.add_argument("file", type=_existing_file, help="a saved skd file (e.g. from `skd wpac`)")
    _data_options(t, 64)
    t.add_argument("--val-data", type=_existing_path, help="an ImageFolder (or text file) to validate on")
    t.add_argument("--target-macs", type=_fraction, default=1 / 3, help="smallest subnet's MACs fraction")
    t.add_argument("--epochs", type=_positive_int, default=30)
    t.add_argument("--progressive-epochs", type=_positive_int, help="epochs to grow the dropout list (epochs//3)")
    t.add_argument("--method", default="piad",
                   choices=("piad", "random", "channel_dropout", "weighted_channel_dropout", "layerdrop"))
    t.add_argument("--lr", type=float, help="peak learning rate (default: DeiT's 5e-4 × global batch / 512)")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the training steps (one graph serves every width that skips no module): a "
                        "minute or more up front, then faster steps where eager ones are host-bound (a GPU); on "
                        "CUDA with --no-amp only (compiled bf16 gradients were wrong there)")
    t.add_argument("--distill", action="store_true",
                   help="distil the input model's full-width outputs (logits or embeddings) into every subnet: "
                        "what an unlabelled text encoder needs")
    t.add_argument("--log", type=Path, help="append one JSON line per epoch (loss, lr, list MACs, val top-1) here")
    t.add_argument("--checkpoint-dir", type=Path, help="write a resumable checkpoint here after every epoch")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --checkpoint-dir")
    t.add_argument("--overwrite", action="store_true", help="start over, replacing the checkpoint in --checkpoint-dir")
    _multiple_of_option(t)
    t.add_argument("--out", type=Path, required=True)

    e = command("eval", cmd_eval, "accuracy, MACs and latency at several budgets")
    e.add_argument("file", type=_existing_file, help="a super-network or an extracted model file")
    _data_options(e, 256)
    e.add_argument("--budgets", type=_budgets, default=[1 / 3, 0.5, 1.0], help="comma-separated MACs fractions")
    e.add_argument("--plot", type=Path, help="write an accuracy-vs-MACs PNG here")
    _multiple_of_option(e)

    x = command("extract", cmd_extract, "a standalone, physically smaller model at a MACs budget")
    x.add_argument("file", type=_existing_file)
    x.add_argument("--macs", type=_fraction, required=True, help="MACs fraction in (0, 1]")
    _multiple_of_option(x)
    x.add_argument("--out", type=Path, required=True)

    b = command("bench", cmd_bench, "kernel and elastic-latency tables on this device")
    b.add_argument("--quick", action="store_true")

    i = command("info", cmd_info, "what a saved skd file holds")
    i.add_argument("file", type=_existing_file, help="a super-network or an extracted model file")
    _multiple_of_option(i)
    return p


def check_outputs(args: argparse.Namespace) -> None:
    """Every path the command will write can be written, is not a folder where a file is meant, and is not
    an input file: checked before any compute."""
    inputs = [x for x in (getattr(args, "file", None), getattr(args, "model", None)) if x and Path(x).is_file()]
    for flag in ("out", "plot", "log"):
        path = getattr(args, flag, None)
        if path is not None and args.command != "demo":
            check_out_file(f"--{flag}", path, inputs)
    if args.command == "demo":
        check_out_dir("--out", args.out)
    if getattr(args, "checkpoint_dir", None) is not None:
        check_out_dir("--checkpoint-dir", args.checkpoint_dir)


def _hub_offline_unless_asked() -> None:
    """Nothing is downloaded unless HF_HUB_OFFLINE=0 is set: a missing checkpoint fails at once instead of
    retrying for a minute. huggingface_hub reads the variable at import (timm may already have imported it),
    so its constant is set too."""
    if os.environ.get("HF_HUB_OFFLINE") != "0":
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def _one_line(error: BaseException) -> str:
    """The error's message on one line. An error re-raised from a DataLoader worker carries the worker's
    traceback in its message: its last line is the original message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    """Run the `skd` command on `argv` (default sys.argv[1:]); returns the exit status (0, 2 or 130)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `skd info F | head` ends quietly, like other CLI tools
    _hub_offline_unless_asked()
    args = build_parser().parse_args(argv)
    from .errors import UnsupportedModelError

    try:
        import torch

        check_outputs(args)
        args.device = _device(args.device)
        torch.manual_seed(args.seed)
        args.fn(args)
    except (UsageError, UnsupportedModelError, ValueError, FileNotFoundError) as e:
        print(f"skd {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"skd {args.command}: interrupted; no partial output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
