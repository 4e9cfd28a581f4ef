"""Where ViT-B/16's PatternNet and PatternAttribution spend their time beyond the gradient.

Issue 14, item 5. Fits the default patterns of torchvision ``vit_b_16`` (random weights,
seeded, as :mod:`perf.vit`) on one batch, then runs the plain top-logit gradient, PatternNet
and PatternAttribution under :mod:`torch.profiler` (``record_shapes``), each after one
untimed warm-up call, and prints

- the CPU seconds of each profiled call and its ratio to the gradient's (one call each: a
  profile, not a measurement; :mod:`perf.vit` gives the interleaved ratios);
- per method, the operators (name and input shapes) whose self CPU time exceeds the
  gradient's most, with calls and milliseconds side by side.

Usage: python -m perf.vit_profile [--batch 8] [--size 224] [--blocks 12] [--top 25]
"""

from __future__ import annotations

import os
import time
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import patternnet as pn

from .attnlrp import vit_b_16
from .common import images, parse_args, top_logit_gradient
from .vit import truncated


def _table(prof: Any) -> dict[tuple[str, str], tuple[int, float]]:
    """``{(operator, input shapes): (calls, self CPU ms)}``."""
    rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.key_averages(group_by_input_shape=True):
        row = rows[(event.key, str(event.input_shapes)[:90])]
        row[0] += event.count
        row[1] += event.self_cpu_time_total / 1e3
    return {key: (int(calls), ms) for key, (calls, ms) in rows.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(
        __doc__, argv, model="vit_b_16", batch=8, size=224, threads=1,
        extra=lambda parser: (
            parser.add_argument("--blocks", type=int, default=12),
            parser.add_argument("--top", type=int, default=25),
        ),
    )  # fmt: skip
    model = truncated(vit_b_16(), args.blocks)
    x = images(args.batch, args.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patterns = pn.fit_patterns(model, x, progress=False)
    with torch.no_grad():
        target = model(x).argmax(1)
    gradient = top_logit_gradient(model, target)
    calls = {
        "gradient": lambda: gradient(x),
        "PatternNet": lambda: pn.PatternNet(model, patterns).attribute(x, target),
        "PatternAttribution": lambda: pn.PatternAttribution(model, patterns).attribute(
            x, target),
    }
    tables, seconds = {}, {}
    for name, call in calls.items():
        call()  # warm-up
        start = time.process_time()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            call()
        seconds[name] = time.process_time() - start
        tables[name] = _table(prof)
    print(f"vit_b_16 ({args.blocks} blocks), batch {args.batch}, {args.size}², "
          f"{torch.get_num_threads()} thread(s); load {os.getloadavg()[0]:.1f}")
    for name, value in seconds.items():
        print(f"  {name}: {value:.2f} CPU s (profiled) = × {value / seconds['gradient']:.2f}")
    base = tables["gradient"]
    for name in ("PatternNet", "PatternAttribution"):
        table = tables[name]
        keys = set(table) | set(base)
        excess = sorted(keys, key=lambda k: table.get(k, (0, 0.0))[1] - base.get(k, (0, 0.0))[1],
                        reverse=True)
        total = sum(ms for _, ms in table.values()) - sum(ms for _, ms in base.values())
        print(f"\n{name} − gradient: {total:+.0f} ms self CPU in all; largest excesses:")
        print(f"  {'operator':<34} {'input shapes':<60} {'calls':>11} {'ms':>15}")
        for key in excess[:args.top]:
            calls_m, ms_m = table.get(key, (0, 0.0))
            calls_g, ms_g = base.get(key, (0, 0.0))
            print(f"  {key[0][:34]:<34} {key[1][:60]:<60} {calls_m:>5}/{calls_g:<5} "
                  f"{ms_m:7.0f}/{ms_g:<7.0f}")
        savings = excess[-5:]
        print("  largest savings:")
        for key in reversed(savings):
            calls_m, ms_m = table.get(key, (0, 0.0))
            calls_g, ms_g = base.get(key, (0, 0.0))
            print(f"  {key[0][:34]:<34} {key[1][:60]:<60} {calls_m:>5}/{calls_g:<5} "
                  f"{ms_m:7.0f}/{ms_g:<7.0f}")
    return {"seconds": seconds}


if __name__ == "__main__":
    main()
