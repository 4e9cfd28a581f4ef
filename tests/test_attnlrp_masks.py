"""AttnLRP with masked attention: ``attn_mask`` (boolean, float), ``key_padding_mask``,
``is_causal``, in ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention`` and
``nn.TransformerEncoderLayer`` (the module whose eval-mode fast path is fused).

AttnLRP (and ``lxt``) give a masked position probability 0 and no relevance; an additive mask
enters the scores as a fixed summand (a bias of the scores: it absorbs its share). Checked in
float64 against two references:

- ``lxt``'s own form, computed in this process with lxt's ``divide_gradient`` (no patching):
  gradient × input of the unmodified attention with the gradient at ``q``, ``k``, ``v``
  divided by 4, 4, 2, the mask passed to PyTorch as it is;
- the rules written out term by term with einsum (AttnLRP Prop. 3.1 and 3.3, the ε rule), for
  ε = 0 and ε > 0, where lxt has no ε.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnlrp_common import attnlrp_relevance
from patternnet.engine.attention import decomposed
from patternnet.methods.lrp import AttnLRP

E, H, L, N = 12, 3, 6, 2


def lxt_divide_gradient() -> Any:
    rules = pytest.importorskip("lxt.efficient.rules")
    return rules.divide_gradient


def inputs(seed: int = 0) -> tuple[nn.MultiheadAttention, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    attention = nn.MultiheadAttention(E, H, batch_first=True).double().eval()
    nn.init.normal_(attention.in_proj_bias, std=0.3)
    nn.init.normal_(attention.out_proj.bias, std=0.3)
    x = torch.randn(N, L, E, dtype=torch.float64)
    relevance = torch.randn(N, L, E, dtype=torch.float64)
    return attention, x, relevance


def masks() -> dict[str, dict[str, Any]]:
    """Keyword arguments of ``MultiheadAttention.forward`` for every kind of mask."""
    torch.manual_seed(11)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, 4:] = True
    padding[1, 1] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    blocked = torch.rand(L, L) < 0.3
    blocked.fill_diagonal_(False)  # every query keeps a key
    per_head = torch.rand(N * H, L, L) < 0.3
    per_head[:, torch.arange(L), torch.arange(L)] = False
    return {
        "key_padding_mask": {"key_padding_mask": padding},
        "float_key_padding_mask": {"key_padding_mask": torch.zeros(N, L, dtype=torch.float64)
                                   .masked_fill(padding, -math.inf)},
        "bool_attn_mask": {"attn_mask": blocked},
        "per_head_bool_attn_mask": {"attn_mask": per_head},
        "float_attn_mask_finite": {"attn_mask": 0.5 * torch.randn(L, L, dtype=torch.float64)},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal_and_padding": {"attn_mask": causal, "is_causal": True,
                               "key_padding_mask": torch.zeros(N, L, dtype=torch.float64)
                               .masked_fill(padding, -math.inf)},
    }


def additive(attention_kwargs: dict[str, Any]) -> torch.Tensor:
    """The ``(N, H, L, L)`` additive mask PyTorch applies for these arguments."""
    total = torch.zeros(N, H, L, L, dtype=torch.float64)
    mask = attention_kwargs.get("attn_mask")
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, -math.inf)
        total = total + (mask.reshape(N, H, L, L) if mask.dim() == 3 else mask)
    padding = attention_kwargs.get("key_padding_mask")
    if padding is not None:
        if padding.dtype == torch.bool:
            padding = torch.zeros(padding.shape, dtype=torch.float64).masked_fill(padding,
                                                                                 -math.inf)
        total = total + padding.view(N, 1, 1, L)
    return total


class Attend(nn.Module):
    def __init__(self, attention: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.attention = attention
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False, **self.kwargs)[0]


def rule_relevance(model: nn.Module, x: torch.Tensor, relevance: torch.Tensor,
                   epsilon: float = 0.0, conservative: bool = False) -> torch.Tensor:
    """The relevance AttnLRP's rules pass from ``relevance`` at the model's output to x."""
    return attnlrp_relevance(model, x, relevance, epsilon, conservative)


def lxt_form(attention: nn.MultiheadAttention, x: torch.Tensor, relevance: torch.Tensor,
             kwargs: dict[str, Any], conservative: bool = False) -> torch.Tensor:
    """lxt's AttnLRP (or CP-LRP) as gradient × input: PyTorch's own attention with the
    gradient at q, k, v divided by 4, 4, 2 (CP: q and k detached), the output's relevance
    entering as the gradient ``R / out`` (ε = 0)."""
    divide = lxt_divide_gradient()
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        if conservative:
            q, k, v = x.detach(), x.detach(), x
        else:
            q, k, v = divide(x, 4), divide(x, 4), divide(x, 2)
        # q, k, v are different tensors: PyTorch's general (not self-attention) path.
        out = attention(q, k, v, need_weights=False, **kwargs)[0]
        (grad,) = torch.autograd.grad(out, x, relevance / out)
    return x.detach() * grad


def written_out(attention: nn.MultiheadAttention, x: torch.Tensor, relevance: torch.Tensor,
                mask: torch.Tensor, eps: float, shares: tuple[float, float]) -> torch.Tensor:
    """AttnLRP term by term (einsum), the additive ``mask (N, H, L, L)`` a fixed summand of
    the scores (z rule with the mask as bias; −inf: probability 0, relevance 0)."""

    def stab(z: torch.Tensor) -> torch.Tensor:
        return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)

    d = E // H
    w_q, w_k, w_v = attention.in_proj_weight.detach().split(E)
    b_q, b_k, b_v = attention.in_proj_bias.detach().split(E)
    w_o, b_o = attention.out_proj.weight.detach(), attention.out_proj.bias.detach()
    q = (x @ w_q.T + b_q).reshape(N, L, H, d)
    k = (x @ w_k.T + b_k).reshape(N, L, H, d)
    v = (x @ w_v.T + b_v).reshape(N, L, H, d)
    s = torch.einsum("nihc,njhc->nhij", q, k) / math.sqrt(d)
    masked = s + mask
    a = masked.softmax(-1)
    o = torch.einsum("nhij,njhc->nihc", a, v).reshape(N, L, E)
    out = o @ w_o.T + b_o
    r_o = torch.einsum("nlc,oc,nlo->nlc", o, w_o, relevance / stab(out)).reshape(N, L, H, d)
    ratio = (r_o / stab(o.reshape(N, L, H, d))).permute(0, 2, 1, 3)[:, :, :, None]
    terms = torch.einsum("nhij,njhc->nhijc", a, v) * ratio
    r_a, r_v = shares[0] * terms.sum(-1), shares[1] * terms.sum(2).permute(0, 2, 1, 3)
    result = torch.einsum("nlc,oc,nlo->nlc", x, w_v,
                          r_v.reshape(N, L, E) / stab(v.reshape(N, L, E)))
    if shares[0]:
        finite = torch.isfinite(masked)
        r_masked = torch.where(finite, masked, 0.0) * (r_a - a * r_a.sum(-1, keepdim=True))
        # the mask as a bias of the scores: s gets s / stab(s + mask) of it (0 where −inf)
        r_s = torch.where(finite, s * r_masked / stab(torch.where(finite, masked, 1.0)), 0.0)
        qk = torch.einsum("nihc,njhc->nhijc", q, k) / math.sqrt(d) * (r_s / stab(s))[..., None]
        r_q = 0.5 * qk.sum(3).permute(0, 2, 1, 3).reshape(N, L, E)
        r_k = 0.5 * qk.sum(2).permute(0, 2, 1, 3).reshape(N, L, E)
        for r, w, z in ((r_q, w_q, q), (r_k, w_k, k)):
            result = result + torch.einsum("nlc,oc,nlo->nlc", x, w, r / stab(z.reshape(N, L, E)))
    return result


@pytest.mark.parametrize("kind", list(masks()))
@pytest.mark.parametrize("conservative", [False, True])
def test_masked_multi_head_attention_equals_lxt(kind: str, conservative: bool) -> None:
    attention, x, relevance = inputs()
    kwargs = masks()[kind]
    ours = rule_relevance(Attend(attention, kwargs), x, relevance, conservative=conservative)
    reference = lxt_form(attention, x, relevance, kwargs, conservative)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)
    # Not vacuous: the mask changes the relevance.
    unmasked = rule_relevance(Attend(attention, {}), x, relevance, conservative=conservative)
    assert (ours - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(masks()))
@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("conservative", [False, True])
def test_masked_attention_matches_written_out_formula(kind: str, eps: float,
                                                      conservative: bool) -> None:
    attention, x, relevance = inputs(1)
    kwargs = masks()[kind]
    ours = rule_relevance(Attend(attention, kwargs), x, relevance, eps, conservative)
    expected = written_out(attention, x, relevance, additive(kwargs), eps,
                           (0.0, 1.0) if conservative else (0.5, 0.5))
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-11)


def test_masked_keys_get_no_relevance() -> None:
    """A padded key receives relevance only through its own query path (its value and key
    rows get nothing from other queries): a token padded out everywhere and whose own output
    carries no relevance gets exactly 0."""
    attention, x, relevance = inputs(2)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[:, -1] = True
    relevance[:, -1] = 0.0  # the padded token's own output is not explained
    ours = rule_relevance(Attend(attention, {"key_padding_mask": padding}), x, relevance)
    assert torch.all(ours[:, -1] == 0)
    assert ours[:, :-1].abs().sum() > 0


class SDPA(nn.Module):
    """Q, K, V from Linear layers, ``F.scaled_dot_product_attention`` with a mask, merge."""

    def __init__(self, mask: torch.Tensor | None, causal: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)
        self.mask, self.causal = mask, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.reshape(N, L, H, E // H).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(N, L, E))


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_masked_scaled_dot_product_attention_equals_nn_multihead_attention(kind: str) -> None:
    """SDPA with the same weights and mask gives MultiheadAttention's relevance (SDPA's
    boolean masks mark *allowed* positions, MultiheadAttention's blocked ones)."""
    attention, x, relevance = inputs(3)
    blocked = masks()["bool_attn_mask"]["attn_mask"]
    mha_kwargs, sdpa_mask, causal = {
        "bool": ({"attn_mask": blocked}, ~blocked, False),
        "float": (masks()["float_attn_mask_finite"],
                  masks()["float_attn_mask_finite"]["attn_mask"], False),
        "causal": (masks()["causal"], None, True),
    }[kind]
    sdpa = SDPA(sdpa_mask, causal).double()
    with torch.no_grad():
        sdpa.qkv.weight.copy_(attention.in_proj_weight)
        sdpa.qkv.bias.copy_(attention.in_proj_bias)
        sdpa.out.weight.copy_(attention.out_proj.weight)
        sdpa.out.bias.copy_(attention.out_proj.bias)
    ours = rule_relevance(sdpa, x, relevance)
    expected = rule_relevance(Attend(attention, mha_kwargs), x, relevance)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-11)
    written = written_out(attention, x, relevance, additive(mha_kwargs), 0.0, (0.5, 0.5))
    torch.testing.assert_close(ours, written, rtol=1e-9, atol=1e-11)


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (ReLU MLP) with a padding mask, then a head."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True,
                                                norm_first=norm_first)
        self.head = nn.Linear(E, 2)
        self.padding: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x, src_key_padding_mask=self.padding)[:, 0])


def lxt_form_encoder(model: EncoderLayer, x: torch.Tensor, target: int,
                     conservative: bool) -> torch.Tensor:
    """lxt's gradient × input through the encoder layer written out with PyTorch's modules:
    LayerNorm with σ detached (lxt's LayerNorm rule), attention as in :func:`lxt_form`, ReLU
    and residual sums as they are (their gradient is their rule with ε = 0)."""
    divide = lxt_divide_gradient()
    layer = model.layer

    def norm(module: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        mean = t.mean(-1, keepdim=True)
        std = torch.sqrt(t.var(-1, keepdim=True, unbiased=False) + module.eps).detach()
        return (t - mean) / std * module.weight + module.bias

    def attend(t: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.detach(), t.detach(), t) if conservative else (
            divide(t, 4), divide(t, 4), divide(t, 2))
        return layer.self_attn(q, k, v, key_padding_mask=model.padding, need_weights=False)[0]

    def mlp(t: torch.Tensor) -> torch.Tensor:
        return layer.linear2(torch.relu(layer.linear1(t)))

    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        if layer.norm_first:
            h = x + attend(norm(layer.norm1, x))
            h = h + mlp(norm(layer.norm2, h))
        else:
            h = norm(layer.norm1, x + attend(x))
            h = norm(layer.norm2, h + mlp(h))
        logit = model.head(h[:, 0])[:, target].sum()
        (grad,) = torch.autograd.grad(logit, x)
    return x.detach() * grad


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("conservative", [False, True])
def test_transformer_encoder_layer_with_padding_mask_equals_lxt(norm_first: bool,
                                                                conservative: bool) -> None:
    """The whole method (``attribute``) on ``nn.TransformerEncoderLayer`` with
    ``src_key_padding_mask`` in eval mode (PyTorch's fused path under ``no_grad``, taken
    apart by the decomposition) equals lxt's form; padded tokens get exactly 0."""
    torch.manual_seed(4)
    model = EncoderLayer(norm_first).double().eval()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.2)
            nn.init.normal_(module.bias, 0.0, 0.1)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, 3:] = True
    padding[1, -1] = True
    model.padding = padding
    x = torch.randn(N, L, E, dtype=torch.float64)
    with torch.no_grad():  # the fused eval path runs with this mask, and agrees
        fused = model(x)
    ours = AttnLRP(model, conservative=conservative).attribute(x, target=1)
    with torch.no_grad(), decomposed(model):
        torch.testing.assert_close(model(x), fused, rtol=1e-10, atol=1e-12)
    reference = lxt_form_encoder(model, x, 1, conservative)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)
    assert torch.all(ours[padding] == 0) and ours[~padding].abs().sum() > 0
