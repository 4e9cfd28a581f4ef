"""Every fused LRP rule against its own declarative form (engine.rules.base), in float64.

The declarative form (``rule.declarative()``) runs the rule's shares — input, weight and
bias modifiers, coefficients and unit masks — through the generic code, one transposed map
per term; the fused ``save``/``backward`` must give the same relevance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patternnet as pn
from patternnet.engine.rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    LayerRule,
    Share,
    Term,
    WSquare,
    Z,
    ZBox,
    ZPlus,
)

RULES = {
    "epsilon": lambda: Epsilon(1e-2),
    "epsilon_no_bias": lambda: Epsilon(0.1, bias=False),
    "z": lambda: Z(),
    "zplus": lambda: ZPlus(),
    "zplus_no_bias": lambda: ZPlus(bias=False),
    "alpha2beta1": lambda: AlphaBeta(2.0, 1.0),
    "alpha3beta2_no_bias": lambda: AlphaBeta(3.0, 2.0, bias=False),
    "gamma": lambda: Gamma(0.25),
    "gamma_no_bias": lambda: Gamma(1.0, bias=False),
    "w2": lambda: WSquare(),
    "flat": lambda: Flat(),
    "zbox": lambda: ZBox(-3.0, 3.0),
    "zbox_channels": lambda: ZBox(torch.full((1, 4, 1, 1), -3.0), torch.full((1, 4, 1, 1), 2.5)),
}

LAYERS = {
    "linear": (lambda: nn.Linear(4, 5), (3, 4)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (3, 4, 7, 7)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (3, 4, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(4, 3, 2, dilation=2), (3, 4, 9)),
}


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "non_negative"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("name", list(RULES))
def test_fused_rule_equals_its_declarative_form(name: str, layer: str, signed: bool) -> None:
    if name == "zbox_channels" and layer in ("linear", "conv1d"):
        pytest.skip("per-channel bounds shaped for 2-d convolutions")
    torch.manual_seed(0)
    build, shape = LAYERS[layer]
    module = build().double()
    with torch.no_grad():
        module.bias.normal_(0.0, 0.3)
    x = torch.randn(shape, dtype=torch.float64)
    if not signed:
        x = F.relu(x)
    output = module(x).detach()
    relevance = torch.randn_like(output)
    rule = RULES[name]()
    fused = rule.backward(module, rule.save(module, x, output), relevance)
    reference = rule.declarative()
    expected = reference.backward(module, reference.save(module, x, output), relevance)
    torch.testing.assert_close(fused, expected, rtol=1e-9, atol=1e-10)


class AbsoluteZ(LayerRule):
    """A rule written only as data: ``z`` over ``|W|`` and ``|x|`` (for the engine test)."""

    stabilizer = 1e-9

    def shares(self):
        return [Share((Term(torch.abs, torch.abs),))]


def test_a_declarative_rule_runs_in_the_engine_against_an_explicit_formula() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    got = pn.LRP(model, {nn.Linear: AbsoluteZ()}).attribute(x, target=2)
    # explicit: R_in[i] = Σ_j |x_i| |w_ji| / Σ_i' |x_i'| |w_ji'| · R_j, through the ReLU gate
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    h_pre = model[0](x).detach()
    h = h_pre.relu()
    logits = model(x).detach()
    start = torch.zeros_like(logits)
    start[:, 2] = logits[:, 2]
    r2 = h.abs()[:, None, :] * w2.abs()[None] / (h.abs() @ w2.abs().T + 1e-9)[:, :, None]
    r_h = (r2 * start[:, :, None]).sum(1) * (h_pre > 0)
    r1 = x.abs()[:, None, :] * w1.abs()[None] / (x.abs() @ w1.abs().T + 1e-9)[:, :, None]
    expected = (r1 * r_h[:, :, None]).sum(1)
    torch.testing.assert_close(got, expected)


def test_every_lrp_rule_is_declarative() -> None:
    for build in RULES.values():
        rule = build()
        assert isinstance(rule, LayerRule) and rule.shares()
