"""Rules for ReLUs and other activations: what passes backward through the gate.

The gradient needs no rule (the ReLU's own backward pass is its gate ``[x > 0]``).
Install these on every spelling of ReLU with :func:`~patternnet.engine.backward.relu_rules`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backward import Rule

__all__ = ["DeconvNetReLU", "Gate", "GuidedReLU", "Pass"]


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


class Gate(Rule):
    """Pass ``g · [z > 0]``: a smooth activation (GELU, SiLU) as the ReLU it approaches.

    The pattern methods' option ``smooth="gate"`` for GELU and SiLU (method.md §10): the layer
    feeding the activation keeps its two-component patterns split at ``z > 0``, and the
    activation passes what arrives where ``z > 0``, as a ReLU's gate does, instead of
    multiplying by ``f′(z) ∈ [−0.17, 1.13]`` (GELU). Not the default: on the ground-truth
    benchmarks of method.md §10 the derivative recovered the signal better.
    """

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        x = x.detach()
        return torch.gt(x, 0, out=torch.empty_like(x))

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output * state
