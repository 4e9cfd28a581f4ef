"""PatternNet and PatternAttribution through the attention's weighted sum (method.md §12).

The weighted sum ``y[n, h, i, c] = Σ_j P[n, h, i, j] · v[n, h, j, c]`` is, per head, query
and channel, a linear neuron over the keys' values whose weights are the attention
probabilities ``P``, held constant on the way back (the data-dependent factor, like a ReLU's
mask), with the fitted pattern ``a[h, i, j] = cov(v_j, y_i) / var(y_i)``
(:mod:`patternnet.patterns.attention_statistics`). On the way back:

- PatternNet passes ``s_v[n, h, j, c] = Σ_i a[h, i, j] · s[n, h, i, c]`` to the values (``a``
  the joint pattern ``a_joint`` of the fit where it holds one, method.md §12), where
  the gradient passes ``Σ_i P[n, h, i, j] · g[n, h, i, c]`` (signal copied to every token the
  query attends to, background included);
- PatternAttribution passes ``Σ_i (P ⊙ a)[n, h, i, j] · r[n, h, i, c]`` (``w ⊙ a``, the
  per-query ``a``: it recovered the ground-truth signal better than the joint one);
- the filter estimator uses ``a = P / Σ_j P²`` per sample and query (``w / wᵀw``);
- nothing flows into the probabilities (held), hence nothing into Q and K: their rows of the
  input projection receive zero.

Installed as the :class:`~patternnet.engine.attention.AttentionHandler` of the pattern
methods (their ``attention_handler``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..attention import AttentionHandler

__all__ = ["AttentionPatterns"]


class _HeldWeightedSum(torch.autograd.Function):
    """``P @ v`` forward; ``coefficientᵀ g`` to ``v`` backward, nothing to ``P``."""

    @staticmethod
    def forward(ctx: Any, probs: Tensor, values: Tensor, coefficient: Tensor) -> Tensor:
        ctx.save_for_backward(coefficient)
        return torch.matmul(probs, values)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        (coefficient,) = ctx.saved_tensors
        return None, torch.matmul(coefficient.transpose(-2, -1), grad), None


class AttentionPatterns(AttentionHandler):
    """The pattern methods' rule for attention (see the module docstring).

    Parameters
    ----------
    patterns:
        Fitted :class:`~patternnet.patterns.store.Patterns` (their ``nodes`` hold
        ``"attention#k"``), or None for the filter estimator.
    estimator:
        ``"two_component"``, ``"linear"`` (both use the fitted linear pattern) or
        ``"filter"``.
    attribution:
        False: PatternNet (``a``); True: PatternAttribution (``P ⊙ a``).
    joint:
        True (default; PatternNet's choice): the node's joint pattern ``a_joint`` (all queries
        of a head regressed at once,
        :func:`~patternnet.patterns.attention_statistics.attention_joint_pattern`) where the
        patterns hold it; False (PatternAttribution's choice), or patterns fitted before it
        existed: the per-query pattern ``a``.
    """

    def __init__(
        self, patterns: Any, estimator: str, *, attribution: bool, joint: bool = True
    ) -> None:
        self.patterns = patterns
        self.estimator = estimator
        self.attribution = attribution
        self.joint = joint

    def pattern(self, name: str, heads: int, length: int, source: int) -> Tensor:
        """The fitted ``(H, L, S)`` pattern of the call ``name``."""
        nodes = getattr(self.patterns, "nodes", {}) or {}
        tensors = nodes.get(name)
        what = f"{name} (attention of {heads} heads, {length} queries, {source} keys)"
        if tensors is None or "a" not in tensors:
            fitted = sorted(n for n in nodes if n.startswith("attention#")) or "none"
            raise ValueError(
                f"the patterns hold no pattern for {what}; attention patterns: {fitted}. Fit "
                "them on this model with patternnet.fit_patterns(model, data)"
            )
        a = tensors["a_joint"] if self.joint and "a_joint" in tensors else tensors["a"]
        if tuple(a.shape) != (heads * length, source):
            raise ValueError(
                f"the pattern of {name} is {tuple(a.shape)} but the model's {what} needs "
                f"({heads * length}, {source}): fitted on sequences of another length "
                "(images of another size) or another model; fit them again"
            )
        return a.reshape(heads, length, source)

    def weighted_sum(self, name: str, probs: Tensor, values: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not values.requires_grad:
            return torch.matmul(probs, values)
        held = probs.detach()
        if self.estimator == "filter":
            coefficient = held / (held * held).sum(-1, keepdim=True).clamp_min(1e-30)
        else:
            _, heads, length, source = held.shape
            coefficient = self.pattern(name, heads, length, source).to(held)[None]
        if self.attribution:
            coefficient = held * coefficient
        else:
            coefficient = coefficient.expand_as(held)
        return _HeldWeightedSum.apply(held, values, coefficient)
