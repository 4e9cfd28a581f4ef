"""Attention decomposed (engine/attention.py) and its patterns (method.md §12).

References are float64 formulas written here: the decomposition must compute what PyTorch
computes (values and gradients, masks, both layouts, the fused eval paths), the fitted
attention pattern must be ``cov(v_j, y_i) / var(y_i)`` pooled over samples and channels, and
PatternNet/PatternAttribution must be the backward pass of §12 written out by hand.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patternnet as pn
from every_method import explain_with_every_method
from patternnet.engine.attention import (
    UnsupportedAttentionError,
    attention_projections,
    decomposed,
)
from patternnet.engine.support import UnsupportedModuleError, check_supported, classify
from patternnet.methods.registry import build_method

E, H, T, FEAT, C = 8, 2, 5, 3, 4


class TinyAttention(nn.Module):
    """Embedding → self-attention (class token, position embedding) → head on token 0."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(FEAT, E)
        self.class_token = nn.Parameter(torch.randn(1, 1, E))
        self.pos_embedding = nn.Parameter(torch.randn(1, T + 1, E) * 0.5)
        self.attention = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.head = nn.Linear(E, C)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], T, FEAT))
        h = torch.cat([self.class_token.expand(h.shape[0], -1, -1), h], 1) + self.pos_embedding
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, _ = self.attention(h, h, h, need_weights=False)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out[:, 0])


def _net(batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return TinyAttention(batch_first).double().eval()


# ------------------------------------------------------------------ the decomposition


def _gradient(model: nn.Module, x: torch.Tensor, *args: torch.Tensor) -> tuple:
    x = x.clone().requires_grad_(True)
    out = model(x, *args)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad, weights


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "padding", "causal"])
def test_decomposed_multihead_attention_equals_pytorch(
    batch_first: bool, need_weights: bool, mask: str
) -> None:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).double().eval()
    n, length = 3, 6
    shape = (n, length, E) if batch_first else (length, n, E)
    x = torch.randn(shape, dtype=torch.float64)
    kwargs: dict = {"need_weights": need_weights}
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(length, length) > 0.7
        kwargs["attn_mask"].fill_diagonal_(False)
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(n * H, length, length, dtype=torch.float64)
    elif mask == "padding":
        kwargs["key_padding_mask"] = torch.zeros(n, length, dtype=torch.bool)
        kwargs["key_padding_mask"][:, -2:] = True
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(
            length, dtype=torch.float64
        )
        kwargs["is_causal"] = True

    def run(x: torch.Tensor) -> tuple:
        return mha(x, x, x, **kwargs)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return run(x)[0]

    wrap = Wrap()
    expected, expected_grad, weights = _gradient(wrap, x)
    native_weights = run(x)[1]
    with decomposed(wrap):
        xr = x.clone().requires_grad_(True)
        out, probs = run(xr)
        (grad,) = torch.autograd.grad((out * weights).sum(), xr)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(probs.detach(), native_weights, rtol=1e-12, atol=1e-12)
    else:
        assert probs is None


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_fused_eval_path_is_decomposed(norm_first: bool) -> None:
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(
        E, H, 16, dropout=0.0, batch_first=True, norm_first=norm_first
    ).double().eval()
    x = torch.randn(3, 6, E, dtype=torch.float64)
    with torch.no_grad():
        fused = layer(x)  # eval, no grad: PyTorch's fused kernel
    calls = []
    handle = layer.linear1.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), decomposed(layer) as mode:
        steps = layer(x)
    handle.remove()
    assert mode.count == 1 and calls == [1]  # the submodules ran, attention decomposed
    torch.testing.assert_close(steps, fused, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["plain", "bool", "float", "causal", "3d", "scale"])
def test_decomposed_scaled_dot_product_attention_equals_pytorch(variant: str) -> None:
    torch.manual_seed(3)
    n, heads, length, dim = 2, 3, 5, 4
    shape = (n, length, dim) if variant == "3d" else (n, heads, length, dim)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kwargs: dict = {}
    if variant == "bool":
        kwargs["attn_mask"] = torch.rand(length, length) > 0.3
        kwargs["attn_mask"].fill_diagonal_(True)
    elif variant == "float":
        kwargs["attn_mask"] = torch.randn(n, heads, length, length, dtype=torch.float64)
    elif variant == "causal":
        kwargs["is_causal"] = True
    elif variant == "scale":
        kwargs["scale"] = 0.3
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    with decomposed(nn.Identity()) as mode:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    assert mode.count == 1
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ support


def test_support_check_accepts_attention_class_token_and_position_embedding() -> None:
    net = _net()
    kinds = classify(net)
    assert kinds["attention"].kind == "attention"
    assert kinds[""].kind == "container" and "class_token" in kinds[""].note
    check_supported(net)
    (name,) = attention_projections(net)
    assert name == "attention.in_proj"
    assert attention_projections(net)[name].weight is net.attention.in_proj_weight


def test_unsupported_attention_variants_are_refused_clearly() -> None:
    refused = nn.Sequential(nn.MultiheadAttention(E, H, kdim=3, vdim=3))
    with pytest.raises(UnsupportedModuleError, match="kdim/vdim"):
        check_supported(refused)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(E, H, batch_first=True)
            self.head = nn.Linear(E, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            memory = x.flip(1)
            return self.head(self.attention(x, memory, memory)[0][:, 0])

    with pytest.raises(UnsupportedAttentionError, match="cross-attention"):
        pn.fit_patterns(Cross(), torch.randn(4, 3, E), progress=False)


# ------------------------------------------------------------------ patterns


def _explicit(net: TinyAttention, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward pass written out in float64 (batch first)."""
    d = E // H
    h0 = x.reshape(x.shape[0], T, FEAT) @ net.embed.weight.T + net.embed.bias
    h = torch.cat([net.class_token.expand(x.shape[0], -1, -1), h0], 1) + net.pos_embedding
    qkv = h @ net.attention.in_proj_weight.T + net.attention.in_proj_bias
    q, k, v = (t.reshape(x.shape[0], T + 1, H, d).transpose(1, 2) for t in qkv.chunk(3, -1))
    probs = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, -1)
    y = probs @ v  # (N, H, L, d)
    merged = y.transpose(1, 2).reshape(x.shape[0], T + 1, E)
    out = merged @ net.attention.out_proj.weight.T + net.attention.out_proj.bias
    logits = out[:, 0] @ net.head.weight.T + net.head.bias
    return {"h": h, "v": v, "probs": probs, "y": y, "logits": logits}


def _reference_pattern(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``a[h, i, j] = Σ_c cov(v_jc, y_ic) / Σ_c var(y_ic)``, each channel about its own mean
    over the samples (float64)."""
    vc = v - v.mean(0, keepdim=True)
    yc = y - y.mean(0, keepdim=True)
    cov = torch.einsum("nhjc,nhic->hij", vc, yc)
    var = (yc * yc).sum((0, 3))
    return cov / var[:, :, None]


@torch.no_grad()
def test_fitted_attention_pattern_is_covariance_over_output_variance() -> None:
    net = _net()
    data = torch.randn(300, T * FEAT, dtype=torch.float64)
    patterns = pn.fit_patterns(net, data, estimator="linear", batch_size=64, progress=False)
    ref = _explicit(net, data)
    expected = _reference_pattern(ref["v"], ref["y"])
    fitted = patterns.nodes["attention#0"]["a"]
    assert fitted.shape == (H * (T + 1), T + 1)
    torch.testing.assert_close(fitted.reshape(H, T + 1, T + 1), expected, rtol=1e-9,
                               atol=1e-12)  # fmt: skip
    assert set(patterns) >= {"embed", "attention.in_proj", "attention.out_proj", "head"}


@pytest.mark.parametrize("attribution", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_pattern_methods_through_attention_match_the_written_out_backward(
    attribution: bool, batch_first: bool
) -> None:
    net = _net(batch_first)
    data = torch.randn(300, T * FEAT, dtype=torch.float64)
    patterns = pn.fit_patterns(net, data, estimator="linear", batch_size=64, progress=False)
    x = torch.randn(4, T * FEAT, dtype=torch.float64)
    target = 2
    method = pn.PatternAttribution if attribution else pn.PatternNet
    result = method(net, patterns).attribute(x, target=target)

    with torch.no_grad():
        ref = _explicit(net, x)

        def back(name: str, weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            a = patterns[name]["a"]
            if not attribution:  # PatternNet's consistency scale tr(WAᵀ)/‖WAᵀ‖²_F (§12)
                blocks = 3 if name.endswith("in_proj") else 1
                parts = zip(weight.chunk(blocks), a.chunk(blocks))
                a = torch.cat([p * (w * p).sum() / ((w @ p.T) ** 2).sum() for w, p in parts])
            return g @ (weight * a if attribution else a)

        n, d = x.shape[0], E // H
        g = torch.zeros(n, C, dtype=torch.float64)
        g[:, target] = ref["logits"][:, target]
        g_token = back("head", net.head.weight, g)
        g_out = torch.zeros(n, T + 1, E, dtype=torch.float64)
        g_out[:, 0] = g_token
        g_merged = back("attention.out_proj", net.attention.out_proj.weight, g_out)
        g_y = g_merged.reshape(n, T + 1, H, d).transpose(1, 2)
        joint = "a" if attribution else "a_joint"  # PatternNet: the joint pattern (§12)
        a = patterns.nodes["attention#0"][joint].reshape(H, T + 1, T + 1)
        coefficient = ref["probs"] * a if attribution else a.expand_as(ref["probs"])
        g_v = coefficient.transpose(-2, -1) @ g_y  # nothing to Q and K: probabilities held
        g_qkv = torch.cat(
            [torch.zeros(n, T + 1, 2 * E, dtype=torch.float64),
             g_v.transpose(1, 2).reshape(n, T + 1, E)], -1,
        )  # fmt: skip
        g_h = back("attention.in_proj", net.attention.in_proj_weight, g_qkv)
        expected = back("embed", net.embed.weight, g_h[:, 1:]).reshape(n, -1)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-12)


def test_every_registry_method_explains_attention_models_without_changing_them() -> None:
    net = _net()
    layer_model = nn.Sequential(
        nn.Linear(FEAT, E),
        nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True, norm_first=True),
        nn.Flatten(), nn.Linear(T * E, C),
    ).double().eval()  # fmt: skip
    for model, shape in ((net, (T * FEAT,)), (layer_model, (T, FEAT))):
        before = copy.deepcopy(model.state_dict())
        names = [name for name, _ in model.named_modules()]
        data = torch.randn(64, *shape, dtype=torch.float64)
        patterns = pn.fit_patterns(model, data, progress=False)
        assert any(name.startswith("attention#") for name in patterns.nodes)
        explain_with_every_method(model, patterns, data[:3])
        assert [name for name, _ in model.named_modules()] == names
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_gradient_method_through_decomposed_attention_is_the_gradient() -> None:
    net = _net()
    x = torch.randn(3, T * FEAT, dtype=torch.float64)
    patterns = pn.fit_patterns(net, torch.randn(32, T * FEAT, dtype=torch.float64),
                               progress=False)  # fmt: skip
    result = build_method("gradient", net, patterns).attribute(x, target=1)
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net(xr)[:, 1].sum(), xr)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_two_component_fit_of_attention_without_rectifiers_is_linear(activation: str) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(FEAT, E),
        nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True,
                                   activation=activation),
        nn.Flatten(), nn.Linear(T * E, C),
    ).double().eval()  # fmt: skip
    data = torch.randn(64, T, FEAT, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patterns = pn.fit_patterns(model, data, progress=False)
    linear = activation == "gelu"  # a ReLU MLP keeps the two-component split
    assert any("no rectifier" in str(w.message) for w in caught) == linear
    assert ("a" in patterns["3"]) == linear and ("a_plus" in patterns["3"]) != linear
    sums = [name for name in patterns.nodes if name.startswith("sum#")]
    assert sums and all(("a" in patterns.nodes[n]) == linear for n in sums)
    if linear:
        reference = pn.fit_patterns(model, data, estimator="linear", progress=False)
        torch.testing.assert_close(patterns["3"]["a"], reference["3"]["a"])
