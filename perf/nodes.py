"""Cost of the graph's node patterns (sums, pools, means) in a default fit, with and without.

``python -m perf.nodes --model resnet50 --size 224 --batch 16 --images 16 --threads 2
--rounds 8 --before`` (the fit) and ``python -m perf.nodes --model resnet50 --size 224
--batch 8 --threads 2 --rounds 8 --explain`` (explaining, :func:`explain_rounds`)

One process fits the same model on the same images with the default options twice per round,
interleaved: once as it is (every residual sum, average pool and mean gets fitted patterns,
method.md §10), once with node recording switched off (no autograd recording, no tracker: the
fit of Linear/Conv layers alone, what a fit cost before nodes had patterns). ``--before`` adds
a third fit per round whose sums are read as before issue 13's cost work (a unit-major float32
copy of the summands, then one product: ``update_channelwise`` without ``call.native``), for a
before/after in the same run. A plain forward pass over the same batches is timed in the same
rounds, so every fit is also given as a ratio to it. Times are CPU seconds of this process
(:func:`perf.common.clock`); the order of the fits rotates every round; the load average is
recorded beside them. Each ratio is reported as its median over the rounds with a
distribution-free confidence interval for that median (order statistics of the rounds,
:func:`median_interval`) and the range.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

import patternnet as pn
from patternnet.engine.rules import NodePatterns
from patternnet.methods.pattern import _PatternMethod
from patternnet.patterns import graph_statistics

from .common import (
    images,
    interleaved_ratios,
    machine,
    median,
    parse_args,
    timed,
    top_logit_gradient,
    vision_model,
    write_result,
)
from .explain import random_patterns


class _NoNodes:
    """Stands in for :func:`graph_statistics.recording`: nothing recorded, no autograd."""

    def new_pass(self) -> None:
        return None


@contextlib.contextmanager
def _without_nodes(stats: Any, precision: str, plan: Any = None,
                   gated: Any = frozenset()) -> Iterator[_NoNodes]:
    with torch.no_grad():
        yield _NoNodes()


@contextlib.contextmanager
def nodes_switched_off() -> Iterator[None]:
    """Within the block, fits record no node statistics (the layers' fit alone)."""
    original = graph_statistics.recording
    graph_statistics.recording = _without_nodes
    try:
        yield
    finally:
        graph_statistics.recording = original


@contextlib.contextmanager
def sums_read_unit_major() -> Iterator[None]:
    """Within the block, fits read sums through the unit-major copy (the reading before)."""
    original = graph_statistics.update_channelwise

    def unit_major(stats: Any, call: Any, precision: str = "float64",
                   workspace: Any = None) -> None:  # fmt: skip
        call.native = None
        original(stats, call, precision, workspace)

    graph_statistics.update_channelwise = unit_major
    try:
        yield
    finally:
        graph_statistics.update_channelwise = original


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(low, high, coverage)``: the order statistics ``x(j) ≤ median ≤ x(n+1−j)`` with the
    largest ``j`` whose coverage ``1 − 2·P(Binomial(n, ½) < j)`` is at least ``confidence``
    (the whole range, and its coverage, when there are too few rounds for that)."""
    ordered = sorted(values)
    n = len(ordered)
    best = (ordered[0], ordered[-1], 1.0 - 2.0 * 0.5**n)
    for j in range(1, n // 2 + 1):
        below = sum(math.comb(n, i) for i in range(j)) / 2.0**n
        coverage = 1.0 - 2.0 * below
        if coverage < confidence:
            break
        best = (ordered[j - 1], ordered[n - j], coverage)
    return best


@contextlib.contextmanager
def nodes_probed() -> Iterator[None]:
    """Within the block, the pattern methods find nodes as before the graph's plan: every
    call that looks like a node is one (the probe), no :class:`ModelGraph` asked."""
    original = _PatternMethod.graph_context

    def probed(self: Any, canonical: Any) -> Any:
        return NodePatterns(self.patterns, self.estimator,
                            attribution=self._attribution).tracker()  # fmt: skip

    _PatternMethod.graph_context = probed
    try:
        yield
    finally:
        _PatternMethod.graph_context = original


def explain_rounds(args: Any) -> dict[str, Any]:
    """``--explain``: PatternNet / PatternAttribution with the graph's plan (now) against the
    probe (before), each ÷ the plain gradient timed right before it, rounds interleaved."""
    model = vision_model(args.model)
    x = images(args.batch, args.size)
    with torch.no_grad():
        target = model(x).argmax(1)
    patterns = random_patterns(model, args.size)
    floor = top_logit_gradient(model, target)
    built = {"PatternNet": pn.PatternNet(model, patterns),
             "PatternAttribution": pn.PatternAttribution(model, patterns)}  # fmt: skip
    found: dict[str, Any] = {}
    for name, method in built.items():
        found[f"{name} (plan)"] = lambda method=method: method.attribute(x, target)

        def before(method: Any = method) -> Any:
            with nodes_probed():
                return method.attribute(x, target)

        found[f"{name} (probe)"] = before
    for method in built.values():  # the same explanation either way
        with nodes_probed():
            expected = method.attribute(x[:2], target[:2])
        torch.testing.assert_close(method.attribute(x[:2], target[:2]), expected)
    for fn in found.values():
        fn()
    ratios, floors = interleaved_ratios(found, lambda: floor(x), args.rounds)
    loads = machine()["load_average"]
    result: dict[str, Any] = {"model": args.model, "size": args.size, "batch": args.batch,
                              "threads": torch.get_num_threads(), "rounds": args.rounds,
                              "over_gradient": ratios, "gradient_s": floors,
                              "load_average_end": loads, "machine": machine()}  # fmt: skip
    print(f"{args.model} {args.size}² batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} rounds, load at the end {loads[0]:.1f}")
    for name, values in ratios.items():
        low, high, coverage = median_interval(values)
        print(f"  {name:28s} {median(values):.3f}× gradient ({100 * coverage:.0f} % interval "
              f"{low:.3f}–{high:.3f})")
    for name in built:
        after = [a / b for a, b in zip(ratios[f"{name} (plan)"], ratios[f"{name} (probe)"])]
        low, high, coverage = median_interval(after)
        result[f"{name}_plan_over_probe"] = {"median": median(after), "interval": [low, high],
                                             "coverage": coverage, "rounds": after}  # fmt: skip
        print(f"  {name} plan / probe: median {median(after):.3f}, {100 * coverage:.0f} % "
              f"interval {low:.3f}–{high:.3f}")
    write_result(f"nodes_explain_{args.model}_{args.size}", result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def extra(parser: Any) -> None:
        parser.add_argument("--images", type=int, default=16, help="images per fit")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--before", action="store_true",
                            help="also time sums read through the unit-major copy (before)")
        parser.add_argument("--explain", action="store_true",
                            help="time explaining with the graph's plan against the probe")

    args = parse_args(__doc__, argv, model="resnet50", batch=4, size=112, threads=1,
                      extra=extra)  # fmt: skip
    if args.explain:
        return explain_rounds(args)
    model = vision_model(args.model)
    x = images(args.images, args.size)
    batches = x.split(args.batch)

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)

    def fit() -> pn.Patterns:
        return pn.fit_patterns(model, x, batch_size=args.batch, progress=False)

    def fit_without() -> pn.Patterns:
        with nodes_switched_off():
            return fit()

    def fit_before() -> pn.Patterns:
        with sums_read_unit_major():
            return fit()

    with_nodes = fit()
    without = fit_without()  # warm-up, and the check that the switch does what it says
    assert with_nodes.nodes and not without.nodes, "the switch did not switch nodes off"
    fits = {"with_nodes": fit, "without_nodes": fit_without}
    if args.before:
        before = fit_before()
        # The same patterns either way (float32 rounding apart). Only a/a₊: with random
        # weights many a₋ of sums are ill-conditioned (normalisers near 0), and both readings'
        # a₋ differ from float64 by 1e-5 to 2e-2 while their sums agree with it within 1e-7.
        for name, tensors in with_nodes.nodes.items():
            for key in ("a", "a_plus"):
                if key in tensors:
                    value = tensors[key]
                    error = (before.nodes[name][key] - value).norm() / value.norm().clamp(
                        min=1e-30)
                    assert float(error) < 1e-3, (name, key, float(error))
        fits["with_nodes_before"] = fit_before
    times: dict[str, list[float]] = {"forward": [], **{name: [] for name in fits}}
    loads = []
    for r in range(args.rounds):
        order = list(fits.items())
        order = order[r % len(order):] + order[: r % len(order)]
        times["forward"].append(timed(forward))
        for name, fn in order:
            times[name].append(timed(fn))
        loads.append(machine()["load_average"][0])

    def summary(values: list[float]) -> dict[str, Any]:
        low, high, coverage = median_interval(values)
        return {"median": median(values), "interval": [low, high], "coverage": coverage,
                "min": min(values), "max": max(values), "rounds": values}  # fmt: skip

    over = {name: [w / o for w, o in zip(times[name], times["without_nodes"])]
            for name in fits if name != "without_nodes"}  # fmt: skip
    result = {
        "model": args.model, "size": args.size, "batch": args.batch, "images": args.images,
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "nodes": {name: list(p) for name, p in with_nodes.nodes.items()},
        "seconds": times,
        "fit_over_forward": {k: [t / f for t, f in zip(times[k], times["forward"])]
                             for k in fits},
        "with_over_without": summary(over["with_nodes"]),
        "load_average_per_round": loads,
        "machine": machine(),
    }  # fmt: skip
    if args.before:
        result["before_over_without"] = summary(over["with_nodes_before"])
        result["with_over_before"] = summary(
            [w / b for w, b in zip(times["with_nodes"], times["with_nodes_before"])]
        )
    write_result(f"nodes_{args.model}_{args.size}", result)
    print(f"{args.model} {args.size}² batch {args.batch}, {args.images} images, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds, "
          f"load {min(loads):.1f}–{max(loads):.1f}")
    for key in fits:
        ratio = result["fit_over_forward"][key]
        print(f"  fit {key:18s} {median(times[key]):7.2f} s  = {median(ratio):.2f}× forward "
              f"({min(ratio):.2f}–{max(ratio):.2f})")
    labels = {"with_over_without": "with / without nodes",
              "before_over_without": "before: with / without nodes",
              "with_over_before": "with nodes, after / before"}  # fmt: skip
    for key, label in labels.items():
        if key in result:
            r = result[key]
            print(f"  {label:30s} median {r['median']:.3f}, {100 * r['coverage']:.0f} % "
                  f"interval {r['interval'][0]:.3f}–{r['interval'][1]:.3f} "
                  f"(range {r['min']:.3f}–{r['max']:.3f})")
    return result


if __name__ == "__main__":
    main()
