"""Cost of the graph's node patterns (sums, pools, means) in a default fit, with and without.

``python -m perf.nodes --model resnet50 --size 112 --batch 4 --threads 1``

One process fits the same model on the same images with the default options twice per round,
interleaved: once as it is (every residual sum, average pool and mean gets fitted patterns,
method.md §10), once with node recording switched off (no autograd recording, no tracker: the
fit of Linear/Conv layers alone, what a fit cost before nodes had patterns). A plain forward
pass over the same batches is timed in the same rounds, so both are also given as ratios to
it. Times are CPU seconds of this process (:func:`perf.common.clock`), the load average is
recorded beside them; the spread is the range over the rounds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

import patternnet as pn
from patternnet.patterns import graph_statistics

from .common import images, machine, median, parse_args, timed, vision_model, write_result


class _NoNodes:
    """Stands in for :func:`graph_statistics.recording`: nothing recorded, no autograd."""

    def new_pass(self) -> None:
        return None


@contextlib.contextmanager
def _without_nodes(stats: Any, precision: str) -> Iterator[_NoNodes]:
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def extra(parser: Any) -> None:
        parser.add_argument("--images", type=int, default=16, help="images per fit")
        parser.add_argument("--rounds", type=int, default=5)

    args = parse_args(__doc__, argv, model="resnet50", batch=4, size=112, threads=1,
                      extra=extra)  # fmt: skip
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

    with_nodes = fit()
    without = fit_without()  # warm-up, and the check that the switch does what it says
    assert with_nodes.nodes and not without.nodes, "the switch did not switch nodes off"
    times: dict[str, list[float]] = {"forward": [], "with_nodes": [], "without_nodes": []}
    loads = []
    for r in range(args.rounds):
        order = [("with_nodes", fit), ("without_nodes", fit_without)]
        if r % 2:
            order.reverse()
        times["forward"].append(timed(forward))
        for name, fn in order:
            times[name].append(timed(fn))
        loads.append(machine()["load_average"][0])
    ratios = [w / o for w, o in zip(times["with_nodes"], times["without_nodes"])]
    result = {
        "model": args.model, "size": args.size, "batch": args.batch, "images": args.images,
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "nodes": {name: list(p) for name, p in with_nodes.nodes.items()},
        "seconds": times,
        "fit_over_forward": {k: [t / f for t, f in zip(times[k], times["forward"])]
                             for k in ("with_nodes", "without_nodes")},
        "with_over_without": {"median": median(ratios), "min": min(ratios), "max": max(ratios),
                              "rounds": ratios},
        "load_average_per_round": loads,
        "machine": machine(),
    }  # fmt: skip
    write_result(f"nodes_{args.model}_{args.size}", result)
    print(f"{args.model} {args.size}² batch {args.batch}, {args.images} images, "
          f"{torch.get_num_threads()} thread(s), load {min(loads):.1f}–{max(loads):.1f}")
    for key in ("with_nodes", "without_nodes"):
        ratio = result["fit_over_forward"][key]
        print(f"  fit {key:14s} {median(times[key]):7.2f} s  = {median(ratio):.2f}× forward "
              f"({min(ratio):.2f}–{max(ratio):.2f})")
    print(f"  with / without nodes: {median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})")
    return result


if __name__ == "__main__":
    main()
