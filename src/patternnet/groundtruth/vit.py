"""A small Vision Transformer for the ground-truth data (method.md §12).

:func:`small_vit` builds a ViT the size of a unit test: a patch embedding (a strided
convolution), a class token and a position embedding (parameters added to the activations:
biases), ``depth`` pre-norm ``nn.TransformerEncoderLayer`` blocks (GELU MLP), a final
LayerNorm and a linear head on the class token. Everything patternnet must support in a ViT
is in it: Q/K/V inside ``in_proj_weight``, ``out_proj`` never called by PyTorch, the fused
eval path, LayerNorm, residual sums.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import seeded_generator

__all__ = ["SmallViT", "small_vit"]


class SmallViT(nn.Module):
    """Patch embedding → class token + position embedding → blocks → LayerNorm → head.

    Parameters
    ----------
    image_size, patch, channels:
        Square images ``(channels, image_size, image_size)`` cut into ``patch × patch`` patches.
    dim, heads, depth, mlp:
        Token width, attention heads, blocks, hidden units of each block's MLP.
    classes:
        Outputs of the head.
    """

    def __init__(
        self, image_size: int = 8, patch: int = 2, channels: int = 1, dim: int = 16,
        heads: int = 2, depth: int = 2, mlp: int = 32, classes: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        tokens = (image_size // patch) ** 2
        self.patch_embedding = nn.Conv2d(channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu",
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


def small_vit(seed: int = 0, **options: int) -> SmallViT:
    """A :class:`SmallViT` initialised from ``seed`` (class token and position embedding
    drawn with standard deviation 0.02, as in ViT)."""
    generator = seeded_generator(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = SmallViT(**options)
        with torch.no_grad():
            model.class_token.normal_(0.0, 0.02)
            model.pos_embedding.normal_(0.0, 0.02)
    return model
