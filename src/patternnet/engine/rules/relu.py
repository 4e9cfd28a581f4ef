"""Rules for ReLUs and other activations: what passes backward through the gate.

The gradient needs no rule (the ReLU's own backward pass is its gate ``[x > 0]``).
Install these on every spelling of ReLU with :func:`~patternnet.engine.backward.relu_rules`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..backward import Rule

__all__ = ["DeconvNetReLU", "GuidedReLU", "Pass"]


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


class Pass(Rule):
    """Pass what arrives unchanged (LRP through an activation, ignoring its gate, as Zennit)."""

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output
