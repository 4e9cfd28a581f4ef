"""A tiny model factory for fuzzing the CLI (``--model fuzz_model:make``): 1×6×6 → 3 classes."""

from torch import nn


def make() -> nn.Module:
    """Conv(1→2, 3×3) → ReLU → Flatten → Linear(32 → 3)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
