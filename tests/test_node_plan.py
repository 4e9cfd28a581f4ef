"""The model graph says which sums, pools and means are nodes; the forward pass matches them.

``ModelGraph.linear_nodes`` (one fx trace) is the one answer to which operations are
fixed-weight linear nodes; ``NodeTracker`` matches each call to its planned node, and probes
only where the graph cannot see (untraceable models, leaf modules such as
``nn.TransformerEncoderLayer``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import patternnet as pn
from patternnet.engine.graph import ModelGraph, NodePlan
from patternnet.engine.nodes import NodeCall, NodeTracker, graph_recording


class Net(nn.Module):
    """conv-ReLU, a residual sum, a broadcast addition, an average pool and a mean."""

    def __init__(self, branch_if_positive: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4, 3)
        self.branch_if_positive = branch_if_positive

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        if self.branch_if_positive and bool(x.sum() > -1e9):  # data-dependent: fx fails
            h = h + self.branch(h)
        elif not self.branch_if_positive:
            h = h + self.branch(h)
        h = h + h[:, :1]  # broadcast: the graph plans it, the values show it is not one node
        z = torch.relu(h + self.branch(h))
        return self.head(self.pool(z).mean((2, 3)))


def data(n: int = 64) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)


def names_seen(model: nn.Module, plan: NodePlan | None) -> tuple[list[str], list[str]]:
    """The nodes one forward pass names with this plan, and those it probed."""
    seen: list[str] = []

    def handle(name: str, call: NodeCall) -> None:
        seen.append(name)

    tracker = NodeTracker(handle, records=True, plan=plan)
    with graph_recording(), tracker:
        tracker.new_pass()
        model(data(4).requires_grad_(True))
    return seen, list(tracker.probed)


def test_plan_of_a_traced_model_names_its_nodes_in_order() -> None:
    model = Net().double().eval()
    plan = ModelGraph.of(model).linear_nodes()
    assert plan.traced and plan.complete
    assert [(n.name, n.kind) for n in plan.nodes] == [
        ("sum#0", "sum"), ("sum#1", "sum"), ("sum#2", "sum"), ("pool#0", "pool"),
        ("mean#0", "mean"),
    ]  # fmt: skip
    assert plan.nodes[3].module == "pool"
    # The broadcast addition is planned but runs as no node: later sums close up the names.
    seen, probed = names_seen(model, plan)
    assert seen == ["sum#0", "sum#1", "pool#0", "mean#0"] and probed == []
    patterns = pn.fit_patterns(model, data(), progress=False)
    assert sorted(patterns.nodes) == sorted(seen)


def test_graph_decides_what_is_a_node() -> None:
    """A call the complete plan does not hold is no node (the gradient passes, with a
    warning); without a plan every call that looks like a node is one (the probe)."""
    model = Net().double().eval()
    probed_names, probed = names_seen(model, None)
    assert probed_names == ["sum#0", "sum#1", "pool#0", "mean#0"] and probed == []
    plan = ModelGraph.of(model).linear_nodes()
    only_pools = NodePlan(traced=True, nodes=tuple(n for n in plan.nodes if n.kind != "sum"))
    with pytest.warns(UserWarning, match="graph .* shows no such node"):
        seen, _ = names_seen(model, only_pools)
    assert seen == ["pool#0", "mean#0"]


def test_untraceable_model_is_probed_and_explained_like_its_traceable_twin() -> None:
    traced = Net().double().eval()
    untraced = Net(branch_if_positive=True).double().eval()
    untraced.load_state_dict(traced.state_dict())
    plan = ModelGraph.of(untraced).linear_nodes()
    assert not plan.traced and not plan.nodes and plan.error
    seen, probed = names_seen(untraced, plan)
    assert seen == probed == ["sum#0", "sum#1", "pool#0", "mean#0"]
    x = data()
    for estimator in ("linear", "two_component"):
        ours = pn.fit_patterns(untraced, x, estimator=estimator, progress=False)
        theirs = pn.fit_patterns(traced, x, estimator=estimator, progress=False)
        assert sorted(ours.nodes) == sorted(theirs.nodes)
        for name, tensors in theirs.nodes.items():
            for key, value in tensors.items():
                torch.testing.assert_close(ours.nodes[name][key], value)
        for method in (pn.PatternNet, pn.PatternAttribution):
            torch.testing.assert_close(
                method(untraced, ours).attribute(x[:5], target=1),
                method(traced, theirs).attribute(x[:5], target=1),
            )


def test_leaf_modules_the_graph_cannot_see_into_are_probed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8),
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        nn.Flatten(), nn.Linear(4 * 8, 2),
    ).double().eval()  # fmt: skip
    plan = ModelGraph.of(model).linear_nodes()
    assert plan.traced and plan.opaque == ("1",) and not plan.nodes and not plan.complete
    seen: list[str] = []
    tracker = NodeTracker(lambda name, call: seen.append(name), records=True, plan=plan)
    with warnings.catch_warnings(), graph_recording(), tracker:
        warnings.simplefilter("ignore")
        tracker.new_pass()
        model(torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True))
    assert seen == tracker.probed == ["sum#0", "sum#1"]  # the layer's two residual sums


def test_function_spellings_of_pools_and_means_are_planned() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.register_buffer("offset", torch.ones(1, 3, 1, 1))

        def forward(self, x: Tensor) -> Tensor:
            h = self.conv(x) + self.offset  # plus a buffer: a shift, not a sum
            a = F.adaptive_avg_pool2d(h, 1).flatten(1)
            b = F.avg_pool2d(h, 2, padding=1, count_include_pad=False).flatten(1)
            c = torch.mean(h, dim=(2, 3), dtype=torch.float64)
            return a + b.sum(1, keepdim=True) + c + h.mean(dim=(2, 3))

    model = Functional()
    plan = ModelGraph.of(model).linear_nodes()
    assert [(n.name, n.node) for n in plan.nodes] == [
        ("mean#0", "adaptive_avg_pool2d"), ("sum#0", "add_1"), ("sum#1", "add_2"),
        ("mean#1", "mean_1"), ("sum#2", "add_3"),
    ]  # fmt: skip


def test_torchvision_resnet_plan_is_what_its_fit_names() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    plan = ModelGraph.of(model).linear_nodes()
    assert plan.complete
    # test_graph_patterns fits this architecture and finds exactly these nodes
    assert list(plan.kinds()) == [f"sum#{i}" for i in range(8)] + ["mean#0"]
    assert plan.nodes[-1].module == "avgpool"
