"""Static decision which layers never need a₋ (engine.gates) and what PatternNet does with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patternnet as pn
from patternnet.engine.canonize import Canonical
from patternnet.engine.gates import OTHER, RELU, SUM, gated_nodes, relu_gates


class SkipNet(nn.Module):
    """``h = L1 x`` feeds a ReLU *and* the skip path: ``L2(relu(h) + h)``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        return self.l2(F.relu(h) + h)


class Spellings(nn.Module):
    """Every spelling of a ReLU, folded BatchNorms, a reused layer and a LeakyReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.c4 = nn.Conv2d(4, 4, 1)
        self.c5 = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.leaky = nn.LeakyReLU(0.1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.c1(x)))  # through a folded BatchNorm
        h = torch.relu(self.c2(h))
        h = self.c3(h).relu()
        h = self.c4(h)
        h = F.relu(h, inplace=True)
        h = self.c4(h)  # the same layer again, now without a ReLU
        h = self.leaky(self.c5(h))  # LeakyReLU passes gradient at negative inputs
        return self.head(h.mean((2, 3)))


class Pooled(nn.Module):
    """Pooling between a layer and its ReLU (as in PyTorch's MNIST example)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.c1(x), 2))
        x = self.pool(self.c2(x)).flatten(2).view(x.shape[0], 4, 4, 4).relu()
        x = torch.relu(F.avg_pool2d(self.c3(x), 2))
        return self.fc(torch.flatten(x, 1))


def test_layers_read_only_by_relus_are_found() -> None:
    model = Spellings().eval()
    bypass = Canonical(model).form.bypass
    assert bypass == {"bn1"}
    expected = {"c1": RELU, "c2": RELU, "c3": RELU, "c4": OTHER, "c5": OTHER, "head": OTHER}
    assert relu_gates(model, bypass) == expected
    # without folding, the BatchNorm (shift!) stands between c1 and its ReLU
    assert relu_gates(model) == {**expected, "c1": OTHER}
    assert relu_gates(SkipNet()) == {"l1": SUM, "l2": OTHER}
    sequential = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(),
                               nn.Linear(4, 2), nn.ReLU6(), nn.Linear(2, 2))
    assert relu_gates(sequential) == {"0": RELU, "2": OTHER, "4": RELU, "6": OTHER}
    # max-pooling and reshaping before the ReLU keep the gate; average pooling does not
    assert relu_gates(Pooled()) == {"c1": RELU, "c2": RELU, "c3": OTHER, "fc": OTHER}


def test_untraceable_or_hooked_models_leave_the_decision_to_run_time() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.l1(x))
            return self.l2(h) if h.sum() > 0 else -self.l2(h)

    assert relu_gates(DataDependent()) == {}
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert relu_gates(model) == {"0": RELU, "2": OTHER}
    handle = model[0].register_forward_hook(lambda module, args, out: -out)
    try:
        assert relu_gates(model) == {}
    finally:
        handle.remove()


def _two_component_patterns(model: nn.Module, seed: int) -> pn.Patterns:
    generator = torch.Generator().manual_seed(seed)
    layers = {
        name: {
            "a_plus": torch.randn(m.weight.shape, generator=generator, dtype=torch.float64),
            "a_minus": torch.randn(m.weight.shape, generator=generator, dtype=torch.float64),
        }
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    return pn.Patterns(layers, estimator="two_component", nodes="weights")


class RunTimePatternNet(pn.PatternNet):
    """The two-component rule deciding at run time only (as before the static decision)."""

    _gradient_relus = False


class RunTimePatternAttribution(pn.PatternAttribution):
    _gradient_relus = False


def test_skip_path_layer_uses_a_minus_as_the_explicit_formula() -> None:
    torch.manual_seed(0)
    model = SkipNet().double().eval()
    patterns = _two_component_patterns(model, 1)
    x = torch.randn(6, 4, dtype=torch.float64)
    method = pn.PatternNet(model, patterns)
    module_rules, _ = method.rules(Canonical(model))
    assert module_rules[model.l1].negative is not None
    assert not module_rules[model.l1].check_inactive  # feeds a sum: no run-time test
    got = method.attribute(x, target=1)

    # explicit backward: A₊ᵀ(g·m) + A₋ᵀ(g·(1−m)) per layer, ReLU gate and skip copy at h
    h = model.l1(x).detach()
    z = model.l2(F.relu(h) + h).detach()
    g = torch.zeros_like(z)
    g[:, 1] = z[:, 1]
    m2 = (z > 0).double()
    p2, n2 = patterns["l2"]["a_plus"], patterns["l2"]["a_minus"]
    g_sum = (g * m2) @ p2 + (g * (1 - m2)) @ n2
    g_h = g_sum * (h > 0).double() + g_sum  # through the ReLU and along the skip path
    m1 = (h > 0).double()
    p1, n1 = patterns["l1"]["a_plus"], patterns["l1"]["a_minus"]
    expected = (g_h * m1) @ p1 + (g_h * (1 - m1)) @ n1
    torch.testing.assert_close(got, expected)
    # the a₋ of l1 matters: inactive units of h receive the skip path's gradient
    assert ((g_h * (1 - m1)).abs().sum(1) > 0).all()
    assert not torch.allclose(got, (g_h * m1) @ p1 + (g_h * (1 - m1)) @ p1)


def test_layer_without_relu_after_it_keeps_a_minus() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    patterns = _two_component_patterns(model, 2)
    x = torch.randn(8, 4, dtype=torch.float64)
    method = pn.PatternNet(model, patterns)
    module_rules, _ = method.rules(Canonical(model))
    assert all(rule.negative is not None for rule in module_rules.values())
    got = method.attribute(x, target=0)
    plus_only = pn.Patterns(
        {name: {"a_plus": t["a_plus"]} for name, t in patterns.items()},
        estimator="two_component",
    )
    assert not torch.allclose(got, pn.PatternNet(model, plus_only).attribute(x, target=0))
    torch.testing.assert_close(got, RunTimePatternNet(model, patterns).attribute(x, target=0))


@pytest.mark.parametrize("kind", ["net", "attribution"])
def test_static_decision_gives_the_run_time_results_bit_for_bit(kind: str) -> None:
    torch.manual_seed(2)
    model = Spellings().double()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    model.eval()
    patterns = _two_component_patterns(model, 3)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    static, dynamic = (
        (pn.PatternNet, RunTimePatternNet)
        if kind == "net"
        else (pn.PatternAttribution, RunTimePatternAttribution)
    )
    method = static(model, patterns)
    module_rules, _ = method.rules(Canonical(model))
    negatives = {name: module_rules[getattr(model, name)].negative is not None
                 for name in ("c1", "c2", "c3", "c4", "c5", "head")}
    assert negatives == {"c1": False, "c2": False, "c3": False, "c4": True, "c5": True,
                         "head": True}
    # only layers feeding a residual sum skip the run-time test (none here)
    assert all(module_rules[getattr(model, name)].check_inactive
               for name in ("c4", "c5", "head"))
    for target in (0, 1):
        got = method.attribute(x, target=target)
        assert torch.equal(got, dynamic(model, patterns).attribute(x, target=target))
    # a₋ of the gated layers was never formed
    assert not any(side == "minus" and name in ("c1", "c2", "c3")
                   for name, side in method._swap_cache)
    # pooling before the ReLU, and a layer feeding a sum (two maps without the test)
    for other, inputs in ((Pooled(), torch.randn(3, 1, 22, 22)), (SkipNet(), torch.randn(5, 4))):
        other = other.double().eval()
        patterns = _two_component_patterns(other, 4)
        inputs = inputs.double()
        got = static(other, patterns).attribute(inputs, target=1)
        assert torch.equal(got, dynamic(other, patterns).attribute(inputs, target=1))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("check_inactive", [True, False])
def test_two_component_rule_on_convolutions_matches_explicit_maps(
    groups: int, check_inactive: bool
) -> None:
    from torch.nn.grad import conv2d_input

    from patternnet.engine.rules import WeightSwap

    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups).double()
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    output = conv(x).detach()
    plus, minus = torch.randn_like(conv.weight), torch.randn_like(conv.weight)
    g = torch.randn_like(output)
    m = (output > 0).double()
    expected = conv2d_input(x.shape, plus, g * m, stride=2, padding=1, groups=groups)
    expected += conv2d_input(x.shape, minus, g * (1 - m), stride=2, padding=1, groups=groups)
    for stacked in (None, lambda: torch.cat([plus, minus])):
        rule = WeightSwap(conv, plus, minus, check_inactive=check_inactive, stacked=stacked)
        got = rule.backward(conv, rule.save(conv, x, output), g)
        torch.testing.assert_close(got, expected)
    # where no inactive unit receives anything, the result is A₊ᵀg either way
    gated = g * m
    rule = WeightSwap(conv, plus, minus, check_inactive=check_inactive)
    got = rule.backward(conv, rule.save(conv, x, output), gated)
    torch.testing.assert_close(
        got, conv2d_input(x.shape, plus, gated, stride=2, padding=1, groups=groups)
    )


def test_two_component_rule_on_a_linear_layer_with_extra_dimensions() -> None:
    from patternnet.engine.rules import WeightSwap

    torch.manual_seed(8)
    layer = nn.Linear(5, 4).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    output = layer(x).detach()
    plus, minus = torch.randn_like(layer.weight), torch.randn_like(layer.weight)
    g = torch.randn_like(output)
    m = (output > 0).double()
    rule = WeightSwap(layer, plus, minus, check_inactive=False)
    got = rule.backward(layer, rule.save(layer, x, output), g)
    torch.testing.assert_close(got, (g * m) @ plus + (g * (1 - m)) @ minus)


@pytest.mark.parametrize("groups", [1, 2])
def test_two_component_rule_in_batch_slices_gives_the_same(monkeypatch, groups: int) -> None:
    from torch.nn.grad import conv2d_input

    from patternnet.engine.rules import pattern as rules

    torch.manual_seed(9)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups).double()
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    output = conv(x).detach()
    plus, minus = torch.randn_like(conv.weight), torch.randn_like(conv.weight)
    g = torch.randn_like(output)
    g[1] *= (output[1] > 0)  # one sample whose inactive units receive nothing
    m = (output > 0).double()
    expected = conv2d_input(x.shape, plus, g * m, padding=1, groups=groups)
    expected += conv2d_input(x.shape, minus, g * (1 - m), padding=1, groups=groups)
    monkeypatch.setattr(rules, "_CHUNK_BYTES", 2 * g[:2].numel() * g.element_size())
    for check_inactive in (True, False):
        rule = rules.WeightSwap(conv, plus, minus, check_inactive=check_inactive)
        got = rule.backward(conv, rule.save(conv, x, output), g)  # slices of two samples
        torch.testing.assert_close(got, expected)


class Blocks(nn.Module):
    """Two residual blocks (``out += identity`` and ``a + b``), each sum read by a ReLU, then
    a sum read by a Linear layer (not gated) and global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a1, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        out = self.bn(self.a1(h))
        out += h  # in place, as torchvision's blocks
        h = F.relu(out)
        h = torch.relu(self.a2(h) + self.b2(h))
        h = self.c3(h) + h  # read by the mean, not by a ReLU: keeps p₋
        return self.head(h.mean((2, 3)))


def _random_node_patterns(model: nn.Module, x: torch.Tensor, seed: int) -> pn.Patterns:
    from patternnet.engine.nodes import discover

    generator = torch.Generator().manual_seed(seed)
    layers = _two_component_patterns(model, seed)
    nodes = {
        name: {side: torch.randn((units, width), generator=generator, dtype=torch.float64)
               for side in ("a_plus", "a_minus")}
        for name, (_, units, width) in discover(model, x).items()
    }  # fmt: skip
    return pn.Patterns(
        {name: dict(t) for name, t in layers.items()}, estimator="two_component", nodes=nodes
    )


def test_nodes_read_only_by_relus_are_found() -> None:
    model = Blocks().eval()
    bypass = Canonical(model).form.bypass
    assert gated_nodes(model, bypass) == {"sum#0", "sum#1"}
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18().eval()
    # every residual sum of a ResNet (relu(out + identity)); not the global average pool
    assert gated_nodes(resnet, Canonical(resnet).form.bypass) == {f"sum#{i}" for i in range(8)}
    handle = model.a1.register_forward_hook(lambda module, args, out: -out)
    try:
        assert gated_nodes(model, bypass) == frozenset()
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["net", "attribution"])
def test_gated_nodes_give_the_run_time_results_bit_for_bit(kind: str) -> None:
    torch.manual_seed(3)
    model = Blocks().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    patterns = _random_node_patterns(model, x, 4)
    static, dynamic = (
        (pn.PatternNet, RunTimePatternNet)
        if kind == "net"
        else (pn.PatternAttribution, RunTimePatternAttribution)
    )
    for target in (0, 2):
        got = static(model, patterns).attribute(x, target=target)
        assert got.abs().max() > 0
        assert torch.equal(got, dynamic(model, patterns).attribute(x, target=target))
    # p₋ of the gated sums matters nowhere; p₋ of the sum read by the mean does
    def with_minus_zeroed(names: set[str]) -> pn.Patterns:
        nodes = {name: {"a_plus": t["a_plus"], "a_minus": t["a_minus"] * (name not in names)}
                 for name, t in patterns.nodes.items()}  # fmt: skip
        return pn.Patterns({name: dict(t) for name, t in patterns.items()},
                           estimator="two_component", nodes=nodes)  # fmt: skip

    got = static(model, patterns).attribute(x, target=0)
    assert torch.equal(got, dynamic(model, with_minus_zeroed({"sum#0", "sum#1"})).attribute(
        x, target=0))
    assert not torch.allclose(got, static(model, with_minus_zeroed({"sum#2"})).attribute(
        x, target=0))
