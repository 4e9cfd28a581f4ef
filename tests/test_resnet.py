"""Residual networks with BatchNorm: the real graph, folded BN, and the rule at additions."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patternnet as pn
from patternnet.engine.backward import addition_rules
from patternnet.engine.canonize import Canonical, default_canonizers
from patternnet.engine.rules import ProportionalSum
from patternnet.patterns.fit import linear_layers
from reference import layer_samples, two_component
from test_canonize import randomise_batchnorms


class Block(nn.Module):
    """torchvision's BasicBlock: conv-BN-ReLU(inplace)-conv-BN, ``out += identity``, F.relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


def small_resnet() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        Block(4, 4),
        Block(4, 6, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).double()
    return randomise_batchnorms(model).eval()


def canonical_weight_patterns(model: nn.Module) -> pn.Patterns:
    """'a' = the canonical (BatchNorm-folded) weight: PatternNet must equal the gradient."""
    canonical = Canonical(model, default_canonizers())
    layers = {name: {"a": canonical.weight(name).detach().clone()} for name in linear_layers(model)}
    return pn.Patterns(layers, estimator="linear", nodes="weights")


def gradient_and_logit(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    selected = logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    (grad,) = torch.autograd.grad(selected.sum(), xg)
    return grad, selected.detach()


def test_patternnet_with_weight_patterns_is_gradient_times_logit() -> None:
    model = small_resnet()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    assert len(Canonical(model, default_canonizers()).form.bypass) == 6
    signal = pn.PatternNet(model, canonical_weight_patterns(model)).attribute(x)
    grad, logit = gradient_and_logit(model, x)
    torch.testing.assert_close(signal, grad * logit[:, None, None, None])


def hand_folded_resnet(model: nn.Module) -> nn.Module:
    """A copy with every conv-BN pair of :func:`small_resnet` folded by hand (reference)."""
    folded = copy.deepcopy(model)
    pairs = [(folded, "0", "1")]
    for block in (folded[4], folded[5]):
        pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2")]
        if block.downsample is not None:
            pairs.append((block.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            conv.weight.mul_(s.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bn.bias - bn.running_mean * s).detach().clone())
        setattr(parent, bn_name, nn.Identity())
    return folded


def test_one_pass_fits_every_layer_against_reference() -> None:
    model = small_resnet()
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    data = torch.randn(12, 3, 12, 12, dtype=torch.float64)
    try:
        patterns = pn.fit_patterns(model, data, batch_size=4, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 3  # one forward per batch fits all layers
    names = set(linear_layers(model))
    assert set(patterns) == names and len(names) == 7
    # reference: explicit patches of the hand-folded copy's layers
    reference = hand_folded_resnet(model)
    torch.testing.assert_close(reference(data), model(data))
    inputs = {}
    modules = dict(reference.named_modules())
    hooks = [
        modules[name].register_forward_hook(
            lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0].detach())
        )
        for name in ("5.conv2", "5.downsample.0", "8")
    ]
    with torch.no_grad():
        reference(data)
    for hook in hooks:
        hook.remove()
    for name in ("5.conv2", "5.downsample.0", "8"):
        module = modules[name]
        X, y, out = layer_samples(module, torch.cat(inputs[name]))
        w = module.weight.detach().double().reshape(module.weight.shape[0], -1)
        expected = two_component(X, y, out, w, active=True).reshape(module.weight.shape)
        torch.testing.assert_close(patterns[name]["a_plus"], expected, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------- rule at additions


class ResidualPatternAttribution(pn.PatternAttribution):
    """PatternAttribution's layer rules with relevance split in proportion at every addition
    (LRP's rule; PatternAttribution itself passes the sums' patterns, test_graph_patterns.py)."""

    absolute = False

    def rules(self, canonical: Canonical):
        module_rules, function_rules = super().rules(canonical)
        split = ProportionalSum(stabilizer=0, absolute=self.absolute)
        return module_rules, {**function_rules, **addition_rules(split)}

    def graph_context(self, canonical: Canonical):
        return contextlib.nullcontext()


class AbsoluteResidualPatternAttribution(ResidualPatternAttribution):
    absolute = True


class CopyingPatternAttribution(pn.PatternAttribution):
    """PatternAttribution with the gradient's copy at additions (no addition rule)."""

    def rules(self, canonical: Canonical):
        module_rules, _ = super().rules(canonical)
        return module_rules, {}

    def graph_context(self, canonical: Canonical):
        return contextlib.nullcontext()


SPELLINGS = ["iadd", "plus", "torch.add", "add_", "radd"]


class LinearBlock(nn.Module):
    """A residual block without activation: relevance must be conserved through it."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        # no zero padding: relevance put on a padded border would leave the image
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        if self.spelling == "iadd":
            out += x
        elif self.spelling == "plus":
            out = out + x
        elif self.spelling == "torch.add":
            out = torch.add(out, x)
        elif self.spelling == "add_":
            out.add_(x)
        else:
            out = x.__radd__(out)
        return out


def linear_residual_net(spelling: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        LinearBlock(spelling),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    ).double()
    return randomise_batchnorms(model).eval()


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_patternattribution_conserves_relevance_through_residual_block(
    spelling: str, absolute: bool
) -> None:
    model = linear_residual_net(spelling)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    logits = model(x)
    target = logits.argmax(1)
    # the filter estimator gives Σᵢ wᵢaᵢ = 1 for every unit: each layer conserves relevance
    kind = AbsoluteResidualPatternAttribution if absolute else ResidualPatternAttribution
    method = kind(model, estimator="filter")
    relevance = method.attribute(x, target)
    totals = relevance.sum((1, 2, 3))
    torch.testing.assert_close(totals, logits.gather(1, target[:, None]).squeeze(1).detach())
    # the gradient's copy at the sum counts the skip branch's relevance twice
    copied = CopyingPatternAttribution(model, estimator="filter").attribute(x, target)
    assert (copied.sum((1, 2, 3)) - totals).abs().min() > 1e-3
    # PatternAttribution's default is the absolute split (stabiliser 1e-6)
    default = pn.PatternAttribution(model, estimator="filter").attribute(x, target)
    torch.testing.assert_close(
        default.sum((1, 2, 3)),
        logits.gather(1, target[:, None]).squeeze(1).detach(),
        rtol=1e-4,
        atol=1e-6,
    )
    # the rule changes nothing in the forward pass and leaves no trace on the model
    torch.testing.assert_close(model(x), logits)


@pytest.mark.parametrize("absolute", [False, True])
def test_proportional_sum_matches_explicit_formula(absolute: bool) -> None:
    torch.manual_seed(1)
    l1, l2 = nn.Linear(4, 4).double(), nn.Linear(4, 3).double()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = l1, l2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(self.l1(x) + x)

    x = torch.randn(5, 4, dtype=torch.float64)
    kind = AbsoluteResidualPatternAttribution if absolute else ResidualPatternAttribution
    relevance = kind(Net(), estimator="filter").attribute(x, 2)
    w1, w2 = l1.weight.detach(), l2.weight.detach()
    h = l1(x).detach()
    z = h + x
    y = l2(z).detach()[:, 2]
    wa1 = w1 * w1 / (w1 * w1).sum(1, keepdim=True)
    wa2 = w2 * w2 / (w2 * w2).sum(1, keepdim=True)
    r_z = wa2[2][None, :] * y[:, None]
    if absolute:
        x, h, z = x.abs(), h.abs(), x.abs() + h.abs()
    expected = x / z * r_z + (h / z * r_z) @ wa1
    torch.testing.assert_close(relevance, expected)


def test_additions_in_a_resnet_split_relevance_and_patternnet_is_unchanged() -> None:
    model = small_resnet()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    patterns = pn.fit_patterns(model, torch.randn(8, 3, 12, 12, dtype=torch.float64),
                               progress=False)
    split = ResidualPatternAttribution(model, patterns).attribute(x)
    plain = pn.PatternAttribution(model, patterns).attribute(x)
    assert torch.isfinite(split).all() and not torch.allclose(split, plain)
    # the in-place sum of the blocks still computes the model's outputs under the rule
    canonical = Canonical(model, default_canonizers())
    with torch.enable_grad(), canonical.active(), pn_rules(canonical):
        out = canonical(x.clone().requires_grad_(True))
    torch.testing.assert_close(out.detach(), model(x))


def pn_rules(canonical: Canonical):
    from patternnet.engine.backward import rules_applied

    return rules_applied({}, addition_rules(ProportionalSum()))


def test_absolute_split_stays_bounded_where_summands_cancel() -> None:
    a = torch.tensor([1000.0, 2.0, -3.0], dtype=torch.float64)
    b = torch.tensor([-999.999, 2.0, 0.0], dtype=torch.float64)
    relevance = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    signed = ProportionalSum()
    ra, rb = signed.backward(None, signed.save(None, (a, b), a + b), relevance)
    assert ra[0] > 1e5 and rb[0] < -1e5  # the signed z rule explodes at z ≈ 0
    absolute = ProportionalSum(stabilizer=0, absolute=True)
    ra, rb = absolute.backward(None, absolute.save(None, (a, b), a + b), relevance)
    torch.testing.assert_close(ra + rb, relevance)
    assert ((ra >= 0) & (ra <= 1) & (rb >= 0) & (rb <= 1)).all()
    torch.testing.assert_close(ra, torch.tensor([1000 / 1999.999, 0.5, 1.0], dtype=torch.float64))


class Branches(nn.Module):
    """A reused conv (two calls), concatenated branches, ``view`` and ``torch.flatten``."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 3, 3)
        self.left = nn.Conv2d(3, 2, 1)
        self.right = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.shared(x))
        h = torch.relu(self.shared(h))          # the same module again
        h = torch.cat([self.left(h), F.relu(self.right(h))], dim=1)
        h = torch.flatten(F.avg_pool2d(h, 2), 2)
        return self.head(h.view(h.shape[0], -1))


def test_reused_modules_and_concatenation() -> None:
    torch.manual_seed(0)
    model = randomise_batchnorms(Branches().double()).eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert Canonical(model, default_canonizers()).form.bypass == {"right.1"}
    signal = pn.PatternNet(model, canonical_weight_patterns(model)).attribute(x)
    grad, logit = gradient_and_logit(model, x)
    torch.testing.assert_close(signal, grad * logit[:, None, None, None])
    # the reused layer's statistics hold both calls: twice the positions of one call
    stats = pn.collect_statistics(model, x, progress=False)
    assert stats["shared"].count == 4 * (6 * 6 + 4 * 4)
    patterns = pn.compute_patterns(model, stats)
    relevance = pn.PatternAttribution(model, patterns).attribute(x)
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


@pytest.mark.parametrize("absolute", [False, True])
def test_sum_modified_in_place_afterwards_is_split_by_its_value_before(absolute: bool) -> None:
    torch.manual_seed(5)
    l1, l2 = nn.Linear(4, 4).double(), nn.Linear(4, 3).double()

    class Net(nn.Module):
        def __init__(self, in_place: bool) -> None:
            super().__init__()
            self.l1, self.l2, self.in_place = l1, l2, in_place

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.l1(x) + x
            z = z.mul_(-2.0) if self.in_place else z * -2.0
            return self.l2(z)

    kind = AbsoluteResidualPatternAttribution if absolute else ResidualPatternAttribution
    x = torch.randn(6, 4, dtype=torch.float64)
    in_place = kind(Net(True), estimator="filter").attribute(x, 1)
    out_of_place = kind(Net(False), estimator="filter").attribute(x, 1)
    torch.testing.assert_close(in_place, out_of_place)


def test_summand_modified_in_place_after_the_sum_is_refused() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.l1(x)
            z = h + x
            h.mul_(2.0)  # changes a summand after the sum read it
            return self.l2(z + h)

    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="modified in place after the sum"):
        ResidualPatternAttribution(Net().eval(), estimator="filter").attribute(x, 0)
    # the sums' patterns do not read the summands' values: nothing to refuse
    assert torch.isfinite(pn.PatternAttribution(Net().eval(), estimator="filter").attribute(
        x, 0)).all()


def test_in_place_sum_into_a_view_equals_the_out_of_place_sum() -> None:
    torch.manual_seed(6)
    l1, l2 = nn.Linear(4, 4).double(), nn.Linear(4, 3).double()

    class Net(nn.Module):
        def __init__(self, in_place: bool) -> None:
            super().__init__()
            self.l1, self.l2, self.in_place = l1, l2, in_place

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.l1(x) * 1.0
            if self.in_place:
                view = h[:, :2]
                view += x[:, :2]  # the sum written into part of h
            else:
                h = torch.cat([h[:, :2] + x[:, :2], h[:, 2:]], dim=1)
            return self.l2(torch.relu(h))

    x = torch.randn(5, 4, dtype=torch.float64)
    for kind in (ResidualPatternAttribution, AbsoluteResidualPatternAttribution):
        in_place = kind(Net(True), estimator="filter").attribute(x, 1)
        torch.testing.assert_close(in_place, kind(Net(False), estimator="filter").attribute(x, 1))
