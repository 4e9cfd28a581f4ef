"""Explain with every registry method at its cheapest settings (shared by the model tests)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from patternnet.methods.registry import build_method, methods
from patternnet.patterns.store import Patterns


def explain_with_every_method(model: nn.Module, patterns: Patterns, inputs: Tensor,
                              label: str = "", only: Iterable[str] | None = None) -> None:
    """Every registry method explains ``inputs``: shaped like them and finite.

    SmoothGrad uses 2 samples and Integrated Gradients 2 steps (their cost, not their
    correctness, is what the settings change). ``label`` names the model in failures;
    ``only`` restricts the check to these methods (default: every one).
    """
    for method in methods() if only is None else only:
        options: dict = {"n_samples": 2} if method == "smoothgrad" else {}
        if method == "integrated_gradients":
            options = {"n_steps": 2}
        result = build_method(method, model, patterns, **options).attribute(inputs)
        assert result.shape == inputs.shape, (label, method)
        assert torch.isfinite(result).all(), (label, method)
