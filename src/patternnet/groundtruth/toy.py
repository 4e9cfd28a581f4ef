"""The paper's two-dimensional toy example (Kindermans et al. 2018, Sec. 2; method.md §1).

``x = a_s·y + a_d·ε`` with the signal direction ``a_s = (1, 0)``, the distractor direction
``a_d = (1, 1)``, ``y ~ U[-1, 1]`` and ``ε ~ N(μ, σ²)``. The filter ``w = (1, −1)`` recovers
``y = wᵀx`` exactly, yet points away from the signal: the gradient shows ``w``, PatternNet must
show ``a_s``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import GroundTruthData, seeded_generator

__all__ = ["SIGNAL_DIRECTION", "DISTRACTOR_DIRECTION", "toy_data", "toy_model"]

SIGNAL_DIRECTION = (1.0, 0.0)
DISTRACTOR_DIRECTION = (1.0, 1.0)


def toy_data(
    n: int = 1000, *, mu: float = 0.5, sigma: float = 1.0, seed: int = 0
) -> GroundTruthData:
    """Samples of the toy example.

    Parameters
    ----------
    n:
        Number of samples.
    mu, sigma:
        Mean and standard deviation of the distractor amplitude ``ε``.
    seed:
        Seed of the generator (same seed, same data).

    Returns
    -------
    GroundTruthData
        ``inputs`` ``(n, 2)``, ``targets`` ``y`` ``(n,)``, ``signal`` ``a_s·y``; the signal mask
        is the first coordinate; ``regions["distractor"]`` is both coordinates.
    """
    if n < 1:
        raise ValueError(f"n must be positive, not {n}")
    generator = seeded_generator(seed)
    y = torch.rand(n, generator=generator) * 2 - 1
    eps = torch.randn(n, generator=generator) * sigma + mu
    a_s = torch.tensor(SIGNAL_DIRECTION)
    a_d = torch.tensor(DISTRACTOR_DIRECTION)
    signal = y[:, None] * a_s
    inputs = signal + eps[:, None] * a_d
    signal_mask = (a_s != 0).expand(n, 2).clone()
    return GroundTruthData(
        inputs=inputs,
        targets=y,
        signal=signal,
        signal_mask=signal_mask,
        regions={"distractor": (a_d != 0).expand(n, 2).clone()},
        name="toy",
        params={"n": n, "mu": mu, "sigma": sigma, "seed": seed},
    )


def toy_model() -> nn.Linear:
    """The optimal linear model of the toy example: ``y = (1, −1)ᵀx``, no bias."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    return model
