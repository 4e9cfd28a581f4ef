"""A simplified suppressor benchmark (``suppressor_simple``): signal, distractor, suppressor.

For the published design use :func:`~patternnet.groundtruth.wilming_suppressor`. This
simplified variant is *inspired by* Wilming, Budding, Müller, Haufe, "Scrutinizing XAI using
linear ground-truth data with suppressor variables", Machine Learning 111 (2022).
Each ``size×size`` one-channel image is

``x = a·z + d·ζ + ε``

- ``a``: the signal pattern, the indicator of the block ``A`` (top-left);
- ``z = s·(2c − 1) + τ·ξ``: the class-dependent signal amplitude (``c ∈ {0, 1}``, ``ξ ~ N(0,1)``);
- ``d``: the distractor pattern, the indicator of ``A`` and of a second block ``B``
  (bottom-right); ``ζ ~ N(0, σ_d²)`` is independent of the class;
- ``ε``: Gaussian noise of standard deviation ``σ_n``, white or (``noise_smoothing > 0``)
  spatially correlated by a Gaussian filter.

``B`` holds no information about the class at all (a *suppressor*), yet the Bayes-optimal linear
classifier ``w ∝ Σ_within⁻¹ a`` weighs it with opposite sign to cancel the distractor in ``A``.
Gradient-type explanations therefore show ``B``; the signal ``a`` does not.

How it differs from the published design (:mod:`patternnet.groundtruth.wilming`): hard
``block×block`` squares instead of 4×4 soft blobs; one signal block instead of two; the signal
block and the distractor overlap with the same sign and no signal-only blob exists elsewhere;
a jittered signal amplitude instead of exact ±1; white (or Gaussian-filtered) noise instead of
noise with a random covariance; fixed standard deviations instead of Frobenius-normalised
components mixed by a swept λ. Numbers measured on it are therefore not comparable with the
paper's; they can be off in either direction (its suppressor is weaker: one block, no mixed
signal blob to disentangle).
"""

from __future__ import annotations

import torch

from .base import GroundTruthData, seeded_generator
from .noise import smooth

__all__ = ["suppressor_simple"]


def suppressor_simple(
    n: int = 2000,
    *,
    size: int = 8,
    block: int = 3,
    signal_strength: float = 1.0,
    signal_jitter: float = 0.5,
    distractor_std: float = 1.0,
    noise_std: float = 0.2,
    noise_smoothing: float = 0.0,
    offset: int = 1,
    seed: int = 0,
) -> GroundTruthData:
    """Generate the simplified suppressor benchmark (module docstring for how it differs).

    Parameters
    ----------
    n:
        Number of images (classes balanced in expectation).
    size:
        Image side (``≥ 2·block + 2``).
    block:
        Side of the signal block ``A`` (rows/cols ``1 … block``) and the suppressor block ``B``
        (the same block mirrored to the bottom-right corner).
    signal_strength, signal_jitter:
        ``s`` and ``τ`` of the signal amplitude ``z``.
    distractor_std:
        ``σ_d``.
    noise_std, noise_smoothing:
        ``σ_n`` and the standard deviation (pixels) of the Gaussian filter that correlates the
        noise (0: white noise).
    offset:
        Distance of ``A`` from the top-left corner and of ``B`` from the bottom-right one
        (pixels; 1 by default). A patch-based model (a ViT) sees blocks aligned with its
        patches when ``offset`` and ``block`` are multiples of the patch size.
    seed:
        Seed of the generator.

    Returns
    -------
    GroundTruthData
        ``inputs`` ``(n, 1, size, size)``, ``targets`` class labels, ``signal`` ``a·z``;
        ``signal_mask`` is ``A``, ``regions`` holds ``"suppressor"`` (``B``) and
        ``"distractor"`` (``A ∪ B``).
    """
    if offset < 0 or size < 2 * block + 2 * offset:
        raise ValueError(
            f"size {size} is too small for two blocks of {block} at offset {offset}: use "
            f"≥ {2 * block + 2 * offset} (and offset ≥ 0)"
        )
    generator = seeded_generator(seed)
    a = torch.zeros(size, size)
    a[offset : offset + block, offset : offset + block] = 1.0
    b = torch.zeros(size, size)
    far = size - offset
    b[far - block : far, far - block : far] = 1.0
    d = a + b
    labels = torch.randint(0, 2, (n,), generator=generator)
    z = signal_strength * (2 * labels.float() - 1) + signal_jitter * torch.randn(
        n, generator=generator
    )
    zeta = distractor_std * torch.randn(n, generator=generator)
    noise = torch.randn(n, 1, size, size, generator=generator)
    if noise_smoothing > 0:
        noise = smooth(noise, noise_smoothing)
    signal = z[:, None, None, None] * a
    inputs = signal + zeta[:, None, None, None] * d + noise_std * noise
    shape = (n, 1, size, size)
    return GroundTruthData(
        inputs=inputs,
        targets=labels,
        signal=signal,
        signal_mask=(a > 0).expand(shape).clone(),
        regions={
            "suppressor": (b > 0).expand(shape).clone(),
            "distractor": (d > 0).expand(shape).clone(),
        },
        name="suppressor-simple",
        params={
            "n": n,
            "size": size,
            "block": block,
            "signal_strength": signal_strength,
            "signal_jitter": signal_jitter,
            "distractor_std": distractor_std,
            "noise_std": noise_std,
            "noise_smoothing": noise_smoothing,
            "offset": offset,
            "seed": seed,
        },
    )
