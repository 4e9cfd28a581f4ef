"""Where the fixed cost of one default ``fit_patterns`` call goes (issue 15, item 2).

Times, in one process, the parts of a default call that do not grow with the data: the
support check and tracing, the canonical form, allocating the float64 sums, the pass itself
(on ``--images`` images only), the pattern solve, and the metadata (architecture,
fingerprint, weight summary). Each part is timed in wall and CPU seconds, ``--repeats``
times; the load average is recorded beside every repeat. For scale it also times touching
1 GB of fresh memory (the page faults every new buffer pays once).

Usage: python -m perf.setup --model vgg16 --images 2 --threads 2 --repeats 2
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from patternnet.engine.canonize import Canonical
from patternnet.engine.support import check_supported, linear_pattern_layers
from patternnet.patterns import fit as fit_mod
from patternnet.patterns.store import architecture, fingerprint, weight_summary

from .common import images, machine, median, parse_args, vision_model, write_result


def timed(fn: Any) -> tuple[Any, dict[str, float]]:
    """``fn()`` and its ``{"wall", "cpu"}`` seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def one_call(model: torch.nn.Module, data: torch.Tensor, batch: int) -> dict[str, Any]:
    """The parts of one default call, each timed (they add up to the call but for glue)."""
    parts: dict[str, dict[str, float]] = {}
    _, parts["support check and tracing"] = timed(
        lambda: (check_supported(model), linear_pattern_layers(model, True)))
    canonical, parts["canonical form"] = timed(lambda: Canonical(model, None))
    options = fit_mod.FitOptions()
    precision = options.resolved_precision(model)
    empty, parts["allocating the float64 sums"] = timed(lambda: fit_mod._new_statistics(
        model, canonical, options.estimator, options.negative, torch.device("cpu"), precision))
    gigabytes = sum(t.numel() * t.element_size() for t in empty.state_tensors().values()) / 1e9
    stats, parts["statistics pass"] = timed(lambda: fit_mod.collect_statistics(
        model, data, options, statistics=empty, batch_size=batch, progress=False))
    _, parts["metadata (architecture, fingerprint, weight summary)"] = timed(
        lambda: (architecture(model), fingerprint(model), weight_summary(model)))
    _, parts["compute_patterns (solve + metadata)"] = timed(
        lambda: fit_mod.compute_patterns(model, stats))
    solve = {k: parts["compute_patterns (solve + metadata)"][k]
             - parts["metadata (architecture, fingerprint, weight summary)"][k]
             for k in ("wall", "cpu")}  # fmt: skip
    parts["solve (compute_patterns − metadata)"] = solve
    setup = {k: sum(v[k] for name, v in parts.items()
                    if name not in ("statistics pass", "compute_patterns (solve + metadata)"))
             for k in ("wall", "cpu")}  # fmt: skip
    empty = stats = None  # the next call allocates its own
    _, whole = timed(lambda: fit_mod.fit_patterns(model, data, batch_size=batch,
                                                  progress=False))
    return {"parts": parts, "setup": setup, "sums_gb": gigabytes,
            "whole_call": whole, "load_average": os.getloadavg()}


def page_faults() -> dict[str, float]:
    """Seconds to allocate and touch 1 GB of fresh memory (float64 zeros)."""
    _, t = timed(lambda: torch.zeros(125_000_000, dtype=torch.float64))
    return t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def extra(parser: Any) -> None:
        parser.add_argument("--images", type=int, default=2)
        parser.add_argument("--repeats", type=int, default=2)

    args = parse_args(__doc__, argv, batch=2, threads=2, extra=extra)
    model = vision_model(args.model)
    data = images(args.images, args.size)
    runs = []
    for _ in range(args.repeats):
        run = one_call(model, data, args.batch)
        run["touch_1gb"] = page_faults()
        runs.append(run)
        for name, t in run["parts"].items():
            print(f"  {name}: {t['wall']:.2f} s wall, {t['cpu']:.2f} s CPU")
        print(f"setup {run['setup']['wall']:.2f} s wall ({run['setup']['cpu']:.2f} s CPU); "
              f"whole call on {args.images} images {run['whole_call']['wall']:.2f} s; touching "
              f"1 GB {run['touch_1gb']['wall']:.2f} s; load {run['load_average'][0]:.1f}",
              flush=True)
    result = {"benchmark": "setup", "model": args.model, "images": args.images,
              "batch": args.batch, "size": args.size, "machine": machine(), "runs": runs,
              "setup_wall_median_s": median([r["setup"]["wall"] for r in runs]),
              "setting": "default fit_patterns, parts timed separately, wall and CPU s"}
    write_result(f"setup_{args.model}", result)
    return result


if __name__ == "__main__":
    main()
