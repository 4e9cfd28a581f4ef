"""LRP and Deep Taylor against Zennit (a test-only dependency), float64, 1e-5 relative.

Zennit's attributions start from the ``grad_output`` given to autograd, so it gets
``one-hot × logit``, which is where our LRP starts. Conventions matched exactly:

- the stabiliser is ``z + ε·sign(z)`` with ``sign(0) = +1`` in both;
- Zennit's composites put ``Pass`` on activations and ``Norm`` on average pools; our LRP puts
  ``Norm`` on average pools and keeps the ReLU's gradient gate unless ``pass_relu=True``.
  Gate and pass agree whenever no relevance reaches an inactive unit: true in a plain
  ReLU network for every rule that multiplies by the input (VGG, default), false for w² and
  flat above a ReLU (both variants compared, Zennit without an activation rule = the gate)
  and false with skip connections, where the addition copies relevance onto units that the
  other branch's ReLU switched off (ResNet: compared with ``pass_relu=True``);
- Zennit's WSquare adds ``b²`` to the denominator unless ``zero_params=['bias']``; our w²,
  flat and Deep Taylor's z⁺/z^B take no bias (the literature's definition): Zennit is asked
  for the same with ``zero_params``;
- skip connections: with Zennit's torchvision ``ResNetCanonizer`` (a ``Sum`` module with the
  ``Norm`` rule) the sum splits relevance in proportion to the summands, our default
  (``additions="proportional"``); without a canonizer it goes to both branches, our
  ``additions="copy"`` (the hand-written ResNet below); BatchNorm: Zennit's
  ``SequentialMergeBatchNorm`` vs our default BatchNorm folding (eps = 0, see baseline_models).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baseline_models import TINY_EPS, assert_relative, images, resnet, vgg
from patternnet.engine.rules import Z
from patternnet.methods.lrp import LRP, DeepTaylor

zennit = pytest.importorskip("zennit")
from zennit import rules as zr  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    SpecialFirstLayerMapComposite,
)
from zennit.types import Activation, AvgPool, Convolution  # noqa: E402
from zennit.types import Linear as AnyLinear  # noqa: E402

TARGET = torch.tensor([0, 2, 4])
MODELS = {"vgg": vgg, "resnet": resnet}


def zennit_relevance(model: nn.Module, x: torch.Tensor, composite) -> torch.Tensor:
    """Zennit's relevance at the input, starting from the target logit's value."""
    x = x.clone().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(x)
        start = torch.zeros_like(out)
        rows = torch.arange(len(TARGET))
        start[rows, TARGET] = out[rows, TARGET].detach()
        (relevance,) = torch.autograd.grad(out, x, start)
    return relevance


def everywhere(rule, activation_pass: bool = True, canonize: bool = False) -> LayerMapComposite:
    """One Zennit rule on every Linear/Conv, Norm on average pools."""
    layer_map = [(AvgPool, zr.Norm())]
    if activation_pass:
        layer_map.insert(0, (Activation, zr.Pass()))
    layer_map.append((AnyLinear, rule))
    canonizers = [SequentialMergeBatchNorm()] if canonize else None
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def base_map() -> list:
    return [(Activation, zr.Pass()), (AvgPool, zr.Norm())]


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(
    ("preset", "options", "rule"),
    [
        ("epsilon", {}, lambda: zr.Epsilon()),
        ("epsilon", {"epsilon": 0.25}, lambda: zr.Epsilon(epsilon=0.25)),
        ("z", {}, lambda: zr.Epsilon(epsilon=0.0)),
        ("zplus", {}, lambda: zr.ZPlus()),
        ("alpha1beta0", {}, lambda: zr.AlphaBeta(alpha=1, beta=0)),
        ("alpha2beta1", {}, lambda: zr.AlphaBeta(alpha=2, beta=1)),
    ],
)
def test_uniform_rules_equal_zennit(arch: str, preset: str, options: dict, rule) -> None:
    model, x = MODELS[arch](), images()
    canonize = arch == "resnet"
    expected = zennit_relevance(model, x, everywhere(rule(), canonize=canonize))
    if preset == "z":
        # The z preset divides by the average pools' outputs without a stabiliser (exactly
        # gradient × input); Zennit's Norm(0) gives NaN at all-zero windows, so compare the
        # z rule with the presets' stabilised pools instead.
        spec = {(nn.Conv2d, nn.Linear): Z()}
        ours = LRP(model, spec, pass_relu=canonize, additions="copy").attribute(x, TARGET)
    else:
        method = LRP(model, preset, pass_relu=canonize, additions="copy", **options)
        ours = method.attribute(x, TARGET)
    assert_relative(ours, expected)


@pytest.mark.parametrize(
    ("arch", "pass_relu"), [("vgg", False), ("vgg", True), ("resnet", True)]
)
@pytest.mark.parametrize(
    ("preset", "rule"),
    [
        ("w2", lambda: zr.WSquare(zero_params=["bias"])),
        ("flat", lambda: zr.Flat()),
    ],
)
def test_input_free_rules_equal_zennit(arch: str, pass_relu: bool, preset: str, rule) -> None:
    model, x = MODELS[arch](), images()
    composite = everywhere(rule(), activation_pass=pass_relu, canonize=arch == "resnet")
    expected = zennit_relevance(model, x, composite)
    ours = LRP(model, preset, pass_relu=pass_relu, additions="copy").attribute(x, TARGET)
    assert_relative(ours, expected)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(
    ("preset", "composite"),
    [
        ("epsilon_plus", EpsilonPlus),
        ("epsilon_plus_flat", EpsilonPlusFlat),
        ("epsilon_alpha2beta1", EpsilonAlpha2Beta1),
        ("epsilon_alpha2beta1_flat", EpsilonAlpha2Beta1Flat),
    ],
)
def test_presets_equal_zennit_composites(arch: str, preset: str, composite) -> None:
    model, x = MODELS[arch](), images()
    canonizers = [SequentialMergeBatchNorm()] if arch == "resnet" else None
    expected = zennit_relevance(model, x, composite(canonizers=canonizers))
    ours = LRP(model, preset, pass_relu=arch == "resnet", additions="copy").attribute(x, TARGET)
    assert_relative(ours, expected)


def deep_taylor_composite(first, canonize: bool) -> SpecialFirstLayerMapComposite:
    return SpecialFirstLayerMapComposite(
        layer_map=base_map() + [(AnyLinear, zr.ZPlus(zero_params=["bias"]))],
        first_map=[(AnyLinear, first)],
        canonizers=[SequentialMergeBatchNorm()] if canonize else None,
    )


@pytest.mark.parametrize("arch", list(MODELS))
def test_deep_taylor_box_equals_zennit(arch: str) -> None:
    model, x = MODELS[arch](), images()
    low = torch.tensor([-2.0, -1.5, -3.0]).reshape(1, 3, 1, 1).double()
    high = torch.tensor([2.5, 1.0, 3.0]).reshape(1, 3, 1, 1).double()
    x = torch.maximum(torch.minimum(x, high), low)
    composite = deep_taylor_composite(zr.ZBox(low=low, high=high), arch == "resnet")
    expected = zennit_relevance(model, x, composite)
    ours = DeepTaylor(model, low=low, high=high, pass_relu=arch == "resnet", additions="copy")
    assert_relative(ours.attribute(x, TARGET), expected)


@pytest.mark.parametrize("arch", list(MODELS))
def test_deep_taylor_unbounded_equals_zennit(arch: str) -> None:
    model, x = MODELS[arch](), images()
    composite = deep_taylor_composite(zr.WSquare(zero_params=["bias"]), arch == "resnet")
    expected = zennit_relevance(model, x, composite)
    ours = DeepTaylor(model, pass_relu=arch == "resnet", additions="copy").attribute(x, TARGET)
    assert_relative(ours, expected)


def test_zbox_first_layer_with_epsilon_plus_equals_zennit() -> None:
    """A user composite: z^B first (scalar bounds), z⁺ on convolutions, ε on dense layers."""
    from patternnet.engine.rules import Epsilon, ZBox, ZPlus

    model, x = vgg(), images().clamp(-1, 1)
    composite = SpecialFirstLayerMapComposite(
        layer_map=base_map() + [(Convolution, zr.ZPlus()), (nn.Linear, zr.Epsilon())],
        first_map=[(AnyLinear, zr.ZBox(low=-1.0, high=1.0))],
    )
    expected = zennit_relevance(model, x, composite)
    ours = LRP(
        model, {nn.Conv2d: ZPlus(), nn.Linear: Epsilon()}, first=ZBox(-1.0, 1.0)
    ).attribute(x, TARGET)
    assert_relative(ours, expected)


@pytest.mark.parametrize("arch", list(MODELS))
def test_gamma_equals_zennit(arch: str) -> None:
    model, x = MODELS[arch](), images()
    composite = everywhere(zr.Gamma(gamma=0.3), canonize=arch == "resnet")
    expected = zennit_relevance(model, x, composite)
    method = LRP(model, "gamma", gamma=0.3, pass_relu=arch == "resnet", additions="copy")
    assert_relative(method.attribute(x, TARGET), expected)


def test_epsilon_gamma_box_equals_zennit() -> None:
    model, x = vgg(), images().clamp(-2, 2)
    expected = zennit_relevance(model, x, EpsilonGammaBox(low=-2.0, high=2.0))
    ours = LRP(model, "epsilon_gamma", low=-2.0, high=2.0).attribute(x, TARGET)
    assert_relative(ours, expected)


def torchvision_resnet18() -> nn.Module:
    """torchvision's ResNet-18 with random weights and statistics, float64, BatchNorm eps ≈ 0."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=5)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = TINY_EPS  # (torch 2.11 refuses 0)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
            if isinstance(module, nn.ReLU):
                module.inplace = False
    return model.double().eval()


@pytest.mark.parametrize(
    ("preset", "composite"),
    [("epsilon_plus_flat", EpsilonPlusFlat), ("epsilon_alpha2beta1", EpsilonAlpha2Beta1)],
)
def test_torchvision_resnet_with_proportional_sums_equals_zennit_resnet_canonizer(
    preset: str, composite
) -> None:
    """Residual sums split in proportion (our default) = Zennit's ResNetCanonizer."""
    from zennit.torchvision import ResNetCanonizer

    model = torchvision_resnet18()
    x = images(n=3, size=32)
    expected = zennit_relevance(model, x, composite(canonizers=[ResNetCanonizer()]))
    # With proportional sums no relevance reaches an inactive unit: gate and pass agree.
    for pass_relu in (False, True):
        assert_relative(LRP(model, preset, pass_relu=pass_relu).attribute(x, TARGET), expected)
