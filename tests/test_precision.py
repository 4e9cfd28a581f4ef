"""The default fit (float32 products of shifted data, float64 sums) against a float64 fit.

Issue 15: every default pattern tensor (a, a₊, a₋) within 1e-5 relative Frobenius norm of
``precision="float64"`` on the same model, also where the inputs have a large mean (images
normalised like ImageNet, whose white regions sit ~2 standard deviations off zero) and after
ReLUs (non-negative activations). VGG-, ResNet- and ViT-shaped nets (the ViT-shaped one with
Linear layers over tokens ``(B, T, D)``). The unshifted float32 products this replaced were off
by up to 6e-5 on the VGG-shaped net here.

Issue 13: the same 1e-5 for the patterns of the graph's fixed-weight nodes (residual sums,
average pools, means) under the default; unshifted float32 node products were off by up to
7e-4 (the global mean) on the ResNet-shaped net, and a pool of ReLU outputs, whose inactive
side holds only zeros (a₋ = 0 exactly), got a₋ of magnitude ~7 from shifted zeros.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import patternnet as pn

TOLERANCE = 1e-5


class Block(nn.Module):
    """A ResNet basic block (BatchNorm folded by the canonical form)."""

    def __init__(self, channels: int, stride: int = 1, pooled: bool = False) -> None:
        super().__init__()
        out = channels * stride
        self.conv1 = nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.down = None
        if stride != 1 and pooled:  # ResNet-D: average pool, then a 1×1 convolution
            self.down = nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(channels, out, 1, bias=False),
                                      nn.BatchNorm2d(out))  # fmt: skip
        elif stride != 1:
            self.down = nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity)


class TokenMLP(nn.Module):
    """A ViT-shaped net: patch embedding, then Linear layers over tokens (B, T, D)."""

    def __init__(self, dim: int = 24, tokens: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, stride=8)
        self.register_buffer("position", torch.randn(1, tokens, dim) * 0.5)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.fc3 = nn.Linear(dim, dim)
        self.head = nn.Linear(tokens * dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position  # (B, T, D)
        tokens = tokens + self.fc2(self.act(self.fc1(tokens)))
        tokens = self.act(self.fc3(tokens))
        return self.head(tokens.flatten(1))


def vgg_shaped() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def resnet_shaped(pooled: bool = False) -> nn.Module:
    """Stem, two basic blocks (the second downsamples), global average pool, classifier.

    ``pooled``: the downsampling shortcut is ResNet-D's (an average pool of ReLU outputs).
    """
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16), Block(16, stride=2, pooled=pooled), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():  # trained-looking BatchNorms: offsets and scales
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.3)
    return model


MODELS = {"vgg": vgg_shaped, "resnet": resnet_shaped, "vit": TokenMLP,
          "resnet_d": lambda: resnet_shaped(pooled=True)}  # fmt: skip


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth images normalised like ImageNet, mostly bright: channel means around +2."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=generator)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic").clamp(0, 1)
    x = 0.8 + 0.2 * x  # bright, low-contrast pixels in [0, 1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def relative_errors(fast: pn.Patterns, exact: pn.Patterns,
                    model: nn.Module | None = None) -> dict[str, float]:
    """Relative Frobenius error per pattern tensor.

    With ``model``, units whose pattern is ill-conditioned are left out of the tensor and
    checked on their own: a unit with ``κ = ‖a‖·‖w‖ > 100`` (a normaliser ``wᵀcov`` far below
    ``‖w‖‖cov‖``; after BatchNorm folding its pattern can be 1e4 times the others and then
    *is* the tensor's norm) turns the float32 rounding of its covariance (~1e-9) into κ·1e-9;
    its error must stay below ``κ · 1e-7`` (float32 rounding, 6e-8, times κ) instead.
    """
    from patternnet.engine.canonize import Canonical
    from patternnet.engine.nodes import fixed_weight, node_kind

    canonical = None if model is None else Canonical(model)
    errors = {}
    tensors = {name: exact[name] for name in exact}
    tensors.update(exact.nodes)  # sums, pools, means: (U, D) against their fixed weights
    for name, patterns in tensors.items():
        for key, a in patterns.items():
            other = fast.nodes[name] if name in exact.nodes else fast[name]
            a, b = a.double().flatten(1), other[key].double().flatten(1)
            keep = torch.ones(a.shape[0], dtype=torch.bool)
            if float(a.norm()) == 0.0:  # all units dead or degenerate: exactly zero
                errors[f"{name}.{key}"] = float(b.norm())
                continue
            if canonical is not None:
                if name in exact.nodes:
                    w = fixed_weight(node_kind(name), a.shape[0], a.shape[1])
                else:
                    w = canonical.weight(name).detach().double().flatten(1)
                kappa = a.norm(dim=1) * w.norm(dim=1)
                keep = kappa <= 100
                unit = (b - a).norm(dim=1) / a.norm(dim=1).clamp(min=1e-300)
                assert bool((unit[~keep] <= kappa[~keep] * 1e-7).all()), (name, key)
            errors[f"{name}.{key}"] = float((b - a)[keep].norm() / a[keep].norm())
    return errors


@pytest.mark.parametrize("shape", list(MODELS))
def test_default_fit_is_within_1e5_of_float64(shape: str) -> None:
    torch.manual_seed(0)
    model = MODELS[shape]().eval()
    x = images(48)
    assert x.mean() > 1.5  # a large mean against the spread
    exact = pn.fit_patterns(model, x, batch_size=16, progress=False, precision="float64")
    default = pn.fit_patterns(model, x, batch_size=16, progress=False)
    assert default.metadata["precision"] == "float32"
    errors = relative_errors(default, exact, model)
    names = {**{n: exact[n] for n in exact}, **exact.nodes}
    assert set(errors) == {f"{n}.{k}" for n, p in names.items() for k in p}
    assert len(errors) >= 6  # a₋ only where an inactive unit can receive a signal
    if shape.startswith("resnet"):  # the nodes are compared too: sums, the mean (and a pool)
        kinds = {n.partition("#")[0] for n in exact.nodes}
        assert kinds == ({"sum", "mean", "pool"} if shape == "resnet_d" else {"sum", "mean"})
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, (worst, errors)


def test_the_shift_is_what_makes_float32_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the shift (x₀ = y₀ = 0) the same float32 fit misses 1e-5 on these inputs."""
    from patternnet.patterns import statistics as statistics_mod

    torch.manual_seed(0)
    model = vgg_shaped().eval()
    x = images(48) + 20.0  # a mean of 20 standard deviations and more
    # a₋ in every layer (negative=True): the inactive sums are the most sensitive to rounding
    exact = pn.fit_patterns(model, x, batch_size=16, progress=False, precision="float64",
                            negative=True)
    shifted = max(relative_errors(pn.fit_patterns(model, x, batch_size=16, progress=False,
                                                  negative=True), exact).values())
    first = statistics_mod._Shift.first

    def unshifted(x, out, bias, groups, patch_size):
        state = first(x, out, bias, groups, patch_size).state()
        for key, value in state.items():  # x₀ = y₀ = 0: the offset is the bias alone
            state[key] = torch.zeros_like(value)
            if key.startswith("offset") and bias is not None:
                state[key] = bias.float().clone()
        return statistics_mod._Shift(state, groups, patch_size)

    monkeypatch.setattr(statistics_mod._Shift, "first", staticmethod(unshifted))
    plain = max(relative_errors(pn.fit_patterns(model, x, batch_size=16, progress=False,
                                                negative=True), exact).values())
    assert shifted < TOLERANCE < plain, (shifted, plain)


def test_padded_border_is_shifted_too() -> None:
    """A conv with wide zero padding and inputs far from zero: the border holds −x₀."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 5, padding=4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding="same", padding_mode="zeros")).eval()
    x = torch.randn(20, 2, 6, 6) * 0.1 + 5.0
    exact = pn.fit_patterns(model, x, batch_size=5, progress=False, precision="float64")
    default = pn.fit_patterns(model, x, batch_size=5, progress=False)
    errors = relative_errors(default, exact)
    assert max(errors.values()) < TOLERANCE, errors


def test_fit_options_and_keywords_are_the_same_call() -> None:
    torch.manual_seed(0)
    model = vgg_shaped().eval()
    x = images(16)
    options = pn.FitOptions(estimator="linear", batch_size=8, progress=False)
    a = pn.fit_patterns(model, x, options)
    b = pn.fit_patterns(model, x, estimator="linear", batch_size=8, progress=False)
    c = pn.fit_patterns(model, x, pn.FitOptions(progress=False), estimator="linear",
                        batch_size=8)
    for name in a:
        assert torch.equal(a[name]["a"], b[name]["a"]) and torch.equal(a[name]["a"], c[name]["a"])
    with pytest.raises(TypeError, match="unknown fit option"):
        pn.collect_statistics(model, x, estimater="linear")
    with pytest.raises(TypeError, match="FitOptions"):
        pn.fit_patterns(model, x, {"estimator": "linear"})
