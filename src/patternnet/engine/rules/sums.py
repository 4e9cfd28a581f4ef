"""Rules for sums and per-channel maps: how what arrives is split between the inputs.

:class:`ProportionalSum` splits the relevance arriving at a residual sum ``a + b`` between the
summands (installed on every spelling of an addition with
:func:`~patternnet.engine.backward.addition_rules`); :class:`ChannelScale` is the rule of a
standalone BatchNorm seen as one linear unit per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..backward import Rule
from ._numerics import check_nonnegative, relevance_ratio

__all__ = ["ChannelScale", "ProportionalSum", "SumState"]


@dataclass
class SumState:
    """What :class:`ProportionalSum` keeps: the summands, the sum (None for the absolute
    split) and their in-place version counters at the time of the sum."""

    a: Tensor
    b: Tensor
    z: Tensor | None
    versions: tuple[int, int, int | None]


class ProportionalSum(Rule):
    """Split what arrives at a sum ``z = a + b`` in proportion to the summands.

    ``R_a = a ⊙ R / stab(z)`` and ``R_b = b ⊙ R / stab(z)``, so ``R_a + R_b = R`` up to the
    stabiliser: the z rule of LRP applied to the addition of a residual block (what Zennit's
    ResNet canonizer does with its ``Sum`` module and ``Norm`` rule). Installed with
    :func:`~patternnet.engine.backward.addition_rules`; the engine hands ``save`` the pair
    ``(a, b)`` and expects a pair back from ``backward``.

    This is the rule for *relevance* (PatternAttribution, LRP): a relevance decomposition
    must split a sum, whereas the gradient — and PatternNet's signal, a modified gradient —
    passes the same value to both summands (no rule). With it, PatternAttribution conserves
    relevance through a residual block: each Linear/Conv layer conserves it (``Σᵢ wᵢaᵢ = 1``)
    and so does the sum.

    With ``absolute=True`` the shares are ``|a| / (|a| + |b|)`` and ``|b| / (|a| + |b|)``:
    the same split where the summands share a sign, but bounded in [0, 1] where they cancel.
    Use it when the relevance arriving at a unit is not proportional to the unit's value, as
    in PatternAttribution: there the signed ratio ``R / z`` explodes where ``z ≈ 0`` (measured
    on a random ResNet-50: relevance totals of −8·10⁸ for logits of 83 with the signed split).

    Parameters
    ----------
    stabilizer:
        ε in ``stab(z) = z + ε·sign(z)`` (sign(0) = +1); 0 gives nothing to both summands
        where ``z = 0``.
    absolute:
        Split by absolute values (see above).
    """

    def __init__(self, *, stabilizer: float = 1e-6, absolute: bool = False) -> None:
        self.stabilizer = check_nonnegative("stabilizer", stabilizer)
        self.absolute = bool(absolute)

    def save(self, module: nn.Module | None, x: Any, output: Tensor) -> Any:
        # References only (no work in the forward pass), with their in-place version counters:
        # the summands' absolute values are formed on the way back, in buffers that then
        # become the results.
        a, b = x
        if self.absolute:  # the sum itself is not needed: do not keep it alive
            return SumState(a, b, None, (a._version, b._version, None))
        return SumState(a, b, output, (a._version, b._version, output._version))

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Any:
        a, b, z, versions = state.a, state.b, state.z, state.versions
        if (a._version, b._version) != versions[:2]:
            raise RuntimeError(
                "a summand of a residual sum was modified in place after the sum (e.g. "
                "x.relu_() after y = x + h); the relevance split needs its value: write the "
                "later operation out of place (x = x.relu())"
            )
        if not self.absolute:
            if z._version != versions[2]:  # the sum itself changed in place (y.relu_())
                z = a + b
            ratio = relevance_ratio(grad_output, z, self.stabilizer)
            to_b = b * ratio
            return ratio.mul_(a), to_b
        # |a| + |b| ≥ 0, so stab(z) = z + ε: seven passes over the sum's shape and three
        # buffers, all in the backward pass.
        to_a, to_b = a.abs(), b.abs()
        z = to_a + to_b
        if self.stabilizer:
            ratio = torch.div(grad_output, z.add_(self.stabilizer), out=z)
        else:
            ratio = (grad_output / z).masked_fill_(z == 0, 0.0)
        return to_a.mul_(ratio), to_b.mul_(ratio)


class ChannelScale(Rule):
    """Multiply what passes back through a per-channel map by a fixed factor per channel.

    The rule of a standalone BatchNorm ``y = s ⊙ x + t`` seen as one linear unit per channel
    (see :func:`patternnet.engine.support.standalone_batchnorm_rules`): its normalised pattern
    is ``a = 1/s``, so PatternNet passes ``g / s`` and PatternAttribution ``g · s · (1/s) = g``.

    Parameters
    ----------
    factor:
        ``(C,)`` factors for the channels (dimension 1 of the module's input).
    """

    def __init__(self, factor: Tensor) -> None:
        self.factor = factor.detach()

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        shape = [1] * grad_output.dim()
        shape[1] = -1
        return grad_output * self.factor.to(grad_output).view(shape)
