"""Property tests on random small architectures (issue 8, hypothesis).

Random Conv2d/Linear/ReLU/pool stacks with random channels, kernels, strides, paddings,
dilations and groups. For every one of them:

- PatternNet with the weights as patterns (``a = W``) is the gradient times the selected
  logit (method.md §3: the start value is ``y_c`` and the result is linear in it);
- fitted patterns satisfy ``wᵀa = 1`` for every live unit, and are zero otherwise (§2);
- the fit does not depend on how the data is split into batches or partial fits (§2).

``max_examples`` is small so the file runs in a few seconds; raise it with
``PATTERNNET_PROPERTY_EXAMPLES`` for a longer search.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from patternnet import Gradient, PatternNet, Patterns, collect_statistics, fit_patterns
from patternnet.patterns.fit import linear_layers

EXAMPLES = int(os.environ.get("PATTERNNET_PROPERTY_EXAMPLES", "12"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Case:
    model: nn.Module
    inputs: Tensor
    description: str


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def architectures(draw: st.DrawFn) -> Case:
    """A random small classifier and an input batch for it."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    channels = draw(st.integers(1, 3))
    size = input_size = draw(st.integers(5, 9))
    layers: list[nn.Module] = []
    parts = [f"in {channels}x{size}x{size}"]
    conv_layers = draw(st.integers(0, 3))
    current = channels
    for _ in range(conv_layers):
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if current % g == 0]))
        out = groups * draw(st.integers(1, 3))
        kernel = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        padding = draw(st.integers(0, 2))
        dilation = draw(st.integers(1, 2))
        new = _out_size(size, kernel, stride, padding, dilation)
        if new < 1:
            continue
        bias = draw(st.booleans())
        layers.append(
            nn.Conv2d(current, out, kernel, stride, padding, dilation, groups, bias=bias)
        )
        parts.append(f"conv{out} k{kernel} s{stride} p{padding} d{dilation} g{groups}")
        current, size = out, new
        activation = draw(st.sampled_from(["relu", "relu", "none"]))
        if activation == "relu":
            layers.append(nn.ReLU())
        pool = draw(st.sampled_from(["none", "max", "avg"]))
        if pool != "none" and size >= 2:
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            size //= 2
            parts.append(f"{pool}pool")
    layers.append(nn.Flatten())
    features = current * size * size
    for _ in range(draw(st.integers(0, 2))):
        hidden = draw(st.integers(2, 8))
        layers += [nn.Linear(features, hidden, bias=draw(st.booleans())), nn.ReLU()]
        parts.append(f"fc{hidden}")
        features = hidden
    classes = draw(st.integers(2, 4))
    layers.append(nn.Linear(features, classes))
    parts.append(f"fc{classes}")
    model = nn.Sequential(*layers).eval()
    batch = draw(st.integers(6, 20))
    inputs = torch.randn(batch, channels, input_size, input_size)
    return Case(model, inputs, " → ".join(parts))


def quiet_fit(model: nn.Module, data: Tensor, **options: object) -> Patterns:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_patterns(model, data, progress=False, **options)


@SETTINGS
@given(architectures(), st.data())
def test_patternnet_with_weight_patterns_is_gradient_times_logit(
    case: Case, data: st.DataObject
) -> None:
    model, x = case.model, case.inputs
    weights = {
        name: {"a": module.weight.detach().clone()}
        for name, module in linear_layers(model).items()
    }
    patterns = Patterns(weights, estimator="linear", nodes="weights")
    logits = model(x)
    target = torch.tensor(
        data.draw(st.lists(st.integers(0, logits.shape[1] - 1), min_size=len(x), max_size=len(x)))
    )
    signal = PatternNet(model, patterns).attribute(x, target=target)
    gradient = Gradient(model).attribute(x, target=target)
    y = logits.detach().gather(1, target[:, None]).reshape(-1, *[1] * (x.dim() - 1))
    torch.testing.assert_close(signal, gradient * y, rtol=1e-4, atol=1e-5, msg=case.description)


@SETTINGS
@given(architectures(), st.sampled_from(["two_component", "linear"]))
def test_fitted_patterns_are_normalised_on_live_units(case: Case, estimator: str) -> None:
    patterns = quiet_fit(case.model, case.inputs, estimator=estimator)
    for name, module in linear_layers(case.model).items():
        w = module.weight.detach().double().reshape(module.weight.shape[0], -1)
        for key, a in patterns[name].items():
            assert torch.isfinite(a).all(), (case.description, name, key)
            a = a.double().reshape(w.shape)
            zero = a.abs().sum(1) == 0
            products = (w * a).sum(1)
            assert torch.allclose(
                products[~zero], torch.ones_like(products[~zero]), atol=1e-4
            ), (case.description, name, key, products)


@SETTINGS
@given(architectures(), st.integers(1, 5), st.integers(1, 5))
def test_fit_does_not_depend_on_the_batch_split(case: Case, first: int, second: int) -> None:
    """The sums agree to rounding for any batch size and for merged partial fits.

    Patterns are a fixed function of these sums; how far their rounding moves a pattern depends
    on the unit's conditioning (few samples for many inputs), so the sums are what is compared.
    A float64 model: a float32 forward pass may itself round differently for other batch sizes.
    """
    model, x = case.model.double(), case.inputs.double()
    cut = min(second, len(x) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = collect_statistics(model, x, batch_size=len(x), progress=False)
        split = collect_statistics(model, x, batch_size=first, progress=False)
        head = collect_statistics(model, x[:cut], progress=False)
        tail = collect_statistics(model, x[cut:], batch_size=first, progress=False)
    merged = head + tail
    assert split.images == merged.images == whole.images == len(x)
    for name, layer in whole.items():
        for key, expected in layer.tensors.items():
            scale = max(1.0, float(expected.abs().max()))
            for other in (split, merged):
                difference = float((other[name].tensors[key] - expected).abs().max())
                assert difference <= 1e-12 * scale, (case.description, name, key, difference)
