"""Numerics shared by the relevance rules: stabilised denominators and their buffers.

``stab(z) = z + ε·sign(z)`` with sign(0) = +1 (the convention Zennit uses); ``ε = 0`` means a
plain division where units with ``z = 0`` pass no relevance.

Cost: ratios are divided into the rule's own buffers (taken in the forward pass), so the
saved values serve one backward pass; :func:`consume` refuses a second one instead of
reading overwritten values.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_nonnegative",
    "constant",
    "consume",
    "denominator",
    "divide",
    "relevance_ratio",
    "stabilize",
]


@functools.lru_cache(maxsize=64)
def constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor holding ``value``, made once per dtype and device.

    Made anew at every call it is a copy from the host to the GPU, which waits for the GPU
    (one synchronisation per stabilised layer and residual sum: 19 per ResNet-50 explanation).
    """
    return torch.tensor(value, dtype=dtype, device=device)


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + ε·sign(z)`` with ``sign(0) = +1``, so that no denominator is zero."""
    # z + 0.0 turns −0.0 into +0.0, so copysign gives +ε for both zeros; written into one
    # buffer this is ~4× faster than torch.where with scalar operands.
    shifted = z + 0.0
    torch.copysign(constant(epsilon, z.dtype, z.device), shifted, out=shifted)
    return shifted.add_(z)


def relevance_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """``R / stab(z)``; for ``ε = 0`` units with ``z = 0`` pass nothing (no NaN)."""
    if epsilon:
        stabilized = stabilize(z, epsilon)
        if stabilized.shape != relevance.shape:  # a per-layer denominator (w², flat)
            return relevance / stabilized
        return torch.div(relevance, stabilized, out=stabilized)
    return (relevance / z).masked_fill_(z == 0, 0.0)


def denominator(z: Tensor, epsilon: float, *, fresh: bool) -> Tensor:
    """``stab(z)`` (``z`` itself for ``ε = 0``) as a tensor of the rule's own, taken in the
    forward pass; ``fresh`` says ``z`` is already one (not the module's output)."""
    if epsilon:
        return stabilize(z, epsilon)
    return z if fresh else z.clone()


def divide(relevance: Tensor, stabilized: Tensor, epsilon: float) -> Tensor:
    """``R / stab(z)`` written into the denominator (from :func:`denominator`); for
    ``ε = 0`` units with ``z = 0`` pass nothing, as in :func:`relevance_ratio`."""
    if epsilon:
        return torch.div(relevance, stabilized, out=stabilized)
    return torch.div(relevance, stabilized).masked_fill_(stabilized == 0, 0.0)


def consume(box: list) -> Any:
    """Take what a rule saved for one backward pass (it is then overwritten in place).

    LRP rules divide into the denominators they computed in the forward pass instead of
    allocating new tensors; a second backward pass through the same forward pass
    (``retain_graph=True``) would read overwritten values, so it is refused.
    """
    if not box:
        raise RuntimeError(
            "this LRP rule's forward values were already used by a backward pass and are "
            "overwritten; run the forward pass again for each backward pass (retain_graph is "
            "not supported by LRP rules)"
        )
    return box.pop()


def check_nonnegative(name: str, value: float) -> float:
    """``value`` as a float; a clear error unless it is a number ≥ 0."""
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{name} must be a number ≥ 0, got {value!r}")
    return value
