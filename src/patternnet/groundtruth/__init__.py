"""Ground-truth benchmarks: data whose true signal is known, generated from a seed.

- :func:`toy_data` — the paper's 2-D example (signal ``(1, 0)``, distractor ``(1, 1)``);
- :func:`suppressor_images` — linear images with signal, distractor and a pure suppressor
  region (Wilming et al. 2022);
- :func:`tetromino_images` — XAI-TRIS-style tetromino images, ``"lin"``/``"mult"`` over
  ``"white"``/``"corr"`` backgrounds (Clark et al. 2024);
- :func:`linear_classifier`, :func:`small_cnn`, :func:`train_classifier` — models trained on
  them in seconds.
"""

from __future__ import annotations

from .base import GroundTruthData
from .suppressor import suppressor_images
from .tetromino import tetromino_images
from .toy import toy_data, toy_model
from .train import (
    accuracy,
    linear_classifier,
    linear_discriminant,
    small_cnn,
    train_classifier,
)

__all__ = [
    "GroundTruthData",
    "accuracy",
    "linear_classifier",
    "linear_discriminant",
    "small_cnn",
    "suppressor_images",
    "tetromino_images",
    "toy_data",
    "toy_model",
    "train_classifier",
]
