"""Explain time: PatternNet / PatternAttribution against the plain gradient and against peers.

For one model (random weights, batch of 224×224 images) every method explains the same batch
for the same target classes, once per round, in a rotating order; each round also times the
plain autograd gradient of the same model (the floor). The reported ratio is the median over
rounds of (method time / gradient time of the same round), which cancels most of the noise of
a shared machine. Patterns are random tensors shaped like the weights: their values do not
change the cost.

Usage: python -m perf.explain --model vgg16 --batch 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import patternnet as pn
from patternnet.engine.nodes import discover, fixed_weight
from patternnet.patterns.store import Patterns, architecture, fingerprint

from .common import machine, median, parse_args, timed, vision_model, write_result


def random_patterns(model: nn.Module, size: int = 224) -> Patterns:
    """Two-component patterns (a₊, a₋) of the right shapes: random, normalised (wᵀa = 1).

    The normalisation matters for timing: fitted patterns satisfy wᵀa = 1, so relevance keeps
    its scale through the layers; unnormalised random patterns shrink it by orders of magnitude
    per layer, into float32 denormals, which are 10-100× slower to compute with on x86 CPUs.
    """
    from patternnet.engine.canonize import Canonical, default_canonizers

    canonical = Canonical(model, default_canonizers())  # fitted patterns see folded weights
    generator = torch.Generator().manual_seed(1)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = canonical.weight(name).detach().cpu().reshape(module.weight.shape[0], -1)
            tensors = {}
            for key in ("a_plus", "a_minus"):
                v = w + w.std() * torch.randn(w.shape, generator=generator)
                tensors[key] = (v / (w * v).sum(1, keepdim=True)).reshape(module.weight.shape)
            layers[name] = tensors
    # Sums, pools and means (method.md §10): random p₊/p₋ normalised like the layers' (wᵀp = 1)
    nodes = {}
    example = torch.randn(1, 3, size, size, device=next(model.parameters()).device)
    for name, (kind, units, width) in discover(model, example).items():
        w = fixed_weight(kind, units, width).float()
        tensors = {}
        for key in ("a_plus", "a_minus"):
            v = w + w.std().clamp(min=0.1) * torch.randn(w.shape, generator=generator)
            tensors[key] = v / (w * v).sum(1, keepdim=True)
        nodes[name] = tensors
    metadata = {"architecture": architecture(model), "fingerprint": fingerprint(model)}
    return Patterns(layers, estimator="two_component", metadata=metadata, nodes=nodes)


def methods(
    model: nn.Module, target: torch.Tensor, size: int = 224
) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Name → function explaining a batch of ``size``² images (all for the same targets)."""

    def gradient(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
        return grad

    patterns = random_patterns(model, size).to(device=target.device)
    plus = Patterns({name: {"a_plus": t["a_plus"]} for name, t in patterns.items()},
                    estimator="two_component", metadata=patterns.metadata,
                    nodes={name: {"a_plus": t["a_plus"]} for name, t in patterns.nodes.items()})
    found: dict[str, Callable[[torch.Tensor], Any]] = {"gradient (autograd)": gradient}
    # Each method object is built once, as a user would (and as Captum's is below): what it
    # prepares once (PatternAttribution's W ⊙ A) is reused across calls.
    built = {
        "patternnet Gradient": pn.Gradient(model),
        "PatternNet (a₊, a₋)": pn.PatternNet(model, patterns),
        "PatternAttribution (a₊, a₋)": pn.PatternAttribution(model, patterns),
        "PatternNet (a₊ only)": pn.PatternNet(model, plus),
        "PatternAttribution (a₊ only)": pn.PatternAttribution(model, plus),
        "patternnet GuidedBackprop": pn.GuidedBackprop(model),
        "patternnet LRP epsilon_plus_flat": pn.LRP(model, "epsilon_plus_flat"),
        "patternnet LRP epsilon_plus": pn.LRP(model, "epsilon_plus"),
    }
    for name, method in built.items():
        found[name] = lambda x, method=method: method.attribute(x, target)
    try:
        from captum.attr import GuidedBackprop as CaptumGuided

        captum = CaptumGuided(model)
        found["Captum GuidedBackprop"] = lambda x: captum.attribute(x, target=target)
    except ImportError:
        pass
    try:
        from zennit.attribution import Gradient as ZennitGradient
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer

        canonizer = ResNetCanonizer() if hasattr(model, "layer1") else VGGCanonizer()

        def zennit(x: torch.Tensor) -> torch.Tensor:
            composite = EpsilonPlusFlat(canonizers=[canonizer])
            one_hot = torch.zeros(x.shape[0], 1000, device=x.device)
            one_hot.scatter_(1, target[:, None], 1.0)
            with ZennitGradient(model, composite) as attributor:
                _, relevance = attributor(x, one_hot)
            return relevance

        found["Zennit EpsilonPlusFlat"] = zennit
    except ImportError:
        pass
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rounds", type=int, default=3)
        parser.add_argument(
            "--methods", nargs="+", default=None,
            help="only these methods (substrings of their names), with the gradient",
        )  # fmt: skip

    args = parse_args(__doc__, argv, extra=extra)
    model = vision_model(args.model).to(args.device)
    # Captum's module hooks refuse in-place ReLUs; every method runs on the same model.
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    with torch.no_grad():
        target = model(x).argmax(1)
    found = methods(model, target, args.size)
    names = list(found)
    if args.methods:
        names = names[:1] + [n for n in names[1:] if any(m in n for m in args.methods)]
    times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up (allocations, lazy imports)
        found[name](x)
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        floor = timed(lambda: found[names[0]](x))
        times[names[0]].append(floor)
        others = names[1:]
        shift = round_index % len(others)
        for name in others[shift:] + others[:shift]:
            seconds = timed(lambda name=name: found[name](x))
            times[name].append(seconds)
            ratios[name].append(seconds / floor)
        print(f"round {round_index + 1}/{args.rounds}: gradient {floor:.2f} s", flush=True)
    rows = []
    for name in names:
        rows.append({
            "method": name,
            "median_s": median(times[name]),
            "per_image_s": median(times[name]) / args.batch,
            "ratio_to_gradient": 1.0 if name == names[0] else median(ratios[name]),
            "ratios": ratios[name],
            "times_s": times[name],
        })
    result = {"benchmark": "explain", "model": args.model, "batch": args.batch,
              "size": args.size, "device": str(args.device), "rounds": args.rounds,
              "load_average_before": load_before, "machine": machine(), "rows": rows}
    device = "" if args.device.type == "cpu" else f"_{args.device.type}"
    write_result(f"explain_{args.model}{device}{'_subset' if args.methods else ''}", result)
    load_after = result["machine"]["load_average"]
    print(f"\n{args.model}, batch {args.batch}, {args.rounds} rounds (median; per-round "
          f"ratios in brackets); load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    for row in rows:
        spread = ", ".join(f"{r:.2f}" for r in row["ratios"])
        print(f"  {row['method']:<34} {row['median_s']:7.2f} s  ×{row['ratio_to_gradient']:.2f}"
              + (f"  ({spread})" if spread else ""))
    return result


if __name__ == "__main__":
    main()
