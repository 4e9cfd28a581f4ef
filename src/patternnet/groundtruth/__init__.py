"""Ground-truth data: inputs whose true signal is known, generated from a seed.

As published (designs and differences in each module's docstring):

- :func:`wilming_suppressor` — Wilming et al. 2022's linear suppressor data (8×8, soft 4×4
  blobs, two signal blobs, one mixed with the distractor, noise with a random covariance,
  Frobenius-normalised components mixed by a swept λ);
- :func:`xai_tris` — XAI-TRIS (Clark et al. 2024): LIN / MULT / RIGID / XOR × WHITE / CORR at
  8×8 and 64×64.

Simplified variants (own names, faster, NOT comparable with the papers' numbers):

- :func:`suppressor_simple` — hard blocks, one signal block, no mixing;
- :func:`tetromino_simple` — T and L at one anchor, LIN / MULT only;
- :func:`toy_data` — the PatternNet paper's 2-D example (signal ``(1, 0)``, distractor
  ``(1, 1)``).

Models: :func:`linear_classifier`, :func:`small_cnn`, :func:`train_classifier`,
:func:`linear_discriminant`, :func:`accuracy`. The comparison with the papers' numbers:
``python -m patternnet.groundtruth.reproduce``.
"""

from __future__ import annotations

import warnings
from typing import Any

from .base import GroundTruthData
from .suppressor import suppressor_simple
from .tetromino import tetromino_simple
from .toy import toy_data, toy_model
from .train import (
    accuracy,
    linear_classifier,
    linear_discriminant,
    small_cnn,
    train_classifier,
)
from .wilming import WILMING_SIGNAL_WEIGHTS, wilming_suppressor
from .xaitris import XAI_TRIS_ALPHA, XAI_TRIS_BACKGROUNDS, XAI_TRIS_SCENARIOS, xai_tris

__all__ = [
    "WILMING_SIGNAL_WEIGHTS",
    "XAI_TRIS_ALPHA",
    "XAI_TRIS_BACKGROUNDS",
    "XAI_TRIS_SCENARIOS",
    "GroundTruthData",
    "accuracy",
    "linear_classifier",
    "linear_discriminant",
    "small_cnn",
    "suppressor_images",
    "suppressor_simple",
    "tetromino_images",
    "tetromino_simple",
    "toy_data",
    "toy_model",
    "train_classifier",
    "wilming_suppressor",
    "xai_tris",
]


def tetromino_images(*args: Any, **kwargs: Any) -> GroundTruthData:
    """Deprecated name of :func:`tetromino_simple` (warns; removed in a later release)."""
    warnings.warn(
        "tetromino_images was renamed tetromino_simple (the simplified variant); the published "
        "design is xai_tris",
        DeprecationWarning,
        stacklevel=2,
    )
    return tetromino_simple(*args, **kwargs)


def suppressor_images(*args: Any, **kwargs: Any) -> GroundTruthData:
    """Deprecated name of :func:`suppressor_simple` (warns; removed in a later release)."""
    warnings.warn(
        "suppressor_images was renamed suppressor_simple (the simplified variant); the "
        "published design is wilming_suppressor",
        DeprecationWarning,
        stacklevel=2,
    )
    return suppressor_simple(*args, **kwargs)
