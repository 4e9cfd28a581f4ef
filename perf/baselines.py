"""Explain time of every baseline against the plain autograd gradient (issue 7's targets).

Each round times the plain autograd gradient right before each method (the floor) and
reports the median over rounds of (method time / that gradient time), which cancels most of
the noise of a shared machine. Nothing is written to disk; results go to stdout.

Usage: python -m perf.baselines --model resnet18 --batch 4 --rounds 5 --threads 1
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import patternnet as pn
from patternnet.methods.guided import GuidedBackprop
from patternnet.methods.lrp import LRP, DeepTaylor

from .common import interleaved_ratios, parse_args, top_logit_gradient, vision_model
from .explain import random_patterns

PRESETS = ("epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2beta1", "zplus")


def methods(model: nn.Module, target: torch.Tensor) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Name → function explaining a batch (all for the same targets)."""
    patterns = random_patterns(model)
    found: dict[str, Callable[[torch.Tensor], Any]] = {
        "patternnet Gradient": lambda x: pn.Gradient(model).attribute(x, target),
        "PatternNet": lambda x: pn.PatternNet(model, patterns).attribute(x, target),
        "PatternAttribution": lambda x: pn.PatternAttribution(model, patterns).attribute(x, target),
        "GuidedBackprop": lambda x: GuidedBackprop(model).attribute(x, target),
    }
    for preset in PRESETS:
        found[f"LRP {preset}"] = (
            lambda p: lambda x: LRP(model, p).attribute(x, target)
        )(preset)
    found["DeepTaylor (z^B first)"] = (
        lambda x: DeepTaylor(model, low=-3.0, high=3.0).attribute(x, target)
    )
    try:
        from zennit.attribution import Gradient as ZennitGradient
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer

        canonizer = ResNetCanonizer() if hasattr(model, "layer1") else VGGCanonizer()

        def zennit(x: torch.Tensor) -> torch.Tensor:
            one_hot = torch.zeros(x.shape[0], 1000).scatter_(1, target[:, None], 1.0)
            with ZennitGradient(model, EpsilonPlusFlat(canonizers=[canonizer])) as attributor:
                return attributor(x, one_hot)[1]

        found["Zennit EpsilonPlusFlat"] = zennit
    except ImportError:
        pass
    return found


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(
        __doc__, argv, model="resnet18", batch=4, size=None, threads=1,
        extra=lambda parser: parser.add_argument("--rounds", type=int, default=5),
    )  # fmt: skip
    model = vision_model(args.model)
    for module in model.modules():  # Zennit's hooks need out-of-place ReLUs
        if isinstance(module, nn.ReLU):
            module.inplace = False
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = model(x).argmax(1)

    gradient = top_logit_gradient(model, target)

    found = methods(model, target)
    for function in [gradient, *found.values()]:  # warm-up
        function(x)
    ratios, floors = interleaved_ratios(
        {name: (lambda f=f: f(x)) for name, f in found.items()}, lambda: gradient(x), args.rounds
    )
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s): autograd gradient "
          f"{statistics.median(floors):.3f} s (median)")
    result = {name: statistics.median(values) for name, values in ratios.items()}
    for name, values in ratios.items():
        print(f"  {name:<26} ×{result[name]:.2f}   ({', '.join(f'{v:.2f}' for v in values)})")
    return result


if __name__ == "__main__":
    main()
