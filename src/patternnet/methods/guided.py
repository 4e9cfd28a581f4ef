"""DeConvNet and Guided BackProp: the gradient with a different backward pass through ReLUs.

Both backpropagate the weights ``W`` like the gradient and so show the filter, not the signal
(method.md §1, §7). They differ from the gradient only at ReLUs:

- DeConvNet (Zeiler & Fergus 2014): a ReLU passes ``max(g, 0)`` whatever its input was;
- Guided BackProp (Springenberg et al. 2015): ``g · [x > 0] · [g > 0]``.

The rules catch every spelling of ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, in place),
so models that call ``F.relu`` in their forward are explained correctly too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..engine.backward import Rule, relu_rules
from ..engine.canonize import Canonical
from ..engine.rules import DeconvNetReLU, GuidedReLU
from .base import Attribution
from .registry import register

__all__ = ["DeConvNet", "GuidedBackprop"]


@register("deconvnet")
class DeConvNet(Attribution):
    """DeConvNet (Zeiler & Fergus, ECCV 2014): ReLUs pass positive values, ignoring the gate.

    Equal to Captum's ``Deconvolution`` for ``nn.ReLU`` models; also handles ``F.relu``.
    """

    kind = "signal"
    description = "DeConvNet: ReLUs pass positive gradients, no gate"
    references = ("Zeiler, Fergus, Visualizing and understanding convolutional networks, "
                  "ECCV 2014",)

    def rules(
        self, canonical: Canonical
    ) -> tuple[dict[nn.Module, Rule], dict[Callable[..., Any], Rule]]:
        """No module rules; :class:`~patternnet.engine.rules.DeconvNetReLU` on every ReLU."""
        return {}, relu_rules(DeconvNetReLU())


@register("guided_backprop")
class GuidedBackprop(Attribution):
    """Guided BackProp (Springenberg et al., ICLR workshop 2015): gate and positive values.

    Equal to Captum's ``GuidedBackprop`` for ``nn.ReLU`` models; also handles ``F.relu``.
    """

    kind = "signal"
    description = "Guided BackProp: ReLU gate and positive gradients"
    references = ("Springenberg et al., Striving for simplicity: the all convolutional net, "
                  "ICLR workshop 2015",)

    def rules(
        self, canonical: Canonical
    ) -> tuple[dict[nn.Module, Rule], dict[Callable[..., Any], Rule]]:
        """No module rules; :class:`~patternnet.engine.rules.GuidedReLU` on every ReLU."""
        return {}, relu_rules(GuidedReLU())
