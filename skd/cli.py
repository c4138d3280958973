"""The `skd` command: demo, wpac, train, eval, extract, bench, info.

A bad argument (a budget outside (0, 1], a missing path, an unknown model, a file that is not an skd
file) prints one line naming it and exits with status 2. Every output file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return n


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


def _out_file(text: str) -> Path:
    path = Path(text)
    if not path.parent.resolve().is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its folder {path.parent} does not exist")
    return path


def load_model(spec: str, pretrained: bool = False) -> Any:
    """An ElasticViT from a saved skd file, or a timm model by name (with its pretrained weights)."""
    import timm

    from .elastic import ElasticViT
    from .io import load

    if Path(spec).is_file():
        loaded = load(spec)
        if not isinstance(loaded, ElasticViT):
            raise UsageError(f"{spec} holds an extracted standalone model; this command needs a super-network file")
        return loaded
    if spec.endswith(".safetensors") or os.sep in spec:
        raise UsageError(f"{spec}: no such file")
    if not timm.is_model(spec):
        raise UsageError(f"unknown model {spec!r}: not a timm model name nor an skd file")
    if spec == "vit_digits" and pretrained:
        from .digits import pretrained_digits_vit  # trains and caches on first use: nothing to download

        return ElasticViT(pretrained_digits_vit())
    try:
        return ElasticViT(timm.create_model(spec, pretrained=pretrained))
    except OSError as e:  # huggingface_hub's offline / not-cached errors are OSErrors
        raise UsageError(f"cannot load pretrained weights for {spec!r}: not in the local cache and downloads "
                         f"are off (set HF_HUB_OFFLINE=0 with a network to fetch them) [{type(e).__name__}]") from e


def _train_val(args: argparse.Namespace, model: Any) -> tuple[Any, Any]:
    """`skd train`'s (train, validation) datasets: --data (default the digits' train split) and --val-data
    (default the digits' test split when --data is left out, else no validation)."""
    from .data import dataset_for

    train = dataset_for(args.data, model.model, "train")
    validate = args.val_data is not None or args.data is None
    return train, dataset_for(args.val_data, model.model, "test") if validate else None


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(args.out, DemoConfig.quick() if args.quick else DemoConfig(), progress=not args.no_progress)


def cmd_wpac(args: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    from .data import dataset_for
    from .io import save
    from .wpac import wpac

    elastic = load_model(args.model, args.pretrained)
    data = DataLoader(dataset_for(args.data, elastic.model, "train"), batch_size=args.batch_size)
    wpac(elastic, data, num_samples=args.samples, criterion=args.criterion, progress=not args.no_progress)
    save(elastic, args.out)
    print(f"wrote {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .io import save
    from .piad import PIADTrainer

    elastic = load_model(str(args.file))
    train, val = _train_val(args, elastic)
    trainer = PIADTrainer(elastic, train, val, target_macs=args.target_macs, epochs=args.epochs,
                          progressive_epochs=args.progressive_epochs or max(1, args.epochs // 3),
                          method=args.method, batch_size=args.batch_size, lr=args.lr,
                          checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress=not args.no_progress)
    supernet = trainer.fit()
    if trainer.rank == 0:
        save(supernet, args.out)
        print(f"wrote {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .data import dataset_for
    from .demo import format_table
    from .evaluate import evaluate_budgets
    from .plots import plot_lines

    elastic = load_model(str(args.file))
    data = dataset_for(args.data, elastic.model, "test")
    rows = evaluate_budgets(elastic, data, args.budgets, progress=not args.no_progress)
    print(format_table({Path(args.file).name: rows}))
    if args.plot:
        plot_lines({Path(args.file).name: [(r["macs_fraction"], 100 * r["accuracy"]) for r in rows]}, args.plot,
                   xlabel="fraction of the full model's MACs", ylabel="top-1 accuracy (%)")
        print(f"wrote {args.plot}")


def cmd_extract(args: argparse.Namespace) -> None:
    from .io import save

    elastic = load_model(str(args.file)).set_subnet(macs=args.macs)
    small = elastic.extract()
    save(small, args.out)
    print(f"wrote {args.out}: {elastic.macs() / 1e6:.2f} M MACs per image "
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

    elastic = load_model(str(args.file))
    _, meta = load_tensors(args.file)
    print(f"file:         {args.file}")
    print(f"model:        {meta['architecture']} {meta['model_args']}")
    print(f"layout:       {meta['layout']} (kind {meta['kind']}, skd {meta['skd_version']})")
    print(f"subnet:       {elastic.subnet}")
    dl = elastic.dropout_list
    print(f"dropout list: {'none (uniform budgets)' if dl is None else f'{len(dl)} units'}")
    print(f"full MACs:    {elastic.full_macs / 1e6:.2f} M per image")
    print("budget  MACs (M)  fraction")
    for f in (0.25, 1 / 3, 0.5, 2 / 3, 1.0):
        try:
            m = elastic.set_subnet(macs=f).macs()
        except ValueError:  # below the end of the dropout list
            print(f"{f:6.3f}  below the smallest subnetwork")
            continue
        print(f"{f:6.3f}  {m / 1e6:8.2f}  {m / elastic.full_macs:8.3f}")


def build_parser() -> argparse.ArgumentParser:
    """The `skd` argument parser; each sub-command sets `fn` to its cmd_* function."""
    p = argparse.ArgumentParser(prog="skd", description="Stratified knowledge-density super-networks for timm ViTs.")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole method on the built-in digits: table, plots, report")
    d.add_argument("--out", type=Path, default=Path("skd-demo"), help="output folder (default skd-demo)")
    d.add_argument("--quick", action="store_true", help="a smoke run under a minute")
    d.set_defaults(fn=cmd_demo)

    data_help = "an ImageFolder (class sub-folders); default: the built-in digits"
    w = sub.add_parser("wpac", help="stratify a model with WPAC (function-preserving)")
    w.add_argument("model", help="a timm model name or a saved skd file")
    w.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights")
    w.add_argument("--data", type=_existing_dir, help=data_help)
    w.add_argument("--samples", type=_positive_int, default=1024, help="calibration samples (default 1024)")
    w.add_argument("--criterion", default="wpac",
                   choices=("wpac", "wpac+", "pca", "taylor", "magnitude", "random", "hessian"))
    w.add_argument("--batch-size", type=_positive_int, default=64)
    w.add_argument("--out", type=_out_file, required=True, help="the skd file to write")
    w.set_defaults(fn=cmd_wpac)

    t = sub.add_parser("train", help="PIAD training of a stratified model (works under torchrun)")
    t.add_argument("file", type=_existing_file, help="a saved skd file (e.g. from `skd wpac`)")
    t.add_argument("--data", type=_existing_dir, help=data_help)
    t.add_argument("--val-data", type=_existing_dir, help="an ImageFolder to validate on")
    t.add_argument("--target-macs", type=_fraction, default=1 / 3, help="smallest subnet's MACs fraction")
    t.add_argument("--epochs", type=_positive_int, default=30)
    t.add_argument("--progressive-epochs", type=_positive_int, help="epochs to grow the dropout list (epochs/3)")
    t.add_argument("--method", default="piad",
                   choices=("piad", "random", "channel_dropout", "weighted_channel_dropout", "layerdrop"))
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=float, help="peak learning rate (default: DeiT's 5e-4 × global batch / 512)")
    t.add_argument("--checkpoint-dir", type=Path)
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    t.add_argument("--out", type=_out_file, required=True)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="accuracy, MACs and latency at several budgets")
    e.add_argument("file", type=_existing_file)
    e.add_argument("--data", type=_existing_dir, help=data_help)
    e.add_argument("--budgets", type=_budgets, default=[1 / 3, 0.5, 1.0], help="comma-separated MACs fractions")
    e.add_argument("--plot", type=_out_file, help="write an accuracy-vs-MACs PNG here")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("extract", help="a standalone, physically smaller model at a MACs budget")
    x.add_argument("file", type=_existing_file)
    x.add_argument("--macs", type=_fraction, required=True, help="MACs fraction in (0, 1]")
    x.add_argument("--out", type=_out_file, required=True)
    x.set_defaults(fn=cmd_extract)

    b = sub.add_parser("bench", help="kernel and elastic-latency tables on this device")
    b.add_argument("--quick", action="store_true")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("info", help="what a saved skd file holds")
    i.add_argument("file", type=_existing_file)
    i.set_defaults(fn=cmd_info)
    return p


def _hub_offline_unless_asked() -> None:
    """Nothing is downloaded unless HF_HUB_OFFLINE=0 is set: a missing checkpoint fails at once instead of
    retrying for a minute. huggingface_hub reads the variable at import (timm may already have imported it),
    so its constant is set too."""
    if os.environ.get("HF_HUB_OFFLINE") != "0":
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def main(argv: list[str] | None = None) -> int:
    """Run the `skd` command on `argv` (default sys.argv[1:]); returns the exit status (0, 2 or 130)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `skd info F | head` ends quietly, like other CLI tools
    _hub_offline_unless_asked()
    args = build_parser().parse_args(argv)
    from .errors import UnsupportedModelError

    try:
        args.fn(args)
    except (UsageError, UnsupportedModelError, ValueError, FileNotFoundError) as e:
        print(f"skd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"skd {args.command}: interrupted; no partial output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
