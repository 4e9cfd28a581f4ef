"""ViT-B/16: PatternNet/PatternAttribution × the gradient, and the default fit × forward.

Issue 14, item 5: on torchvision ``vit_b_16`` (random weights, seeded, the zero-initialised
head re-initialised; batch 8 at 224², CPU, one thread) PatternNet and PatternAttribution
should cost ≤ 1.2 × the plain autograd gradient of the top logit, and the whole default
``fit_patterns`` call ≤ 4 × forward-only inference per image.

In one process:

1. **Fit** (``--repeats`` times, interleaved): forward-only inference over the ``--images``
   images in batches of ``--batch`` (``torch.no_grad``), then the whole default
   ``fit_patterns(model, images, batch_size=batch)`` call over the same images; each is timed
   in wall and CPU seconds, and the ratio fit ÷ forward is given per repeat.
2. **Explain** (``--rounds`` rounds): PatternNet and PatternAttribution with the patterns of
   the last fit on one batch, each timed right after the plain gradient
   (:func:`perf.common.interleaved_ratios`, CPU seconds; the order rotates every round).

A random ViT-B/16's PatternNet signal grows by about 10⁵–10⁶ per block (docs/method.md §12)
and overflows float32 after about seven blocks: a method that fails in float32 is then
measured, together with its gradient, on a float64 copy of the model (patterns cast, not
refitted), and the result names the dtype beside its ratio. ``--blocks`` keeps only the
first encoder blocks (a smaller model, named in the result).

The load average is recorded before and after each timed call: on a shared machine, give
ratios from the same run, with the load.

Usage: python -m perf.vit [--images 32] [--batch 8] [--repeats 2] [--rounds 3] [--blocks 12]
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import patternnet as pn

from .attnlrp import vit_b_16
from .common import (
    images,
    interleaved_ratios,
    machine,
    parse_args,
    top_logit_gradient,
    write_result,
)


def truncated(model: nn.Module, blocks: int) -> nn.Module:
    """A copy of a torchvision ViT with only its first ``blocks`` encoder blocks."""
    layers = model.encoder.layers
    if blocks >= len(layers):
        return model
    model = copy.deepcopy(model)
    model.encoder.layers = nn.Sequential(*list(model.encoder.layers)[:blocks])
    return model


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """``fn()`` and its wall and CPU seconds, with the 1-minute load average after it."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                   "load": os.getloadavg()[0]}


def fit_ratios(model: nn.Module, data: torch.Tensor, batch: int,
               repeats: int) -> tuple[Any, list[dict[str, Any]]]:
    """Forward-only inference, then the whole default fit, ``repeats`` times."""
    rows, patterns = [], None

    def forward() -> None:
        with torch.no_grad():
            for start in range(0, data.shape[0], batch):
                model(data[start:start + batch])

    def fit() -> Any:
        with warnings.catch_warnings():  # the "attention and no rectifier" note, every call
            warnings.simplefilter("ignore")
            return pn.fit_patterns(model, data, batch_size=batch, progress=False)

    for _ in range(repeats):
        _, t_forward = timed(forward)
        patterns = None  # the previous fit's memory is free before the next call
        patterns, t_fit = timed(fit)
        rows.append({"forward": t_forward, "fit": t_fit,
                     "ratio_wall": t_fit["wall"] / t_forward["wall"],
                     "ratio_cpu": t_fit["cpu"] / t_forward["cpu"]})
        print(f"  fit {t_fit['wall']:.1f} s wall ({t_fit['cpu']:.1f} CPU), forward "
              f"{t_forward['wall']:.1f} s wall ({t_forward['cpu']:.1f} CPU): "
              f"× {rows[-1]['ratio_wall']:.2f} wall, × {rows[-1]['ratio_cpu']:.2f} CPU; "
              f"load {t_fit['load']:.1f}", flush=True)
    return patterns, rows


def explainers(model: nn.Module, patterns: Any,
               target: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "PatternNet": lambda x: pn.PatternNet(model, patterns).attribute(x, target),
        "PatternAttribution": lambda x: pn.PatternAttribution(model, patterns).attribute(
            x, target),
    }


def explain_ratios(model: nn.Module, patterns: Any, x: torch.Tensor,
                   rounds: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Interleaved ratios method ÷ gradient; float64 for a method that fails in float32."""
    with torch.no_grad():
        target = model(x).argmax(1)
    refused: dict[str, str] = {}
    by_dtype: dict[torch.dtype, list[str]] = {torch.float32: [], torch.float64: []}
    for name, method in explainers(model, patterns, target).items():
        try:
            result = method(x)
            assert torch.isfinite(result).all()
            by_dtype[torch.float32].append(name)
        except (ValueError, AssertionError) as error:
            refused[name] = f"float32: {type(error).__name__}: {str(error).splitlines()[0]}"
            by_dtype[torch.float64].append(name)
    table: dict[str, Any] = {}
    for dtype, names in by_dtype.items():
        if not names:
            continue
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        inputs = x.to(dtype)
        found = explainers(m, patterns, target)
        gradient = top_logit_gradient(m, target)
        gradient(inputs)
        for name in names:
            found[name](inputs)  # warm-up (and a float64 failure is raised here)
        ratios, floors = interleaved_ratios(
            {name: (lambda f=found[name], x=inputs: f(x)) for name in names},
            lambda g=gradient, x=inputs: g(x), rounds)
        for name, values in ratios.items():
            table[name] = {"dtype": str(dtype).removeprefix("torch."),
                           "median": statistics.median(values), "min": min(values),
                           "max": max(values), "all": values,
                           "gradient_cpu_s": statistics.median(floors)}
            print(f"  {name} ({table[name]['dtype']}): × {table[name]['median']:.2f} the "
                  f"gradient ({min(values):.2f}–{max(values):.2f}; gradient "
                  f"{statistics.median(floors):.2f} CPU s); load {os.getloadavg()[0]:.1f}",
                  flush=True)
    return table, refused


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(
        __doc__, argv, model="vit_b_16", batch=8, size=224, threads=1,
        extra=lambda parser: (
            parser.add_argument("--images", type=int, default=32),
            parser.add_argument("--repeats", type=int, default=2),
            parser.add_argument("--rounds", type=int, default=3),
            parser.add_argument("--blocks", type=int, default=12),
            parser.add_argument("--no-fit-timing", action="store_true",
                                help="fit once on one batch, untimed; only the explain ratios"),
        ),
    )  # fmt: skip
    load_before = os.getloadavg()
    model = truncated(vit_b_16(), args.blocks)
    data = images(args.images, args.size)
    print(f"vit_b_16 ({args.blocks} blocks), {args.images} images in batches of {args.batch}, "
          f"{args.size}², {torch.get_num_threads()} thread(s); load {load_before}", flush=True)
    if args.no_fit_timing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patterns = pn.fit_patterns(model, data[:args.batch], progress=False)
        fits: list[dict[str, Any]] = []
    else:
        patterns, fits = fit_ratios(model, data, args.batch, args.repeats)
    table, refused = explain_ratios(model, patterns, data[:args.batch], args.rounds)
    result = {
        "model": "vit_b_16", "blocks": args.blocks, "images": args.images,
        "batch": args.batch, "size": args.size, "threads": torch.get_num_threads(),
        "fit": fits,
        "fit_ratio_wall_median": statistics.median([f["ratio_wall"] for f in fits])
        if fits else None,
        "fit_ratio_cpu_median": statistics.median([f["ratio_cpu"] for f in fits])
        if fits else None,
        "explain": table, "float32_refused": refused,
        "load_before": load_before, "load_after": os.getloadavg(), "machine": machine(),
        "setting": "whole default fit_patterns call vs forward-only inference over the same "
        "images; explain: CPU s vs the top-logit gradient, interleaved",
    }
    write_result(f"vit_b_16_{args.blocks}blocks", result)
    return result


if __name__ == "__main__":
    main()
