"""Small models with fixed random weights for the baseline tests (VGG- and ResNet-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights, non-zero biases and BatchNorm statistics; float64, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.endswith(".weight") and tensor.dim() > 1:
                values = values / tensor[0].numel() ** 0.5
            else:
                values = values * 0.1
            tensor.copy_(values.to(tensor.dtype))
    return model.double().eval()


class VGGish(nn.Module):
    """conv/ReLU/maxpool/conv/ReLU/avgpool/flatten/linear/ReLU/linear; optional F.relu."""

    def __init__(self, functional_relu: bool = False, bias: bool = True, padding: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=padding, bias=bias),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=padding, bias=bias),
            nn.ReLU(),
            nn.AvgPool2d(2) if padding else nn.MaxPool2d(1),
        )
        spatial = 2 if padding else 1  # 8×8 inputs: 8 → 4 → 2 padded, 8 → 6 → 3 → 1 unpadded
        self.fc1 = nn.Linear(8 * spatial * spatial, 16, bias=bias)
        self.fc2 = nn.Linear(16, 5, bias=bias)
        self.relu = nn.ReLU()
        self.functional_relu = functional_relu

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.features(x), 1)
        x = self.fc1(x)
        x = F.relu(x) if self.functional_relu else self.relu(x)
        return self.fc2(x)


#: BatchNorm eps of the test models: negligible next to the comparisons' tolerances.
TINY_EPS = 1e-12


class Block(nn.Module):
    """A residual block: conv-BN-ReLU-conv-BN plus the identity, then ReLU.

    BatchNorm ``eps = 1e-12`` (:data:`TINY_EPS`): Zennit's BatchNorm merging leaves the
    BatchNorm as ``x / √(1 + eps)`` (it resets the running variance to 1 but keeps eps), which
    with the default eps would differ by ~1e-5. Not 0: torch 2.11 refuses ``eps = 0``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels, eps=TINY_EPS),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels, eps=TINY_EPS),
        )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + x)


class ResNetish(nn.Module):
    """Stem (conv-BN-ReLU), two residual blocks, adaptive average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, eps=TINY_EPS), nn.ReLU()
        )
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def vgg(seed: int = 1, **options: bool | int) -> nn.Module:
    """A VGG-style float64 model with fixed random weights (input (N, 3, 8, 8))."""
    return _randomise(VGGish(**options), seed)


def resnet(seed: int = 2) -> nn.Module:
    """A ResNet-style float64 model with BatchNorm and fixed random weights (input (N, 3, 8, 8))."""
    return _randomise(ResNetish(), seed)


def images(n: int = 3, seed: int = 3, size: int = 8) -> Tensor:
    """Signed float64 inputs (N, 3, size, size)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def assert_relative(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    """``max |actual − expected| ≤ rtol · max |expected|`` (and the same shape)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert scale > 0, "the reference is all zeros: the comparison would prove nothing"
    assert error <= rtol * scale, f"max error {error:.3g} > {rtol} × {scale:.3g}"
