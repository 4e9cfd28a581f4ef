"""The ``patternnet`` command: fit patterns, explain images, evaluate, run the demo.

A thin argparse front end over the library's API (``fit_patterns``, the method registry,
:mod:`patternnet.evaluate`, :mod:`patternnet.viz`, :mod:`patternnet.demo`)::

    patternnet fit --model torchvision:vgg16 --data ~/imagenet/train --limit 20000 \\
        --out vgg16.patterns.safetensors
    patternnet explain --model torchvision:vgg16 --patterns vgg16.patterns.safetensors \\
        --method pattern_net,pattern_attribution,gradient cat.jpg dog.jpg --out explained/
    patternnet evaluate --model torchvision:vgg16 --patterns vgg16.patterns.safetensors \\
        --data ~/imagenet/val --limit 2000 --out report/
    patternnet demo

Bad arguments or unusable inputs print one line, ``patternnet <command>: error: ...``, and exit
with status 2. ``python -m patternnet`` and ``torchrun -m patternnet fit ...`` work too.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "load_model", "main"]

EXIT_USAGE = 2
MODEL_HELP = (
    "the model: 'torchvision:NAME' (e.g. torchvision:vgg16), 'module.path:factory' (a "
    "function or class returning an nn.Module, importable from the current folder), or a "
    "torch.export file (.pt2, from torch.export.save)"
)


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message (see prog --help)``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _image_size(text: str) -> int:
    """A side length in pixels: 1 to 16384 (a larger one would exhaust memory)."""
    value = _positive_int(text)
    if value > 16384:
        raise argparse.ArgumentTypeError(f"{text!r} pixels: at most 16384")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers (e.g. 0.485,0.456,0.406)"
        ) from None


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="weights to load: a state-dict file (.safetensors, or .pt/.pth read with "
        "weights_only=True), or for torchvision models a weights name such as DEFAULT or "
        "IMAGENET1K_V1 (downloaded by torchvision). Without it a torchvision model has random "
        "weights",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to run: cpu (default), cuda, cuda:1, ... (the model is moved there)",
    )


def _add_preset(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "input preprocessing",
        "uint8 pixels are scaled to [0, 1], images resized/cropped, then normalised per "
        "channel with (x - mean) / std. Default preset: imagenet for torchvision: models, "
        "none (scaling only) otherwise.",
    )
    group.add_argument(
        "--preset",
        choices=("imagenet", "none"),
        help="imagenet: RGB, resize 256, centre-crop 224, ImageNet mean/std; none: as is",
    )
    group.add_argument("--resize", type=_image_size, metavar="N", help="shorter side → N px")
    group.add_argument("--crop", type=_image_size, metavar="N", help="centre crop N×N px")
    group.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="per-channel mean")
    group.add_argument("--std", type=_floats, metavar="S[,S,S]", help="per-channel std")
    group.add_argument(
        "--mode", choices=("RGB", "L"), help="convert images to RGB or greyscale (L)"
    )


def _add_data(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--data",
        required=required,
        metavar="DATA",
        help="an image folder (ImageFolder layout: one sub-folder per class, or a flat "
        "folder), IDX files (MNIST format: a *-images-idx3-ubyte[.gz] file or a folder of "
        "them), or a .npy/.npz array (N, C, H, W) / (N, H, W) / (N, H, W, C)",
    )
    parser.add_argument(
        "--split",
        default="train",
        choices=("train", "t10k"),
        help="for a folder of IDX files: which split to read (default train)",
    )
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N", help="use at most the first N samples"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="N", help="batch size (32)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="data-loading worker processes for image folders (default: up to 4)",
    )


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or logs")


def build_parser() -> argparse.ArgumentParser:
    """The ``patternnet`` argument parser (sub-commands fit, explain, evaluate, demo, methods)."""
    parser = _Parser(
        prog="patternnet",
        description="Learn how to explain neural networks: fit PatternNet/PatternAttribution "
        "patterns, explain images with them and the baselines, evaluate explanations.",
        epilog="Run 'patternnet COMMAND --help' for the options of a command.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"patternnet {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, required=True
    )

    fit = commands.add_parser(
        "fit",
        help="fit the patterns of a model on data and save them",
        description="One pass over DATA (model in eval mode, no gradients) accumulates "
        "float64 statistics for every Linear/Conv layer; the patterns are saved as "
        "safetensors. Under torchrun the data is sharded across processes and rank 0 writes.",
    )
    _add_model(fit)
    _add_data(fit)
    fit.add_argument("--out", required=True, metavar="FILE", help="patterns file to write")
    fit.add_argument(
        "--estimator",
        default="two_component",
        choices=("two_component", "linear", "filter", "identity"),
        help="signal estimator (default two_component: a+ and a-, the paper's S_a+-)",
    )
    fit.add_argument(
        "--no-negative",
        dest="negative",
        action="store_false",
        help="two_component only: fit a+ only (halves the statistics)",
    )
    fit.add_argument(
        "--precision",
        default="float64",
        choices=("float64", "float32"),
        help="per-batch products in float64 (default, exact) or float32 (faster); sums are "
        "always float64",
    )
    fit.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="save the running statistics here now and then, to resume an interrupted fit",
    )
    fit.add_argument(
        "--checkpoint-every", type=_positive_int, metavar="N", help="checkpoint every N batches"
    )
    fit.add_argument(
        "--checkpoint-minutes",
        type=_positive_float,
        metavar="M",
        help="checkpoint every M minutes (may be fractional; default with --checkpoint and "
        "without --checkpoint-every: 10)",
    )
    fit.add_argument(
        "--resume", action="store_true", help="continue the fit saved in --checkpoint"
    )
    _add_preset(fit)
    _add_quiet(fit)

    explain = commands.add_parser(
        "explain",
        help="explain images with one or more methods: a PNG and raw arrays per image",
        description="Writes OUT/<image>.png (the input, then one column per method: signals "
        "as grey-centred images, attributions as red(+)/blue(-) heatmaps) and "
        "OUT/<image>.<method>.npy (the raw explanation, shaped like the model's input).",
    )
    _add_model(explain)
    explain.add_argument(
        "--patterns", metavar="FILE", help="patterns file (from 'patternnet fit'); needed by "
        "pattern_net and pattern_attribution"
    )
    explain.add_argument(
        "--method",
        default="pattern_net,pattern_attribution,gradient",
        metavar="NAME[,NAME...]",
        help="comma-separated method names (default pattern_net,pattern_attribution,gradient;"
        " 'patternnet methods' lists them)",
    )
    explain.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (or folders of images)"
    )
    explain.add_argument("--out", required=True, metavar="DIR", help="output folder")
    explain.add_argument(
        "--target",
        type=int,
        metavar="CLASS",
        help="class index to explain (default: each image's predicted class)",
    )
    _add_preset(explain)
    _add_quiet(explain)

    evaluate = commands.add_parser(
        "evaluate",
        help="judge the patterns and the explanations on data: ρ(S) and degradation",
        description="Estimator quality ρ(S) per layer (method.md §5) on two disjoint halves "
        "of DATA (regression and evaluation), and, where available, image degradation "
        "curves for the methods (method.md §6). Writes a Markdown report, CSV and figures.",
    )
    _add_model(evaluate)
    evaluate.add_argument(
        "--patterns", required=True, metavar="FILE", help="patterns file (from 'patternnet fit')"
    )
    _add_data(evaluate)
    evaluate.add_argument("--out", required=True, metavar="DIR", help="report folder")
    evaluate.add_argument(
        "--method",
        default="pattern_attribution,gradient",
        metavar="NAME[,NAME...]",
        help="methods for the degradation curves (default pattern_attribution,gradient)",
    )
    evaluate.add_argument(
        "--patch", type=_positive_int, default=9, metavar="K",
        help="degradation: K×K regions (default 9, as in the paper)",
    )  # fmt: skip
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the sampling (0)")
    _add_preset(evaluate)
    _add_quiet(evaluate)

    demo = commands.add_parser(
        "demo",
        help="the built-in demo on Fashion-MNIST (trains a small net, writes figures)",
        description="Trains a small VGG-style network on Fashion-MNIST (cached), fits "
        "two-component patterns on half the training set and writes the explanation figure, "
        "the ρ(S) plot, the degradation curves and a summary to OUT.",
    )
    demo.add_argument(
        "--data", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: "
        "/usr/share/datasets/fashion-mnist or $PATTERNNET_DATA)"
    )
    demo.add_argument("--out", default="demo-output", metavar="DIR", help="(demo-output)")
    demo.add_argument(
        "--epochs", type=_positive_int, default=3, metavar="N", help="training epochs (3)"
    )
    demo.add_argument(
        "--quick", action="store_true",
        help="a reduced run in seconds: 1 epoch on 3000 images, small evaluation",
    )  # fmt: skip
    demo.add_argument(
        "--threads", type=_positive_int, metavar="N", help="CPU threads (default: all cores)"
    )
    _add_quiet(demo)

    methods = commands.add_parser("methods", help="list the available methods")
    methods.set_defaults()
    return parser


# ---------------------------------------------------------------------------- models
def load_model(spec: str, weights: str | None = None) -> Any:
    """Build the model a ``--model`` specification names (:func:`patternnet.models.load`).

    Raises
    ------
    UsageError
        For an unknown or unimportable model, a factory that does not return an
        ``nn.Module``, or a weights file that is missing or does not fit.
    """
    from .models import load

    if spec.startswith("torchvision:") and weights is None:
        print(
            f"note: --model {spec} without --weights has RANDOM weights, drawn anew in each "
            "run; pass --weights IMAGENET1K_V1 (or your file) to explain a trained network",
            file=sys.stderr,
        )
    try:
        return load(spec, weights=weights)
    except (ValueError, KeyError, TypeError, ImportError, FileNotFoundError) as error:
        raise UsageError(f"--model {spec}: {error}") from error


# ---------------------------------------------------------------------------- helpers
def _preset(args: argparse.Namespace) -> Any:
    from .data import PRESETS, preset_for

    base = PRESETS[args.preset] if args.preset else preset_for(args.model)
    return base.with_overrides(
        resize=args.resize, crop=args.crop, mean=args.mean, std=args.std, mode=args.mode
    )


def _dataset(args: argparse.Namespace, preset: Any) -> Any:
    from torch.utils.data import Subset

    from .data import load_data

    dataset = load_data(args.data, preset, split=args.split)
    if args.limit is not None and args.limit < len(dataset):
        dataset = Subset(dataset, range(args.limit))
    return dataset


def _loader(args: argparse.Namespace, dataset: Any) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    from .data import ImageFiles

    workers = args.workers
    inner = getattr(dataset, "dataset", dataset)
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if isinstance(inner, ImageFiles) else 0
    if isinstance(inner, TensorDataset):
        workers = 0
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=workers)


def _device_model(args: argparse.Namespace) -> Any:
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UsageError(f"--device {args.device}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    model = load_model(args.model, args.weights)
    return model.to(device), device


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _method_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--method: give at least one method name")
    return names


def _available_methods() -> dict[str, str]:
    from .methods.registry import methods

    return dict(methods())


def _build_method(name: str, model: Any, patterns: Any) -> Any:
    from .methods.registry import build_method, method_info

    known = _available_methods()
    if name not in known:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(sorted(known))}")
    if method_info(name).needs_patterns and patterns is None:
        raise UsageError(f"method {name} needs --patterns FILE (make one with 'patternnet fit')")
    try:
        return build_method(name, model, patterns)
    except (KeyError, ValueError, TypeError) as error:
        raise UsageError(f"method {name}: {error}") from error


def _patterns(path: str | None, model: Any) -> Any:
    from .patterns.store import Patterns

    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"--patterns {path}: no such file (make one with 'patternnet fit')")
    try:
        return Patterns.load(path, model=model)
    except (ValueError, KeyError) as error:
        raise UsageError(f"--patterns {path}: {error}") from error


# ---------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    """``patternnet fit``: fit patterns on DATA and save them to OUT.

    Launched by ``torchrun``, every process fits its shard of the data (on ``cuda:LOCAL_RANK``
    with ``--device cuda``), the statistics are all-reduced and rank 0 writes the file.
    """
    from .patterns import distributed
    from .patterns.fit import fit_patterns

    if args.checkpoint is None:
        for flag, value in (("--checkpoint-every", args.checkpoint_every),
                            ("--checkpoint-minutes", args.checkpoint_minutes),
                            ("--resume", args.resume or None)):  # fmt: skip
            if value is not None:
                raise UsageError(f"{flag} needs --checkpoint FILE (where the statistics go)")
    # NCCL for a fit on GPUs, gloo for one on CPUs (even where CUDA is present).
    on_gpu = str(args.device).startswith("cuda")
    launched = distributed.init_from_env(backend="nccl" if on_gpu else "gloo")
    try:
        if launched and args.device == "cuda":
            args.device = str(distributed.local_device())
        model, device = _device_model(args)
        preset = _preset(args)
        loader = _loader(args, _dataset(args, preset))
        options: dict[str, Any] = {
            "estimator": args.estimator,
            "negative": args.negative,
            "precision": args.precision,
            "progress": not args.quiet and distributed.is_main_process(),
            "limit": args.limit,
        }
        accepted = inspect.signature(fit_patterns).parameters
        for name, value in (
            ("checkpoint", args.checkpoint),
            ("checkpoint_every", args.checkpoint_every),
            ("checkpoint_minutes", args.checkpoint_minutes),
            ("resume", args.resume or None),
        ):
            if value is None:
                continue
            if name not in accepted:
                raise UsageError(f"--{name.replace('_', '-')} is not supported by this version")
            options[name] = value
        start = time.perf_counter()
        patterns = fit_patterns(model, loader, **options)
        seconds = time.perf_counter() - start
        if distributed.is_main_process():
            patterns.metadata.setdefault("preset", _preset_dict(preset))
            patterns.save(args.out)
            images = patterns.metadata.get("images", "?")
            _log(args, f"fitted {args.estimator} patterns for {len(patterns)} layers on "
                       f"{images} samples in {seconds:.1f} s → {args.out}")  # fmt: skip
            _report_dead(args, patterns)
    finally:
        if launched:
            distributed.shutdown()
    return 0


def _preset_dict(preset: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(preset).items()}


def _report_dead(args: argparse.Namespace, patterns: Any) -> None:
    report = patterns.metadata.get("report", {})
    for name, entry in report.items():
        dead = entry.get("dead") or 0
        counts = dead if isinstance(dead, dict) else {"a": dead}
        for which, count in counts.items():
            if count:
                _log(args, f"  note: layer {name}: {count} of {entry.get('units')} units have "
                           f"no samples for {which} (their patterns are zero)")  # fmt: skip
        for which, count in (entry.get("fallback") or {}).items():
            if count:
                _log(args, f"  note: layer {name}: {count} of {entry.get('units')} units have an "
                           f"ill-conditioned {which} normaliser (they use the "
                           f"{entry.get('fallback_to')} pattern)")  # fmt: skip


def cmd_explain(args: argparse.Namespace) -> int:
    """``patternnet explain``: one PNG and raw arrays per image."""
    import numpy as np
    import torch

    from . import viz
    from .borrow import forward_checked
    from .data import load_data

    model, device = _device_model(args)
    preset = _preset(args)
    patterns = _patterns(args.patterns, model)
    names = _method_names(args.method)
    methods = {name: _build_method(name, model, patterns) for name in names}
    inputs = []
    for item in args.images:
        path = Path(item)
        if not path.exists():
            raise UsageError(f"image {item}: no such file or folder")
        dataset = load_data(path, preset)
        stems = getattr(dataset, "paths", None) or [path.with_suffix("")]
        if len(stems) != len(dataset):
            stems = [Path(f"{path.stem}_{i}") for i in range(len(dataset))]
        inputs += [(Path(s).stem, dataset[i][0]) for i, s in enumerate(stems)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = None if args.quiet else _tqdm(len(inputs), "explaining")
    for stem, x in inputs:
        batch = x[None].to(device)
        with torch.no_grad():
            logits = forward_checked(model, batch)  # a shape mismatch: one line, not a traceback
        if args.target is not None and not 0 <= args.target < logits.shape[-1]:
            raise UsageError(f"--target {args.target}: the model has {logits.shape[-1]} classes")
        target = args.target if args.target is not None else int(logits.argmax(-1)[0])
        row = [viz.input_image(x, preset.mean, preset.std) if preset.mean else viz.input_image(x)]
        for name, method in methods.items():
            result = method.attribute(batch, target=target)[0].detach().cpu()
            np.save(out / f"{stem}.{name}.npy", result.numpy())
            row.append(_picture(method, result))
        viz.grid(
            [row],
            column_titles=["input", *names],
            title=f"{stem}: class {target}",
            path=out / f"{stem}.png",
        )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _log(args, f"explained {len(inputs)} image(s) with {', '.join(names)} → {out}")
    return 0


def _picture(method: Any, result: Any) -> Any:
    from . import viz

    return viz.picture(result, method.kind)


def _tqdm(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, leave=False)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``patternnet evaluate``: ρ(S) per layer and degradation curves, as a report.

    DATA is split in two halves: ρ(S)'s regression and evaluation splits (the patterns were
    fitted on other data); the degradation curves of every ``--method`` and a random order
    are measured on the second half. :func:`patternnet.evaluate.compare` writes
    ``report.md``, ``metrics.csv``, ``degradation.png``, ``explanations.png``, ``rho.png`` and
    ``rho.csv`` into OUT.
    """
    import torch

    from . import evaluate

    model, device = _device_model(args)
    preset = _preset(args)
    patterns = _patterns(args.patterns, model)
    dataset = _dataset(args, preset)
    if len(dataset) < 4:
        raise UsageError(f"--data {args.data}: {len(dataset)} samples; evaluate needs at least 4")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    half = images.shape[0] // 2
    if images.dim() != 4:
        raise UsageError(f"--data {args.data}: inputs of shape {tuple(images.shape[1:])}; "
                         "evaluate needs images (C, H, W)")  # fmt: skip
    height, width = images.shape[-2:]
    if args.patch > min(height, width):
        raise UsageError(f"--patch {args.patch} is larger than the {height}×{width} images")
    methods = {name: _build_method(name, model, patterns) for name in _method_names(args.method)}
    estimators = ["random", "filter", patterns.estimator]
    if patterns.estimator not in ("linear", "two_component"):
        estimators = ["random", "filter"]
    _log(args, f"ρ(S) on {half} + {images.shape[0] - half} samples: {', '.join(estimators)}")
    started = time.perf_counter()
    table = evaluate.estimator_quality(
        model,
        None,
        images[:half].to(device),
        images[half:].to(device),
        estimators=estimators,
        patterns={patterns.estimator: patterns},
        batch_size=args.batch_size,
        seed=args.seed,
    )
    steps = min(100, -(-height // args.patch) * -(-width // args.patch))
    _log(args, f"degradation of {images.shape[0] - half} images, {args.patch}×{args.patch} "
               f"regions, {steps} steps: {', '.join(methods)} and a random order")  # fmt: skip
    rho_seconds = time.perf_counter() - started
    started = time.perf_counter()
    comparison = evaluate.compare(
        model,
        methods,
        images[half:].to(device),
        k=args.patch,
        steps=steps,
        batch_size=max(args.batch_size, 64),
        seed=args.seed,
        quality=table,
        output_dir=Path(args.out),
    )
    _write_evaluate_report(args, comparison, rho_seconds, time.perf_counter() - started)
    _log(args, f"report → {Path(args.out) / 'report.md'} and {Path(args.out) / 'report.html'}")
    return 0


def _write_evaluate_report(
    args: argparse.Namespace, comparison: Any, rho_seconds: float, compare_seconds: float
) -> Path:
    """``report.html`` of ``patternnet evaluate`` (:mod:`patternnet.report`)."""
    from .report import Report

    settings = {name: getattr(args, name) for name in ("model", "weights", "patterns", "data",
                "limit", "method", "patch", "seed", "device", "batch_size")}  # fmt: skip
    settings.update(comparison.settings)
    report = Report.from_comparison(comparison, title=f"patternnet evaluate: {args.model}",
                                    settings=settings)  # fmt: skip
    report.timings = {"estimator quality ρ(S)": rho_seconds,
                      "explain + degradation": compare_seconds, **report.timings}  # fmt: skip
    return report.write(Path(args.out) / "report.html")


def cmd_demo(args: argparse.Namespace) -> int:
    """``patternnet demo``: the built-in Fashion-MNIST demo."""
    from .demo import DemoConfig, DemoDataError, run_demo

    settings: dict[str, Any] = {
        "data": Path(args.data) if args.data else None,
        "out": Path(args.out),
        "threads": args.threads,
        "progress": not args.quiet,
        "log": (lambda message: None) if args.quiet else print,
    }
    if args.quick:
        config = DemoConfig.quick(**settings)
        if args.epochs != 3:
            config.epochs = args.epochs
    else:
        config = DemoConfig(epochs=args.epochs, **settings)
    try:
        summary = run_demo(config)
    except DemoDataError as error:
        print(f"patternnet demo: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.quiet:
        print(f"demo done in {summary['timings']['total']:.0f} s → {config.out}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """``patternnet methods``: list method names and descriptions."""
    for name, description in sorted(_available_methods().items()):
        print(f"{name:24s} {description}")
    return 0


COMMANDS = {
    "fit": cmd_fit,
    "explain": cmd_explain,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "methods": cmd_methods,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``patternnet`` command line; returns the exit status.

    Exit status: 0 on success, 2 for bad arguments or inputs (one-line message on stderr;
    set ``PATTERNNET_DEBUG=1`` for the full traceback instead).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"patternnet {args.command}: error: {error}", file=sys.stderr)
    # OSError: --out is a file, ...; OverflowError/MemoryError: --resize 10**30, ...
    except (OSError, ValueError, KeyError, TypeError, OverflowError, MemoryError) as error:
        if os.environ.get("PATTERNNET_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"patternnet {args.command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
