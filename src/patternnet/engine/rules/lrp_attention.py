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
attention: query, key and value the same tensor): its in-projections (ε rule), the product
``q kᵀ``, the softmax, the product ``A V`` and the output projection (ε rule), recomputed on the
way back from the saved input. With ``ε = 0`` every rule above equals the gradient × input
form that ``lxt`` implements (identity rules as ``f(x)/x`` factors on the gradient, ``1/σ``
detached, the gradient at ``q``, ``k``, ``v`` divided by 4, 4, 2), up to units with ``z = 0``
(here they pass nothing; there the gradient still flows). tests/test_attnlrp.py checks that
against ``lxt`` on a torchvision ViT in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
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
    x: Tensor
    batch_first: bool


def _projections(module: nn.MultiheadAttention) -> list[tuple[Tensor, Tensor | None]]:
    """``[(W_q, b_q), (W_k, b_k), (W_v, b_v)]`` of ``module`` (packed or separate weights)."""
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.detach().split(e)
    else:
        weights = (module.q_proj_weight.detach(), module.k_proj_weight.detach(),
                   module.v_proj_weight.detach())
    bias = module.in_proj_bias
    biases = bias.detach().split(e) if bias is not None else (None, None, None)
    return list(zip(weights, biases))


class AttentionLRP(Rule):
    """AttnLRP (or CP-LRP) through one ``nn.MultiheadAttention`` self-attention call.

    The relevance arriving at the attention's output goes back through the output projection
    (ε rule), ``O = A V`` (:func:`product_relevance`), the softmax
    (:func:`softmax_relevance`), ``S = q kᵀ/√d`` (:func:`product_relevance`) and the three
    in-projections (ε rule) to the input; the decomposed attention is recomputed from the
    saved input on the way back (the module's own forward may run a fused kernel).

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
        same tensor (cross-attention), attention masks, ``bias_k``/``bias_v``,
        ``add_zero_attn``, unbatched inputs.
    """

    reads_call = True

    def __init__(self, epsilon: float = 0.0, *, conservative: bool = False) -> None:
        self.epsilon = check_nonnegative("epsilon", epsilon)
        self.conservative = bool(conservative)

    def save(self, module: nn.Module | None, x: Any, output: Tensor) -> Any:
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError("AttentionLRP is a rule for nn.MultiheadAttention modules")
        args, kwargs = x
        names = ("query", "key", "value")
        given = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
        query = given[0]
        if any(t is not query for t in given):
            raise NotImplementedError(
                "the AttnLRP rule covers self-attention only (query, key and value the same "
                "tensor); this nn.MultiheadAttention call has different ones"
            )
        masks = [n for n in ("key_padding_mask", "attn_mask") if kwargs.get(n) is not None]
        masks += ["is_causal"] if kwargs.get("is_causal") else []
        if len(args) > 3:
            masks.append("positional mask arguments")
        if masks:
            raise NotImplementedError(
                f"the AttnLRP rule does not support {', '.join(masks)} yet; call the attention "
                "without masks"
            )
        if module.bias_k is not None or module.add_zero_attn:
            raise NotImplementedError(
                "the AttnLRP rule does not support bias_k/bias_v or add_zero_attn"
            )
        if query.dim() != 3:
            raise NotImplementedError("the AttnLRP rule needs batched (3-d) attention inputs")
        return _AttentionState(query.detach(), module.batch_first)

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        assert isinstance(module, nn.MultiheadAttention)
        eps = self.epsilon
        x, r_out = state.x, grad_output
        if not state.batch_first:  # (L, N, E) → (N, L, E)
            x, r_out = x.transpose(0, 1), r_out.transpose(0, 1)
        n, length, _ = x.shape
        heads, dim = module.num_heads, module.head_dim
        dtype = x.dtype
        projections = [(w.to(dtype), None if b is None else b.to(dtype))
                       for w, b in _projections(module)]
        with torch.no_grad():
            q, k, v = (torch.nn.functional.linear(x, w, b) for w, b in projections)

            def split(t: Tensor) -> Tensor:  # (N, L, E) → (N, h, L, d)
                return t.reshape(n, length, heads, dim).transpose(1, 2)

            qh, kh, vh = split(q), split(k), split(v)
            scale = 1.0 / math.sqrt(dim)
            logits = (qh * scale) @ kh.transpose(-1, -2)
            attention = logits.softmax(-1)
            heads_out = attention @ vh
            merged = heads_out.transpose(1, 2).reshape(n, length, heads * dim)
            w_o = module.out_proj.weight.detach().to(dtype)
            b_o = module.out_proj.bias
            out = torch.nn.functional.linear(
                merged, w_o, None if b_o is None else b_o.detach().to(dtype)
            )
            r_merged = _linear_relevance(merged, w_o, out, r_out, eps)
            r_heads = r_merged.reshape(n, length, heads, dim).transpose(1, 2)
            share_a = 0.0 if self.conservative else 0.5
            share_v = 1.0 if self.conservative else 0.5
            r_attention, r_v = product_relevance(attention, vh, r_heads, eps, share_a, share_v,
                                                 out=heads_out)
            relevance = []
            if r_attention is not None:
                r_logits = softmax_relevance(logits, attention, r_attention)
                r_q, r_k = product_relevance(qh * scale, kh.transpose(-1, -2), r_logits, eps,
                                             out=logits)
                relevance += [(q, r_q), (k, r_k.transpose(-1, -2))]
            relevance.append((v, r_v))
            weights = dict(zip(("q", "k", "v"), (w for w, _ in projections)))
            result = torch.zeros_like(x)
            for (z, r), name in zip(relevance, ("q", "k", "v")[-len(relevance):]):
                r = r.transpose(1, 2).reshape(n, length, heads * dim)
                result += _linear_relevance(x, weights[name], z, r, eps)
        return result if state.batch_first else result.transpose(0, 1)
