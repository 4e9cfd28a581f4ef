"""Methods describe themselves (kind, needs_patterns, description, references) and register
with a decorator; the CLI, the demo and compare draw each result as its method's kind says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patternnet as pn
from baseline_models import images, vgg
from patternnet import viz
from patternnet.methods import registry
from patternnet.methods.base import Attribution
from patternnet.methods.registry import build_method, get_method, method_info, methods, register

SIGNALS = {"gradient", "deconvnet", "guided_backprop", "smoothgrad", "pattern_net"}


def test_every_method_describes_itself() -> None:
    for name in methods():
        info = method_info(name)
        assert info.kind in ("signal", "attribution"), name
        assert (info.kind == "signal") == (name in SIGNALS), name
        assert info.needs_patterns == (name in ("pattern_net", "pattern_attribution")), name
        assert info.description and info.references, name
        assert issubclass(info.cls, Attribution)
    # the class's own name is its registry name (presets keep the class's)
    assert pn.PatternNet.name == "pattern_net" and pn.DeepTaylor.name == "deep_taylor"
    assert pn.LRP.name == "lrp" and method_info("lrp_epsilon").cls is pn.LRP


def test_a_wrapper_has_its_inner_methods_kind() -> None:
    model = vgg()
    assert get_method("smoothgrad", model).kind == "signal"
    assert get_method("smoothgrad", model, inner="lrp_epsilon").kind == "attribution"
    assert get_method("integrated_gradients", model).kind == "attribution"


def test_build_method_gives_patterns_only_to_methods_that_use_them() -> None:
    model, x = vgg(), images(n=2)
    patterns = pn.fit_patterns(model, x, progress=False)
    assert build_method("pattern_net", model, patterns).patterns is patterns
    assert isinstance(build_method("gradient", model, patterns), pn.Gradient)
    smooth = build_method("smoothgrad", model, patterns, inner="pattern_attribution",
                          n_samples=2)
    assert smooth.method.patterns is patterns and smooth.kind == "attribution"
    with pytest.raises(TypeError, match="does not take the options \\['patterns'\\]"):
        get_method("gradient", model, patterns=patterns)


def test_register_adds_a_method_everyone_can_use() -> None:
    @register("test_negated_gradient")
    class NegatedGradient(Attribution):
        """The gradient, negated (a method for this test only)."""

        kind = "signal"
        description = "minus the gradient"
        references = ("this test",)

        def finish(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            return -grad

    try:
        model, x = vgg(), images(n=2)
        assert NegatedGradient.name == "test_negated_gradient"
        assert methods()["test_negated_gradient"] == "minus the gradient"
        got = build_method("test_negated_gradient", model).attribute(x, target=1)
        torch.testing.assert_close(got, -pn.Gradient(model).attribute(x, target=1))
        with pytest.raises(ValueError, match="taken by NegatedGradient"):
            register("test_negated_gradient")(pn.Gradient)
        with pytest.raises(ValueError, match="needs a description"):
            register("test_no_description")(type("Bare", (Attribution,), {}))
        report = pn.compare(model, ["test_negated_gradient", "lrp_epsilon"], x,
                            random_baseline=False, steps=2)
        assert report.kinds == {"test_negated_gradient": "signal", "lrp_epsilon": "attribution"}
    finally:
        registry._REGISTRY.pop("test_negated_gradient", None)


def test_one_picture_function_follows_the_kind() -> None:
    values = torch.randn(3, 5, 5)
    assert np.array_equal(viz.picture(values, "signal"), viz.signal_image(values))
    assert np.array_equal(viz.picture(values, "attribution"), viz.heatmap(values))
    with pytest.raises(ValueError, match="kind must be"):
        viz.picture(values, "saliency")
