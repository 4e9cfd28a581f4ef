"""Gaussian smoothing of noise images (the correlated backgrounds of the benchmarks)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_kernel", "smooth"]


def gaussian_kernel(sigma: float) -> Tensor:
    """A normalised 1-D Gaussian kernel of standard deviation ``sigma`` (radius ``⌈3σ⌉``)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, not {sigma}")
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def smooth(images: Tensor, sigma: float, *, unit_variance: bool = True) -> Tensor:
    """Separable Gaussian filter over the last two dimensions (reflect border).

    Parameters
    ----------
    images:
        ``(N, C, H, W)``.
    sigma:
        Standard deviation of the filter in pixels.
    unit_variance:
        Rescale so that the result has standard deviation 1 over the whole batch (the
        correlated background then has the same power as white noise).
    """
    kernel = gaussian_kernel(sigma).to(images)
    radius = kernel.numel() // 2
    n, c, h, w = images.shape
    x = images.reshape(n * c, 1, h, w)
    mode = "reflect" if min(h, w) > radius else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    x = x.reshape(n, c, h, w)
    if unit_variance:
        x = x / x.std().clamp(min=1e-12)
    return x
