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

Attention runs decomposed (:mod:`patternnet.engine.attention`): the input and output
projections are Linear layers (ε rule), ``q kᵀ`` is a product of two activations
(:class:`BilinearProduct`), and :class:`AttentionLRP` is the attention handler of the
softmax and of the weighted sum ``A V``. With ``ε = 0`` every rule above equals the gradient × input
form that ``lxt`` implements (identity rules as ``f(x)/x`` factors on the gradient, ``1/σ``
detached, the gradient at ``q``, ``k``, ``v`` divided by 4, 4, 2), up to units with ``z = 0``
(here they pass nothing; there the gradient still flows). tests/test_attnlrp.py checks that
against ``lxt`` on a torchvision ViT in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import AttentionHandler
from ..backward import Rule
from ._numerics import check_nonnegative, relevance_ratio
from .norms import norm_scale
from .sums import ProportionalSum

__all__ = [
    "AttentionLRP", "BiasShare", "BilinearProduct", "ConstantProduct", "Identity", "NormIdentity",
    "ResidualAndBiasSum", "product_relevance", "softmax_relevance",
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



class Identity(Rule):
    """The identity rule (AttnLRP Eq. 9) for element-wise activations: ``R_x = R``."""

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        return None

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output


class ConstantProduct(Rule):
    """``s * x`` with a fixed ``s`` (a number or a tensor without graph, e.g. attention's
    ``q · 1/√d``): a one-input unit, whose z rule is ``R_x = R``. Installed with
    :func:`~patternnet.engine.backward.product_rules`; products of two graph-carrying
    tensors are not claimed."""

    def operands(self, a: Any, b: Any) -> tuple[Tensor, Tensor] | None:
        """``(x, s)`` when exactly one operand carries the graph."""
        for x, scale in ((a, b), (b, a)):
            fixed = not isinstance(scale, Tensor) or not scale.requires_grad
            if isinstance(x, Tensor) and x.requires_grad and fixed and (
                isinstance(scale, (int, float)) or isinstance(scale, Tensor)
            ):
                return x, torch.as_tensor(scale)
        return None

    def save(self, module: nn.Module | None, x: Any, output: Tensor) -> Any:
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
class _ProductState:
    a: Tensor
    b: Tensor
    z: Tensor


class BilinearProduct(Rule):
    """AttnLRP's rule for a matrix product ``z = a @ b`` of two activations (``q kᵀ``): the
    ε rule over the terms ``a_ik b_kj``, then half of each term to each factor
    (:func:`product_relevance`). Installed with
    :func:`~patternnet.engine.backward.matmul_rules`."""

    def __init__(self, epsilon: float = 0.0) -> None:
        self.epsilon = check_nonnegative("epsilon", epsilon)

    def save(self, module: nn.Module | None, x: Any, output: Tensor) -> Any:
        a, b = x
        return _ProductState(a, b, output.clone())

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Any:
        r_a, r_b = product_relevance(state.a, state.b, grad_output, self.epsilon,
                                     out=state.z)
        return r_a, r_b


class _Softmax(torch.autograd.Function):
    """``softmax(x)`` forward; AttnLRP's softmax rule backward."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor) -> Tensor:
        probs = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(scores, probs)
        return probs

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> Tensor:
        scores, probs = ctx.saved_tensors
        return softmax_relevance(scores, probs, relevance)


class _WeightedSum(torch.autograd.Function):
    """``P @ v`` forward; :func:`product_relevance` backward (shares to ``P`` and ``v``)."""

    @staticmethod
    def forward(ctx: Any, probs: Tensor, values: Tensor, epsilon: float, share_p: float,
                share_v: float) -> Tensor:
        out = torch.matmul(probs, values)
        ctx.save_for_backward(probs, values, out)
        ctx.rule = (epsilon, share_p, share_v)
        return out

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Any, ...]:
        probs, values, out = ctx.saved_tensors
        epsilon, share_p, share_v = ctx.rule
        r_p, r_v = product_relevance(probs, values, relevance, epsilon, share_p, share_v,
                                     out=out)
        if r_p is None:
            r_p = torch.zeros_like(probs)
        return r_p, r_v, None, None, None


class _HeldNorm(torch.autograd.Function):
    """``t / max(‖t‖, eps)`` forward; the relevance passes unchanged backward (the norm held:
    per element a one-input unit, whose z rule is the identity, as LayerNorm's ``σ``)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, eps: float) -> Tensor:
        return torch.nn.functional.normalize(t, dim=-1, eps=eps)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Any, ...]:
        return relevance, None


class AttentionLRP(AttentionHandler):
    """AttnLRP (or CP-LRP) at attention's softmax and weighted sum (the attention handler).

    Attention runs decomposed (:mod:`patternnet.engine.attention`): the input projection is
    a Linear layer (ε rule), ``q kᵀ`` a product of two activations (:class:`BilinearProduct`),
    then this handler's softmax (:func:`softmax_relevance`) and weighted sum ``P V``
    (:func:`product_relevance`), then the output projection (ε rule).

    Parameters
    ----------
    epsilon:
        ε of the weighted sum's denominator (0: a plain division, as ``lxt``'s gradient ×
        input form).
    conservative:
        False: AttnLRP (``P`` and ``V`` get half each); True: CP-LRP (attention
        probabilities held fixed: ``V`` gets all of it, the softmax none), what ``lxt``
        applies to torchvision's vision transformers.
    """

    def __init__(self, epsilon: float = 0.0, *, conservative: bool = False) -> None:
        self.epsilon = check_nonnegative("epsilon", epsilon)
        self.conservative = bool(conservative)

    def softmax(self, name: str, scores: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and scores.requires_grad):
            return torch.softmax(scores, dim=-1)
        return _Softmax.apply(scores)

    def normalize(self, name: str, t: Tensor, eps: float = 1e-12) -> Tensor:
        """Swin V2's cosine attention ``q/‖q‖``, ``k/‖k‖``: the norm held, ``R`` passes."""
        if not (torch.is_grad_enabled() and t.requires_grad):
            return torch.nn.functional.normalize(t, dim=-1, eps=eps)
        return _HeldNorm.apply(t, eps)

    def weighted_sum(self, name: str, probs: Tensor, values: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and values.requires_grad):
            return torch.matmul(probs, values)
        shares = (0.0, 1.0) if self.conservative else (0.5, 0.5)
        return _WeightedSum.apply(probs, values, self.epsilon, *shares)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(epsilon={self.epsilon!r}, "
                f"conservative={self.conservative!r})")
