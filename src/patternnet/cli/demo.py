"""``patternnet demo``: the built-in Fashion-MNIST demo (:func:`patternnet.demo.run_demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..demo import MODELS, DemoConfig, DemoDataError, run_demo
from . import common

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``demo`` to the sub-commands."""
    demo = commands.add_parser(
        "demo",
        help="the built-in demo on Fashion-MNIST (trains a small net, writes figures)",
        description="Trains a small VGG-style network (or with --model vit a small Vision "
        "Transformer) on Fashion-MNIST (cached), fits two-component patterns on the training "
        "set and writes the explanation figure, the ρ(S) plot, the degradation curves and a "
        "summary to OUT.",
    )
    demo.add_argument(
        "--model", choices=sorted(MODELS), default="cnn",
        help="cnn: the VGG-style network (default); vit: a 2-block Vision Transformer",
    )  # fmt: skip
    demo.add_argument(
        "--data", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: "
        "/usr/share/datasets/fashion-mnist or $PATTERNNET_DATA)"
    )
    demo.add_argument("--out", metavar="DIR",
                      help="(demo-output; demo-output-vit with --model vit)")  # fmt: skip
    demo.add_argument(
        "--epochs", type=common.positive_int, default=3, metavar="N",
        help="training epochs (3)",
    )  # fmt: skip
    demo.add_argument(
        "--quick", action="store_true",
        help="a reduced run in seconds: 1 epoch on 3000 images, small evaluation",
    )  # fmt: skip
    demo.add_argument(
        "--threads", type=common.positive_int, metavar="N",
        help="CPU threads (default: all cores)",
    )  # fmt: skip
    common.add_quiet(demo)
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The built-in Fashion-MNIST demo."""
    settings: dict[str, Any] = {
        "data": Path(args.data) if args.data else None,
        "threads": args.threads,
        "progress": not args.quiet,
        "log": (lambda message: None) if args.quiet else print,
    }
    if args.out:
        settings["out"] = Path(args.out)
    if args.model == "vit":  # the ViT variant's settings (--quick keeps its small fit)
        vit = DemoConfig.vit()
        settings = {"model": "vit", "out": vit.out, "quality_splits": vit.quality_splits,
                    **({} if args.quick else {"fit_limit": vit.fit_limit,
                                              "linear_fit_limit": vit.linear_fit_limit}),
                    **settings}  # fmt: skip
    if args.quick:
        config = DemoConfig.quick(**settings)
        if args.epochs != 3:
            config.epochs = args.epochs
    else:
        config = DemoConfig(epochs=args.epochs, **settings)
    try:
        summary = run_demo(config)
    except DemoDataError as error:  # several lines: how to get the data
        print(f"patternnet demo: error: {error}", file=sys.stderr)
        return common.EXIT_USAGE
    if args.quiet:
        print(f"demo done in {summary['timings']['total']:.0f} s → {config.out}")
    return 0
