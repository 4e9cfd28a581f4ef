"""Fit cost: images/s of fitting patterns against forward-only inference, and peak memory.

One configuration per process (peak RSS is per process). Every batch is first run forward
only (``torch.no_grad``, on a copy of the model that shares its weights and has no hooks),
then fitted; the ratio is the median over batches of (fit time / forward time of the same
batch), which cancels most of the noise of a shared machine. The first batch (allocation of
the float64 sums) is left out. With more than 8 batches the ratio covers one whole flush
cycle (batches 2-8; the 8th includes the periodic flush of held-back products); with fewer,
it is the median over batches and the final flush is shared equally by the batches it served
(conservative: in a long fit its fixed part, adding into the float64 sums, is shared by 8).
Times are CPU seconds of the one-thread process (see ``common.clock``).

Usage: python -m perf.fit --model vgg16 --estimator two_component --no-negative \
           --precision float32 --batches 3
       python -m perf.fit --whole --model vgg16 --images 64 --batch 16 --threads 2 --repeats 2

``--whole`` measures what a user gets: the whole default ``fit_patterns`` call (setup, pass,
solve), wall time, against forward-only inference over the same images, the two interleaved
``--repeats`` times in one process; it prints every pair and the load average.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from patternnet.patterns.fit import collect_statistics
from patternnet.patterns.statistics import DEFAULT_FLUSH_EVERY

from .common import (
    clock,
    images,
    machine,
    median,
    parse_args,
    peak_gpu_gb,
    peak_rss_gb,
    vision_model,
    write_result,
)


class TimedBatches:
    """Times a forward-only pass of each batch, yields it, and times its fit."""

    def __init__(self, batches: list[torch.Tensor], reference: torch.nn.Module) -> None:
        self.batches, self.reference = batches, reference
        self.forward: list[float] = []
        self.fit: list[float] = []
        self.end = 0.0

    def __iter__(self):
        for batch in self.batches:
            self.forward += forward_times(self.reference, [batch])
            start = clock()
            yield batch
            self.fit.append(clock() - start)
        self.end = clock()


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares the parameters and buffers (no extra memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def forward_times(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[float]:
    times = []
    with torch.no_grad():
        for batch in batches:
            start = clock()
            model(batch)
            times.append(clock() - start)
    return times


def floor_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """The arithmetic floor of the default fit: forward plus, per Linear/Conv layer, the
    weight-gradient product of its input with the stacked float32 output gradient of the
    default fit, by the layer's own weight-gradient kernel, a few images at a time like the
    fit: ``3·O + 1`` channels (``[y'·m, m, y'·(1−m), 1]``, a₊ and a₋) where an inactive unit
    can receive a signal, ``2·O`` (``[y'·m, m]``, a₊ only) in the layers read only through
    ReLU gates (``negative="auto"``). No masks, no shift, no float64 sums, no pattern solve,
    no sums/pools: what any fit of these sums must compute. 1×1 convolutions use the fit's
    kernel for them, one matrix product of channel-major data (the stacked gradient written
    channel-major by the same one copy, the input copied once, as the fit's shift writes it).
    """
    from patternnet.engine.canonize import Canonical
    from patternnet.engine.gates import RELU, relu_gates
    from patternnet.layers import geometry, is_linear_layer
    from patternnet.patterns.fit import linear_layers
    from patternnet.patterns.statistics import _CHUNK_ELEMENTS, _pointwise

    gates = relu_gates(model, Canonical(model).form.bypass)
    gated = {module for name, module in linear_layers(model).items() if gates.get(name) == RELU}

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        x, g = args[0], geometry(module)
        O = out.shape[1]
        k = 2 * O if module in gated else 3 * O + 1

        def stack(y: torch.Tensor, dim: int) -> torch.Tensor:
            if module in gated:
                return torch.cat([y, y], dim=dim)
            return torch.cat([y, y, y, y.narrow(dim, 0, 1)], dim=dim)

        if g.kind == "linear":
            x, out = x.reshape(-1, x.shape[-1]), out.reshape(-1, O)
            g.weight_product(x, stack(out, 1), torch.Size((k, x.shape[1])))
            return
        per_image = k * out[0, 0].numel()
        step = max(1, _CHUNK_ELEMENTS // per_image)
        shape = torch.Size((k, *module.weight.shape[1:]))
        pointwise = _pointwise(g, module.weight.shape)
        for start in range(0, out.shape[0], step):
            chunk, y = x[start : start + step], out[start : start + step]
            if pointwise:  # as the fit: one matrix product of channel-major data
                chunk = chunk[(slice(None), slice(None), *(slice(None, None, s) for s in g.stride))]
                xs = chunk.transpose(0, 1).reshape(chunk.shape[1], -1)
                torch.mm(stack(y.transpose(0, 1), 0).reshape(k, -1), xs.t())
                continue
            g.weight_product(chunk, stack(y, 1), shape)

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_linear_layer(m)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()


def whole_call(args: argparse.Namespace) -> dict[str, Any]:
    """The default ``fit_patterns(model, data, batch_size=B)`` against forward, wall time.

    After a warm-up (two forward passes over every batch), each repeat runs, back to back
    over the same images: forward-only inference, the arithmetic floor (:func:`floor_pass`),
    and the whole default call; the ratios are the fit's and the floor's wall time over the
    forward's of the same repeat, with the load average at the end of each. The headline is
    the median over repeats.
    """
    import os
    import time

    import patternnet as pn

    model = vision_model(args.model).to(args.device)
    floor_model = sharing_copy(model)  # the floor's hooks never touch the fitted model
    data = images(args.images, args.size).to(args.device)
    batches = list(data.split(args.batch))
    # Warm-up: the whole forward pass over every batch, twice. One batch was not enough: the
    # first repeat's forward then took 5.8-6.2 s against 3.5-3.8 s in every later repeat
    # (ResNet-50, 64 images), since the allocator only keeps large activation buffers mapped
    # once the process has freed some (glibc's adaptive mmap threshold): a cold forward paid
    # page faults that no later forward, fit or floor pays, and flattered that repeat's ratio.
    for _ in range(2):
        forward_times(model, batches)
    pairs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward_times(model, batches)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        floor_pass(floor_model, batches)
        floor = time.perf_counter() - start
        start = time.perf_counter()
        pn.fit_patterns(model, data, batch_size=args.batch, progress=False)
        fit = time.perf_counter() - start
        load = os.getloadavg()
        pairs.append({"forward_s": forward, "floor_s": floor, "fit_s": fit,
                      "ratio": fit / forward, "floor_ratio": floor / forward,
                      "load_average": load})
        print(f"fit {fit:.1f} s, floor {floor:.1f} s, forward {forward:.1f} s: "
              f"fit ×{fit / forward:.2f}, floor ×{floor / forward:.2f} (load {load[0]:.1f})",
              flush=True)
    ratios = [p["ratio"] for p in pairs]
    floors = [p["floor_ratio"] for p in pairs]
    above = [p["fit_s"] / p["floor_s"] for p in pairs]
    print(f"{args.model}: fit ÷ forward {median(ratios):.2f} (median of {len(pairs)}; "
          f"{', '.join(f'{r:.2f}' for r in ratios)}), floor ÷ forward {median(floors):.2f} "
          f"({', '.join(f'{r:.2f}' for r in floors)}), fit ÷ floor {median(above):.2f}",
          flush=True)
    result = {"benchmark": "fit_whole", "model": args.model, "images": args.images,
              "batch": args.batch, "size": args.size, "threads": torch.get_num_threads(),
              "machine": machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "pairs": pairs, "ratio_median": median(ratios),
              "ratio_spread": [min(ratios), max(ratios)],
              "floor_ratio_median": median(floors), "fit_over_floor_median": median(above),
              "warm_up": "two forward passes over every batch before the first repeat",
              "setting": "default fit_patterns call, wall time, everything included"}
    tag = f"{args.model}_{args.size}_{args.images}img"
    write_result(f"fit_whole_{tag}", result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--estimator", default="two_component",
                            choices=["two_component", "linear"])
        parser.add_argument("--no-negative", dest="negative", action="store_false")
        parser.add_argument("--precision", default="float32", choices=["float32", "float64"])
        parser.add_argument("--batches", type=int, default=3)
        parser.add_argument("--whole", action="store_true",
                            help="time the whole default fit_patterns call (wall)")
        parser.add_argument("--images", type=int, default=64)
        parser.add_argument("--repeats", type=int, default=2)

    args = parse_args(__doc__, argv, extra=extra)
    if args.whole:
        return whole_call(args)
    model = vision_model(args.model).to(args.device)
    data = images(args.batch * args.batches, args.size).to(args.device)
    batches = list(data.split(args.batch))
    reference = sharing_copy(model)
    forward_times(reference, batches[:1])  # warm-up
    rss_before_fit = peak_rss_gb()
    timed = TimedBatches(batches, reference)
    stats = collect_statistics(model, timed, estimator=args.estimator, negative=args.negative,
                               precision=args.precision, progress=False)
    final_flush = clock() - timed.end  # the final flush follows the last batch
    per_batch, forward = timed.fit, timed.forward
    if len(per_batch) > DEFAULT_FLUSH_EVERY:
        # A whole flush cycle: batches 2..8, the 8th including the periodic flush.
        cycle = range(1, DEFAULT_FLUSH_EVERY)
        ratios = [sum(per_batch[i] for i in cycle) / sum(forward[i] for i in cycle)]
        fit_batch = sum(per_batch[i] for i in cycle) / len(cycle)
        accounting = "flush cycle: batches 2-8 (the 8th includes the periodic flush)"
    else:
        steady = range(1, len(per_batch)) if len(per_batch) > 1 else range(len(per_batch))
        flush_share = final_flush / min(len(per_batch), DEFAULT_FLUSH_EVERY)
        ratios = [(per_batch[i] + flush_share) / forward[i] for i in steady]
        fit_batch = median([per_batch[i] for i in steady]) + flush_share
        accounting = "median of batches 2.., final flush shared by the batches it served"
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stats_bytes = sum(t.numel() * t.element_size() for t in stats.state_tensors().values())
    peak = peak_rss_gb()
    result = {
        "benchmark": "fit", "model": args.model, "estimator": args.estimator,
        "negative": args.negative, "precision": args.precision, "batch": args.batch,
        "size": args.size, "batches": args.batches, "machine": machine(),
        "forward_batch_s": median(forward), "forward_times_s": forward,
        "fit_batch_times_s": per_batch, "first_batch_s": per_batch[0],
        "final_flush_s": final_flush,
        "fit_batch_s": fit_batch,
        "ratio_to_forward": median(ratios), "ratios": ratios, "accounting": accounting,
        "images_per_s_fit": args.batch / fit_batch,
        "images_per_s_forward": args.batch / median(forward),
        "model_gb": model_bytes / 1e9, "stats_gb": stats_bytes / 1e9,
        "peak_rss_gb": peak, "rss_before_fit_gb": rss_before_fit, "device": str(args.device),
        "peak_gpu_gb": peak_gpu_gb(),
        "rss_goal_gb": 1.2 * (model_bytes + stats_bytes) / 1e9 + 1.0,
    }
    tag = f"{args.model}_{args.estimator}{'' if args.negative else '_plus'}_{args.precision}"
    if args.batch != 8:
        tag += f"_batch{args.batch}"
    if args.device.type != "cpu":
        tag += f"_{args.device.type}"
    write_result(f"fit_{tag}", result)
    print(f"{tag}: fit {fit_batch:.2f} s/batch vs forward {median(forward):.2f} s/batch = "
          f"×{result['ratio_to_forward']:.2f}; first batch {per_batch[0]:.2f} s, final flush "
          f"{final_flush:.2f} s; peak RSS {peak:.2f} GB (goal ≤ {result['rss_goal_gb']:.2f})"
          + (f"; peak GPU {result['peak_gpu_gb']:.2f} GB" if result["peak_gpu_gb"] else ""))
    return result


if __name__ == "__main__":
    main()
