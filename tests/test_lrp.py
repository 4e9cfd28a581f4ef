"""LRP rules against float64 references written from the formulas, conservation, and the
estimator view of method.md §4 (identity → z rule, filter → w² rule)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baseline_models import assert_relative, images, resnet, vgg
from patternnet.engine.rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Norm,
    WSquare,
    Z,
    ZBox,
    ZPlus,
)
from patternnet.methods.gradient import GradientXInput
from patternnet.methods.lrp import LRP, PRESETS, DeepTaylor
from patternnet.methods.pattern import PatternAttribution

# ------------------------------------------------------------------ one-layer references


def reference(rule: str, x: torch.Tensor, conv: nn.Conv2d, j: int, **p: float) -> torch.Tensor:
    """Relevance of one conv output unit ``j`` (flat index), started from its value, by the
    rule's formula on the unfolded receptive field (float64)."""
    n = x.shape[0]
    k, stride, pad = conv.kernel_size, conv.stride, conv.padding
    unfold = lambda t: F.unfold(t, k, padding=pad, stride=stride)  # noqa: E731
    patches = unfold(x)  # (N, C·k·k, L)
    inside = unfold(torch.ones_like(x[:1]))[0]  # 1 where the patch is inside the image
    out_channels, positions = conv.out_channels, patches.shape[-1]
    channel, position = divmod(j, positions)
    w = conv.weight[channel].reshape(-1).double()
    b = conv.bias[channel].double()
    P = patches[:, :, position]
    c = P * w  # contributions x_i w_i
    y = c.sum(1) + b
    if rule in ("epsilon", "z"):
        eps = p.get("epsilon", 0.0)
        denom = y + eps * ((y >= 0).double() * 2 - 1)
        R = c * (y / denom)[:, None]
    elif rule == "alphabeta":
        alpha, beta = p["alpha"], p["beta"]
        pos, neg = c.clamp(min=0), c.clamp(max=0)
        zp, zn = pos.sum(1) + b.clamp(min=0), neg.sum(1) + b.clamp(max=0)
        R = alpha * pos * (y / zp)[:, None] - beta * neg * (y / zn)[:, None]
    elif rule in ("w2", "flat"):
        v = (w * w if rule == "w2" else torch.ones_like(w)) * inside[:, position]
        R = (v / v.sum())[None] * y[:, None]
    elif rule == "zbox":
        low, high = (unfold(torch.full_like(x[:1], p[s]))[0, :, position] for s in ("low", "high"))
        c = c - low * w.clamp(min=0) - high * w.clamp(max=0)
        R = c * (y / c.sum(1))[:, None]
    else:
        raise AssertionError(rule)
    fold = torch.zeros(n, patches.shape[1], positions, dtype=x.dtype)
    fold[:, :, position] = R
    assert out_channels * positions > j
    return F.fold(fold, x.shape[-2:], k, padding=pad, stride=stride)


RULES = [
    ("z", Z(), {}),
    ("epsilon", Epsilon(0.3), {"epsilon": 0.3}),
    ("alphabeta", ZPlus(stabilizer=0.0), {"alpha": 1.0, "beta": 0.0}),
    ("alphabeta", AlphaBeta(2, 1, stabilizer=0.0), {"alpha": 2.0, "beta": 1.0}),
    ("alphabeta", AlphaBeta(3, 2, stabilizer=0.0), {"alpha": 3.0, "beta": 2.0}),
    ("w2", WSquare(stabilizer=0.0), {}),
    ("flat", Flat(stabilizer=0.0), {}),
    ("zbox", ZBox(-3.0, 3.0, stabilizer=0.0), {"low": -3.0, "high": 3.0}),
]


@pytest.mark.parametrize(("name", "rule", "params"), RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("unit", [0, 7, 40])
def test_rule_equals_formula_on_a_conv_layer(name, rule, params, unit) -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    model = nn.Sequential(conv, nn.Flatten()).eval()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)  # signed: the x⁻ terms are exercised
    ours = LRP(model, rule).attribute(x, target=unit)
    assert_relative(ours, reference(name, x, conv, unit, **params), rtol=1e-10)


def test_rules_on_a_linear_layer_equal_the_conv_formula() -> None:
    """A Linear layer is a 1×1 convolution of a 1×1 image: the same formulas."""
    torch.manual_seed(5)
    linear = nn.Linear(6, 4).double()
    conv = nn.Conv2d(6, 4, 1).double()
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        conv.bias.copy_(linear.bias)
    x = torch.randn(3, 6, dtype=torch.float64)
    for name, rule, params in RULES:
        ours = LRP(nn.Sequential(linear), rule).attribute(x, target=2)
        expected = reference(name, x[:, :, None, None], conv, 2, **params)
        assert_relative(ours, expected.reshape(3, 6), rtol=1e-10)


# ------------------------------------------------------------------ conservation


@pytest.mark.parametrize("preset", list(PRESETS))
def test_conservation_without_biases(preset: str) -> None:
    """ε → 0 and no biases: the input relevance sums to the logit (per sample)."""
    # w² and flat give relevance to inactive units: the gate would drop it (so: pass_relu), and
    # so would an average pool over a window of zeros (so: the model with max pools only).
    pass_relu = preset in ("w2", "flat")
    model, x = vgg(bias=False, padding=0 if pass_relu else 1), images()
    target = torch.tensor([0, 1, 2])
    method = LRP(model, preset, epsilon=1e-12, stabilizer=1e-12, pass_relu=pass_relu)
    relevance = method.attribute(x, target)
    logits = model(x).detach()[torch.arange(3), target]
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("bounded", [False, True])
def test_deep_taylor_conserves_without_biases(bounded: bool) -> None:
    model, x = vgg(bias=False), images().clamp(-2, 2)
    bounds = {"low": -2.0, "high": 2.0} if bounded else {}
    relevance = DeepTaylor(model, stabilizer=1e-12, **bounds).attribute(x, 3)
    logits = model(x).detach()[:, 3]
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits, rtol=1e-8, atol=1e-12)


def test_epsilon_absorbs_relevance() -> None:
    """A large ε keeps less than the logit at the input (|Σ R| shrinks)."""
    model, x = vgg(bias=False), images()
    small = LRP(model, "epsilon", epsilon=1e-9).attribute(x, 0).sum((1, 2, 3)).abs()
    large = LRP(model, "epsilon", epsilon=10.0).attribute(x, 0).sum((1, 2, 3)).abs()
    assert bool((large < small).all())


# ------------------------------------------------------------------ the estimator view


@pytest.mark.parametrize("arch", ["vgg", "functional"])
def test_z_rule_is_gradient_x_input_and_the_identity_estimator(arch: str) -> None:
    """LRP-z equals gradient × input for ReLU nets (Ancona et al. 2018), biases included, and
    PatternAttribution with the identity estimator is LRP-z (method.md §4)."""
    model = vgg(functional_relu=arch == "functional")
    x = images()
    expected = GradientXInput(model).attribute(x, 2)
    assert_relative(LRP(model, "z").attribute(x, 2), expected, rtol=1e-10)
    identity = PatternAttribution(model, estimator="identity").attribute(x, 2)
    assert_relative(identity, expected, rtol=1e-10)


def test_filter_estimator_is_the_w2_rule() -> None:
    """PatternAttribution with the filter estimator is the w² rule (gate kept at ReLUs),
    on a network without zero padding, where both normalise by the whole kernel."""
    model, x = vgg(padding=0), images()
    expected = LRP(model, "w2", stabilizer=0.0).attribute(x, 1)
    result = PatternAttribution(model, estimator="filter").attribute(x, 1)
    assert_relative(result, expected, rtol=1e-10)


def test_filter_estimator_differs_from_w2_only_at_padded_borders() -> None:
    """With zero padding the w² rule normalises over the inputs inside the image (conserving,
    as Zennit), the filter pattern over the whole kernel: the two differ."""
    model, x = vgg(padding=1), images()
    w2 = LRP(model, "w2", stabilizer=0.0).attribute(x, 1)
    filt = PatternAttribution(model, estimator="filter").attribute(x, 1)
    assert not torch.allclose(w2, filt)


# ------------------------------------------------------------------ composition and errors


def test_mapping_by_name_type_and_first_layer() -> None:
    model, x = vgg(), images()
    spec = {"fc2": Z(), nn.Conv2d: ZPlus(), nn.Linear: Epsilon(0.1)}
    method = LRP(model, spec, first=Flat())
    rules = method.assignment
    assert isinstance(rules[model.features[0]], Flat)
    assert isinstance(rules[model.features[3]], ZPlus)
    assert isinstance(rules[model.fc1], Epsilon) and rules[model.fc1].epsilon == 0.1
    assert isinstance(rules[model.fc2], Z)
    assert isinstance(rules[model.features[5]], Norm)
    assert method.attribute(x).shape == x.shape


def test_lrp_on_resnet_with_batchnorm_runs_and_leaves_the_model_alone() -> None:
    model, x = resnet(), images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for preset in ("epsilon_plus", "epsilon_alpha2beta1_flat"):
        relevance = LRP(model, preset).attribute(x)
        assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_clear_errors() -> None:
    model = vgg()
    with pytest.raises(ValueError, match="unknown LRP preset"):
        LRP(model, "epsilon_delta")
    with pytest.raises(ValueError, match="no LRP rule for the layers"):
        LRP(model, {nn.Conv2d: ZPlus()})
    with pytest.raises(ValueError, match="does not have"):
        LRP(model, {"nope": Z(), nn.Module: Z()})
    with pytest.raises(TypeError, match="rules from patternnet.engine.rules|must be a rule"):
        LRP(model, {nn.Linear: "epsilon"})
    with pytest.raises(ValueError, match="alpha − beta = 1"):
        AlphaBeta(2, 2)
    with pytest.raises(ValueError, match="low and high"):
        ZBox(None, 1.0)
    with pytest.raises(ValueError, match="low ≤ high"):
        ZBox(torch.tensor([0.0, 2.0]), 1.0)
    with pytest.raises(ValueError, match="both low and high"):
        DeepTaylor(model, low=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        Epsilon(-1.0)
    with pytest.raises(ValueError, match="broadcast"):
        DeepTaylor(model, low=torch.zeros(1, 2, 1, 1), high=1.0).attribute(images())
    with pytest.raises(ValueError, match="no Linear/Conv"):
        LRP(nn.Sequential(nn.Flatten()), "z")


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_conserve(dims: int) -> None:
    conv = (nn.Conv1d, nn.Conv3d)[dims == 3]
    pool = (nn.MaxPool1d, nn.MaxPool3d)[dims == 3]
    model = nn.Sequential(
        conv(2, 4, 3, padding=1, bias=False), nn.ReLU(), pool(2),
        conv(4, 4, 3, stride=2, padding="valid", bias=False), nn.ReLU(), nn.Flatten(),
        nn.LazyLinear(3, bias=False),
    ).double()
    x = torch.randn((2, 2) + (8,) * dims, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    model.eval()
    for preset in ("z", "epsilon_plus", "epsilon_alpha2beta1_flat"):
        relevance = LRP(model, preset, epsilon=1e-12, stabilizer=1e-12).attribute(x, 1)
        torch.testing.assert_close(
            relevance.flatten(1).sum(1), model(x).detach()[:, 1], rtol=1e-8, atol=1e-12
        )


def test_float32_model_agrees_with_float64() -> None:
    model64, x64 = vgg(), images()
    model32 = vgg().float()
    for preset in ("epsilon_plus_flat", "epsilon_alpha2beta1"):
        r64 = LRP(model64, preset).attribute(x64, 1)
        r32 = LRP(model32, preset).attribute(x64.float(), 1)
        assert r32.dtype == torch.float32
        assert_relative(r32.double(), r64, rtol=1e-4)


def test_reused_module_gets_its_rule_at_every_call() -> None:
    """A Linear applied twice: each call keeps its own input (z rule = gradient × input)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.shared(torch.relu(self.shared(x)))))

    model = Twice().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = GradientXInput(model).attribute(x, 0)
    assert_relative(LRP(model, "z").attribute(x, 0), expected, rtol=1e-10)


class _BiasFreeResidual(nn.Module):
    """conv-ReLU, then two residual blocks ``relu(conv(relu(conv(h))) + h)``, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        conv = lambda: nn.Conv2d(4, 4, 3, padding=1, bias=False)  # noqa: E731
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.convs = nn.ModuleList([conv() for _ in range(4)])
        # A module: LRP splits its relevance in proportion (F.adaptive_avg_pool2d would get the
        # gradient, which also hands relevance to zero inputs, lost at the ReLU gate).
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        for i in (0, 2):
            h = F.relu(self.convs[i + 1](F.relu(self.convs[i](h))) + h)
        return self.fc(self.pool(h).flatten(1))


@pytest.mark.parametrize("preset", ["z", "epsilon", "gamma"])
def test_residual_sums_conserve_relevance(preset: str) -> None:
    """Proportional sums (default) conserve relevance through skip connections; copying it to
    both branches (``additions="copy"``) does not. (Not z⁺/αβ: a residual branch ends in a
    conv without ReLU, whose units with only negative contributions have ``p = 0`` and keep
    the relevance the sum gives them.)"""
    torch.manual_seed(8)
    model = _BiasFreeResidual().double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    logits = model(x).detach()[:, 4]
    options = {"epsilon": 1e-12, "stabilizer": 1e-12}
    relevance = LRP(model, preset, **options).attribute(x, 4)
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits, rtol=1e-8, atol=1e-12)
    copied = LRP(model, preset, additions="copy", **options).attribute(x, 4)
    assert not torch.allclose(copied.sum((1, 2, 3)), logits, rtol=1e-3)


def test_z_rule_is_gradient_x_input_on_a_resnet_with_batchnorm() -> None:
    """With proportional sums and folded BatchNorm, LRP-z (and the identity estimator) is
    still exactly gradient × input."""
    model, x = resnet(), images()
    expected = GradientXInput(model).attribute(x, 3)
    assert_relative(LRP(model, "z").attribute(x, 3), expected, rtol=1e-10)
    identity = PatternAttribution(model, estimator="identity").attribute(x, 3)
    assert_relative(identity, expected, rtol=1e-10)


def test_bounds_put_zbox_on_the_first_layer() -> None:
    model = vgg()
    method = LRP(model, "epsilon_plus", low=-1.0, high=1.0)
    assert isinstance(method.assignment[model.features[0]], ZBox)
    assert isinstance(method.assignment[model.features[3]], ZPlus)
    with pytest.raises(ValueError, match="both low and high"):
        LRP(model, "epsilon", low=0.0)
    with pytest.raises(ValueError, match="additions"):
        LRP(model, "epsilon", additions="split")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stabilizer_adds_epsilon_with_the_sign_and_plus_for_both_zeros(dtype) -> None:
    from patternnet.engine.rules import relevance_ratio, stabilize

    z = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 2.0, -3.0], dtype=dtype)
    sign = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, -1.0], dtype=dtype)
    assert torch.equal(stabilize(z, 1e-6), z + sign * 1e-6)
    relevance = torch.ones_like(z)
    assert torch.equal(relevance_ratio(relevance, z, 0.0)[:2], torch.zeros(2, dtype=dtype))
