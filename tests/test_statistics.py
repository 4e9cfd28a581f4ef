"""Statistics and patterns of Linear and ConvNd layers against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import patternnet as pn
from patternnet.patterns.fit import collect_statistics
from reference import conv_patches, layer_samples, linear_pattern, two_component

LAYERS = {
    "linear": lambda: nn.Linear(7, 5),
    "linear_nobias": lambda: nn.Linear(6, 4, bias=False),
    "conv1d": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
    "conv1d_same_even": lambda: nn.Conv1d(2, 3, 4, padding="same"),
    "conv2d": lambda: nn.Conv2d(3, 4, 3, padding=1),
    "conv2d_strided_dilated": lambda: nn.Conv2d(2, 6, 3, stride=2, padding=2, dilation=2),
    "conv2d_groups": lambda: nn.Conv2d(4, 6, (3, 2), padding=(1, 0), groups=2),
    "conv2d_depthwise": lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False),
    "conv2d_same": lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1)),
    "conv2d_reflect": lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    "conv2d_circular": lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular"),
    "conv3d": lambda: nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0)),
}
INPUTS = {
    "linear": (40, 7),
    "linear_nobias": (40, 6),
    "conv1d": (5, 3, 11),
    "conv1d_same_even": (4, 2, 9),
    "conv2d": (3, 3, 6, 5),
    "conv2d_strided_dilated": (3, 2, 9, 8),
    "conv2d_groups": (3, 4, 6, 6),
    "conv2d_depthwise": (3, 3, 5, 5),
    "conv2d_same": (3, 2, 7, 6),
    "conv2d_reflect": (3, 2, 6, 6),
    "conv2d_circular": (3, 2, 5, 6),
    "conv3d": (2, 2, 4, 5, 4),
}


def _layer(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    layer = LAYERS[name]().double()
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_(0, 0.3)
    # Non-zero-mean inputs make E[xy] − E[x]E[y] matter.
    x = torch.randn(*INPUTS[name], dtype=torch.float64) + 0.4
    return layer, x


@pytest.mark.parametrize("name", list(LAYERS))
def test_sums_match_explicit_unfolding(name: str) -> None:
    layer, x = _layer(name)
    stats = collect_statistics(nn.Sequential(layer), x, estimator="two_component", progress=False)
    s = stats["0"]
    X, y, out = layer_samples(layer, x)
    m = (out > 0).double()
    assert s.count == X.shape[0]
    torch.testing.assert_close(s["sum_y"], y.sum(0))
    torch.testing.assert_close(s["count_plus"], m.sum(0))
    torch.testing.assert_close(s["sum_xy"], (X * y[..., None]).sum(0))
    torch.testing.assert_close(s["sum_xy_plus"], (X * (y * m)[..., None]).sum(0))
    torch.testing.assert_close(s["sum_x_plus"], (X * m[..., None]).sum(0))
    per_unit = s["sum_x"].repeat_interleave(layer.weight.shape[0] // s.groups, 0)
    torch.testing.assert_close(per_unit, X.sum(0))


@pytest.mark.parametrize("name", list(LAYERS))
def test_patterns_match_reference(name: str) -> None:
    layer, x = _layer(name)
    model = nn.Sequential(layer)
    X, y, out = layer_samples(layer, x)
    w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    lin = pn.fit_patterns(model, x, estimator="linear", progress=False)
    torch.testing.assert_close(lin["0"]["a"].reshape(w.shape), linear_pattern(X, y, w))
    two = pn.fit_patterns(model, x, progress=False)
    torch.testing.assert_close(
        two["0"]["a_plus"].reshape(w.shape), two_component(X, y, out, w, active=True)
    )
    torch.testing.assert_close(
        two["0"]["a_minus"].reshape(w.shape), two_component(X, y, out, w, active=False)
    )
    assert two["0"]["a_plus"].shape == layer.weight.shape


def test_e_y_is_over_all_samples() -> None:
    """a₊ uses E[y] over ALL samples, not E₊[y] (method.md §2 note)."""
    layer, x = _layer("linear")
    X, y, out = layer_samples(layer, x)
    w = layer.weight.detach().double()
    two = pn.fit_patterns(nn.Sequential(layer), x, progress=False)
    j = 0
    m = out[:, j] > 0
    wrong_num = (X[m, j] * y[m, j, None]).mean(0) - X[m, j].mean(0) * y[m, j].mean()
    wrong = wrong_num / (w[j] * wrong_num).sum()
    assert not torch.allclose(two["0"]["a_plus"][j], wrong)


@pytest.mark.parametrize("estimator", ["linear", "two_component"])
def test_w_dot_a_is_one(estimator: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 36, 4)
    ).double()
    x = torch.randn(20, 3, 6, 6, dtype=torch.float64)
    patterns = pn.fit_patterns(model, x, estimator=estimator, progress=False)
    for name, layer in (("0", model[0]), ("3", model[3])):
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        for key, a in patterns[name].items():
            dots = (w * a.reshape(w.shape)).sum(1)
            live = a.reshape(w.shape).abs().sum(1) > 0
            assert live.any()
            torch.testing.assert_close(dots[live], torch.ones_like(dots[live]), msg=key)


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16, 3),
    ).double()


def test_batch_size_invariance() -> None:
    model = _model()
    x = torch.randn(21, 2, 8, 8, dtype=torch.float64)
    fits = [pn.fit_patterns(model, x, batch_size=b, progress=False) for b in (1, 7, 21)]
    for other in fits[1:]:
        for name in fits[0]:
            for key, a in fits[0][name].items():
                torch.testing.assert_close(other[name][key], a, rtol=1e-10, atol=1e-12)


def test_merge_of_two_halves_equals_one_fit() -> None:
    model = _model()
    x = torch.randn(20, 2, 8, 8, dtype=torch.float64)
    whole = collect_statistics(model, x, progress=False)
    first = collect_statistics(model, x[:9], progress=False)
    second = collect_statistics(model, x[9:], progress=False)
    merged = first + second
    assert merged.images == 20
    for name in whole:
        for key, total in whole[name].tensors.items():
            torch.testing.assert_close(merged[name][key], total, rtol=1e-12, atol=1e-12)
    a = pn.compute_patterns(model, merged)
    b = pn.compute_patterns(model, whole)
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-10, atol=1e-12)


def test_negative_false_skips_a_minus_sums() -> None:
    model = _model()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    stats = collect_statistics(model, x, negative=False, progress=False)
    assert "sum_xy" not in stats["0"].tensors and "sum_x" not in stats["0"].tensors
    patterns = pn.compute_patterns(model, stats)
    assert set(patterns["0"]) == {"a_plus"}


def test_dead_units_give_zero_patterns_and_are_reported() -> None:
    layer = nn.Linear(3, 2).double()
    with torch.no_grad():
        layer.bias[:] = torch.tensor([-100.0, 0.0])  # unit 0 never fires
    x = torch.randn(50, 3, dtype=torch.float64)
    patterns = pn.fit_patterns(nn.Sequential(layer), x, progress=False)
    a_plus = patterns["0"]["a_plus"]
    assert torch.isfinite(a_plus).all()
    assert (a_plus[0] == 0).all() and (a_plus[1] != 0).any()
    assert patterns.metadata["report"]["0"]["dead"]["a_plus"] == 1


def test_constant_input_gives_zero_not_nan() -> None:
    layer = nn.Linear(3, 2).double()
    x = torch.ones(30, 3, dtype=torch.float64) * 2.5
    patterns = pn.fit_patterns(nn.Sequential(layer), x, estimator="linear", progress=False)
    assert torch.isfinite(patterns["0"]["a"]).all()
    assert (patterns["0"]["a"] == 0).all()
    assert patterns.metadata["report"]["0"]["degenerate"]["a"] == 2


def test_filter_estimator_needs_no_data() -> None:
    layer = nn.Linear(4, 3)
    patterns = pn.fit_patterns(nn.Sequential(layer), estimator="filter")
    w = layer.weight.detach()
    torch.testing.assert_close(patterns["0"]["a"], w / (w * w).sum(1, keepdim=True))


def test_float32_precision_is_close_to_float64() -> None:
    model = _model().float()
    x = torch.randn(16, 2, 8, 8) + 0.5
    exact = pn.fit_patterns(model, x, progress=False)
    fast = pn.fit_patterns(model, x, precision="float32", progress=False)
    for name in exact:
        for key, a in exact[name].items():
            torch.testing.assert_close(fast[name][key], a, rtol=1e-3, atol=1e-4)


def test_dataloader_tuples_and_tensor_give_the_same_patterns() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model = _model()
    x = torch.randn(18, 2, 8, 8, dtype=torch.float64)
    labels = torch.zeros(18, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, labels), batch_size=5)
    from_loader = pn.fit_patterns(model, loader, progress=False)
    from_tensor = pn.fit_patterns(model, x, progress=False)
    from_generator = pn.fit_patterns(model, (b for b in x.split(4)), progress=False)
    assert from_loader.metadata["images"] == 18
    for name in from_tensor:
        for key, a in from_tensor[name].items():
            torch.testing.assert_close(from_loader[name][key], a, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(from_generator[name][key], a, rtol=1e-10, atol=1e-12)


def test_reused_module_accumulates_every_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    model = Twice().double()
    x = torch.randn(10, 4, dtype=torch.float64)
    stats = collect_statistics(model, x, progress=False)
    assert stats["fc"].count == 20


@pytest.mark.parametrize("name", [n for n in LAYERS if n.startswith("conv")])
def test_patches_match_explicit_unfolding(name: str) -> None:
    # LayerGeometry.patches (used by ρ(S)) against the reference, every padding mode and 1/2/3-D
    layer, x = _layer(name)
    cols = pn.layers.geometry(layer).patches(x, tuple(layer.weight.shape[2:]))
    expected = conv_patches(layer, x)  # (M, G, D/G)
    assert torch.equal(cols.permute(0, 2, 1).reshape(expected.shape[0], -1),
                       expected.flatten(1))  # fmt: skip
