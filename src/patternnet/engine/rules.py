"""The rules: what each kind of operation passes backward (method.md §3, §4, §7).

A rule is small: it says what to remember from the forward pass and how to map the quantity
arriving at an operation's output to its input. All of them run inside the one engine of
:mod:`patternnet.engine.backward`.

Linear/Conv rules
    :class:`WeightSwap` — the layer's transposed map with another weight: a pattern ``A``
    (PatternNet), ``W ⊙ A`` (PatternAttribution), or ``W`` itself (the gradient). With two
    weights it is the two-component rule: ``A₊ᵀ(g ⊙ m) + A₋ᵀ(g ⊙ (1 − m))`` with the mask
    ``m = [Wx + b > 0]`` of the forward pass.

ReLU rules
    :class:`DeconvNetReLU` (pass positive values, ignore the forward gate) and
    :class:`GuidedReLU` (forward gate and positive values). The gradient needs no rule.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..layers import LayerGeometry, geometry
from .backward import Rule

__all__ = ["WeightSwap", "DeconvNetReLU", "GuidedReLU"]


class WeightSwap(Rule):
    """Backward through a Linear/Conv layer with ``weight`` in place of ``W``, no bias.

    Parameters
    ----------
    module:
        The layer (its geometry: stride, padding, groups ...).
    positive:
        The weight used where the unit was active (``Wx + b > 0``), or everywhere when
        ``negative`` is None. Shaped like the layer's weight.
    negative:
        The weight used where the unit was not active (two-component rule), or None.
    """

    def __init__(self, module: nn.Module, positive: Tensor, negative: Tensor | None = None):
        self.geometry: LayerGeometry = geometry(module)
        self.positive = positive.detach()
        self.negative = None if negative is None else negative.detach()

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        mask = (output > 0) if self.negative is not None else None
        return x.shape, mask

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        shape, mask = state
        if mask is None:
            return self.geometry.transpose(grad_output, self.positive, shape)
        active = grad_output * mask
        result = self.geometry.transpose(active, self.positive, shape)
        inactive = grad_output - active
        # In a ReLU network the gate already zeroed the inactive units: skip the second map.
        if bool(inactive.any()):
            result = result + self.geometry.transpose(inactive, self.negative, shape)
        return result


class DeconvNetReLU(Rule):
    """DeConvNet (Zeiler & Fergus 2014): ReLU passes ``max(g, 0)``, whatever the input was."""

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output.clamp(min=0)


class GuidedReLU(Rule):
    """Guided BackProp (Springenberg et al. 2015): ``g · [x > 0] · [g > 0]``."""

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        return x > 0

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output.clamp(min=0) * state


def as_dtype(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` on ``like``'s device and dtype (patterns are stored apart from the model)."""
    return tensor.detach().to(device=like.device, dtype=like.dtype)


def elementwise_product(weight: Tensor, pattern: Tensor) -> Tensor:
    """``W ⊙ A`` — the PatternAttribution weight (method.md §4)."""
    return weight.detach() * as_dtype(pattern, weight)


