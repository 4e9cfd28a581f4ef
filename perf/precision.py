"""Error of ``precision="float32"`` (float32 products, float32 staging, float64 sums) against
an all-float64 fit (``precision="float64"``), on VGG16 with image-like inputs.

Reports, per layer, the relative error ‖A₃₂ − A₆₄‖ / ‖A₆₄‖ of a₊ and a₋, the largest
element-wise error relative to the layer's largest pattern value, and the relative error of a
PatternAttribution heat map computed with each set of patterns.

Usage: python -m perf.precision --model vgg16 --batches 2 --batch 8
"""

from __future__ import annotations

from typing import Any

import patternnet as pn

from .common import clock, images, machine, median, parse_args, vision_model, write_result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(
        __doc__, argv,
        extra=lambda parser: parser.add_argument("--batches", type=int, default=2),
    )  # fmt: skip
    model = vision_model(args.model).to(args.device)
    data = images(args.batch * args.batches, args.size).to(args.device)
    fits: dict[str, pn.Patterns] = {}
    seconds: dict[str, float] = {}
    for precision in ("float32", "float64"):
        start = clock()
        fits[precision] = pn.fit_patterns(model, data, batch_size=args.batch, progress=False,
                                          precision=precision)
        seconds[precision] = clock() - start
        print(f"{precision} fit: {seconds[precision]:.1f} s", flush=True)
    layers = []
    for name in fits["float64"]:
        row: dict[str, Any] = {"layer": name}
        for key, exact in fits["float64"][name].items():
            fast = fits["float32"][name][key]
            exact64, fast64 = exact.double(), fast.double()
            row[f"{key}_relative"] = float((fast64 - exact64).norm() / exact64.norm())
            row[f"{key}_max_elementwise"] = float(
                (fast64 - exact64).abs().max() / exact64.abs().max()
            )
        layers.append(row)
    x = images(2, args.size, seed=1).to(args.device)
    heat = {p: pn.PatternAttribution(model, fits[p]).attribute(x).double() for p in fits}
    attribution_error = float((heat["float32"] - heat["float64"]).norm() / heat["float64"].norm())
    keys = [k for k in layers[0] if k != "layer"]
    summary = {k: {"median": median([r[k] for r in layers]), "max": max(r[k] for r in layers)}
               for k in keys}
    result = {"benchmark": "precision", "model": args.model, "images": len(data),
              "device": str(args.device),
              "size": args.size, "machine": machine(), "fit_seconds": seconds,
              "layers": layers, "summary": summary,
              "pattern_attribution_relative_error": attribution_error}
    device = "" if args.device.type == "cpu" else f"_{args.device.type}"
    write_result(f"precision_{args.model}_{args.size}{device}", result)
    for key, values in summary.items():
        print(f"  {key:<28} median {values['median']:.2e}  max {values['max']:.2e}")
    print(f"  PatternAttribution heat map relative error {attribution_error:.2e}")
    return result


if __name__ == "__main__":
    main()
