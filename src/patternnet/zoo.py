"""Small models the demos train: named, seeded by the caller, for 1×28×28 inputs.

:func:`fashion_cnn` is the built-in demo's VGG-style network (``patternnet demo``),
:func:`fashion_vit` its Vision Transformer (``patternnet demo --model vit``). Each builder is
also reachable by name through :func:`patternnet.models.load` (``"patternnet.zoo:fashion_vit"``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

__all__ = ["FashionViT", "TokenViT", "fashion_cnn", "fashion_vit"]


def fashion_cnn(classes: int = 10) -> nn.Sequential:
    """The demo's small VGG-style network for 1×28×28 inputs.

    conv3×3(1→32)-ReLU-maxpool2, conv3×3(32→64)-ReLU-maxpool2, dense(3136→128)-ReLU,
    dense(128→``classes``). Modules are named (``conv1`` … ``fc2``) so patterns are readable.
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 32, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(32, 64, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(64 * 7 * 7, 128)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(128, classes)),
            ]
        )
    )


class TokenViT(nn.Module):
    """A small Vision Transformer: patch embedding → class token + position embedding →
    ``depth`` pre-norm ``nn.TransformerEncoderLayer`` blocks → LayerNorm → linear head on the
    class token.

    Everything patternnet must support in a ViT is in it: Q/K/V inside ``in_proj_weight``,
    ``out_proj`` never called by PyTorch, the fused eval path, LayerNorm, residual sums, and
    the class token and position embedding (parameters added to the activations: biases).

    Parameters
    ----------
    image_size, patch, channels:
        Square images ``(channels, image_size, image_size)`` cut into ``patch × patch``
        patches (a strided convolution, ``patch_embedding``).
    dim, heads, depth, mlp:
        Token width, attention heads, blocks, hidden units of each block's MLP.
    classes:
        Outputs of the head.
    activation:
        The MLP's activation (``"relu"`` or ``"gelu"``).
    embedding_std:
        Standard deviation of the class token and position embedding, drawn right after the
        patch embedding is built; ``None`` leaves them at zero for the caller to draw.
    """

    def __init__(self, image_size: int, patch: int, channels: int, dim: int, heads: int,
                 depth: int, mlp: int, classes: int, activation: str = "relu",
                 embedding_std: float | None = 0.02) -> None:  # fmt: skip
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        tokens = (image_size // patch) ** 2
        self.patch_embedding = nn.Conv2d(channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        if embedding_std is not None:
            nn.init.normal_(self.class_token, std=embedding_std)
            nn.init.normal_(self.pos_embedding, std=embedding_std)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation=activation,
                                       batch_first=True, norm_first=True)  # fmt: skip
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], 1)
        tokens = tokens + self.pos_embedding
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


class FashionViT(TokenViT):
    """The demo's :class:`TokenViT` (ReLU MLP, embeddings drawn with std 0.02), with the
    demo's sizes as defaults."""

    def __init__(self, image_size: int = 28, patch: int = 7, channels: int = 1,
                 dim: int = 64, heads: int = 4, depth: int = 2, mlp: int = 128,
                 classes: int = 10) -> None:  # fmt: skip
        super().__init__(image_size, patch, channels, dim, heads, depth, mlp, classes)


def fashion_vit(classes: int = 10, depth: int = 2) -> FashionViT:
    """The demo's Vision Transformer for 1×28×28 inputs: 7×7 patches (16 tokens and a class
    token), width 64, 4 heads, ``depth`` blocks with a 128-unit ReLU MLP."""
    return FashionViT(classes=classes, depth=depth)
