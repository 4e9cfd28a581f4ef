"""``patternnet explain``: explain images with one or more methods."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import viz
from ..borrow import forward_checked
from ..data import load_data
from . import common

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``explain`` to the sub-commands."""
    explain = commands.add_parser(
        "explain",
        help="explain images with one or more methods: a PNG and raw arrays per image",
        description="Writes OUT/<image>.png (the input, then one column per method, drawn as "
        "the method's kind says: signals as grey-centred images, attributions as "
        "red(+)/blue(-) heatmaps) and OUT/<image>.<method>.npy (the raw explanation, shaped "
        "like the model's input).",
    )
    common.add_model(explain)
    explain.add_argument(
        "--patterns", metavar="FILE", help="patterns file (from 'patternnet fit'); needed by "
        "the methods that explain with patterns (pattern_net, pattern_attribution)"
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
    common.add_preset(explain)
    common.add_quiet(explain)
    explain.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """One PNG and raw arrays per image."""
    model, device = common.device_model(args)
    preset = common.preset(args)
    patterns = common.patterns_file(args.patterns, model)
    names = common.method_names(args.method)
    methods = {name: common.build_named_method(name, model, patterns) for name in names}
    inputs = []
    for item in args.images:
        path = Path(item)
        if not path.exists():
            raise common.UsageError(f"image {item}: no such file or folder")
        with common.user_input(f"image {item}"):
            dataset = load_data(path, preset)
            images = [dataset[i][0] for i in range(len(dataset))]
        stems = getattr(dataset, "paths", None) or [path.with_suffix("")]
        if len(stems) != len(dataset):
            stems = [Path(f"{path.stem}_{i}") for i in range(len(dataset))]
        inputs += [(Path(s).stem, x) for s, x in zip(stems, images)]
    out = Path(args.out)
    with common.user_input(f"--out {args.out}"):
        out.mkdir(parents=True, exist_ok=True)
    bar = None if args.quiet else common.progress_bar(len(inputs), "explaining")
    for stem, x in inputs:
        batch = x[None].to(device)
        with torch.no_grad(), common.user_input(f"image {stem}"):
            logits = forward_checked(model, batch)  # a shape mismatch: one line, not a traceback
        if args.target is not None and not 0 <= args.target < logits.shape[-1]:
            raise common.UsageError(
                f"--target {args.target}: the model has {logits.shape[-1]} classes"
            )
        target = args.target if args.target is not None else int(logits.argmax(-1)[0])
        row = [viz.input_image(x, preset.mean, preset.std) if preset.mean else viz.input_image(x)]
        for name, method in methods.items():
            with common.user_input(f"method {name} on image {stem}"):
                result = method.attribute(batch, target=target)[0].detach().cpu()
            with common.user_input(f"--out {args.out}"):
                np.save(out / f"{stem}.{name}.npy", result.numpy())
            row.append(viz.picture(result, method.kind))
        with common.user_input(f"--out {args.out}"):
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
    common.log(args, f"explained {len(inputs)} image(s) with {', '.join(names)} → {out}")
    return 0
