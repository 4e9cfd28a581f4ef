"""The gradient family, DeConvNet and Guided BackProp against Captum (test-only), 1e-5.

SmoothGrad is compared with Captum's ``NoiseTunnel`` noise draw for draw: both draw
``N(0, 1)`` noise for all inputs × a batch of copies at a time (``repeat_interleave`` order)
from a generator seeded the same way, so with the same batching the noisy inputs are
identical. Captum draws its noise in float32 whatever the inputs, so that comparison runs in
float32; a float64 check against explicit draws covers the rest.
"""

from __future__ import annotations

import pytest
import torch

from baseline_models import assert_relative, images, resnet, vgg
from patternnet.methods.gradient import (
    Gradient,
    GradientXInput,
    IntegratedGradients,
    SmoothGrad,
)
from patternnet.methods.guided import DeConvNet, GuidedBackprop

captum_attr = pytest.importorskip("captum.attr")

TARGET = torch.tensor([1, 3, 0])
MODELS = {"vgg": vgg, "resnet": resnet}


@pytest.mark.parametrize("arch", list(MODELS))
def test_gradient_equals_saliency(arch: str) -> None:
    model, x = MODELS[arch](), images()
    expected = captum_attr.Saliency(model).attribute(x, target=TARGET, abs=False)
    assert_relative(Gradient(model).attribute(x, TARGET), expected)


@pytest.mark.parametrize("arch", list(MODELS))
def test_gradient_x_input_equals_captum(arch: str) -> None:
    model, x = MODELS[arch](), images()
    expected = captum_attr.InputXGradient(model).attribute(x, target=TARGET)
    assert_relative(GradientXInput(model).attribute(x, TARGET), expected)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(GuidedBackprop, "GuidedBackprop"), (DeConvNet, "Deconvolution")],
)
def test_relu_methods_equal_captum(arch: str, ours, theirs: str) -> None:
    model, x = MODELS[arch](), images()
    expected = getattr(captum_attr, theirs)(model).attribute(x, target=TARGET)
    result = ours(model).attribute(x, TARGET)
    assert_relative(result, expected)
    assert not torch.allclose(result, Gradient(model).attribute(x, TARGET))


@pytest.mark.parametrize(("ours", "theirs"), [(GuidedBackprop, "GuidedBackprop"),
                                              (DeConvNet, "Deconvolution")])
def test_relu_methods_catch_functional_relu(ours, theirs: str) -> None:
    """A model calling F.relu gets the rule too (Captum only hooks nn.ReLU modules)."""
    modular, functional, x = vgg(), vgg(functional_relu=True), images()
    expected = getattr(captum_attr, theirs)(modular).attribute(x, target=TARGET)
    assert_relative(ours(functional).attribute(x, TARGET), expected)
    missed = getattr(captum_attr, theirs)(functional).attribute(x, target=TARGET)
    assert not torch.allclose(missed, expected)  # the case Captum gets wrong


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(
    ("integration", "baseline", "batch"),
    [("gausslegendre", None, None), ("riemann_trapezoid", "random", 7),
     ("riemann_left", 0.5, 4), ("riemann_middle", None, 5), ("riemann_right", "random", None)],
)
def test_integrated_gradients_equal_captum(arch, integration, baseline, batch) -> None:
    model, x = MODELS[arch](), images()
    if baseline == "random":
        baseline = 0.1 * images(seed=9)
    theirs = 0.0 if baseline is None else baseline
    expected = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=theirs, target=TARGET, n_steps=12, method=integration,
        internal_batch_size=batch,
    )
    ours = IntegratedGradients(
        Gradient(model), baseline=baseline, n_steps=12, internal_batch_size=batch,
        integration=integration,
    )
    if integration == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n with halved ends (they sum to (n−1)/n); the
        # trapezoid rule on n points spaced 1/(n−1) has weights 1/(n−1): ours = theirs·n/(n−1).
        expected = expected * 12 / 11
    assert_relative(ours.attribute(x, TARGET), expected)


def test_integrated_gradients_completeness() -> None:
    """Σ attribution ≈ f(x) − f(baseline) for each sample (the IG axiom), many steps (the
    integrand of a ReLU network has kinks, so the quadrature converges slowly)."""
    model, x = vgg(), images()
    result = IntegratedGradients(model, n_steps=1000, internal_batch_size=3000).attribute(
        x, TARGET
    )
    rows = torch.arange(len(TARGET))
    gap = model(x)[rows, TARGET] - model(torch.zeros_like(x))[rows, TARGET]
    torch.testing.assert_close(result.sum((1, 2, 3)), gap.detach(), rtol=1e-2, atol=1e-6)


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """Each sample rescaled to exactly [-1, 1] (so σ = noise_level · 2 for every sample)."""
    flat = x.reshape(len(x), -1)
    low, high = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (x.dim() - 1)
    return 2 * (x - low.reshape(shape)) / (high - low).reshape(shape) - 1


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(("wrapped", "captum_name"), [(Gradient, "Saliency"),
                                                      (GuidedBackprop, "GuidedBackprop")])
@pytest.mark.parametrize("copies_per_batch", [None, 3])
def test_smoothgrad_equals_noise_tunnel(arch, wrapped, captum_name, copies_per_batch) -> None:
    model = MODELS[arch]().float()
    x = _unit_range(images()).float()
    n_samples, seed = 7, 123
    options = {"abs": False} if captum_name == "Saliency" else {}
    torch.manual_seed(seed)
    expected = captum_attr.NoiseTunnel(getattr(captum_attr, captum_name)(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=n_samples, stdevs=0.3, target=TARGET,
        nt_samples_batch_size=copies_per_batch, **options,
    )
    batch = None if copies_per_batch is None else copies_per_batch * len(x)
    ours = SmoothGrad(wrapped(model), n_samples=n_samples, noise_level=0.15,
                      internal_batch_size=batch, seed=seed)
    assert_relative(ours.attribute(x, TARGET), expected)


def test_smoothgrad_float64_matches_explicit_draws() -> None:
    """The mean of the gradient at x + σ·ε_k with the generator's draws, in float64."""
    model, x = vgg(), images(n=2)
    n_samples, level, seed = 5, 0.2, 7
    result = SmoothGrad(Gradient(model), n_samples, level, seed=seed).attribute(x, TARGET[:2])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((2 * n_samples,) + x.shape[1:], generator=generator, dtype=x.dtype)
    expected = torch.zeros_like(x)
    for i in range(2):
        sigma = level * (x[i].max() - x[i].min())
        for k in range(n_samples):
            point = (x[i] + sigma * noise[i * n_samples + k]).unsqueeze(0).requires_grad_(True)
            (grad,) = torch.autograd.grad(model(point)[0, TARGET[i]], point)
            expected[i] += grad[0] / n_samples
    assert_relative(result, expected)


def test_smoothgrad_batching_and_seed() -> None:
    """The same seed gives the same result for any internal batch that keeps the draw order;
    another seed gives another result."""
    model, x = vgg(), images()
    one = SmoothGrad(model, n_samples=6, seed=1, internal_batch_size=2).attribute(x, TARGET)
    again = SmoothGrad(model, n_samples=6, seed=1, internal_batch_size=2).attribute(x, TARGET)
    torch.testing.assert_close(one, again, rtol=0, atol=0)
    other = SmoothGrad(model, n_samples=6, seed=2).attribute(x, TARGET)
    assert not torch.allclose(one, other)


def test_wrappers_reject_bad_options() -> None:
    model = vgg()
    with pytest.raises(ValueError, match="n_samples"):
        SmoothGrad(model, n_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        SmoothGrad(model, noise_level=-1)
    with pytest.raises(ValueError, match="internal_batch_size"):
        IntegratedGradients(model, internal_batch_size=0)
    with pytest.raises(ValueError, match="integration rule"):
        IntegratedGradients(model, integration="simpson")
    with pytest.raises(TypeError, match="method must be"):
        SmoothGrad("gradient")
    with pytest.raises(ValueError, match="baseline"):
        IntegratedGradients(model, baseline=torch.zeros(2, 2)).attribute(images(), TARGET)


def test_wrappers_explain_the_clean_argmax_by_default() -> None:
    """target=None: the class predicted for the clean input, for every noisy/path point."""
    model, x = vgg(), images()
    predicted = model(x).argmax(1)
    for method in (SmoothGrad(model, n_samples=3, seed=0), IntegratedGradients(model, n_steps=4)):
        torch.testing.assert_close(
            method.attribute(x), method.attribute(x, predicted), rtol=0, atol=0
        )


def test_in_place_relus_give_the_same_result() -> None:
    """nn.ReLU(inplace=True) (which Captum's hooks refuse) is handled like nn.ReLU()."""
    from patternnet.methods.lrp import LRP

    model, x = resnet(), images()
    in_place = resnet()
    for module in in_place.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = True
    for method in (GuidedBackprop, DeConvNet, lambda m: LRP(m, "epsilon_plus_flat")):
        assert_relative(method(in_place).attribute(x, TARGET), method(model).attribute(x, TARGET))
