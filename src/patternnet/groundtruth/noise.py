"""Gaussian smoothing of noise images (the correlated backgrounds of the benchmarks)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_filter", "gaussian_kernel", "smooth"]


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


def _symmetric_index(n: int, radius: int) -> Tensor:
    """Indices ``-radius … n+radius-1`` folded into ``0 … n-1`` by half-sample reflection."""
    index = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(index >= n, 2 * n - 1 - index, index)


def gaussian_filter(images: Tensor, sigma: float, *, truncate: float = 4.0) -> Tensor:
    """Gaussian filter of the last two dimensions exactly as ``scipy.ndimage.gaussian_filter``.

    Separable, kernel radius ``int(truncate·σ + 0.5)``, ``"reflect"`` border (half-sample
    symmetric: ``d c b a | a b c d | d c b a``, repeated when the kernel is wider than the
    image). The XAI-TRIS data (Clark et al. 2024) smooth their correlated backgrounds and their
    64×64 shapes with this filter; no rescaling is applied.

    Parameters
    ----------
    images:
        ``(..., H, W)`` floating-point tensor.
    sigma:
        Standard deviation in pixels (> 0).
    truncate:
        Kernel radius in standard deviations.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, not {sigma}")
    if not images.is_floating_point() or images.dim() < 2:
        raise ValueError("images must be a floating-point tensor (..., H, W)")
    radius = int(truncate * float(sigma) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    h, w = images.shape[-2:]
    x = images.index_select(-1, _symmetric_index(w, radius))
    x = x.unfold(-1, 2 * radius + 1, 1) @ kernel
    x = x.index_select(-2, _symmetric_index(h, radius))
    x = x.transpose(-1, -2).unfold(-1, 2 * radius + 1, 1) @ kernel
    return x.transpose(-1, -2).contiguous()
