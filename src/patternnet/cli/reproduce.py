"""``patternnet reproduce``: the paper's Figures 3, 4 and 7 on ImageNet in one command.

A thin front end over :func:`patternnet.reproduce`::

    patternnet reproduce --imagenet ~/imagenet --model torchvision:vgg16 \\
        --weights IMAGENET1K_V1 --out vgg16-paper/
    torchrun --nproc-per-node 4 -m patternnet reproduce --imagenet ~/imagenet --device cuda \\
        --out vgg16-paper/          # the fit shared by 4 GPUs; rank 0 does the rest
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..reproduction import reproduce
from . import common

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``reproduce`` to the sub-commands."""
    parser = commands.add_parser(
        "reproduce",
        help="the paper on ImageNet: ρ(S) per layer, degradation, explanations, report.html",
        description="Kindermans et al. 2018 on an ImageNet folder (DIR/train/<wnid>/*.JPEG, "
        "DIR/val/<wnid>/*.JPEG): fits S_a+- and S_a patterns on --fit-images training images "
        "(under torchrun: shared by the processes), then writes Figure 3 (ρ(S) per layer), "
        "Figure 4 (degradation of --val-images validation images, 9×9 regions, AOPC with "
        "intervals), Figure 7 (explanations), report.html and summary.json to OUT. Fitted "
        "patterns are kept in OUT and reused by a rerun with the same settings.",
    )
    parser.add_argument("--imagenet", required=True, metavar="DIR",
                        help="ImageNet folder: train/ and val/ in ImageFolder layout")  # fmt: skip
    parser.add_argument("--model", default="torchvision:vgg16", metavar="MODEL",
                        help=common.MODEL_HELP + " (default torchvision:vgg16)")  # fmt: skip
    parser.add_argument(
        "--weights", default="IMAGENET1K_V1", metavar="NAME|FILE",
        help="torchvision weights name or state-dict file (default IMAGENET1K_V1); 'none' "
        "keeps a random, seeded initialisation (for testing the pipeline only)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--fit-images", type=common.positive_int, default=20000, metavar="N",
                        help="training images the patterns are fitted on (20000)")  # fmt: skip
    parser.add_argument("--val-images", type=common.positive_int, default=1000, metavar="N",
                        help="validation images for the degradation curves (1000)")  # fmt: skip
    parser.add_argument("--quality-images", type=common.positive_int, default=500, metavar="N",
                        help="images in each of ρ(S)'s regression and evaluation splits "
                        "(500)")  # fmt: skip
    parser.add_argument("--grid-images", type=common.positive_int, default=8, metavar="N",
                        help="validation images in the explanation grid (8)")  # fmt: skip
    parser.add_argument("--patch", type=common.positive_int, default=9, metavar="K",
                        help="degradation: K×K regions (9, the paper's)")  # fmt: skip
    parser.add_argument("--steps", type=common.positive_int, default=100, metavar="N",
                        help="degradation: replacement steps (100)")  # fmt: skip
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda, cuda:1 ... (under torchrun, cuda is each "
                        "process's local GPU)")  # fmt: skip
    parser.add_argument("--batch-size", type=common.positive_int, default=32, metavar="N",
                        help="batch size (32)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="data-loading worker processes (default: up to 4)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the image draws (0)")
    common.add_preset(parser)
    common.add_quiet(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run :func:`patternnet.reproduce` with the parsed options."""
    weights = None if str(args.weights).lower() == "none" else args.weights
    if args.model.startswith("torchvision:") and weights is None:
        common.log(args, f"note: --model {args.model} with --weights none has RANDOM (seeded) "
                         "weights: the figures test the pipeline, not the paper")  # fmt: skip
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise common.UsageError(f"--device {args.device}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise common.UsageError(f"--device {args.device}: CUDA is not available here")
    try:
        reproduce(
            args.imagenet, model=args.model, weights=weights, out=args.out,
            fit_images=args.fit_images, val_images=args.val_images,
            quality_images=args.quality_images, grid_images=args.grid_images,
            patch=args.patch, steps=args.steps, device=args.device, batch_size=args.batch_size,
            workers=args.workers, seed=args.seed, preset=common.preset(args),
            progress=not args.quiet, log=lambda message: common.log(args, message),
        )  # fmt: skip
    except (FileNotFoundError, ImportError) as error:
        raise common.UsageError(str(error)) from error
    return 0
