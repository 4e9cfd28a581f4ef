"""The relevance that :class:`~patternnet.methods.lrp.AttnLRP` installs, through one model call.

Shared by tests/test_attnlrp.py and tests/test_attnlrp_masks.py: the method's rules and its
attention handler are applied and the relevance at the output is passed back by autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from patternnet.engine.attention import decomposed
from patternnet.engine.backward import rules_applied
from patternnet.methods.lrp import AttnLRP


def attnlrp_relevance(model: nn.Module, x: torch.Tensor, relevance: torch.Tensor,
                      epsilon: float = 0.0, conservative: bool = False) -> torch.Tensor:
    """The relevance AttnLRP's rules pass from ``relevance`` at ``model``'s output to ``x``."""
    method = AttnLRP(model, epsilon=epsilon, conservative=conservative)
    canonical = method._canonical()
    modules, functions = method.rules(canonical)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), rules_applied(modules, functions), decomposed(
        model, method.attention_handler(canonical)
    ):
        out = model(x)
        (result,) = torch.autograd.grad(out, x, relevance)
    return result
