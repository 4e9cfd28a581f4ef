"""XAI-TRIS-style images: a tetromino signal over a white or correlated Gaussian background.

In the spirit of Clark, Wilming, Haufe, "XAI-TRIS: non-linear image benchmarks to quantify
false positive post-hoc attribution of feature importance", Machine Learning (2024). Our own
design, stated here in full:

- Each ``size×size`` one-channel image belongs to class 0 (a *T* tetromino) or class 1 (an *L*
  tetromino). Both shapes are drawn at the same anchor (top-left at ``size // 4``) from
  ``cell×cell`` pixel blocks (``cell = max(1, size // 8)``), so the classes differ only in the
  cells where the shapes differ. ``H_c`` is the 0/1 map of class ``c``'s shape.
- The background ``η`` is white Gaussian noise (``background="white"``) or Gaussian noise
  smoothed by a Gaussian filter of ``smoothing`` pixels and rescaled to unit variance
  (``background="corr"``).
- ``mode="lin"`` (additive): ``x = α·H_c + (1 − α)·η``; the signal is ``α·H_c``; a linear model
  can solve it.
- ``mode="mult"`` (multiplicative): ``x = (1 − α·H_c) ⊙ η``; the shape damps the background, so
  the class is in the *variance* of the shape's pixels, not their mean, and a non-linear model
  is needed. The signal component is ``x − η = −α·H_c ⊙ η``.

The ground-truth mask of each image is its own class's shape ``H_c > 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GroundTruthData, seeded_generator
from .noise import smooth

__all__ = ["TETROMINOES", "tetromino_images", "tetromino_map"]

#: Cells (row, col) of the two shapes.
TETROMINOES: dict[str, tuple[tuple[int, int], ...]] = {
    "T": ((0, 0), (0, 1), (0, 2), (1, 1)),
    "L": ((0, 0), (1, 0), (2, 0), (2, 1)),
}


def tetromino_map(shape: str, size: int) -> Tensor:
    """The 0/1 map ``(size, size)`` of one tetromino at the benchmark's anchor."""
    cells = TETROMINOES[shape]
    cell = max(1, size // 8)
    anchor = size // 4
    if anchor + 3 * cell > size:
        raise ValueError(f"size {size} is too small for a tetromino: use ≥ 8")
    out = torch.zeros(size, size)
    for row, col in cells:
        r, c = anchor + row * cell, anchor + col * cell
        out[r : r + cell, c : c + cell] = 1.0
    return out


def tetromino_images(
    n: int = 2000,
    *,
    mode: str = "lin",
    background: str = "white",
    size: int = 16,
    alpha: float | None = None,
    smoothing: float = 1.5,
    seed: int = 0,
) -> GroundTruthData:
    """Generate an XAI-TRIS-style benchmark.

    Parameters
    ----------
    n:
        Number of images (classes balanced in expectation).
    mode:
        ``"lin"`` (additive signal) or ``"mult"`` (multiplicative).
    background:
        ``"white"`` or ``"corr"`` (smoothed Gaussian noise).
    size:
        Image side (≥ 8).
    alpha:
        Signal strength ``α`` (default 0.5 for ``"lin"``, 0.9 for ``"mult"``).
    smoothing:
        Standard deviation (pixels) of the background filter for ``"corr"``.
    seed:
        Seed of the generator.

    Returns
    -------
    GroundTruthData
        ``inputs`` ``(n, 1, size, size)``, class ``targets``, the ``signal`` component and the
        shape mask; ``regions["background"]`` is every pixel outside both shapes.
    """
    if mode not in ("lin", "mult"):
        raise ValueError(f"mode must be 'lin' or 'mult', not {mode!r}")
    if background not in ("white", "corr"):
        raise ValueError(f"background must be 'white' or 'corr', not {background!r}")
    if alpha is None:
        alpha = 0.5 if mode == "lin" else 0.9
    generator = seeded_generator(seed)
    shapes = torch.stack([tetromino_map("T", size), tetromino_map("L", size)])
    labels = torch.randint(0, 2, (n,), generator=generator)
    noise = torch.randn(n, 1, size, size, generator=generator)
    if background == "corr":
        noise = smooth(noise, smoothing)
    h = shapes[labels][:, None]
    if mode == "lin":
        signal = alpha * h
        inputs = signal + (1 - alpha) * noise
    else:
        inputs = (1 - alpha * h) * noise
        signal = inputs - noise
    union = (shapes.sum(0) > 0)[None, None].expand(n, 1, size, size)
    return GroundTruthData(
        inputs=inputs,
        targets=labels,
        signal=signal,
        signal_mask=h > 0,
        regions={"background": (~union).clone()},
        name=f"xai-tris-{mode}-{background}",
        params={
            "n": n,
            "mode": mode,
            "background": background,
            "size": size,
            "alpha": alpha,
            "smoothing": smoothing,
            "seed": seed,
        },
    )
