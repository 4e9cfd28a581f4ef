"""Sums, average pools and means are linear neurons with fitted patterns (method.md §10).

The specification is **rewrite invariance**: explaining a network gives the same PatternNet
and PatternAttribution explanation (to numerical precision, both data-driven estimators) as
explaining the same function with the operation rewritten as the equivalent grouped
convolution with fixed weights, which gets fitted patterns like any convolution:

- a sum ``z = u₀ + … + u_{m−1}`` of ``(N, C, …)`` tensors is, per channel, a neuron with one
  input per summand and weights 1: a 1×1 convolution with ``groups=C`` over the summands
  interleaved channel by channel, ``stack(u, 2).flatten(1, 2)``;
- an average pool (count_include_pad), an adaptive pool whose windows tile the input, and a
  mean over trailing dimensions are, per channel, neurons with weights ``1/k``: a depthwise
  convolution with the pool's kernel, stride and padding.

Plus ground truth: the paper's toy written as a residual network.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import patternnet as pn

ESTIMATORS = ("linear", "two_component")
TOLERANCE = {"rtol": 1e-9, "atol": 1e-11}


def fit(model: nn.Module, x: Tensor, estimator: str, **options: object) -> pn.Patterns:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pn.fit_patterns(model, x, estimator=estimator, progress=False, batch_size=50,
                               **options)


def explain(model: nn.Module, x: Tensor, estimator: str) -> dict[str, Tensor]:
    patterns = fit(model, x, estimator)
    xs = x[:12]
    return {
        "PatternNet": pn.PatternNet(model, patterns).attribute(xs, target=1),
        "PatternAttribution": pn.PatternAttribution(model, patterns).attribute(xs, target=1),
    }


def assert_same_explanations(original: nn.Module, rewritten: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(original(x), rewritten(x), rtol=1e-12, atol=1e-12)
    for estimator in ESTIMATORS:
        got, expected = explain(original, x, estimator), explain(rewritten, x, estimator)
        for method in got:
            assert got[method].abs().max() > 0
            torch.testing.assert_close(
                got[method], expected[method], **TOLERANCE,
                msg=lambda m, method=method, estimator=estimator: f"{method} ({estimator}): {m}",
            )


def fixed_conv(dims: int, channels_in: int, channels: int, kernel: int | tuple, value: float,
               **options: object) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](
        channels_in, channels, kernel, groups=channels, bias=False, **options
    ).double()
    with torch.no_grad():
        conv.weight.fill_(value)
    conv.weight.requires_grad_(False)
    return conv


# ------------------------------------------------------------------------------ sums


def add_plus(u: list[Tensor]) -> Tensor:
    return u[0] + u[1]


def add_torch(u: list[Tensor]) -> Tensor:
    return torch.add(u[0], u[1])


def add_in_place(u: list[Tensor]) -> Tensor:
    out = u[1]  # a convolution's output, as in torchvision's blocks
    out += u[0]
    return out


def add_three(u: list[Tensor]) -> Tensor:
    return u[0] + u[1] + u[2]


def add_three_in_place(u: list[Tensor]) -> Tensor:
    out = u[1] + u[2]
    out += u[0]
    return out


SPELLINGS: dict[str, tuple[Callable[[list[Tensor]], Tensor], int]] = {
    "a+b": (add_plus, 2),
    "torch.add": (add_torch, 2),
    "out+=identity": (add_in_place, 2),
    "a+b+c": (add_three, 3),
    "(a+b)+=c": (add_three_in_place, 3),
}


class Residual(nn.Module):
    """conv-ReLU, then ``m`` branches (the first the identity) summed, ReLU, dense head."""

    def __init__(self, dims: int, summands: int, combine: Callable | None, relu: bool = True):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.stem = conv(2, 4, 3, padding=1)
        self.branches = nn.ModuleList(conv(4, 4, 3, padding=1) for _ in range(summands - 1))
        self.combine = combine
        self.summands = summands
        self.rewrite = fixed_conv(dims, 4 * summands, 4, 1, 1.0) if combine is None else None
        self.relu = relu
        self.head = nn.Linear(4 * 4**dims, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        u = [h] + [branch(h) for branch in self.branches]
        if self.combine is not None:
            z = self.combine(u)
        else:  # the same sum as a grouped convolution over the interleaved summands
            z = self.rewrite(torch.stack(u, 2).flatten(1, 2))
        if self.relu:
            z = torch.relu(z)
        return self.head(z.flatten(1))


def pair(dims: int, spelling: str, relu: bool = True) -> tuple[nn.Module, nn.Module]:
    combine, summands = SPELLINGS[spelling]
    torch.manual_seed(1)
    original = Residual(dims, summands, combine, relu).double().eval()
    rewritten = Residual(dims, summands, None, relu).double().eval()
    rewritten.load_state_dict(original.state_dict(), strict=False)
    return original, rewritten


def data(dims: int, n: int = 200) -> Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn((n, 2) + (4,) * dims, generator=g, dtype=torch.float64) + 0.2


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_sum_spellings_equal_their_grouped_convolution(spelling: str) -> None:
    original, rewritten = pair(2, spelling)
    assert_same_explanations(original, rewritten, data(2))


@pytest.mark.parametrize("dims", [1, 3])
def test_sums_in_1d_and_3d(dims: int) -> None:
    original, rewritten = pair(dims, "a+b")
    assert_same_explanations(original, rewritten, data(dims))


def test_sum_without_a_relu_after_it() -> None:
    original, rewritten = pair(2, "a+b", relu=False)
    assert_same_explanations(original, rewritten, data(2))


def test_sum_patterns_add_up_to_one_and_are_saved(tmp_path) -> None:
    original, _ = pair(2, "a+b+c")
    x = data(2)
    for estimator, keys in (("linear", ("a",)), ("two_component", ("a_plus", "a_minus"))):
        # a₋ of every node: the default leaves it out of sum#1, which only its ReLU reads
        patterns = fit(original, x, estimator, negative=True)
        # (a + b) is a node of its own, (a + b) + c merges into one node of three summands
        assert sorted(patterns.nodes) == ["sum#0", "sum#1"]
        name = "sum#1"
        for key in keys:
            p = patterns.nodes[name][key]
            assert p.shape == (4, 3)
            torch.testing.assert_close(p.sum(1), torch.ones(4, dtype=p.dtype), rtol=0, atol=1e-12)
        path = patterns.save(tmp_path / f"{estimator}.safetensors")
        loaded = pn.Patterns.load(path, model=original)
        for key in keys:
            assert torch.equal(loaded.nodes[name][key], patterns.nodes[name][key])



def test_a_sum_read_only_by_its_relu_has_no_a_minus_by_default() -> None:
    original, _ = pair(2, "a+b+c")
    patterns = fit(original, data(2), "two_component")
    assert set(patterns.nodes["sum#1"]) == {"a_plus"}  # its ReLU zeroes what a₋ would get
    assert set(patterns.nodes["sum#0"]) == {"a_plus", "a_minus"}  # read by the next sum


# ------------------------------------------------------------------------------ pools, means


class Pooled(nn.Module):
    """conv-ReLU, a pool (or its depthwise-convolution rewrite), then a dense head."""

    def __init__(self, dims: int, pool: nn.Module | Callable, features: int, size: int = 6):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.stem = conv(2, 3, 3, padding=1)
        self.pool = pool
        self.head = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.flatten(self.pool(h), 1))


class Mean(nn.Module):
    def __init__(self, dims: tuple[int, ...], keepdim: bool = False, method: bool = True):
        super().__init__()
        self.dims, self.keepdim, self.method = dims, keepdim, method

    def forward(self, x: Tensor) -> Tensor:
        if self.method:
            return x.mean(self.dims, keepdim=self.keepdim)
        return torch.mean(x, dim=self.dims, keepdim=self.keepdim)


# (dims, pool, rewrite kernel, stride, padding, pooled size per dim)
POOLS = {
    "AvgPool2d(2)": (2, lambda: nn.AvgPool2d(2), 2, 2, 0, 3),
    "AvgPool2d(3,2,1)": (2, lambda: nn.AvgPool2d(3, 2, 1), 3, 2, 1, 3),
    "AdaptiveAvgPool2d(1)": (2, lambda: nn.AdaptiveAvgPool2d(1), 6, 1, 0, 1),
    "AdaptiveAvgPool2d(2)": (2, lambda: nn.AdaptiveAvgPool2d(2), 3, 3, 0, 2),
    "x.mean((2,3))": (2, lambda: Mean((2, 3)), 6, 1, 0, 1),
    "torch.mean(keepdim)": (2, lambda: Mean((2, 3), True, method=False), 6, 1, 0, 1),
    "AvgPool1d(2)": (1, lambda: nn.AvgPool1d(2), 2, 2, 0, 3),
    "AdaptiveAvgPool1d(1)": (1, lambda: nn.AdaptiveAvgPool1d(1), 6, 1, 0, 1),
    "x.mean(2) 1-D": (1, lambda: Mean((2,)), 6, 1, 0, 1),
    "AvgPool3d(2)": (3, lambda: nn.AvgPool3d(2), 2, 2, 0, 3),
    "AdaptiveAvgPool3d(1)": (3, lambda: nn.AdaptiveAvgPool3d(1), 6, 1, 0, 1),
    "x.mean((2,3,4))": (3, lambda: Mean((2, 3, 4)), 6, 1, 0, 1),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_pools_and_means_equal_their_depthwise_convolution(name: str) -> None:
    dims, make, kernel, stride, padding, size = POOLS[name]
    features = 3 * size**dims
    torch.manual_seed(3)
    original = Pooled(dims, make(), features).double().eval()
    weight = 1.0 / kernel**dims
    rewrite = fixed_conv(dims, 3, 3, kernel, weight, stride=stride, padding=padding)
    rewritten = Pooled(dims, rewrite, features).double().eval()
    rewritten.load_state_dict(original.state_dict(), strict=False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn((150, 2) + (6,) * dims, generator=g, dtype=torch.float64)
    assert_same_explanations(original, rewritten, x)


# ------------------------------------------------------------------------------ ResNet


def test_resnet_block_with_batchnorm_equals_its_rewrite() -> None:
    """A torchvision-style block (BatchNorm folded, ``out += identity``, global pool)."""

    class Block(nn.Module):
        def __init__(self, rewrite: bool) -> None:
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.bn0 = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.rewrite = rewrite
            self.sum = fixed_conv(2, 8, 4, 1, 1.0)
            self.pool = fixed_conv(2, 4, 4, 5, 1 / 25) if rewrite else nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            identity = torch.relu(self.bn0(self.stem(x)))
            out = self.bn(self.conv(identity))
            if self.rewrite:
                out = self.sum(torch.stack([out, identity], 2).flatten(1, 2))
            else:
                out += identity
            out = torch.relu(out)
            return self.fc(torch.flatten(self.pool(out), 1))

    torch.manual_seed(5)
    original = Block(False).double()
    for bn in (original.bn0, original.bn):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    original.eval()
    rewritten = Block(True).double().eval()
    rewritten.load_state_dict(original.state_dict(), strict=False)
    g = torch.Generator().manual_seed(6)
    assert_same_explanations(
        original, rewritten, torch.randn(120, 2, 5, 5, generator=g, dtype=torch.float64)
    )


# ------------------------------------------------------------------------------ ground truth


def residual_toy(n: int = 5000, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """The paper's toy ``x = (y + ε, ε)`` as ``z = x + Bx``, ``B = [[0, −1], [0, 0]]``, ŷ = z₁.

    Returns the residual model, the plain model ``ŷ = (1, −1)ᵀx`` (the same function), the
    inputs and the signal ``y``.
    """

    class ResidualToy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.B = nn.Linear(2, 2, bias=False)
            self.read = nn.Linear(2, 1, bias=False)
            with torch.no_grad():
                self.B.weight[:] = torch.tensor([[0.0, -1.0], [0.0, 0.0]])
                self.read.weight[:] = torch.tensor([[1.0, 0.0]])

        def forward(self, x: Tensor) -> Tensor:
            return self.read(x + self.B(x))

    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, generator=g, dtype=torch.float64) + 0.5
    x = torch.stack([y + eps, eps], 1)
    plain = nn.Sequential(nn.Linear(2, 1, bias=False)).double().eval()
    with torch.no_grad():
        plain[0].weight[:] = torch.tensor([[1.0, -1.0]])
    return ResidualToy().double().eval(), plain, x, y


def test_residual_toy_patternnet_returns_the_signal() -> None:
    # 50 000 samples: the linear pattern's sampling error (≈ 4 % at 5 000) is then ≈ 0.1 %
    residual, plain, x, y = residual_toy(50_000)
    xs, ys = x[:16], y[:16]
    expected = torch.stack([ys, torch.zeros_like(ys)], 1)
    for model in (residual, plain):
        patterns = fit(model, x, "linear")
        signal = pn.PatternNet(model, patterns).attribute(xs, target=0)
        # was ≈ (0, −y) for the residual form when the sum copied the signal to both summands
        torch.testing.assert_close(signal, expected, atol=0.01, rtol=0)


def test_residual_toy_patternattribution_equals_the_plain_form() -> None:
    residual, plain, x, y = residual_toy(5000)  # the setting of the issue
    xs, ys = x[:16], y[:16]
    residual_attr = pn.PatternAttribution(residual, fit(residual, x, "linear")).attribute(
        xs, target=0
    )
    plain_attr = pn.PatternAttribution(plain, fit(plain, x, "linear")).attribute(xs, target=0)
    # was 13–68 % of |y| on the distractor input with the proportional split; now exactly
    # the plain form's (its sampling error, ≈ 4 % of |y| at 5 000 samples)
    torch.testing.assert_close(residual_attr, plain_attr, atol=1e-10, rtol=0)
    assert (residual_attr[:, 1].abs() <= 0.05 * ys.abs()).all()
    # conserving: the attribution adds up to the logit ŷ = y
    torch.testing.assert_close(residual_attr.sum(1), ys, atol=1e-10, rtol=0)


def test_torchvision_resnet18_fits_and_explains_with_sum_and_pool_patterns() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(7)
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    x = torch.randn(6, 3, 64, 64, dtype=torch.float64)
    patterns = fit(model, x, "two_component")
    # 8 residual sums (out += identity) and the global average pool (a mean over 2×2)
    assert sorted(patterns.nodes) == sorted([f"sum#{i}" for i in range(8)] + ["mean#0"])
    channels = [64, 64, 128, 128, 256, 256, 512, 512]
    for i, c in enumerate(channels):
        p = patterns.nodes[f"sum#{i}"]["a_plus"]
        assert p.shape == (c, 2)
        live = p.abs().sum(1) > 0
        torch.testing.assert_close(p.sum(1)[live], torch.ones_like(p[live, 0]))
    assert patterns.nodes["mean#0"]["a_plus"].shape == (512, 4)
    assert patterns.metadata["nodes"]["sum#7"] == {"kind": "sum", "units": 512, "inputs": 2}
    for method in (pn.PatternNet(model, patterns), pn.PatternAttribution(model, patterns)):
        result = method.attribute(x[:2])
        assert result.shape == (2, 3, 64, 64) and torch.isfinite(result).all()
        assert result.abs().sum() > 0


class ResidualDiscriminant(nn.Module):
    """A ``Flatten → Linear`` model written as ``read(x + B x)`` (the same function).

    ``read``'s weight is ``W (I + B)⁻¹``; with ``B`` of the toy's structure (one signal pixel's
    row collects the weights of every other pixel, as ``B = [[0, −1], [0, 0]]`` collects the
    distractor's) the residual branch carries the suppressor's cancelling weights.
    """

    def __init__(self, plain: nn.Module, branch: Tensor) -> None:
        super().__init__()
        weight, bias = plain[1].weight.detach().double(), plain[1].bias.detach().double()
        d = weight.shape[1]
        self.branch = nn.Linear(d, d, bias=False).double()
        self.read = nn.Linear(d, weight.shape[0]).double()
        with torch.no_grad():
            self.branch.weight.copy_(branch)
            eye = torch.eye(d, dtype=torch.float64)
            self.read.weight.copy_(torch.linalg.solve(eye + branch, weight, left=False))
            self.read.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.read(x + self.branch(x))


def test_residual_suppressor_keeps_mass_off_the_suppressor() -> None:
    """Wilming et al.'s suppressor benchmark, the optimal linear model in residual form.

    Measured (3 000 samples, λ₁ = 0.08, 2 400 to fit, 600 to explain; linear estimator): mass
    on the suppressor, plain form PatternNet 0.066 / PatternAttribution 0.066, residual form
    0.022 / 0.083; the gradient 0.22. (A dense random branch, or the plain model written as
    two chained Linear layers without any sum, gives PatternNet 0.44: patterns are fitted
    layer by layer, and a chain of layer-wise patterns is not the one-layer pattern.)
    """
    from patternnet.evaluate import region_mass
    from patternnet.groundtruth import linear_discriminant, wilming_suppressor

    data = wilming_suppressor(3000, signal_weight=0.08, seed=0)
    train, test = data.split(2400, 600)
    plain = linear_discriminant(train).double()
    x_fit, x_test = train.inputs.double(), test.inputs.double()
    w = plain[1].weight.detach().double()[1]
    signal_only = torch.where(data.signal_mask[0].flatten(), w, torch.zeros_like(w))
    pixel = int(signal_only.abs().argmax())
    branch = torch.zeros(64, 64, dtype=torch.float64)
    branch[pixel] = (w - signal_only) / signal_only[pixel]
    residual = ResidualDiscriminant(plain, branch).eval()
    torch.testing.assert_close(residual(x_test), plain(x_test), atol=1e-9, rtol=0)
    suppressor = test.regions["suppressor"]
    mass = {}
    for name, model in (("plain", plain), ("residual", residual)):
        patterns = fit(model, x_fit, "linear")
        assert name == "plain" or sorted(patterns.nodes) == ["sum#0"]
        for method in (pn.PatternNet, pn.PatternAttribution):
            e = method(model, patterns).attribute(x_test, target=1)
            mass[name, method.__name__] = float(region_mass(e, suppressor).mean())
    gradient = float(region_mass(pn.Gradient(plain).attribute(x_test, target=1),
                                 suppressor).mean())  # fmt: skip
    assert mass["plain", "PatternNet"] < 0.1 < 0.15 < gradient, (mass, gradient)
    assert mass["residual", "PatternNet"] <= mass["plain", "PatternNet"] + 0.01, mass
    assert mass["residual", "PatternAttribution"] < 0.1, mass
