"""GELU and SiLU in the pattern methods: the gradient's f′(z) (default) or a gate at z > 0.

method.md §10: ``smooth="derivative"`` (the default, chosen by measurement) passes ``g·f′(z)``
and uses the linear pattern of the layer feeding the activation; ``smooth="gate"`` passes
``g·[z > 0]`` and keeps that layer's two-component patterns (as for a ReLU). A two-component fit
stores both. Checked against the formulas written out in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patternnet as pn


def fitted(act: type[nn.Module]) -> tuple[nn.Module, pn.Patterns, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(600, 5, dtype=torch.float64)
    return model, pn.fit_patterns(model, x, progress=False), x[:7]


def reference(model: nn.Module, patterns: pn.Patterns, x: torch.Tensor, smooth: str,
              attribution: bool, act: type[nn.Module]) -> torch.Tensor:
    """The backward pass by hand: output layer (a₊/a₋ by the logit's sign), activation, layer."""
    first, last = model[0], model[2]
    z = first(x)
    logits = model(x).detach()
    target = logits.argmax(1)
    y = logits.gather(1, target[:, None]).squeeze(1)
    p2 = patterns["2"]
    a2 = torch.where((y > 0)[:, None], p2["a_plus"][target], p2["a_minus"][target])
    if attribution:
        a2 = a2 * last.weight[target].detach()
    g = a2 * y[:, None]
    fn = {nn.GELU: F.gelu, nn.SiLU: F.silu}[act]
    if smooth == "gate":
        g = g * (z > 0).double()
        a1 = patterns["0"]["a_plus"]  # g is 0 wherever z ≤ 0: a₋ receives nothing
    else:
        zg = z.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(fn(zg).sum(), zg)
        g = g * slope
        a1 = patterns["0"]["a"]
    if attribution:
        a1 = a1 * first.weight.detach()
    return (g @ a1).detach()


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU])
def test_gate_and_derivative_follow_their_formulas(act: type[nn.Module]) -> None:
    model, patterns, x = fitted(act)
    assert sorted(patterns["0"]) == ["a", "a_minus", "a_plus"]  # both kinds stored
    assert sorted(patterns["2"]) == ["a_minus", "a_plus"]
    for method, attribution in ((pn.PatternNet, False), (pn.PatternAttribution, True)):
        results = {}
        for smooth in ("gate", "derivative"):
            got = method(model, patterns, smooth=smooth).attribute(x)
            expected = reference(model, patterns, x, smooth, attribution, act)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
            results[smooth] = got
        # the option switches behaviour, and the default is the derivative
        assert (results["gate"] - results["derivative"]).abs().max() > 1e-3
        torch.testing.assert_close(method(model, patterns).attribute(x), results["derivative"])


def test_smooth_option_is_checked() -> None:
    model, patterns, _ = fitted(nn.GELU)
    with pytest.raises(ValueError, match="smooth must be one of 'gate', 'derivative'"):
        pn.PatternNet(model, patterns, smooth="relu")
    from patternnet.methods.registry import method_info

    for name in ("pattern_net", "pattern_attribution"):
        assert "smooth" in method_info(name).options()
    gate = pn.get_method("pattern_net", model, patterns=patterns, smooth="gate")
    assert gate.smooth == "gate" and pn.PatternNet(model, patterns).smooth == "derivative"
