"""PatternNet on transformers: the joint attention pattern and the consistency scale (§12).

Float64 reference formulas for both; the scale keeps the signal of a 12-block ViT-B/16 in
float32's range (without it the signal grows 10⁵–10⁶ per block and overflows after about
seven blocks); CNNs are unchanged (the scale is off without attention).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import patternnet as pn
from patternnet.engine.rules.scale import consistency_scale
from test_attention import FEAT, H, T, _explicit, _net


def _reference_scale(weight: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``tr(W Aᵀ) / ‖W Aᵀ‖²_F`` of ``(O, D)`` matrices (float64)."""
    product = weight @ pattern.T
    return torch.trace(product) / (product * product).sum()


@pytest.mark.parametrize("shape", [(6, 4), (4, 12), (40, 5)])
def test_consistency_scale_is_the_least_squares_scalar(shape: tuple[int, int]) -> None:
    weight = torch.randn(shape, dtype=torch.float64)
    pattern = torch.randn(shape, dtype=torch.float64)
    factor = consistency_scale(nn.Linear(shape[1], shape[0]), weight, pattern)
    expected = _reference_scale(weight, pattern)
    torch.testing.assert_close(factor, expected.expand(shape[0]), rtol=1e-10, atol=0)
    # it minimises ‖c·WAᵀ − I‖_F over c
    product = weight @ pattern.T
    eye = torch.eye(shape[0], dtype=torch.float64)

    def loss(c: torch.Tensor) -> torch.Tensor:
        return ((c * product - eye) ** 2).sum()

    for step in (1e-3, -1e-3):
        assert loss(factor[0]) <= loss(factor[0] * (1 + step))


def test_consistency_scale_per_projection_and_per_group() -> None:
    weight = torch.randn(9, 5, dtype=torch.float64)
    pattern = torch.randn(9, 5, dtype=torch.float64)
    factor = consistency_scale(nn.Linear(5, 9), weight, pattern, blocks=3)
    for k in range(3):
        rows = slice(3 * k, 3 * k + 3)
        torch.testing.assert_close(factor[rows], _reference_scale(weight[rows], pattern[rows])
                                   .expand(3), rtol=1e-10, atol=0)  # fmt: skip
    conv = nn.Conv2d(4, 6, 3, groups=2)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    pattern = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    factor = consistency_scale(conv, weight, pattern)
    for g in range(2):
        rows = slice(3 * g, 3 * g + 3)
        expected = _reference_scale(weight[rows].flatten(1), pattern[rows].flatten(1))
        torch.testing.assert_close(factor[rows], expected.expand(3), rtol=1e-10, atol=0)


@torch.no_grad()
def test_joint_attention_pattern_is_the_regression_on_all_queries() -> None:
    net = _net()
    data = torch.randn(300, T * FEAT, dtype=torch.float64)
    patterns = pn.fit_patterns(net, data, estimator="linear", batch_size=64, progress=False)
    ref = _explicit(net, data)
    v = ref["v"] - ref["v"].mean(0, keepdim=True)  # (N, H, S, C)
    y = ref["y"] - ref["y"].mean(0, keepdim=True)  # (N, H, L, C)
    cov_yv = torch.einsum("nhic,nhjc->hij", y, v)
    cov_yy = torch.einsum("nhic,nhkc->hik", y, y)
    expected = torch.linalg.solve(cov_yy, cov_yv)  # full rank here: no cut-off
    fitted = patterns.nodes["attention#0"]["a_joint"].reshape(H, T + 1, T + 1)
    torch.testing.assert_close(fitted, expected, rtol=1e-8, atol=1e-10)


def test_rescale_is_on_for_attention_and_off_for_cnns() -> None:
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    cnn = cnn.double().eval()
    data = torch.randn(64, 1, 8, 8, dtype=torch.float64)
    patterns = pn.fit_patterns(cnn, data, progress=False)
    assert not pn.PatternNet(cnn, patterns).rescale
    x = data[:4]
    plain = pn.PatternNet(cnn, patterns).attribute(x, target=0)
    scaled = pn.PatternNet(cnn, patterns, rescale=True).attribute(x, target=0)
    # a chain: one factor per layer, so the direction is the same, the magnitude not
    c = [consistency_scale(m, m.weight, patterns[n]["a_plus"])[0]
         for n, m in (("0", cnn[0]), ("3", cnn[3]))]  # fmt: skip
    torch.testing.assert_close(scaled, plain * c[0] * c[1], rtol=1e-9, atol=1e-12)
    net = _net()
    attention_patterns = pn.fit_patterns(net, torch.randn(64, T * FEAT, dtype=torch.float64),
                                         progress=False)  # fmt: skip
    assert pn.PatternNet(net, attention_patterns).rescale
    assert not pn.PatternNet(net, attention_patterns, rescale=False).rescale
    with pytest.raises(TypeError, match="rescale"):
        pn.PatternNet(net, attention_patterns, rescale="yes")


def test_vit_b_16_explains_in_float32_without_overflow() -> None:
    """12 blocks of ViT-B/16 (random weights, re-initialised head, 5 tokens, fitted on 8
    images): without the scale the signal reaches ~1e64 in float64 and float32 overflows."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tvm.vit_b_16(image_size=32, num_classes=10).eval()
        nn.init.normal_(model.heads.head.weight, std=0.02)
        data = torch.randn(8, 3, 32, 32)
        patterns = pn.fit_patterns(model, data, batch_size=8, progress=False)
    x = data[:2]
    signal = pn.PatternNet(model, patterns).attribute(x)
    assert signal.dtype == torch.float32 and torch.isfinite(signal).all()
    norm = signal.flatten(1).norm(dim=1)
    assert (norm > 0).all() and (norm < 1e6).all(), norm
    reference = pn.PatternNet(model.double(), patterns.to(dtype=torch.float64)).attribute(
        x.double()
    )
    torch.testing.assert_close(signal.double(), reference, rtol=1e-3, atol=1e-4 * float(norm.max()))
    attribution = pn.PatternAttribution(model.float(), patterns).attribute(x)
    assert torch.isfinite(attribution).all()


def test_scales_are_computed_once_per_weight_and_pattern(monkeypatch) -> None:
    import patternnet.engine.rules.scale as scale

    net = _net()
    patterns = pn.fit_patterns(net, torch.randn(64, T * FEAT, dtype=torch.float64),
                               progress=False)  # fmt: skip
    x = torch.randn(3, T * FEAT, dtype=torch.float64)
    first = pn.PatternNet(net, patterns).attribute(x, target=1)
    calls = []
    original = scale.consistency_scale
    monkeypatch.setattr(scale, "consistency_scale",
                        lambda *a, **k: calls.append(1) or original(*a, **k))  # fmt: skip
    again = pn.PatternNet(net, patterns).attribute(x, target=1)  # a new method object
    assert calls == []
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with torch.no_grad():
        net.head.weight.mul_(2.0)  # changed in place: its factor is computed again
    pn.PatternNet(net, patterns).attribute(x, target=1)
    assert len(calls) == 1
