"""Every patternnet method where a Captum 0.9 attribution stands: NoiseTunnel wraps it,
visualize_image_attr draws it, captum.metrics takes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Attribution as CaptumBase
from captum.attr import NoiseTunnel, Saliency, visualization
from matplotlib.backends.backend_agg import FigureCanvasAgg

import patternnet
from baseline_models import images, vgg
from patternnet.captum import CaptumAttribution

NAMES = list(patternnet.available_methods())


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.Tensor, patternnet.Patterns]:
    model = vgg()
    data = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64)
    patterns = patternnet.fit_patterns(model, data, progress=False)
    return model, images(3), patterns


@pytest.mark.parametrize("name", NAMES)
def test_noise_tunnel_is_the_mean_over_the_same_draws(setup, name) -> None:
    model, x, patterns = setup
    adapter = CaptumAttribution(name, model, patterns=patterns)
    assert isinstance(adapter, CaptumBase)
    target = torch.tensor([0, 3, 1])
    samples, stdev = 4, 0.3
    torch.manual_seed(11)
    smooth = NoiseTunnel(adapter).attribute(
        x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=target
    )
    # the same draws, in the same order: one normal draw of the stacked batch, then the method
    torch.manual_seed(11)
    stacked = x.repeat_interleave(samples, 0)
    noise = torch.normal(0.0, torch.tensor(stdev).repeat(stacked.shape))
    method = patternnet.methods.registry.build_method(name, model, patterns)
    each = method.attribute(stacked + noise, target=target.repeat_interleave(samples))
    expected = each.reshape(len(x), samples, *x.shape[1:]).mean(1)
    assert smooth.shape == x.shape
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(smooth, expected, rtol=0, atol=1e-10 * scale)
    # and not simply the method on the clean inputs
    assert not torch.allclose(smooth, method.attribute(x, target=target))


def test_vargrad_and_tuple_inputs(setup) -> None:
    model, x, patterns = setup
    adapter = CaptumAttribution(patternnet.PatternAttribution(model, patterns))
    assert adapter.multiplies_by_inputs
    assert not CaptumAttribution("pattern_net", model, patterns=patterns).multiplies_by_inputs
    (single,) = adapter.attribute((x,), target=2)
    torch.testing.assert_close(single, patternnet.PatternAttribution(model, patterns).attribute(
        x, target=2))
    (var,) = NoiseTunnel(adapter).attribute((x,), nt_type="vargrad", nt_samples=3, stdevs=0.2,
                                            target=2)
    assert var.shape == x.shape and bool((var >= -1e-12).all())


def test_bad_use_names_the_fix(setup) -> None:
    model, x, patterns = setup
    with pytest.raises(TypeError, match="needs the model"):
        CaptumAttribution("gradient")
    with pytest.raises(TypeError, match="patternnet method"):
        CaptumAttribution(Saliency(model))
    with pytest.raises(ValueError, match="additional_forward_args"):
        CaptumAttribution("gradient", model).attribute(x, additional_forward_args=(1,))


@pytest.mark.parametrize("name", ["pattern_net", "pattern_attribution", "lrp_epsilon"])
def test_visualize_image_attr_draws_it(setup, name) -> None:
    model, x, patterns = setup
    attribution = CaptumAttribution(name, model, patterns=patterns).attribute(x, target=1)
    picture = attribution[0].permute(1, 2, 0).numpy()
    image = x[0].permute(1, 2, 0).numpy()
    image = (image - image.min()) / (image.max() - image.min())
    for method, sign in [("heat_map", "all"), ("blended_heat_map", "absolute_value")]:
        figure, axis = visualization.visualize_image_attr(
            picture, image, method=method, sign=sign, use_pyplot=False
        )
        canvas = FigureCanvasAgg(figure)  # (use_pyplot=False: a figure without a canvas)
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())
        assert pixels.std() > 0  # something was drawn
        assert len(axis.images) >= 1


def test_captum_metrics_take_it(setup) -> None:
    """captum.metrics.infidelity calls the explanation as a Captum attribution's attribute."""
    from captum.metrics import infidelity

    model, x, patterns = setup
    adapter = CaptumAttribution("pattern_attribution", model, patterns=patterns)
    target = torch.tensor([0, 1, 2])
    attribution = adapter.attribute(x, target=target)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    score = infidelity(model, perturb, x, attribution, target=target, n_perturb_samples=4)
    assert score.shape == (3,) and bool(torch.isfinite(score).all())
