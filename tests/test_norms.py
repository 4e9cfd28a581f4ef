"""LayerNorm, GroupNorm and LayerNorm2d: per-element units γ/σ with 1/σ held (method.md §10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import patternnet as pn
from patternnet.engine.backward import product_rules, rules_applied
from patternnet.engine.rules.norms import LayerScale, norm_scale
from patternnet.engine.support import classify
from patternnet.methods.registry import build_method, methods


def _layer_norm_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].weight[2] = 0.0  # a dead unit: pattern 0
        net[1].bias.normal_()
    return net.eval()


@pytest.mark.parametrize("attribution", [False, True])
def test_layer_norm_passes_sigma_over_gamma_to_patternnet_and_g_to_attribution(
    attribution: bool,
) -> None:
    net = _layer_norm_net()
    assert classify(net)["1"].kind == "norm"
    data = torch.randn(200, 6, dtype=torch.float64)
    patterns = pn.fit_patterns(net, data, estimator="linear", progress=False)
    x = torch.randn(3, 6, dtype=torch.float64)
    method = pn.PatternAttribution if attribution else pn.PatternNet
    result = method(net, patterns).attribute(x, target=1)
    # float64 reference, written from the formula: g → A₂ᵀ → ReLU gate → σ/γ (or 1) → A₁ᵀ
    a1, a2 = patterns["0"]["a"], patterns["3"]["a"]
    w1, w2 = net[0].weight.detach(), net[3].weight.detach()
    z = x @ w1.T + net[0].bias.detach()
    sigma = (z.var(dim=1, unbiased=False, keepdim=True) + net[1].eps).sqrt()
    gamma = net[1].weight.detach()
    n = net[1](z).detach()
    logit = net(x)[:, 1].detach()
    g = logit[:, None] * (w2[1] * a2[1] if attribution else a2[1])[None, :]
    g = g * (n > 0)
    if attribution:  # w ⊙ a = γ/σ · σ/γ = 1 on live units
        expected = (g * (gamma != 0)) @ (w1 * a1)
    else:
        factor = torch.where(gamma != 0, sigma / torch.where(gamma != 0, gamma, 1.0), 0.0)
        expected = (g * factor) @ a1
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize(
    "norm",
    [lambda: nn.GroupNorm(2, 4), lambda: _layer_norm_2d(4)],
    ids=["GroupNorm", "LayerNorm2d"],
)
def test_channel_norms_fit_and_explain_with_every_method(norm) -> None:
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), norm(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 3),
    ).double().eval()
    assert classify(net)["1"].kind == "norm"
    x = torch.randn(16, 2, 6, 6, dtype=torch.float64)
    patterns = pn.fit_patterns(net, x, progress=False)
    for name in methods():
        result = build_method(name, net, patterns).attribute(x[:2])
        assert result.shape == x[:2].shape and torch.isfinite(result).all(), name
    # the per-element weight the rule inverts: y − β = (γ/σ) ⊙ (x − μ)
    inp = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    module = net[1]
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
    scale = norm_scale(module, inp)
    if isinstance(module, nn.GroupNorm):
        grouped = inp.reshape(2, 2, -1)
        centred = (grouped - grouped.mean(-1, keepdim=True)).reshape(inp.shape)
        shift = module.bias.view(1, -1, 1, 1)
    else:
        centred = inp - inp.mean(1, keepdim=True)
        shift = module.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(module(inp) - shift, scale * centred)


def _layer_norm_2d(channels: int) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.convnext.LayerNorm2d(channels)


def test_layer_scale_passes_one_over_s_and_convnext_blocks_explain() -> None:
    torchvision = pytest.importorskip("torchvision")
    block = torchvision.models.convnext.CNBlock(4, 0.5, 0.0)
    with torch.no_grad():
        block.layer_scale.copy_(torch.tensor([0.5, 2.0, 0.0, -1.0]).view(4, 1, 1))
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).double().eval()
    assert classify(net)["1"].kind == "container"
    # the rule on the product alone: g / s (PatternNet), g where s ≠ 0 (PatternAttribution)
    s = block.layer_scale.double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    for attribution, factor in ((False, torch.tensor([2.0, 0.5, 0.0, -1.0])),
                                (True, torch.tensor([1.0, 1.0, 0.0, 1.0]))):
        rules = product_rules(LayerScale([block.layer_scale], attribution))
        with rules_applied({}, rules):
            out = block.layer_scale * x
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        torch.testing.assert_close(grad, factor.double().view(1, 4, 1, 1).expand_as(x))
    with rules_applied({}, product_rules(LayerScale([block.layer_scale], False))):
        other = (s.detach().clone() * x).sum()  # not a registered scale: the gradient
    (grad,) = torch.autograd.grad(other, x)
    torch.testing.assert_close(grad, s.detach().expand_as(x))
    data = torch.randn(16, 2, 6, 6, dtype=torch.float64)
    patterns = pn.fit_patterns(net, data, progress=False)
    for name in methods():
        result = build_method(name, net, patterns).attribute(data[:2])
        assert result.shape == data[:2].shape and torch.isfinite(result).all(), name
