"""``patternnet evaluate``: ρ(S) per layer and degradation curves, as a report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import evaluate
from ..report import Report
from . import common

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``evaluate`` to the sub-commands."""
    parser = commands.add_parser(
        "evaluate",
        help="judge the patterns and the explanations on data: ρ(S) and degradation",
        description="Estimator quality ρ(S) per layer (method.md §5) on two disjoint halves "
        "of DATA (regression and evaluation), and, where available, image degradation "
        "curves for the methods (method.md §6). Writes a Markdown report, CSV and figures.",
    )
    common.add_model(parser)
    parser.add_argument(
        "--patterns", required=True, metavar="FILE", help="patterns file (from 'patternnet fit')"
    )
    common.add_data(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder")
    parser.add_argument(
        "--method",
        default="pattern_attribution,gradient",
        metavar="NAME[,NAME...]",
        help="methods for the degradation curves (default pattern_attribution,gradient)",
    )
    parser.add_argument(
        "--patch", type=common.positive_int, default=9, metavar="K",
        help="degradation: K×K regions (default 9, as in the paper)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (0)")
    parser.add_argument(
        "--sanity", action="store_true",
        help="also run the sanity checks (patternnet.evaluate.sanity: model-parameter "
        "randomisation, cosine convergence, class sensitivity, input invariance) for every "
        "registered method; writes sanity.md, sanity.json and sanity.png",
    )  # fmt: skip
    parser.add_argument(
        "--sanity-images", type=common.positive_int, default=16, metavar="N",
        help="images explained by the sanity checks (default 16, from the second half)",
    )  # fmt: skip
    common.add_preset(parser)
    common.add_quiet(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """ρ(S) per layer and degradation curves, as a report.

    DATA is split in two halves: ρ(S)'s regression and evaluation splits (the patterns were
    fitted on other data); the degradation curves of every ``--method`` and a random order
    are measured on the second half. :func:`patternnet.evaluate.compare` writes
    ``report.md``, ``metrics.csv``, ``degradation.png``, ``explanations.png``, ``rho.png`` and
    ``rho.csv`` into OUT, and :mod:`patternnet.report` ``report.html``.
    """
    model, device = common.device_model(args)
    preset = common.preset(args)
    patterns = common.patterns_file(args.patterns, model)
    dataset = common.dataset(args, preset)
    if len(dataset) < 4:
        raise common.UsageError(
            f"--data {args.data}: {len(dataset)} samples; evaluate needs at least 4"
        )
    with common.user_input(f"--data {args.data}"):
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    half = images.shape[0] // 2
    if images.dim() != 4:
        raise common.UsageError(f"--data {args.data}: inputs of shape "
                                f"{tuple(images.shape[1:])}; evaluate needs images "
                                "(C, H, W)")  # fmt: skip
    height, width = images.shape[-2:]
    if args.patch > min(height, width):
        raise common.UsageError(
            f"--patch {args.patch} is larger than the {height}×{width} images"
        )
    methods = {
        name: common.build_named_method(name, model, patterns)
        for name in common.method_names(args.method)
    }
    estimators = ["random", "filter", patterns.estimator]
    if patterns.estimator not in ("linear", "two_component"):
        estimators = ["random", "filter"]
    missing = evaluate.layers_without_a_minus(patterns)
    if missing:  # ρ(S) of S_a+- needs a₋ everywhere; the default fit leaves it out
        estimators = ["random", "filter"]
        print(f"warning: ρ(S) of two_component not measured: {args.patterns} has no a₋ for "
              f"{', '.join(missing)} (fitted with the default negative='auto'); refit with "
              "`patternnet fit --negative-everywhere` to measure it", file=sys.stderr)
    common.log(args, f"ρ(S) on {half} + {images.shape[0] - half} samples: "
                     f"{', '.join(estimators)}")  # fmt: skip
    started = time.perf_counter()
    with common.user_input(f"ρ(S) on --data {args.data}"):
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
    common.log(args, f"degradation of {images.shape[0] - half} images, {args.patch}×"
                     f"{args.patch} regions, {steps} steps: {', '.join(methods)} and a random "
                     "order")  # fmt: skip
    rho_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with common.user_input(f"evaluate --data {args.data} into --out {args.out}"):
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
    compare_seconds = time.perf_counter() - started
    sanity = None
    if args.sanity:
        sanity = _sanity(args, model, patterns, images[:half].to(device),
                         images[half:].to(device))  # fmt: skip
    with common.user_input(f"evaluate: report.html into --out {args.out}"):
        _write_report(args, comparison, rho_seconds, compare_seconds, sanity)
    out = Path(args.out)
    common.log(args, f"report → {out / 'report.md'} and {out / 'report.html'}")
    return 0


def _sanity(
    args: argparse.Namespace, model: Any, patterns: Any, fit: torch.Tensor, test: torch.Tensor
) -> Any:
    """``--sanity``: every registered method against every check; files into OUT."""
    estimator = patterns.estimator if patterns.estimator in ("linear", "two_component") else (
        "two_component")  # fmt: skip
    images = test[: args.sanity_images]
    common.log(args, f"sanity checks of every registered method on {images.shape[0]} images "
                     f"(patterns refitted on {fit.shape[0]} images per model variant)")  # fmt: skip
    with common.user_input(f"evaluate --sanity on --data {args.data}"):
        result = evaluate.sanity_checks(
            model, images, fit_data=fit, patterns=patterns, seed=args.seed,
            batch_size=args.batch_size, estimator=estimator,
            setting=f"{args.model} on {images.shape[0]} images of {args.data}",
        )  # fmt: skip
    out = Path(args.out)
    text = result.to_markdown()
    common_write(out / "sanity.md", text)
    common_write(out / "sanity.json", json.dumps(result.to_records(), indent=1, default=str))
    result.plot(out / "sanity.png")
    report = out / "report.md"
    if report.exists():
        common_write(report, report.read_text() + "\n## Sanity checks\n\n" + text
                     + "\n![sanity](sanity.png)\n")  # fmt: skip
    return result


def common_write(path: Path, text: str) -> None:
    """Write ``text`` atomically (a temporary file renamed over ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_report(
    args: argparse.Namespace,
    comparison: Any,
    rho_seconds: float,
    compare_seconds: float,
    sanity: Any = None,
) -> Path:
    """``report.html`` of ``patternnet evaluate`` (:mod:`patternnet.report`)."""
    settings = {name: getattr(args, name) for name in ("model", "weights", "patterns", "data",
                "limit", "method", "patch", "seed", "device", "batch_size")}  # fmt: skip
    settings.update(comparison.settings)
    report = Report.from_comparison(comparison, title=f"patternnet evaluate: {args.model}",
                                    settings=settings, sanity=sanity)  # fmt: skip
    report.timings = {"estimator quality ρ(S)": rho_seconds,
                      "explain + degradation": compare_seconds, **report.timings}  # fmt: skip
    return report.write(Path(args.out) / "report.html")
