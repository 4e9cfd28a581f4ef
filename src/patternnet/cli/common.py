"""What the sub-commands share: the one-line error, argument types, common options, and the
steps from command-line values to library objects (model, preset, data, patterns, methods)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm.auto import tqdm

from ..data import PRESETS, load_data, preset_for
from ..engine.support import UnsupportedModuleError
from ..methods.registry import build_method, method_info, methods
from ..models import load
from ..patterns.store import Patterns

__all__ = [
    "EXIT_USAGE",
    "UsageError",
    "user_input",
    "add_data",
    "add_model",
    "add_preset",
    "add_quiet",
    "build_named_method",
    "dataset",
    "device_model",
    "load_model",
    "loader",
    "log",
    "method_names",
    "patterns_file",
    "positive_float",
    "positive_int",
    "preset",
    "progress_bar",
]

EXIT_USAGE = 2
MODEL_HELP = (
    "the model: 'torchvision:NAME' (e.g. torchvision:vgg16), 'module.path:factory' (a "
    "function or class returning an nn.Module, importable from the current folder), or a "
    "torch.export file (.pt2, from torch.export.save)"
)


class UsageError(ValueError):
    """A problem with what the user asked for: reported in one line, exit status 2.

    The only exception the command line turns into exit status 2 (argparse exits with 2 on
    its own); any other exception is a bug and propagates with its traceback.
    """


@contextmanager
def user_input(what: str) -> Iterator[None]:
    """Within this block, the library's verdicts on the user's inputs are usage errors.

    The library reports a bad input — data, model, file — as ``ValueError`` (a wrong value),
    :class:`~patternnet.engine.support.UnsupportedModuleError` (a model it cannot explain)
    or ``OSError`` (a file that cannot be read or written); these become a
    :class:`UsageError` naming ``what`` (e.g. ``"--data x.npy"``). Wrap only the steps that
    consume the user's inputs: a bug elsewhere must not look like a usage error.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, UnsupportedModuleError, OSError) as error:
        text = str(error).strip()
        if isinstance(error, OSError) and error.strerror:
            text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
        message = text.splitlines()[0] if text else type(error).__name__
        raise UsageError(f"{what}: {message}") from error


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message (see prog --help)``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------- types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def image_size(text: str) -> int:
    """A side length in pixels: 1 to 16384 (a larger one would exhaust memory)."""
    value = positive_int(text)
    if value > 16384:
        raise argparse.ArgumentTypeError(f"{text!r} pixels: at most 16384")
    return value


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers (e.g. 0.485,0.456,0.406)"
        ) from None


# ---------------------------------------------------------------------------- options
def add_model(parser: argparse.ArgumentParser) -> None:
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


def add_preset(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--resize", type=image_size, metavar="N", help="shorter side → N px")
    group.add_argument("--crop", type=image_size, metavar="N", help="centre crop N×N px")
    group.add_argument("--mean", type=floats, metavar="M[,M,M]", help="per-channel mean")
    group.add_argument("--std", type=floats, metavar="S[,S,S]", help="per-channel std")
    group.add_argument(
        "--mode", choices=("RGB", "L"), help="convert images to RGB or greyscale (L)"
    )


def add_data(parser: argparse.ArgumentParser, required: bool = True) -> None:
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
        "--limit", type=positive_int, metavar="N", help="use at most the first N samples"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, metavar="N", help="batch size (32)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="data-loading worker processes for image folders (default: up to 4)",
    )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or logs")


# ---------------------------------------------------------------------------- objects
def load_model(spec: str, weights: str | None = None) -> Any:
    """Build the model a ``--model`` specification names (:func:`patternnet.models.load`).

    Raises
    ------
    UsageError
        For an unknown or unimportable model, a factory that does not return an
        ``nn.Module``, or a weights file that is missing or does not fit.
    """
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


def preset(args: argparse.Namespace) -> Any:
    """The input preprocessing of ``--preset`` and its overrides."""
    weights = getattr(args, "weights", None)
    weights = None if str(weights).lower() == "none" else weights
    with user_input(f"--weights {weights}"):
        own = preset_for(args.model, weights)
    base = PRESETS[args.preset] if args.preset else own
    if own.transform is not None and base is not own and (base.resize, base.crop) != (
        own.resize, own.crop
    ):
        print(
            f"warning: --preset {args.preset} (resize {base.resize}, crop {base.crop}) differs "
            f"from the preprocessing of --weights {weights} (resize {own.resize}, crop "
            f"{own.crop}); leave out --preset to use the weights' own",
            file=sys.stderr,
        )
    with user_input("preprocessing"):
        return base.with_overrides(
            resize=args.resize, crop=args.crop, mean=args.mean, std=args.std, mode=args.mode
        )


def dataset(args: argparse.Namespace, chosen_preset: Any) -> Any:
    """``--data`` read with the preset (the first ``--limit`` samples)."""
    with user_input(f"--data {args.data}"):
        data = load_data(args.data, chosen_preset, split=args.split)
    if args.limit is not None and args.limit < len(data):
        data = Subset(data, range(args.limit))
    return data


def loader(args: argparse.Namespace, data: Any) -> DataLoader:
    """Batches of ``--batch-size``; worker processes for image folders only."""
    workers = args.workers
    inner = getattr(data, "dataset", data)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)  # image files (ImageFiles, ImageFolder)
    if isinstance(inner, TensorDataset):
        workers = 0
    return DataLoader(data, batch_size=args.batch_size, num_workers=workers)


def device_model(args: argparse.Namespace) -> tuple[Any, torch.device]:
    """The ``--model`` on ``--device``."""
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UsageError(f"--device {args.device}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    model = load_model(args.model, args.weights)
    with user_input(f"--device {args.device}"):
        return model.to(device), device


def log(args: argparse.Namespace, message: str) -> None:
    """A progress line on stderr unless ``--quiet``."""
    if not args.quiet:
        print(message, file=sys.stderr)


def progress_bar(total: int, desc: str) -> Any:
    return tqdm(total=total, unit="img", desc=desc, leave=False)


def method_names(text: str) -> list[str]:
    """The names of ``--method NAME[,NAME...]``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--method: give at least one method name")
    return names


def build_named_method(name: str, model: Any, patterns: Any) -> Any:
    """The registry's method ``name``; the method says whether it needs ``--patterns``."""
    known = methods()
    if name not in known:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(sorted(known))}")
    if method_info(name).needs_patterns and patterns is None:
        raise UsageError(f"method {name} needs --patterns FILE (make one with 'patternnet fit')")
    try:
        return build_method(name, model, patterns)
    except (KeyError, ValueError, TypeError) as error:
        raise UsageError(f"method {name}: {error}") from error


def patterns_file(path: str | None, model: Any) -> Patterns | None:
    """``--patterns FILE`` read and checked against the model (None without the option)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"--patterns {path}: no such file (make one with 'patternnet fit')")
    try:
        return Patterns.load(path, model=model)
    except (ValueError, KeyError) as error:
        raise UsageError(f"--patterns {path}: {error}") from error
