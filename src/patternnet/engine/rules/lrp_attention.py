"""LRP rules for transformers following AttnLRP (Achtibat et al., ICML 2024).

AttnLRP extends LRP to the operations of an attention model; written as relevance rules
(``R`` the relevance arriving at an operation's output, ``stab(z) = z + ε·sign(z)``):

=======================  ========================================================================
Linear layers            the ε rule (:class:`~patternnet.engine.rules.Epsilon`): the bias absorbs
                         its share
softmax ``s = σ(x)``     ``R_x = x ⊙ (R − s ⊙ Σ R)`` (Prop. 3.1: Deep Taylor at ``x``, with bias),
                         :func:`softmax_relevance`
product ``a · b``        the ε rule on the terms, then half to each factor (uniform rule,
                         Prop. 3.2/3.3): :func:`product_relevance` for ``A V`` and ``q kᵀ``
LayerNorm                the identity rule on ``1/σ`` and ``γ`` (one-input units, Prop. 3.4),
                         the z rule on the centring ``x − μ`` (a linear map with bias ``β``):
                         :class:`NormIdentity`
GELU, SiLU, tanh, ...    the identity rule ``R_x = R`` (Eq. 9): :class:`Identity`
residual sums            the z rule (:class:`~patternnet.engine.rules.ProportionalSum`)
``x + c``, ``c`` fixed    the z rule with ``c`` as a bias: ``R_x = x ⊙ R / stab(x + c)``
                         (:class:`BiasShare`; position embeddings)
=======================  ========================================================================

CP-LRP (Ali et al., ICML 2022), which ``lxt`` applies inside the attention of torchvision's
vision transformers, holds the attention probabilities fixed: the softmax gets nothing and
``A V`` passes all of its relevance to ``V`` (``R_V = V ⊙ Aᵀ(R / stab(AV))``).

:class:`AttentionLRP` applies these rules to a whole ``nn.MultiheadAttention`` call (self
attention: query, key and value the same tensor), which it runs decomposed: its
in-projections (ε rule), the product ``q kᵀ``, the softmax, the product ``A V`` and the output
projection (ε rule). With ``ε = 0`` every rule above equals the gradient × input
form that ``lxt`` implements (identity rules as ``f(x)/x`` factors on the gradient, ``1/σ``
detached, the gradient at ``q``, ``k``, ``v`` divided by 4, 4, 2), up to units with ``z = 0``
(here they pass nothing; there the gradient still flows). tests/test_attnlrp.py checks that
against ``lxt`` on a torchvision ViT in float64.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backward import Rule
from ._numerics import check_nonnegative, relevance_ratio
from .norms import norm_scale
from .sums import ProportionalSum

__all__ = [
    "AttentionLRP", "BiasShare", "Identity", "NormIdentity", "ResidualAndBiasSum",
    "product_relevance", "softmax_relevance",
]


def softmax_relevance(x: Tensor, s: Tensor, relevance: Tensor, dim: int = -1) -> Tensor:
    """AttnLRP's softmax rule ``R_x = x ⊙ (R − s ⊙ Σ_dim R)`` (Prop. 3.1).

    Parameters
    ----------
    x:
        The softmax's input (logits); masked entries (``−inf``) count as 0.
    s:
        Its output ``softmax(x, dim)``.
    relevance:
        ``R`` at the output.
    dim:
        The softmax's dimension.
    """
    x = torch.where(torch.isneginf(x), 0.0, x)
    return x * (relevance - s * relevance.sum(dim, keepdim=True))


def product_relevance(
    a: Tensor, b: Tensor, relevance: Tensor, epsilon: float, share_a: float = 0.5,
    share_b: float = 0.5, out: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Relevance of the factors of a matrix product ``z = a @ b`` (AttnLRP Prop. 3.3).

    The ε rule distributes ``R`` over the terms ``a_ik b_kj`` of each ``z_ij``; each term then
    gives ``share_a`` of its relevance to ``a_ik`` and ``share_b`` to ``b_kj`` (the uniform
    rule: ½ and ½; CP-LRP: 0 and 1).

    Returns
    -------
    tuple
        ``(R_a, R_b)``; an entry is None when its share is 0.
    """
    z = a @ b if out is None else out
    ratio = relevance_ratio(relevance, z, epsilon)
    r_a = a * (ratio @ b.transpose(-1, -2)) * share_a if share_a else None
    r_b = b * (a.transpose(-1, -2) @ ratio) * share_b if share_b else None
    return r_a, r_b


def _linear_relevance(x: Tensor, weight: Tensor, z: Tensor, relevance: Tensor,
                      epsilon: float) -> Tensor:
    """The ε rule of ``z = x Wᵀ + b``: ``R_x = x ⊙ (R / stab(z)) W``."""
    return x * (relevance_ratio(relevance, z, epsilon) @ weight)


class Identity(Rule):
    """The identity rule (AttnLRP Eq. 9) for element-wise activations: ``R_x = R``."""

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        return None

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output


@dataclass
class _NormState:
    x: Tensor
    scale: Tensor
    output: Tensor


def _centre_transpose(module: nn.Module, t: Tensor) -> Tensor:
    """``t`` minus its mean over the axes the normalisation ``module`` takes its mean over
    (the centring ``x − μ(x)`` is symmetric, so this is also its transpose)."""
    if isinstance(module, nn.GroupNorm):
        grouped = t.reshape(t.shape[0], module.num_groups, -1)
        return (grouped - grouped.mean(-1, keepdim=True)).reshape(t.shape)
    if type(module).__name__ == "LayerNorm2d":
        return t - t.mean(1, keepdim=True)
    dims = tuple(range(t.dim() - len(module.normalized_shape), t.dim()))
    return t - t.mean(dims, keepdim=True)


class NormIdentity(Rule):
    """LayerNorm/GroupNorm in AttnLRP: identity on ``γ/σ``, the z/ε rule on the centring.

    ``y = (γ/σ) ⊙ (x − μ(x)) + β`` with ``σ`` held fixed is a linear map of ``x`` with bias
    ``β``; its ε rule is ``R_x = x ⊙ C((γ/σ) ⊙ R / stab(y))`` with ``C`` the centring. This is
    what ``lxt`` computes by detaching ``σ`` (Prop. 3.4).

    Parameters
    ----------
    epsilon:
        ε of ``stab(y)`` (0: a plain division, ``y = 0`` passes nothing).
    """

    def __init__(self, epsilon: float = 0.0) -> None:
        self.epsilon = check_nonnegative("epsilon", epsilon)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        if module is None:
            raise TypeError("NormIdentity is a rule for LayerNorm/GroupNorm modules")
        with torch.no_grad():
            # A copy of the output: the model may change it in place later.
            return _NormState(x.detach(), norm_scale(module, x.detach()),
                              output.detach().clone())

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        ratio = relevance_ratio(grad_output, state.output, self.epsilon)
        return state.x * _centre_transpose(module, ratio * state.scale)


@dataclass
class _BiasState:
    x: Tensor
    z: Tensor


class BiasShare(Rule):
    """``z = x + c`` with a fixed ``c`` (a position embedding): ``R_x = x ⊙ R / stab(z)``.

    The z/ε rule with ``c`` as a bias, which absorbs its share (as a Linear layer's bias does
    under :class:`~patternnet.engine.rules.Epsilon`).
    """

    def __init__(self, epsilon: float = 0.0) -> None:
        self.epsilon = check_nonnegative("epsilon", epsilon)

    def save(self, module: nn.Module | None, x: Any, output: Tensor) -> Any:
        summand, _ = x
        return _BiasState(summand, output.clone())

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return state.x * relevance_ratio(grad_output, state.z, self.epsilon)


class ResidualAndBiasSum(ProportionalSum):
    """:class:`~patternnet.engine.rules.ProportionalSum` for ``a + b`` (both carry the graph)
    and :class:`BiasShare` for ``x + c`` with a fixed ``c`` (installed with
    :func:`~patternnet.engine.backward.addition_rules`)."""

    def __init__(self, *, stabilizer: float = 0.0) -> None:
        super().__init__(stabilizer=stabilizer)
        self.constant_rule = BiasShare(stabilizer)


@dataclass
class _AttentionState:
    """What :class:`AttentionLRP` keeps of one attention call (batch first, per head)."""

    x: Tensor
    weights: tuple[Tensor, Tensor, Tensor]
    q: Tensor
    k: Tensor
    v: Tensor
    logits: Tensor
    attention: Tensor
    heads_out: Tensor
    merged: Tensor
    out_weight: Tensor
    out: Tensor
    batch_first: bool


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class AttentionLRP(Rule):
    """AttnLRP (or CP-LRP) through ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``).

    Installed as the function rule of ``F.multi_head_attention_forward`` (what
    ``nn.MultiheadAttention`` calls when gradients are on; the engine hands the whole call to
    :meth:`call`). The rule runs the attention decomposed — in-projections, ``S = q kᵀ/√d``,
    ``A = softmax(S)``, ``O = A V``, output projection — keeps the intermediate values, and
    on the way back sends the relevance through the output projection (ε rule), ``A V``
    (:func:`product_relevance`), the softmax (:func:`softmax_relevance`), ``q kᵀ`` and the
    three in-projections (ε rule) to the input.

    Parameters
    ----------
    epsilon:
        ε of every denominator (0: plain divisions, as ``lxt``'s gradient × input form).
    conservative:
        False: AttnLRP (the softmax and ``q kᵀ`` get half of ``A V``'s relevance); True:
        CP-LRP (attention probabilities held fixed: ``V`` gets all of it, the softmax none),
        what ``lxt`` applies to torchvision's vision transformers.

    Raises
    ------
    NotImplementedError
        In the forward pass, for calls the rule does not cover: query, key and value not the
        same tensor (cross-attention), attention masks or ``is_causal``, ``bias_k``/``bias_v``,
        ``add_zero_attn``, static keys, dropout in training mode, unbatched inputs.
    """

    replaces_call = True

    def __init__(self, epsilon: float = 0.0, *, conservative: bool = False) -> None:
        self.epsilon = check_nonnegative("epsilon", epsilon)
        self.conservative = bool(conservative)

    def call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run one attention call decomposed: ``(input, state, output, rest)``, or None to
        let the call run as usual (no gradient needed)."""
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query = a["query"]
        if not (torch.is_grad_enabled() and isinstance(query, Tensor) and query.requires_grad):
            return None
        _check_call(a)
        # (L, N, E) as nn.MultiheadAttention passes it; batch first inside, contiguous so
        # that the projections are plain matrix products.
        x = query.detach().transpose(0, 1).contiguous()
        n, length, e = x.shape
        heads = a["num_heads"]
        dim = e // heads
        if a["use_separate_proj_weight"]:
            weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        else:
            weights = tuple(a["in_proj_weight"].split(e))
        weights = tuple(w.detach() for w in weights)
        bias = a["in_proj_bias"]
        biases = bias.detach().split(e) if bias is not None else (None, None, None)
        with torch.no_grad():
            q, k, v = (F.linear(x, w, b) for w, b in zip(weights, biases))

            def split(t: Tensor) -> Tensor:  # (N, L, E) → (N, h, L, d)
                return t.reshape(n, length, heads, dim).transpose(1, 2)

            qh, kh, vh = split(q), split(k), split(v)
            logits = (qh * (1.0 / math.sqrt(dim))) @ kh.transpose(-1, -2)
            attention = logits.softmax(-1)
            heads_out = attention @ vh
            merged = heads_out.transpose(1, 2).reshape(n, length, e)
            w_o = a["out_proj_weight"].detach()
            b_o = a["out_proj_bias"]
            out = F.linear(merged, w_o, None if b_o is None else b_o.detach())
        state = _AttentionState(x, weights, q, k, v, logits, attention, heads_out, merged, w_o,
                                out, False)
        weights_out = None
        if a["need_weights"]:
            weights_out = attention.mean(1) if a["average_attn_weights"] else attention
        # A copy of its own for the model: the state keeps ``out`` (a denominator) unchanged.
        return query, state, out.transpose(0, 1).contiguous(), (weights_out,)

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        eps = self.epsilon
        x, attention, logits = state.x, state.attention, state.logits
        r_out = grad_output.transpose(0, 1)  # (L, N, E) → (N, L, E)
        n, length, e = x.shape
        heads = attention.shape[1]
        dim = e // heads
        with torch.no_grad():
            r_merged = _linear_relevance(state.merged, state.out_weight, state.out, r_out, eps)
            r_heads = r_merged.reshape(n, length, heads, dim).transpose(1, 2)

            def split(t: Tensor) -> Tensor:
                return t.reshape(n, length, heads, dim).transpose(1, 2)

            share_a = 0.0 if self.conservative else 0.5
            share_v = 1.0 if self.conservative else 0.5
            r_attention, r_v = product_relevance(attention, split(state.v), r_heads, eps,
                                                 share_a, share_v, out=state.heads_out)
            w_q, w_k, w_v = state.weights
            result = _linear_relevance(x, w_v, state.v, _merge(r_v), eps)
            if r_attention is not None:
                r_logits = softmax_relevance(logits, attention, r_attention)
                scaled = split(state.q) * (1.0 / math.sqrt(dim))
                r_q, r_k = product_relevance(scaled, split(state.k).transpose(-1, -2), r_logits,
                                             eps, out=logits)
                result += _linear_relevance(x, w_q, state.q, _merge(r_q), eps)
                result += _linear_relevance(x, w_k, state.k, _merge(r_k.transpose(-1, -2)), eps)
        return result.transpose(0, 1)


def _merge(t: Tensor) -> Tensor:
    """(N, h, L, d) → (N, L, h·d)."""
    n, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(n, length, heads * dim)


def _check_call(a: dict) -> None:
    """Refuse attention calls :class:`AttentionLRP` does not cover, naming what is missing."""
    query, key, value = a["query"], a["key"], a["value"]
    if key is not query or value is not query:
        raise NotImplementedError(
            "the AttnLRP rule covers self-attention only (query, key and value the same "
            "tensor); this attention call has different ones"
        )
    missing = [name for name in ("key_padding_mask", "attn_mask", "bias_k", "bias_v",
                                 "static_k", "static_v") if a[name] is not None]
    missing += [name for name in ("is_causal", "add_zero_attn") if a[name]]
    if a["training"] and a["dropout_p"] > 0:
        missing.append("dropout in training mode")
    if query.dim() != 3:
        missing.append("unbatched (2-d) inputs")
    if missing:
        raise NotImplementedError(
            f"the AttnLRP rule does not support {', '.join(missing)} yet; call the attention "
            "without them (eval mode for dropout)"
        )
