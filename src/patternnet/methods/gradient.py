"""The gradient (saliency) and gradient × input: the engine with no rules."""

from __future__ import annotations

from torch import Tensor

from .base import Attribution

__all__ = ["Gradient", "GradientXInput"]


class Gradient(Attribution):
    """The gradient of the selected logit with respect to the input (Simonyan et al. 2014).

    Signed (Captum's ``Saliency`` with ``abs=False``). It shows the filter ``w``, not the
    signal (method.md §1).
    """

    name = "gradient"


class GradientXInput(Attribution):
    """Gradient ⊙ input (Shrikumar et al. 2016); equals LRP-z for bias-free ReLU networks."""

    name = "gradient_x_input"

    def finish(self, inputs: Tensor, grad: Tensor) -> Tensor:
        return grad * inputs
