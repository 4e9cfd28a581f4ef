"""engine.graph: one ModelGraph per model, traced once; node kinds for every spelling."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import patternnet as pn
from patternnet.engine.graph import OTHER, RELU, SUM, ModelGraph


class Block(nn.Module):
    """A residual block (BatchNorm after each conv, in-place sum, ReLU after the sum)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return out.relu()


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block1, self.block2 = Block(4), Block(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_like() -> nn.Module:
    torch.manual_seed(0)
    model = ResNetLike().double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


class Spellings(nn.Module):
    """Every spelling of the node kinds the graph names."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.ln, self.gn = nn.LayerNorm(8), nn.GroupNorm(2, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.avg, self.maxp = nn.AvgPool1d(2), nn.MaxPool1d(2)
        self.gelu, self.leaky, self.drop = nn.GELU(), nn.LeakyReLU(), nn.Dropout()
        self.register_buffer("shift", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 8)
        h = self.lin(x)
        s1 = h + x  # sum
        s2 = torch.add(s1, h)  # sum
        s2 += x  # in-place sum
        s3 = s2.add(h) + s1 + x  # n-ary: a chain of sums
        shifted = s3 + self.shift  # a shift (+ buffer), not a sum
        shifted = shifted + 1.0  # a shift, not a sum
        a, _ = self.attn(shifted, shifted, shifted)
        q = a.unsqueeze(1)
        b = F.scaled_dot_product_attention(q, q, q).squeeze(1)
        n = self.gn(self.ln(b).transpose(1, 2)).transpose(1, 2)
        n = F.layer_norm(n, (8,))
        p = self.avg(n) + self.maxp(n)  # sum of two pools
        p = F.avg_pool1d(p, 1) * F.max_pool1d(p, 1)
        m = p.mean(-1) + torch.mean(p, -1)
        g = torch.sigmoid(self.gelu(m)) + self.leaky(m) + F.elu(m) + F.relu(m) + m.relu()
        return self.drop(g.reshape(g.shape[0], -1).flatten(1).view(g.shape[0], -1))


def test_node_kinds_for_every_spelling() -> None:
    model = Spellings()
    graph = ModelGraph(model)
    assert graph.traced and graph.error is None

    def names(kind: str) -> list[str]:
        return [str(node.target) if node.op != "call_module" else graph.module_name(node)
                for node in graph.nodes(kind)]

    sums = list(graph.nodes("sum"))
    # h + x, torch.add, +=, .add, two chained +, avg+max, mean+mean, four sums of activations
    assert len(sums) == 12
    assert all(graph.kind(node) == "sum" for node in sums)
    shifts = [n for n in graph.nodes("other") if n.op == "call_function" and "add" in str(n)]
    assert len(shifts) == 2  # + buffer, + 1.0
    assert names("attention") == ["attn", "<built-in function scaled_dot_product_attention>"]
    norms = list(graph.nodes("norm"))
    assert [graph.module_name(n) for n in norms] == ["ln", "gn", None]
    assert norms[2].target is F.layer_norm
    assert len(names("avg_pool")) == 4 and len(names("max_pool")) == 2
    assert names("linear") == ["lin"]
    assert len(names("smooth")) == 2  # GELU, sigmoid
    assert len(names("gate")) == 2  # LeakyReLU, F.elu
    assert len(names("relu")) == 2  # F.relu, .relu()
    assert len(names("passthrough")) == 4  # reshape, flatten, view, dropout
    with pytest.raises(ValueError, match="unknown node kind"):
        list(graph.nodes("conv"))


def test_readers_look_through_what_the_caller_names() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.Flatten(), nn.ReLU())
    graph = ModelGraph(model)
    (layer,) = graph.calls("0")
    assert [graph.module_name(n) for n in graph.readers(layer)] == ["1"]
    through = graph.readers(layer, through=lambda n: graph.kind(n) == "passthrough")
    assert [graph.module_name(n) for n in through] == ["3"]
    assert graph.relu_gates() == {"0": RELU}


def test_one_trace_per_model_while_fitting_and_explaining(monkeypatch) -> None:
    model = resnet_like()
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    traces: list[str] = []
    original = torch.fx.Tracer.trace

    def counting(self, root, *args, **kwargs):
        traces.append(type(root).__name__)
        return original(self, root, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counting)
    patterns = pn.fit_patterns(model, x, progress=False)
    for method in (pn.PatternNet(model, patterns), pn.PatternAttribution(model, patterns),
                   pn.LRP(model, "epsilon"), pn.Gradient(model)):
        method.attribute(x, target=1)
        method.attribute(x, target=0)
    assert traces == ["ResNetLike"]
    graph = ModelGraph.of(model)
    assert graph.batchnorm_pairs() == {
        "stem.0": "stem.1", "block1.conv1": "block1.bn1", "block1.conv2": "block1.bn2",
        "block2.conv1": "block2.bn1", "block2.conv2": "block2.bn2",
    }
    bypass = set(graph.batchnorm_pairs().values())
    assert graph.relu_gates(bypass) == {
        "stem.0": RELU, "block1.conv1": RELU, "block1.conv2": SUM, "block2.conv1": RELU,
        "block2.conv2": SUM, "fc": OTHER,
    }
    # refresh() is the explicit way to trace again (on the next call that needs the graph)
    pn.PatternNet(model, patterns).refresh().attribute(x, target=0)
    assert traces == ["ResNetLike", "ResNetLike"]


def test_cache_follows_structure_not_values_and_keeps_no_model_alive() -> None:
    model = resnet_like()
    graph = ModelGraph.of(model)
    pairs = graph.batchnorm_pairs()
    with torch.no_grad():
        model.stem[0].weight.data.mul_(2.0)  # values: the graph does not depend on them
    assert ModelGraph.of(model) is graph and graph.batchnorm_pairs() == pairs
    model.stem[1] = nn.Identity()  # structure: a new graph
    again = ModelGraph.of(model)
    assert again is not graph and "stem.0" not in again.batchnorm_pairs()
    assert ModelGraph.of(model, refresh=True) is not again
    reference = weakref.ref(model)
    del model, graph, again
    gc.collect()
    assert reference() is None


def test_tracing_leaves_the_model_unchanged() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * torch.tensor([1.0, 2.0, 3.0])  # a tensor made in forward

    model = Constant()
    before = set(vars(model)) | {name for name, _ in model.named_buffers()}
    graph = ModelGraph(model)
    assert graph.traced
    assert set(vars(model)) | {name for name, _ in model.named_buffers()} == before


def test_weight_data_writes_are_picked_up_after_refresh() -> None:
    model = resnet_like()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    patterns = pn.fit_patterns(model, x, progress=False)
    method = pn.PatternAttribution(model, patterns)
    before = method.attribute(x, target=0)
    model.stem[0].weight.data.mul_(-1.0)  # through .data: no version counter bump
    with pytest.warns(UserWarning, match="differ from those the patterns were fitted on"):
        fresh = pn.PatternAttribution(model, patterns).attribute(x, target=0)
    assert not torch.allclose(fresh, before)
    torch.testing.assert_close(method.refresh().attribute(x, target=0), fresh)
