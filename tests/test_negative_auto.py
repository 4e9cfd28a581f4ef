"""The default fit (``negative="auto"``) leaves out a₋ where no method reads it (issue 15).

A layer (or a residual sum) whose output is read only through ReLU gates never passes
anything back through its inactive units, so its a₋ is never read. The default fit collects
a₋'s sums only for the other layers and nodes; the explanations must be those of a fit with
a₋ everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import patternnet as pn
from baseline_models import TINY_EPS, _randomise, images, resnet, vgg
from patternnet.patterns.checkpoint import load_checkpoint
from patternnet.patterns.estimators import filter_pattern
from patternnet.patterns.fit import collect_statistics
from patternnet.patterns.statistics import Statistics

POSITIVE = {"count", "sum_y", "count_plus", "sum_x_plus", "sum_xy_plus"}


class NoReluInside(nn.Module):
    """conv → conv without a ReLU between them, a BatchNorm, then ReLU, pool, two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, eps=TINY_EPS)
        self.fc1 = nn.Linear(6 * 4 * 4, 7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.c2(self.c1(x))))
        h = torch.flatten(nn.functional.max_pool2d(h, 2), 1)
        return self.fc2(torch.relu(self.fc1(h)))


def no_relu_inside() -> nn.Module:
    return _randomise(NoReluInside(), 11)  # a seed whose biases make no unit fall back


def _fit(model: nn.Module, x: Tensor, **options: object) -> pn.Patterns:
    return pn.fit_patterns(model, x, batch_size=8, progress=False, **options)


MODELS = {
    "vgg": lambda: vgg(bias=False),  # no bias: no ill-conditioned unit (see the last test)
    "resnet": resnet,
    "no_relu_inside": no_relu_inside,
}
GATED = {
    "vgg": {"features.0", "features.3", "fc1"},
    "resnet": {"stem.0", "blocks.0.body.0", "blocks.1.body.0"},
    "no_relu_inside": {"c2", "fc1"},
}
#: Sums, pools and means read only through ReLUs (a ResNet's residual sums): no a₋ either.
GATED_NODES = {"vgg": set(), "resnet": {"sum#0", "sum#1"}, "no_relu_inside": set()}


@pytest.mark.parametrize("name", list(MODELS))
def test_default_leaves_out_only_the_unread_a_minus(name: str) -> None:
    model = MODELS[name]()
    x = images(16)
    stats = collect_statistics(model, x, batch_size=8, progress=False)
    assert stats.negative == "auto"
    layers = {n for n in stats if "#" not in n}
    assert {n for n in layers if set(stats[n].tensors) == POSITIVE} == GATED[name]
    for n in layers - GATED[name]:
        assert {"sum_x", "sum_xy"} <= set(stats[n].tensors), n
    nodes = set(stats) - layers
    assert {n for n in nodes if set(stats[n].tensors) == POSITIVE} == GATED_NODES[name]
    for n in nodes - GATED_NODES[name]:  # the other sums, pools and means keep a₋
        assert "sum_xy" in stats[n].tensors, n
    with pytest.raises(KeyError, match="was not collected"):
        stats[sorted(GATED[name])[0]]["sum_xy"]


@pytest.mark.parametrize("name", list(MODELS))
def test_explanations_equal_those_of_a_minus_everywhere(name: str) -> None:
    model = MODELS[name]()
    x = images(24)
    full = _fit(model, x, negative=True)
    auto = _fit(model, x)
    assert full.fallback == {} and auto.fallback == {}  # the premise (see the last test)
    assert auto.metadata["negative"] == "auto" and full.metadata["negative"] is True
    for layer in full:
        expected = {"a_plus"} if layer in GATED[name] else {"a_plus", "a_minus"}
        assert set(auto[layer]) == expected, layer
        for key, tensor in auto[layer].items():
            torch.testing.assert_close(tensor, full[layer][key], rtol=1e-12, atol=1e-14)
    assert set(auto.nodes) == set(full.nodes)
    for node, tensors in full.nodes.items():
        expected = {"a_plus"} if node in GATED_NODES[name] else set(tensors)
        assert set(auto.nodes[node]) == expected, node
        # a gated sum's sums come from a product with fewer columns (2 instead of 4): the
        # same float64 sums up to their rounding (~1e-11 relative after the solve)
        exact = node not in GATED_NODES[name]
        for key, tensor in auto.nodes[node].items():
            torch.testing.assert_close(tensor, tensors[key], rtol=1e-12 if exact else 1e-9,
                                       atol=1e-14 if exact else 1e-12)
    probe = images(6, seed=7)
    with torch.no_grad():  # a negative logit in some samples: the last layer's a₋ is read
        assert (model(probe) <= 0).any()
    for method in (pn.PatternNet, pn.PatternAttribution):
        for target in (0, 3):
            expected = method(model, full).attribute(probe, target=target)
            got = method(model, auto).attribute(probe, target=target)
            scale = 1e-14 if not GATED_NODES[name] else 1e-9  # that rounding, see above
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=scale * float(
                expected.abs().max()))


def test_negative_true_and_false_are_kept() -> None:
    model = vgg()
    x = images(8)
    full = _fit(model, x, negative=True)
    assert all(set(full[n]) == {"a_plus", "a_minus"} for n in full)
    plus = _fit(model, x, negative=False)
    assert all(set(plus[n]) == {"a_plus"} for n in plus)
    with pytest.raises(ValueError, match="negative must be True"):
        _fit(model, x, negative="sometimes")


def test_saved_auto_patterns_round_trip(tmp_path: Path) -> None:
    model = resnet()
    x = images(16)
    auto = _fit(model, x)
    path = auto.save(tmp_path / "auto.safetensors")
    loaded = pn.Patterns.load(path, model=model)
    assert {n: set(t) for n, t in loaded.items()} == {n: set(t) for n, t in auto.items()}
    assert loaded.metadata["negative"] == "auto"
    probe = images(4, seed=5)
    torch.testing.assert_close(pn.PatternAttribution(model, loaded).attribute(probe, target=1),
                               pn.PatternAttribution(model, auto).attribute(probe, target=1))


class _KilledError(Exception):
    pass


def _until(x: Tensor, stop: int):
    for index, batch in enumerate(x.split(4)):
        if index == stop:
            raise _KilledError
        yield batch


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_checkpoints_merges_and_resumes_keep_the_layout(tmp_path: Path, precision: str) -> None:
    model = resnet()
    x = images(24)
    reference = collect_statistics(model, x, batch_size=4, progress=False, precision=precision)
    path = tmp_path / "fit.ckpt"
    with pytest.raises(_KilledError):
        collect_statistics(model, _until(x, 4), progress=False, precision=precision,
                           checkpoint=path, checkpoint_every=2)
    saved, _ = load_checkpoint(path)
    assert saved.negative == "auto"
    assert {n: set(s.tensors) for n, s in saved.items()} == {
        n: set(s.tensors) for n, s in reference.items()}
    resumed = collect_statistics(model, x, batch_size=4, progress=False, precision=precision,
                                 checkpoint=path, checkpoint_every=2, resume=True)
    with pytest.raises(ValueError, match="negative"):
        collect_statistics(model, x, batch_size=4, progress=False, precision=precision,
                           checkpoint=path, resume=True, negative=True)
    halves = (collect_statistics(model, x[:12], batch_size=4, progress=False, precision=precision)
              + collect_statistics(model, x[12:], batch_size=4, progress=False,
                                   precision=precision))
    rebuilt = Statistics.from_state(reference.describe(), reference.state_tensors())
    assert rebuilt.negative == "auto"
    # float32: the halves' products are shifted by their own first batches (rounding differs)
    tolerance = 1e-9 if precision == "float64" else 1e-4
    for other in (resumed, halves, rebuilt):
        assert other.images == reference.images
        for n, layer in reference.items():
            assert set(other[n].tensors) == set(layer.tensors), n
            for key, tensor in layer.tensors.items():
                torch.testing.assert_close(other[n].tensors[key], tensor, rtol=tolerance,
                                           atol=tolerance * float(tensor.abs().max()))


def test_ill_conditioned_units_of_gated_layers_fall_back_to_the_filter_pattern() -> None:
    """The one difference to ``negative=True``: its linear sums are not collected there."""
    model = vgg()  # random biases: unit 2 of features.3 fires on mostly negative y
    x = images(16)
    full = _fit(model, x, negative=True)
    auto = _fit(model, x)
    assert auto.fallback.get("features.3") == {"a_plus": [2]}
    assert full.fallback["features.3"] == {"a_plus": [2]}
    assert auto.metadata["report"]["features.3"]["fallback_to"] == "filter"
    assert full.metadata["report"]["features.3"]["fallback_to"] == "linear"
    got, expected = auto["features.3"]["a_plus"], full["features.3"]["a_plus"]
    weight = model.features[3].weight.detach()
    w = filter_pattern(weight)[0].reshape(weight.shape)
    torch.testing.assert_close(got[2], w[2])
    keep = [unit for unit in range(got.shape[0]) if unit != 2]
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-12, atol=1e-14)


def test_a_checkpoint_with_a_minus_everywhere_resumes_under_the_default(tmp_path: Path) -> None:
    """Checkpoints written before ``"auto"`` (``negative=True``) continue as they are."""
    model = resnet()
    x = images(16)
    path = tmp_path / "fit.ckpt"
    with pytest.raises(_KilledError):
        collect_statistics(model, _until(x, 3), progress=False, precision="float64",
                           checkpoint=path, checkpoint_every=2, negative=True)
    resumed = pn.fit_patterns(model, x, batch_size=4, progress=False, precision="float64",
                              checkpoint=path, checkpoint_every=2, resume=True)
    full = pn.fit_patterns(model, x, batch_size=4, progress=False, precision="float64",
                           negative=True)
    assert resumed.metadata["negative"] is True
    for layer, tensors in full.items():
        assert set(resumed[layer]) == set(tensors)
        for key, tensor in tensors.items():
            torch.testing.assert_close(resumed[layer][key], tensor, rtol=1e-10, atol=1e-12)
