"""The faster paths of the LRP rules and the engine give the results of the plain ones.

- residual sums written in place (``out += identity``, torchvision's blocks) equal the
  out-of-place sum, and the ε/z rules read the layer output from before the sum;
- a signed input is one stacked product (``[x⁺, x⁻]`` with ``[W⁺, W⁻]``), grouped convolutions
  included;
- the input of a ReLU output is known non-negative without a scan, and an in-place change
  afterwards is noticed;
- rules refuse to run a second backward pass on overwritten values, and an input changed in
  place after its layer;
- bypassed (folded) BatchNorms are not computed and get their forward back afterwards.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baseline_models import _randomise, assert_relative, images
from patternnet.engine.backward import rules_applied
from patternnet.engine.canonize import Canonical
from patternnet.engine.rules import AlphaBeta, Gamma, ZPlus
from patternnet.engine.rules.lrp import _known_non_negative
from patternnet.methods.gradient import Gradient, GradientXInput
from patternnet.methods.lrp import LRP


class _Residual(nn.Module):
    """Stem, two residual blocks (conv-BN-ReLU-conv-BN, + identity, ReLU), pool, linear.

    ``in_place`` writes the sum as torchvision does (``out += identity``); ``doubled`` adds a
    tensor to itself in place (``h += h``: both summands are the same tensor).
    """

    def __init__(self, in_place: bool, doubled: bool = False) -> None:
        super().__init__()
        self.in_place, self.doubled = in_place, doubled
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
            )
            for _ in range(2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            out = block(h)
            if self.in_place:
                out += h
            else:
                out = out + h
            h = F.relu(out)
        if self.doubled:
            h = h * 1.0  # a fresh non-leaf tensor, then h += h
            if self.in_place:
                h += h
            else:
                h = h + h
        return self.fc(torch.flatten(self.pool(h), 1))


def _pair(**options: bool) -> tuple[nn.Module, nn.Module]:
    """The same weights, the residual sums written in place and out of place."""
    return (_randomise(_Residual(True, **options), 4), _randomise(_Residual(False, **options), 4))


@pytest.mark.parametrize("preset", ["z", "epsilon"])
def test_z_and_epsilon_read_the_output_before_an_in_place_sum(preset: str) -> None:
    """The ε/z rules of the last conv of a block read its output, which ``out += identity``
    overwrites afterwards: LRP-z is still gradient × input (it was off by 10⁶ before)."""
    in_place, _ = _pair()
    x = images()
    expected = GradientXInput(in_place).attribute(x, 2)
    options = {"epsilon": 1e-12, "stabilizer": 1e-12} if preset == "epsilon" else {}
    assert_relative(LRP(in_place, preset, **options).attribute(x, 2), expected, rtol=1e-8)


@pytest.mark.parametrize("doubled", [False, True])
@pytest.mark.parametrize("preset", ["z", "epsilon_plus_flat", "epsilon_alpha2beta1", "gamma"])
def test_in_place_sums_equal_out_of_place_sums(preset: str, doubled: bool) -> None:
    in_place, out_of_place = _pair(doubled=doubled)
    x = images()
    expected = LRP(out_of_place, preset).attribute(x, 1)
    assert_relative(LRP(in_place, preset).attribute(x, 1), expected, rtol=1e-10)
    # The gradient (no sum rule) and the model's own output are unchanged as well.
    assert_relative(Gradient(in_place).attribute(x, 1), Gradient(out_of_place).attribute(x, 1),
                    rtol=1e-12)
    torch.testing.assert_close(in_place(x), out_of_place(x))


def _grouped_and_dense(groups: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """A grouped conv and the same map as an ungrouped conv with a block-diagonal weight."""
    torch.manual_seed(5)
    grouped = nn.Conv2d(4, 6, 3, padding=1, groups=groups).double()
    dense = nn.Conv2d(4, 6, 3, padding=1).double()
    with torch.no_grad():
        dense.weight.zero_()
        per_out, per_in = 6 // groups, 4 // groups
        for g in range(groups):
            rows, cols = slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in)
            dense.weight[rows, cols] = grouped.weight[rows]
        dense.bias.copy_(grouped.bias)
    return grouped, dense


def _rule_relevance(layer: nn.Module, rule, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    with rules_applied({layer: rule}):
        out = layer(x)
        (relevance,) = torch.autograd.grad(out, x, out.detach())
    return relevance


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("rule", [ZPlus(), AlphaBeta(2, 1), Gamma(0.5)], ids=repr)
def test_stacked_signed_input_equals_the_ungrouped_layer(rule, groups: int) -> None:
    """Signed inputs go through one product over ``[x⁺, x⁻]``; grouped convolutions stack per
    group. Zero weights contribute nothing, so a block-diagonal dense conv is a reference
    computed by the rule's other layout (groups = 1) — and by the float64 formula below."""
    grouped, dense = _grouped_and_dense(groups)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert bool((x < 0).any()) and bool((x > 0).any())
    ours = _rule_relevance(grouped, rule, x)
    assert_relative(ours, _rule_relevance(dense, rule, x), rtol=1e-10)
    if isinstance(rule, ZPlus):  # p = W⁺x⁺ + W⁻x⁻ + b⁺ + ε; R_in = x⁺ W⁺ᵀs + x⁻ W⁻ᵀs
        w, b = dense.weight, dense.bias
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z = F.conv2d(x, w, b, padding=1)
        p = F.conv2d(xp, wp, b.clamp(min=0), padding=1) + F.conv2d(xn, wn, None, padding=1)
        s = z / (p + 1e-6)
        t = lambda weight: torch.nn.grad.conv2d_input(x.shape, weight, s, padding=1)  # noqa: E731
        assert_relative(ours, xp * t(wp) + xn * t(wn), rtol=1e-10)


def test_relu_outputs_are_known_non_negative_without_a_scan() -> None:
    y = torch.randn(2, 3, 4, 4, requires_grad=True)
    h = torch.relu(y)
    assert _known_non_negative(h)
    assert _known_non_negative(F.max_pool2d(h, 2))
    assert _known_non_negative(F.avg_pool2d(F.max_pool2d(h, 2), 2))
    assert not _known_non_negative(y)
    assert not _known_non_negative(h.detach())
    assert not _known_non_negative(F.max_pool2d(y, 2))
    changed = torch.relu(y)
    changed.sub_(1.0)  # an in-place change replaces the autograd node
    assert not _known_non_negative(changed)


def test_z_plus_on_a_relu_output_changed_in_place_sees_its_signs() -> None:
    """A ReLU output made signed in place before the layer is split into x⁺ and x⁻."""
    torch.manual_seed(7)
    first, second = nn.Conv2d(3, 4, 3, padding=1).double(), nn.Conv2d(4, 5, 3, padding=1).double()
    x = images(n=2)
    h = torch.relu(first(x)).detach()
    h_signed = h - 0.5
    expected = _rule_relevance(second, ZPlus(), h_signed)

    class Net(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(first(inputs))
            hidden.sub_(0.5)
            return second(hidden)

    net = Net()
    captured = {}

    def keep(module, args, output):
        captured["x"] = args[0]

    handle = second.register_forward_hook(keep)
    try:
        inputs = x.clone().requires_grad_(True)
        with rules_applied({second: ZPlus()}):
            out = net(inputs)
            assert bool((captured["x"] < 0).any())
            (relevance,) = torch.autograd.grad(out, captured["x"], out.detach())
    finally:
        handle.remove()
    assert_relative(relevance, expected, rtol=1e-10)


def test_a_second_backward_pass_is_refused() -> None:
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    x = images(n=2).requires_grad_(True)
    with rules_applied({layer: ZPlus()}):
        out = torch.relu(layer(torch.relu(x)))
        torch.autograd.grad(out.sum(), x, retain_graph=True)
        with pytest.raises(RuntimeError, match="retain_graph"):
            torch.autograd.grad(out.sum(), x)


def test_an_input_changed_in_place_after_its_layer_is_refused() -> None:
    first, second = nn.Conv2d(3, 4, 3, padding=1).double(), nn.Conv2d(4, 5, 3, padding=1).double()
    x = images(n=2).requires_grad_(True)
    with rules_applied({second: ZPlus()}):
        hidden = first(x).abs()  # non-negative: z⁺ keeps the tensor itself, not a copy
        out = second(hidden)
        hidden.mul_(2.0)
        with pytest.raises(RuntimeError, match="changed in place"):
            torch.autograd.grad(out.sum(), x)


class _CountingBatchNorm(nn.BatchNorm2d):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


def test_bypassed_batchnorms_are_not_computed_and_get_their_forward_back() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _CountingBatchNorm(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    canonical = Canonical(model)
    assert canonical.form.bypass == {"1"}
    _CountingBatchNorm.calls = 0
    with canonical.active():
        folded = canonical(x)
    assert _CountingBatchNorm.calls == 0
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model[1])
    torch.testing.assert_close(model(x), expected)
    assert _CountingBatchNorm.calls == 1
    with pytest.raises(ValueError, match="inside"), canonical.active():
        raise ValueError("inside")
    assert "forward" not in vars(model[1])


def test_no_scalar_is_copied_to_the_device_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """ε and friends are made once per dtype/device: a host-to-GPU copy would synchronise."""
    from baseline_models import resnet

    model = resnet()
    x = images(n=2)
    method = LRP(model, "epsilon_plus_flat")
    method.attribute(x, target=1)  # warm-up: constants made here

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a scalar tensor was made during the explanation")

    monkeypatch.setattr(torch.Tensor, "new_tensor", refuse)
    monkeypatch.setattr(torch, "tensor", refuse)
    method.attribute(x, target=1)
