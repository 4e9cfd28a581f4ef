"""The registry: every name builds a working method; unknown names and options are refused."""

from __future__ import annotations

import pytest
import torch

import patternnet
from baseline_models import images, vgg
from patternnet.methods.base import Attribution
from patternnet.methods.gradient import IntegratedGradients, SmoothGrad
from patternnet.methods.guided import GuidedBackprop
from patternnet.methods.lrp import LRP, DeepTaylor
from patternnet.methods.registry import get_method, methods

ISSUE_NAMES = [
    "gradient", "gradient_x_input", "smoothgrad", "integrated_gradients", "deconvnet",
    "guided_backprop", "lrp_z", "lrp_epsilon", "lrp_zplus", "lrp_alpha1beta0",
    "lrp_alpha2beta1", "lrp_w2", "lrp_flat", "lrp_epsilon_plus", "lrp_epsilon_plus_flat",
    "deep_taylor", "pattern_net", "pattern_attribution",
]

NEEDS = {
    "pattern_net": {"estimator": "filter"},
    "pattern_attribution": {"estimator": "filter"},
    "smoothgrad": {"n_samples": 2, "seed": 0},
    "integrated_gradients": {"n_steps": 3},
}


def test_every_issue_name_is_listed_with_a_description() -> None:
    listed = methods()
    assert set(ISSUE_NAMES) <= set(listed)
    for name, text in listed.items():
        assert isinstance(text, str) and text and "\n" not in text, name


@pytest.mark.parametrize("name", list(methods()))
def test_every_method_builds_and_explains(name: str) -> None:
    model, x = vgg(), images(n=2)
    method = get_method(name, model, **NEEDS.get(name, {}))
    assert isinstance(method, Attribution)
    result = method.attribute(x, target=1)
    assert result.shape == x.shape and torch.isfinite(result).all()
    assert result.abs().sum() > 0


def test_options_reach_the_method() -> None:
    model, x = vgg(), images(n=2)
    epsilon = get_method("lrp_epsilon", model, epsilon=0.5)
    assert isinstance(epsilon, LRP) and epsilon.assignment[model.fc1].epsilon == 0.5
    same = LRP(model, "epsilon", epsilon=0.5).attribute(x, 0)
    torch.testing.assert_close(epsilon.attribute(x, 0), same, rtol=0, atol=0)
    box = get_method("deep_taylor", model, low=-3.0, high=3.0)
    assert isinstance(box, DeepTaylor)
    smooth = get_method("smoothgrad", model, inner="guided_backprop", n_samples=3, seed=1)
    assert isinstance(smooth, SmoothGrad) and isinstance(smooth.method, GuidedBackprop)
    ig = get_method("integrated_gradients", model, n_steps=4, baseline=0.5)
    assert isinstance(ig, IntegratedGradients) and ig.n_steps == 4 and ig.baseline == 0.5


def test_wrapped_lrp_gets_its_own_options() -> None:
    model = vgg()
    smooth = get_method("smoothgrad", model, inner="lrp_epsilon", epsilon=0.2, n_samples=2)
    assert smooth.method.assignment[model.fc2].epsilon == 0.2


def test_unknown_names_and_options_are_refused() -> None:
    model = vgg()
    with pytest.raises(ValueError, match="unknown method 'lrp_delta'.*lrp_epsilon"):
        get_method("lrp_delta", model)
    with pytest.raises(TypeError, match="does not take the options \\['epsilon'\\]"):
        get_method("gradient", model, epsilon=0.1)
    with pytest.raises(TypeError, match="takes"):
        get_method("lrp_epsilon", model, alpha=2)
    with pytest.raises(ValueError, match="not itself a wrapper"):
        get_method("smoothgrad", model, inner="integrated_gradients")
    with pytest.raises(ValueError, match="needs patterns"):
        get_method("pattern_net", model)


def test_available_methods_is_public_and_methods_stays_a_package() -> None:
    """``patternnet.available_methods()`` lists the methods; ``patternnet.methods`` is the
    package (no longer callable: see CHANGELOG.md)."""
    import importlib

    assert patternnet.available_methods() == methods()
    assert patternnet.methods.available_methods() == methods()
    package = importlib.import_module("patternnet.methods")
    assert package is patternnet.methods and hasattr(package, "__path__")
    assert type(package) is type(importlib)  # a plain module, not a module subclass
    assert not callable(package)
    assert patternnet.methods.lrp.LRP is LRP
