"""Wilming et al. 2022's suppressor data as published.

Wilming, Budding, Müller, Haufe, "Scrutinizing XAI using linear ground-truth data with
suppressor variables", Machine Learning 111 (2022); the design follows their code
(github.com/braindatalab/scrutinizing-xai, ``data/patterns.py`` pattern type 0 and
``data/data_generator.py``):

- 8×8 images built from one 4×4 soft blob ``[[0,.5,.5,0],[.5,1,1,.5],[.5,1,1,.5],[0,.5,.5,0]]``.
- Signal pattern ``a``: the blob at the top left and its negative at the bottom left.
- Distractor pattern ``d``: the blob at the top left (where it mixes with the signal) and its
  negative at the top right. The top right is the **suppressor**: it holds no information
  about the class, yet a linear model weighs it to cancel the distractor in the top left.
  The bottom right holds noise only.
- Per sample: ``z = ±1`` by class (their "exact" signal: class 0 at −1, class 1 at +1),
  distractor amplitude ``ζ ~ N(0, 1)`` and noise ``η ~ N(0, Σ)`` with a random covariance
  ``Σ = U·diag(δ)·Uᵀ``, ``U = expm(A − Aᵀ)`` for ``A`` upper-triangular with entries uniform in
  ``[−π, π)``, ``δ`` uniform in ``[0, 1)`` plus ``0.01·max δ``.
- The three ``N×64`` component matrices ``S = z·aᵀ``, ``D = ζ·dᵀ`` and ``E`` are each divided by
  their Frobenius norm over the data set, then ``x = λ₁·Ŝ + λ₂·D̂ + λ₃·Ê`` with
  ``λ₂ = λ₃ = (1 − λ₁)/2`` and the published sweep ``λ₁ ∈ {0, 0.02, 0.04, 0.06, 0.08}``
  (:data:`WILMING_SIGNAL_WEIGHTS`).
- Ground truth: the 24 pixels where ``a ≠ 0``. They score explanations by ROC-AUC and by
  precision at 90 % specificity against this mask (with ``|e|``).

Differences from their data, stated: random numbers from a seeded ``torch.Generator`` (not
NumPy's), the classes shuffled by a seeded permutation (they split 80/20 with
``StratifiedShuffleSplit``), and the size chosen by the caller (they use 1 000 samples per
data set and 100 data sets per λ₁).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import GroundTruthData, seeded_generator

__all__ = [
    "WILMING_BLOB",
    "WILMING_SIGNAL_WEIGHTS",
    "random_covariance",
    "wilming_patterns",
    "wilming_suppressor",
]

#: The 4×4 soft blob of their ``PATTERN_BLOCK``.
WILMING_BLOB = (
    (0.0, 0.5, 0.5, 0.0),
    (0.5, 1.0, 1.0, 0.5),
    (0.5, 1.0, 1.0, 0.5),
    (0.0, 0.5, 0.5, 0.0),
)

#: The published sweep of the signal weight λ₁.
WILMING_SIGNAL_WEIGHTS = (0.0, 0.02, 0.04, 0.06, 0.08)


def wilming_patterns() -> tuple[Tensor, Tensor]:
    """The signal pattern ``a`` and distractor pattern ``d`` as ``(8, 8)`` float64 images."""
    blob = torch.tensor(WILMING_BLOB, dtype=torch.float64)
    a = torch.zeros(8, 8, dtype=torch.float64)
    a[:4, :4] = blob
    a[4:, :4] = -blob
    d = torch.zeros(8, 8, dtype=torch.float64)
    d[:4, :4] = blob
    d[:4, 4:] = -blob
    return a, d


def random_covariance(dim: int, generator: torch.Generator) -> Tensor:
    """Their random SPD covariance ``U·diag(δ)·Uᵀ`` (module docstring), float64."""
    upper = torch.triu(
        2 * math.pi * torch.rand(dim, dim, generator=generator, dtype=torch.float64) - math.pi
    )
    rotation = torch.linalg.matrix_exp(upper - upper.T)
    eigen = torch.rand(dim, generator=generator, dtype=torch.float64)
    eigen = eigen + 0.01 * eigen.max()
    covariance = rotation @ torch.diag(eigen) @ rotation.T
    return (covariance + covariance.T) / 2


def wilming_suppressor(
    n: int = 1000,
    *,
    signal_weight: float = 0.04,
    seed: int = 0,
) -> GroundTruthData:
    """Generate one data set of Wilming et al. 2022 (module docstring for the design).

    Parameters
    ----------
    n:
        Number of samples (≥ 2; ``n // 2`` of class 0, the rest class 1). The paper: 1 000.
    signal_weight:
        λ₁ in ``[0, 1)``; the distractor and the noise get ``(1 − λ₁)/2`` each. The published
        sweep is :data:`WILMING_SIGNAL_WEIGHTS`.
    seed:
        Seed of the generator (same seed, same data and the same noise covariance).

    Returns
    -------
    GroundTruthData
        ``inputs`` ``(n, 1, 8, 8)`` float32, ``targets`` 0/1, ``signal`` ``λ₁·Ŝ``,
        ``signal_mask`` the 24 pixels of ``a ≠ 0``; ``regions``: ``"suppressor"`` (the top-right
        blob: distractor, no signal), ``"distractor"`` (``d ≠ 0``) and ``"noise_only"`` (the
        bottom-right quadrant). ``params["noise_covariance"]`` holds ``Σ`` (64×64, float64).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int ≥ 2, not {n!r}")
    if not 0.0 <= signal_weight < 1.0:
        raise ValueError(f"signal_weight must lie in [0, 1), not {signal_weight}")
    generator = seeded_generator(seed)
    a, d = wilming_patterns()
    labels = torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)]).long()
    labels = labels[torch.randperm(n, generator=generator)]
    z = 2.0 * labels.double() - 1.0
    zeta = torch.randn(n, generator=generator, dtype=torch.float64)
    covariance = random_covariance(64, generator)
    white = torch.randn(n, 64, generator=generator, dtype=torch.float64)
    noise = white @ torch.linalg.cholesky(covariance).T

    s = z[:, None] * a.reshape(1, 64)
    dist = zeta[:, None] * d.reshape(1, 64)
    rest = (1.0 - signal_weight) / 2
    signal = signal_weight * s / s.norm()
    dist_norm = dist.norm()
    x = signal + rest * (dist / dist_norm if dist_norm > 0 else dist) + rest * noise / noise.norm()

    shape = (n, 1, 8, 8)
    signal_mask = (a != 0).expand(shape).clone()
    suppressor = ((d != 0) & (a == 0)).expand(shape).clone()
    noise_only = torch.zeros(8, 8, dtype=torch.bool)
    noise_only[4:, 4:] = True
    return GroundTruthData(
        inputs=x.float().reshape(shape),
        targets=labels,
        signal=signal.float().reshape(shape),
        signal_mask=signal_mask,
        regions={
            "suppressor": suppressor,
            "distractor": (d != 0).expand(shape).clone(),
            "noise_only": noise_only.expand(shape).clone(),
        },
        name=f"wilming-suppressor-{signal_weight:g}",
        params={
            "n": n,
            "signal_weight": signal_weight,
            "distractor_weight": rest,
            "noise_weight": rest,
            "seed": seed,
            "noise_covariance": covariance,
        },
    )
