"""A simplified XAI-TRIS-style benchmark (``tetromino_simple``): T vs L over noise.

For the published design use :func:`~patternnet.groundtruth.xai_tris`. This simplified variant
is in the spirit of Clark, Wilming, Haufe, "XAI-TRIS: non-linear image benchmarks to quantify
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

Ground truth. T and L share their anchor cell: that cell is present in both classes, carries
no class information and is part of the class-independent offset. The ``signal`` is therefore
the class-dependent part only: ``α·(H_c − H̄)`` for ``lin`` (``H̄`` the mean of the two shapes:
0 on the shared cell, ``±α/2`` on the cells where the shapes differ) and ``−α·H_c⊙η`` on the
cells where the shapes differ for ``mult``. ``signal_mask`` is the same for every image: the
cells where T and L differ (the *combined* mask, as XAI-TRIS scores LIN and MULT), so a map that
shows exactly the class information scores 1.0 top-k precision. (Before this was fixed, each
image's mask was its own shape, anchor cell included, and a perfect map scored 0.50.)
``regions["shared"]`` is the shared anchor cell, ``regions["background"]`` every pixel outside
both shapes.

How it differs from the published design (:mod:`patternnet.groundtruth.xaitris`): both shapes
at one anchor (they overlap in one cell) instead of at separate published positions; shapes
drawn at any size ≥ 8 in ``size // 8`` cells; no RIGID or XOR scenario; a background rescaled to
unit variance and ``x = α·H + (1 − α)·η`` without the published Frobenius normalisation and
α values. Numbers on it are not comparable with the paper's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GroundTruthData, seeded_generator
from .noise import smooth

__all__ = ["TETROMINOES", "tetromino_map", "tetromino_simple"]

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


def tetromino_simple(
    n: int = 2000,
    *,
    mode: str = "lin",
    background: str = "white",
    size: int = 16,
    alpha: float | None = None,
    smoothing: float = 1.5,
    seed: int = 0,
) -> GroundTruthData:
    """Generate the simplified XAI-TRIS-style benchmark (module docstring: how it differs).

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
        ``inputs`` ``(n, 1, size, size)``, class ``targets``, the class-dependent ``signal``
        component and the mask of the cells where T and L differ; ``regions["shared"]`` is the
        shared anchor cell and ``regions["background"]`` every pixel outside both shapes.
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
    differ = shapes[0] != shapes[1]
    if mode == "lin":
        inputs = alpha * h + (1 - alpha) * noise
        signal = alpha * (h - shapes.mean(0))
    else:
        inputs = (1 - alpha * h) * noise
        signal = -alpha * h * differ * noise
    shape4 = (n, 1, size, size)
    union = (shapes.sum(0) > 0)[None, None].expand(shape4)
    shared = (shapes.prod(0) > 0)[None, None].expand(shape4)
    return GroundTruthData(
        inputs=inputs,
        targets=labels,
        signal=signal,
        signal_mask=differ[None, None].expand(shape4).clone(),
        regions={"shared": shared.clone(), "background": (~union).clone()},
        name=f"tetromino-simple-{mode}-{background}",
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
