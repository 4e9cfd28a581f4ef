"""Small models for the ground-truth benchmarks (seconds on 2 CPU cores), trained with the
one trainer of :mod:`patternnet.training` (re-exported here)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..training import accuracy, train_classifier
from .base import GroundTruthData, seeded_generator

__all__ = ["accuracy", "linear_classifier", "linear_discriminant", "small_cnn", "train_classifier"]


def linear_classifier(input_shape: Sequence[int], classes: int = 2, *, seed: int = 0) -> nn.Module:
    """``Flatten → Linear``: logistic regression on the flattened input."""
    generator = seeded_generator(seed)
    features = math.prod(input_shape)
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    _init(model, generator)
    return model


def small_cnn(
    input_shape: Sequence[int],
    classes: int = 2,
    *,
    channels: int = 8,
    hidden: int = 32,
    seed: int = 0,
) -> nn.Module:
    """A tiny VGG-style network: two conv-ReLU-maxpool stages, then two dense layers.

    Parameters
    ----------
    input_shape:
        ``(C, H, W)`` with ``H`` and ``W`` divisible by 4.
    classes, channels, hidden:
        Outputs, channels of the first conv (the second has twice as many), hidden units.
    seed:
        Seed of the initialisation.
    """
    c, h, w = input_shape
    if h % 4 or w % 4:
        raise ValueError(f"small_cnn needs H and W divisible by 4, got {h}×{w}")
    model = nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * (h // 4) * (w // 4), hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    _init(model, seeded_generator(seed))
    return model


def _init(model: nn.Module, generator: torch.Generator) -> None:
    """Kaiming-uniform weights and zero biases, drawn from ``generator`` (reproducible)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = math.sqrt(6.0 / fan_in) / math.sqrt(2.0)
                module.weight.copy_(
                    (torch.rand(module.weight.shape, generator=generator) * 2 - 1) * bound
                )
                if module.bias is not None:
                    module.bias.zero_()


def linear_discriminant(
    data: GroundTruthData | tuple[Tensor, Tensor], *, ridge: float = 1e-6
) -> nn.Module:
    """Fisher's linear discriminant for two classes, as a ``Flatten → Linear(D, 2)`` model.

    The Bayes-optimal linear classifier for Gaussian classes with a shared covariance:
    ``w = Σ_within⁻¹ (μ₁ − μ₀)``, solved in float64 in closed form (no optimiser noise). The
    logits are ``±(wᵀx − c)/2`` with ``c`` halfway between the class means' projections.

    Parameters
    ----------
    data:
        A :class:`GroundTruthData` with labels 0/1, or ``(inputs, labels)``.
    ridge:
        Added to the diagonal of ``Σ_within`` relative to its mean eigenvalue.
    """
    inputs, labels = (data.inputs, data.targets) if isinstance(data, GroundTruthData) else data
    x = inputs.reshape(inputs.shape[0], -1).double()
    if set(labels.unique().tolist()) != {0, 1}:
        raise ValueError("linear_discriminant needs two classes labelled 0 and 1")
    mean0, mean1 = x[labels == 0].mean(0), x[labels == 1].mean(0)
    centred = torch.cat([x[labels == 0] - mean0, x[labels == 1] - mean1])
    within = centred.T @ centred / centred.shape[0]
    within += ridge * within.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(within, mean1 - mean0)
    c = w @ (mean0 + mean1) / 2
    model = nn.Sequential(nn.Flatten(), nn.Linear(x.shape[1], 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-w, w]).float() / 2)
        model[1].bias.copy_(torch.stack([c, -c]).float() / 2)
    return model.eval()
