"""XAI-TRIS as published: tetromino images for LIN / MULT / RIGID / XOR over WHITE / CORR.

Clark, Wilming, Haufe, "XAI-TRIS: non-linear image benchmarks to quantify false positive
post-hoc attribution of feature importance", Machine Learning 113 (2024); the design follows
their code (github.com/braindatalab/xai-tris, ``data/data_utils.py`` and
``data/generate_data.py``, configs ``data_config_8by8.json`` and ``data_config.json``):

- **Shapes.** ``T = [[1,0],[1,1],[1,0]]`` and ``L = [[1,0],[1,0],[1,1]]`` (3×2 cells), each
  cell ``scale×scale`` pixels (Kronecker product); ``scale = 1`` at 8×8 and ``8`` at 64×64
  (``4`` for RIGID at 64×64). At 64×64 every shape image is smoothed by a Gaussian filter of
  σ = 1.5 pixels (``scipy.ndimage.gaussian_filter``, reproduced by
  :func:`~patternnet.groundtruth.noise.gaussian_filter`).
- **Positions.** T at ``(1, 1)`` and L at ``(4, 5)`` at 8×8, ``(8, 8)`` and ``(32, 40)`` at
  64×64: the two shapes never overlap, so no pixel lies in both classes' shapes.
- **Scenarios.** ``lin``: class 0 carries T at its position, class 1 L at its; ``mult``: the
  same shapes, multiplicative; ``rigid``: each image carries its class's shape rotated by a
  random multiple of 90° at a random position (translations and rotations); ``xor``: every
  image carries both T and L with signs ``(+,+)`` or ``(−,−)`` (class 0) and ``(+,−)`` or
  ``(−,+)`` (class 1), a quarter of the images each.
- **Backgrounds.** ``white``: i.i.d. ``N(0, 0.5²)`` pixels; ``corr``: the same smoothed by a
  Gaussian filter of σ = 3 (8×8) or 10 (64×64) pixels.
- **Mixing.** With ``P`` the ``N×D`` matrix of shape images and ``B`` of backgrounds, each
  normalised by its Frobenius norm over the whole data set: ``x = α·P̂ + (1 − α)·B̂``
  (additive), or ``x = (1 − α·P)^ ⊙ B̂`` (multiplicative: ``1 − α·P`` normalised, then times
  the background), and finally the whole data set is divided by ``max |x|``.
- **α** (their "SNR") per scenario and background, as in their configs
  (:data:`XAI_TRIS_ALPHA`).
- **Ground truth.** The shape images ``P`` (at 64×64 binarised at ``≥ 0.05`` after smoothing).
  Their precision and EMD score LIN, MULT and XOR against the *combined* mask (T's and L's
  positions together: in LIN the absence of a T at its position is as informative as the
  presence of an L) and RIGID against each image's own shape. ``signal_mask`` holds that mask,
  ``regions["shape"]`` each image's own shape and ``regions["background"]`` the rest.

Differences from their data, stated: our random numbers come from a seeded
``torch.Generator`` (not their NumPy stream), the inputs are float32 (they store float16),
classes are shuffled by a seeded permutation (they split with ``StratifiedShuffleSplit``), and
the data sizes are chosen by the caller (they use 10 000 images at 8×8 and 40 000 at 64×64);
the normalisations over "the whole data set" therefore run over the ``n`` images generated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GroundTruthData, seeded_generator
from .noise import gaussian_filter

__all__ = [
    "XAI_TRIS_ALPHA",
    "XAI_TRIS_BACKGROUNDS",
    "XAI_TRIS_SCENARIOS",
    "xai_tris",
    "xai_tris_shapes",
]

XAI_TRIS_SCENARIOS = ("lin", "mult", "rigid", "xor")
XAI_TRIS_BACKGROUNDS = ("white", "corr")

#: α per ``(scenario, background, size)`` from their ``data_config_8by8.json`` and
#: ``data_config.json`` (the values behind the paper's figures).
XAI_TRIS_ALPHA: dict[tuple[str, str, int], float] = {
    ("lin", "white", 8): 0.18,
    ("lin", "corr", 8): 0.0125,
    ("mult", "white", 8): 0.7,
    ("mult", "corr", 8): 0.1,
    ("rigid", "white", 8): 0.65,
    ("rigid", "corr", 8): 0.2,
    ("xor", "white", 8): 0.35,
    ("xor", "corr", 8): 0.15,
    ("lin", "white", 64): 0.03,
    ("lin", "corr", 64): 0.02,
    ("mult", "white", 64): 0.65,
    ("mult", "corr", 64): 0.05,
    ("rigid", "white", 64): 0.575,
    ("rigid", "corr", 64): 0.375,
    ("xor", "white", 64): 0.075,
    ("xor", "corr", 64): 0.03,
}

_T = ((1.0, 0.0), (1.0, 1.0), (1.0, 0.0))
_L = ((1.0, 0.0), (1.0, 0.0), (1.0, 1.0))
_POSITIONS = {8: ((1, 1), (4, 5)), 64: ((8, 8), (32, 40))}
_BACKGROUND_STD = 0.5  # their "var_data" 0.5 is passed to np.random.normal as the scale
_CORR_SIGMA = {8: 3.0, 64: 10.0}
_SHAPE_SIGMA = 1.5  # smoothing of the shapes when the cell scale is > 3
_MASK_THRESHOLD = 0.05


def xai_tris_shapes(scale: int = 1) -> tuple[Tensor, Tensor]:
    """The T and L tetrominoes as ``(3·scale, 2·scale)`` float32 images of 0/1."""
    if scale < 1:
        raise ValueError(f"scale must be ≥ 1, not {scale}")
    block = torch.ones(scale, scale)
    return torch.kron(torch.tensor(_T), block), torch.kron(torch.tensor(_L), block)


def _scale(scenario: str, size: int) -> int:
    if size == 8:
        return 1
    return 4 if scenario == "rigid" else 8


def _place(canvas: Tensor, shape: Tensor, row: int, col: int, sign: float = 1.0) -> None:
    canvas[row : row + shape.shape[0], col : col + shape.shape[1]] = sign * shape


def _patterns(
    scenario: str, size: int, labels: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Shape images ``(n, size, size)`` (signed for XOR) and the combined-position mask."""
    scale = _scale(scenario, size)
    t, l_shape = xai_tris_shapes(scale)
    n = labels.shape[0]
    patterns = torch.zeros(n, size, size)
    combined = torch.zeros(size, size)
    (r0, c0), (r1, c1) = _POSITIONS[size]
    _place(combined, t, r0, c0)
    _place(combined, l_shape, r1, c1)
    if scenario in ("lin", "mult"):
        for i, label in enumerate(labels.tolist()):
            if label == 0:
                _place(patterns[i], t, r0, c0)
            else:
                _place(patterns[i], l_shape, r1, c1)
    elif scenario == "xor":
        # signs (+,+), (−,−) for class 0 and (+,−), (−,+) for class 1, balanced within class
        flip = torch.randint(0, 2, (n,), generator=generator)
        for i, (label, f) in enumerate(zip(labels.tolist(), flip.tolist())):
            first = 1.0 if f == 0 else -1.0
            second = first if label == 0 else -first
            _place(patterns[i], t, r0, c0, first)
            _place(patterns[i], l_shape, r1, c1, second)
    else:  # rigid
        turns = torch.randint(0, 4, (n,), generator=generator)
        uniform = torch.rand(n, 2, generator=generator)
        for i, label in enumerate(labels.tolist()):
            shape = torch.rot90(t if label == 0 else l_shape, int(turns[i]), dims=(0, 1))
            rows, cols = size - shape.shape[0] + 1, size - shape.shape[1] + 1
            row, col = int(uniform[i, 0] * rows), int(uniform[i, 1] * cols)
            _place(patterns[i], shape, row, col)
    if scale > 3:
        patterns = gaussian_filter(patterns.double(), _SHAPE_SIGMA).float()
        combined = gaussian_filter(combined.double(), _SHAPE_SIGMA).float()
        combined = (combined >= _MASK_THRESHOLD).float()
    return patterns, combined


def xai_tris(
    n: int = 2000,
    *,
    scenario: str = "lin",
    background: str = "white",
    size: int = 8,
    alpha: float | None = None,
    seed: int = 0,
) -> GroundTruthData:
    """Generate one XAI-TRIS data set as published (module docstring for the design).

    Parameters
    ----------
    n:
        Number of images (≥ 4; classes balanced: ``n // 2`` of class 0, the rest class 1).
        The paper uses 10 000 (8×8) and 40 000 (64×64).
    scenario:
        ``"lin"``, ``"mult"``, ``"rigid"`` or ``"xor"``.
    background:
        ``"white"`` or ``"corr"``.
    size:
        8 or 64.
    alpha:
        Signal weight; default: the published value :data:`XAI_TRIS_ALPHA`.
    seed:
        Seed of the generator (same seed, same data).

    Returns
    -------
    GroundTruthData
        ``inputs`` ``(n, 1, size, size)`` float32, ``targets`` 0 (T) / 1 (L), ``signal`` the
        shape component of ``x`` (what remains of ``x`` minus its background part),
        ``signal_mask`` the mask the paper scores against (combined positions for LIN, MULT
        and XOR; each image's own shape for RIGID), ``regions["shape"]`` each image's own
        shape(s) and ``regions["background"]`` the complement of ``signal_mask``.
    """
    if scenario not in XAI_TRIS_SCENARIOS:
        raise ValueError(f"scenario must be one of {XAI_TRIS_SCENARIOS}, not {scenario!r}")
    if background not in XAI_TRIS_BACKGROUNDS:
        raise ValueError(f"background must be one of {XAI_TRIS_BACKGROUNDS}, not {background!r}")
    if size not in _POSITIONS:
        raise ValueError(f"size must be 8 or 64 (the published images), not {size}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 4:
        raise ValueError(f"n must be an int ≥ 4, not {n!r}")
    if alpha is None:
        alpha = XAI_TRIS_ALPHA[(scenario, background, size)]
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], not {alpha}")
    generator = seeded_generator(seed)
    labels = torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)]).long()
    labels = labels[torch.randperm(n, generator=generator)]
    patterns, combined = _patterns(scenario, size, labels, generator)
    backgrounds = _BACKGROUND_STD * torch.randn(n, size, size, generator=generator)
    if background == "corr":
        backgrounds = gaussian_filter(backgrounds.double(), _CORR_SIGMA[size]).float()

    p, b = patterns.double(), backgrounds.double()
    b_hat = b / b.norm()
    if scenario == "mult":
        factor = 1 - alpha * p
        norm = factor.norm()
        x = factor / norm * b_hat
        signal = -alpha * p / norm * b_hat  # x minus what the background alone would give
    else:
        x = alpha * p / p.norm() + (1 - alpha) * b_hat
        signal = alpha * p / p.norm()
    scale = 1.0 / x.abs().max()
    x, signal = x * scale, signal * scale

    if size == 64:
        own = patterns.abs() >= _MASK_THRESHOLD
    else:
        own = patterns != 0
    mask = own if scenario == "rigid" else (combined > 0).expand(n, size, size)
    shape4 = (n, 1, size, size)
    return GroundTruthData(
        inputs=x.float().reshape(shape4),
        targets=labels,
        signal=signal.float().reshape(shape4),
        signal_mask=mask.reshape(shape4).clone(),
        regions={"shape": own.reshape(shape4).clone(), "background": ~mask.reshape(shape4)},
        name=f"xai-tris-{scenario}-{background}-{size}",
        params={
            "n": n,
            "scenario": scenario,
            "background": background,
            "size": size,
            "alpha": alpha,
            "seed": seed,
        },
    )
