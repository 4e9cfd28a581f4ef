"""The paper's toy example (method.md §1): the filter is not the signal."""

from __future__ import annotations

import torch
from torch import nn

import patternnet as pn


def _toy(n: int = 100_000, mu: float = 0.5, sigma: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, generator=g, dtype=torch.float64) * sigma + mu
    a_s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    a_d = torch.tensor([1.0, 1.0], dtype=torch.float64)
    x = y[:, None] * a_s + eps[:, None] * a_d
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight[:] = torch.tensor([[1.0, -1.0]])
    return model, x, y


def test_linear_pattern_recovers_signal_direction() -> None:
    model, x, _ = _toy()
    patterns = pn.fit_patterns(model, x, estimator="linear", progress=False)
    a = patterns["0"]["a"][0]
    assert abs(a[0] - 1) < 0.02 and abs(a[1]) < 0.02


def test_patternnet_and_attribution_return_the_signal_gradient_the_filter() -> None:
    model, x, y = _toy()
    patterns = pn.fit_patterns(model, x, estimator="linear", progress=False)
    xs, ys = x[:16], y[:16]
    signal = pn.PatternNet(model, patterns).attribute(xs, target=0)
    contribution = pn.PatternAttribution(model, patterns).attribute(xs, target=0)
    gradient = pn.Gradient(model).attribute(xs, target=0)
    expected = torch.stack([ys, torch.zeros_like(ys)], 1)
    torch.testing.assert_close(signal, expected, atol=0.02 * ys.abs().max().item(), rtol=0)
    torch.testing.assert_close(contribution, expected, atol=0.02 * ys.abs().max().item(), rtol=0)
    # The gradient is ∝ (1, −1) for every sample, whatever the signal.
    torch.testing.assert_close(gradient, torch.tensor([[1.0, -1.0]]).double().expand(16, 2))


def test_pattern_attribution_of_a_linear_layer_is_w_a_y_exactly() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(6, 4).double()
    x = torch.randn(200, 6, dtype=torch.float64) + 0.3
    model = nn.Sequential(layer)
    for estimator, key in (("linear", "a"), ("two_component", "a_plus")):
        patterns = pn.fit_patterns(model, x, estimator=estimator, negative=False, progress=False)
        xs = x[:10]
        target = 2
        contribution = pn.PatternAttribution(model, patterns).attribute(xs, target=target)
        w = layer.weight[target].detach()
        a = patterns["0"][key][target]
        out = model(xs)[:, target].detach()
        # Starts from the logit y_c (bias included), then w ⊙ a per unit of relevance.
        torch.testing.assert_close(contribution, (w * a)[None] * out[:, None], rtol=0, atol=1e-12)
        # Relevance is conserved: wᵀa = 1, so the attribution sums to the logit.
        torch.testing.assert_close(contribution.sum(1), out, rtol=1e-10, atol=1e-12)
