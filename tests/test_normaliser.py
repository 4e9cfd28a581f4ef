"""The safe two-component normaliser (method.md §11, issue 13).

``E₊[y²] − E₊[y]E[y]`` is not sign-definite: where a unit fires on mostly negative ``y`` (a
bias offset, BatchNorm folded in) it is ≤ 0 or tiny, and a₊ flips sign or blows up. Such
units fall back to their linear pattern; the fit counts and records them; every other unit
keeps exactly the paper's (and iNNvestigate's) a₊/a₋.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import patternnet as pn
from patternnet.patterns import estimators
from patternnet.patterns.estimators import MIN_NORMALISER_FRACTION
from reference import layer_samples, linear_pattern, two_component


def fit(model: nn.Module, data: Tensor, **options: object) -> pn.Patterns:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pn.fit_patterns(model, data, progress=False, **options)


def offset_toy(offset: float, mu: float = 5.0, n: int = 5000) -> tuple[nn.Module, Tensor]:
    """The paper's toy with the signal offset by ``offset`` and a bias ``−offset``.

    ``x = (y + ε, ε)``, ``y ~ U[−1, 1] + offset``, ``ε ~ N(μ, 1)``, ``w = (1, −1)``: the unit
    fires where ``y > offset``, so for ``offset`` near −2/3 its active side has
    ``E₊[y]·(E₊[y] − E[y]) ≈ −Var₊(y)`` and the normaliser ≈ 0.
    """
    g = torch.Generator().manual_seed(0)
    y = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1 + offset
    eps = torch.randn(n, generator=g, dtype=torch.float64) + mu
    x = torch.stack([y + eps, eps], 1)
    model = nn.Sequential(nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        model[0].weight[:] = torch.tensor([[1.0, -1.0]])
        model[0].bias[:] = -offset
    return model, x


@pytest.mark.parametrize("offset", [-0.66, -0.7, -1.0, -1.5])
def test_bias_offset_toy_falls_back_to_the_signal_direction(offset: float) -> None:
    model, x = offset_toy(offset)
    # Without the guard a₊ is far off, e.g. (314, 313) at −0.66 and (−14, −15) at −1.0.
    X, y, out = layer_samples(model[0], x)
    w = model[0].weight.detach().double()
    unsafe = two_component(X, y, out, w, active=True)[0]
    assert (unsafe - torch.tensor([1.0, 0.0], dtype=torch.float64)).abs().max() > 3
    patterns = fit(model, x)
    torch.testing.assert_close(
        patterns["0"]["a_plus"][0], torch.tensor([1.0, 0.0], dtype=torch.float64), atol=0.05,
        rtol=0,
    )
    # exactly the linear pattern of the same data
    torch.testing.assert_close(patterns["0"]["a_plus"], linear_pattern(X, y, w), rtol=1e-10, atol=0)
    assert patterns.fallback == {"0": {"a_plus": [0]}}
    report = patterns.metadata["report"]["0"]
    assert report["fallback"] == {"a_plus": 1, "a_minus": 0}
    assert report["fallback_to"] == "linear"
    # a₋ is well conditioned here and stays the paper's formula
    torch.testing.assert_close(
        patterns["0"]["a_minus"], two_component(X, y, out, w, active=False), rtol=1e-10, atol=0
    )


def test_fallback_is_recorded_in_the_file(tmp_path) -> None:
    model, x = offset_toy(-0.7)
    patterns = fit(model, x)
    path = patterns.save(tmp_path / "toy.safetensors")
    loaded = pn.Patterns.load(path, model=model)
    assert loaded.fallback == {"0": {"a_plus": [0]}}
    assert loaded.metadata["report"]["0"]["fallback"] == {"a_plus": 1, "a_minus": 0}


def test_float32_fit_falls_back_like_the_float64_fit() -> None:
    model, x = offset_toy(-0.7)
    p64, p32 = fit(model, x), fit(model, x, precision="float32")
    assert p32.fallback == p64.fallback
    torch.testing.assert_close(p32["0"]["a_plus"], p64["0"]["a_plus"], rtol=1e-5, atol=1e-6)


def test_without_linear_sums_the_fallback_is_the_filter_pattern() -> None:
    model, x = offset_toy(-0.7)
    patterns = fit(model, x, negative=False)
    w = model[0].weight.detach().double()
    torch.testing.assert_close(patterns["0"]["a_plus"], w / (w * w).sum(), rtol=1e-12, atol=0)
    assert patterns.metadata["report"]["0"]["fallback_to"] == "filter"
    assert patterns.fallback == {"0": {"a_plus": [0]}}


def _bn_cnn() -> tuple[nn.Module, Tensor, nn.Module, nn.Module]:
    """A Conv-BN-ReLU-Linear-BN-ReLU-Linear net whose BatchNorm statistics come from the data.

    The inputs have an offset, so the convolutions' raw outputs have means far from 0; after
    folding, BatchNorm's shift makes many units fire on negative ``y``. Returns the model, the
    data and the folded conv and dense layers as plain modules (for the reference).
    """
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5),
    ).double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 2, 8, 8, generator=g, dtype=torch.float64) * 0.5 + 1.0
    for bn in (model[1], model[6]):
        bn.momentum = None  # cumulative average: the running statistics of the data
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()

    def folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
        copy = type(layer)(**_arguments(layer)).double()
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        with torch.no_grad():
            copy.weight[:] = layer.weight * scale.view(view)
            copy.bias[:] = (layer.bias - bn.running_mean) * scale + bn.bias
        return copy

    conv = folded(model[0], model[1])
    dense = folded(model[5], model[6])
    return model, x, conv, dense


def _arguments(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Conv2d):
        return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": layer.kernel_size, "padding": layer.padding}
    return {"in_features": layer.in_features, "out_features": layer.out_features}


def _reference(layer: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(unguarded a₊, linear a, unsafe mask) of a folded layer, from explicit samples."""
    X, y, out = layer_samples(layer, inputs)
    w = layer.weight.detach().double().reshape(y.shape[1], -1)
    a_plus = two_component(X, y, out, w, active=True)
    a = linear_pattern(X, y, w)
    unsafe = []
    for j in range(y.shape[1]):
        m = out[:, j] > 0
        yj = y[m, j]
        normaliser = (yj * yj).mean() - yj.mean() * y[:, j].mean()
        variance = yj.var(unbiased=False)
        unsafe.append(bool(m.any()) and bool(normaliser <= MIN_NORMALISER_FRACTION * variance))
    return a_plus, a, torch.tensor(unsafe)


def test_batchnorm_cnn_units_with_ill_conditioned_normalisers_fall_back() -> None:
    model, x, conv, dense = _bn_cnn()
    patterns = fit(model, x, negative=True)  # the linear sums of every layer: linear fallback
    with torch.no_grad():
        hidden = model[:5](x)
    checked = 0
    for name, layer, inputs in (("0", conv, x), ("5", dense, hidden)):
        expected_plus, expected_linear, unsafe = _reference(layer, inputs)
        got = patterns[name]["a_plus"].reshape(expected_plus.shape)
        assert unsafe.any(), f"layer {name}: the test needs ill-conditioned units"
        assert patterns.fallback[name]["a_plus"] == unsafe.nonzero().flatten().tolist()
        assert patterns.metadata["report"][name]["fallback"]["a_plus"] == int(unsafe.sum())
        torch.testing.assert_close(got[unsafe], expected_linear[unsafe], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got[~unsafe], expected_plus[~unsafe], rtol=1e-8, atol=1e-10)
        checked += int(unsafe.sum())
    assert checked >= 5
    # nothing blown up any more: every a₊ within the linear patterns' scale
    assert all(torch.isfinite(t).all() for layer in patterns.values() for t in layer.values())


def test_well_conditioned_fits_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bias-free ReLU net: E₊[y] ≥ 0 everywhere, the normaliser ≥ Var₊(y): no fallback, and
    # the patterns are bit-identical to those of an unguarded estimator.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 36, 4, bias=False),
    ).double().eval()
    x = torch.randn(200, 2, 6, 6, dtype=torch.float64) + 0.5
    guarded = fit(model, x)
    assert guarded.fallback == {}
    monkeypatch.setattr(estimators, "MIN_NORMALISER_FRACTION", float("-inf"))
    unguarded = fit(model, x)
    for name in guarded:
        for key, tensor in guarded[name].items():
            assert torch.equal(tensor, unguarded[name][key])
