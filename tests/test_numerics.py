"""Numerics: dead units, constant inputs, extreme scales, low-precision models (issue 8).

Statistics are float64 sums whatever the model's dtype; every pattern must be finite, dead or
degenerate units get zero patterns (and are counted in the report), and a bias-free ReLU
network's patterns do not depend on the input scale (x → s·x scales cov[x, y] and
wᵀcov[x, y] alike, the masks are unchanged), from 1e-6 to 1e6.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from patternnet import (
    PatternAttribution,
    PatternNet,
    Patterns,
    collect_statistics,
    fit_patterns,
)


def net(bias: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 6, bias=bias),
            nn.ReLU(),
            nn.Linear(6, 3, bias=bias),
        )
        .eval()
        .to(dtype)
    )


X = torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(4))


def fit(model: nn.Module, data: Tensor, **options: object) -> Patterns:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_patterns(model, data, progress=False, **options)


def all_finite(patterns: Patterns) -> bool:
    return all(torch.isfinite(t).all() for layer in patterns.values() for t in layer.values())


def max_relative_error(patterns: Patterns, reference: Patterns) -> float:
    worst = 0.0
    for name in reference:
        for key, expected in reference[name].items():
            got = patterns[name][key].to(torch.float64)
            scale = expected.abs().max().clamp(min=1e-30)
            worst = max(worst, float((got - expected.double()).abs().max() / scale))
    return worst


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3, 1e6])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_patterns_do_not_depend_on_the_input_scale(scale: float, precision: str) -> None:
    model = net()
    reference = fit(model, X)
    patterns = fit(model, X * scale, precision=precision)
    assert all_finite(patterns)
    assert max_relative_error(patterns, reference) < (1e-5 if precision == "float64" else 1e-4)
    signal = PatternNet(model, patterns).attribute(X[:4] * scale, target=0)
    torch.testing.assert_close(
        signal / scale, PatternNet(model, reference).attribute(X[:4], target=0), rtol=1e-4,
        atol=1e-5,
    )


def test_large_mean_offset_does_not_cancel_in_float64() -> None:
    """E[xy] − E[x]E[y] with a mean 1e3 times the spread: float64 sums against an explicit fit."""
    torch.manual_seed(1)
    layer = nn.Linear(5, 3, bias=False).double()
    data = (1e3 + torch.randn(400, 5, dtype=torch.float64)).float()
    patterns = fit(layer.float(), data, estimator="linear", batch_size=7)
    x = data.double()
    w = layer.weight.double()
    y = x @ w.T
    cov = ((x - x.mean(0)).T @ (y - y.mean(0))).T / len(x)  # (3, 5)
    expected = cov / (w * cov).sum(1, keepdim=True)
    torch.testing.assert_close(patterns[""]["a"].double(), expected, rtol=1e-4, atol=1e-6)


def test_units_that_never_fire_get_zero_patterns_and_are_reported() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].bias[:2] = -1e3  # units 0 and 1 never fire
    patterns = fit(model, torch.randn(50, 3))
    report = patterns.metadata["report"]["0"]
    assert report["dead"]["a_plus"] == 2
    assert torch.equal(patterns["0"]["a_plus"][:2], torch.zeros(2, 3))
    assert patterns["0"]["a_plus"][2:].abs().sum() > 0
    weight = model[0].weight.detach()
    live = (weight[2:] * patterns["0"]["a_plus"][2:]).sum(1)
    torch.testing.assert_close(live, torch.ones(2))  # wᵀa₊ = 1 on the live units
    for method in (PatternNet, PatternAttribution):
        assert torch.isfinite(method(model, patterns).attribute(torch.randn(5, 3))).all()


def test_a_layer_with_no_live_unit_at_all() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-1e3)  # the whole layer is dead: the output is the constant bias
    patterns = fit(model, torch.randn(50, 3))
    assert all_finite(patterns)
    assert patterns.metadata["report"]["0"]["dead"]["a_plus"] == 4
    signal = PatternNet(model, patterns).attribute(torch.randn(5, 3), target=0)
    assert torch.equal(signal, torch.zeros(5, 3))


@pytest.mark.parametrize("value", [0.0, 1.0, -3.5])
def test_constant_inputs_give_zero_patterns_never_nan(value: float) -> None:
    """No variance, no signal: every pattern of an MLP is zero (degenerate), nothing is NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    data = torch.full((16, 5), value)
    patterns = fit(model, data)
    assert all_finite(patterns)
    for layer in patterns.values():
        for tensor in layer.values():
            assert tensor.abs().max() < 1e-6
    for method in (PatternNet, PatternAttribution):
        result = method(model, patterns).attribute(data[:2])
        assert torch.equal(result, torch.zeros_like(result))


@pytest.mark.parametrize("value", [0.0, 1.0, -3.5])
def test_constant_images_give_finite_patterns(value: float) -> None:
    """Constant images still vary patch-wise (zero-padded borders): finite, never NaN."""
    model = net(bias=True)
    data = torch.full((16, 2, 8, 8), value)
    patterns = fit(model, data)
    assert all_finite(patterns)
    for method in (PatternNet, PatternAttribution):
        assert torch.isfinite(method(model, patterns).attribute(data[:2])).all()


def test_one_sample_is_enough_to_be_finite() -> None:
    model = net(bias=True)
    assert all_finite(fit(model, X[:1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_keep_float64_statistics(dtype: torch.dtype) -> None:
    model = net(dtype=dtype)
    stats = collect_statistics(model, X, progress=False)
    for layer in stats.values():
        assert all(t.dtype == torch.float64 for t in layer.tensors.values())
    patterns = fit(model, X)
    assert all_finite(patterns)
    assert all(t.dtype == torch.float32 for layer in patterns.values() for t in layer.values())
    # The float32 model's patterns, up to the low-precision forward pass.
    tolerance = 5e-3 if dtype == torch.float16 else 3e-2
    assert max_relative_error(patterns, fit(net(), X)) < tolerance
    for method in (PatternNet, PatternAttribution):
        result = method(model, patterns).attribute(X[:4].to(dtype))
        assert result.dtype == dtype and torch.isfinite(result).all()


def test_float16_overflow_is_an_error_not_silent_inf() -> None:
    model = net(dtype=torch.float16)
    with pytest.raises(ValueError, match="hold NaN or Inf.*float32"):
        fit(model, X * 1e6)  # activations beyond float16's 65504
    patterns = fit(model, X)
    with pytest.raises(ValueError, match="NaN or Inf"):
        PatternNet(model, patterns).attribute((X[:2] * 1e6).half())


@pytest.mark.parametrize("batch_size", [1, 2, 5, 23])
def test_a_minus_of_units_silent_only_on_zero_inputs_is_zero(batch_size: int) -> None:
    """a₋ from the differences all − active: rounding residue must not become a pattern.

    The unit is inactive exactly on the all-zero inputs, so E₋[x] = E₋[xy] = 0 and a₋ has no
    signal; the differences of the float64 sums leave ~1e-17 residues whose ratio used to
    come out as a₋ entries of size 1 to 20 for some batch splits.
    """
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(2, 6, generator=generator, dtype=torch.float64) + 0.1)
        layer.bias.zero_()
    data = torch.rand(23, 6, generator=generator, dtype=torch.float64)
    data[torch.randperm(23, generator=generator)[:7]] = 0
    patterns = fit(layer, data, batch_size=batch_size)
    assert torch.equal(patterns[""]["a_minus"], torch.zeros(2, 6, dtype=torch.float64))
    assert patterns.metadata["report"][""]["degenerate"]["a_minus"] == 2
    live = (layer.weight.detach() * patterns[""]["a_plus"]).sum(1)
    torch.testing.assert_close(live, torch.ones(2, dtype=torch.float64))
