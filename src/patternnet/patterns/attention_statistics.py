"""Statistics and patterns of the attention's weighted sum over tokens (method.md §12).

The weighted sum ``y[n, h, i, c] = Σ_j P[n, h, i, j] · v[n, h, j, c]`` is linear in the
values ``v`` with the attention probabilities ``P`` as weights. Following the paper's logic
(method.md §10: linear operations get patterns, data-dependent factors are held), ``P`` is
held on the way back and the sum gets a **fitted pattern per head, query and key**,

    a[h, i, j] = cov(v_j, y_i) / var(y_i),

the paper's linear estimator ``a = cov[x, y] / σ²_y`` (with a fixed weight
``wᵀcov[x, y] = var(y)``; here the weight changes from sample to sample, and ``var(y)`` is
what it normalises by). The covariances pool the samples and the head's channels ``c`` (the
channels share the pattern, as a convolution's positions do), so a ViT-B/16 block holds
``12 × 197 × 197`` pattern entries rather than 64 times as many.

The node is stored like the nodes of :mod:`patternnet.engine.nodes`: one
:class:`~patternnet.patterns.statistics.LayerStatistics` named ``"attention#k"`` (merged,
all-reduced and checkpointed with the layers) with ``U = H·L`` units and ``D = S + 1`` inputs,
the last input being ``y`` itself. With the fixed weight ``[0, …, 0, 1]``
(:func:`patternnet.engine.nodes.fixed_weight`) the library's linear estimator returns exactly
``cov(x, y) / var(y)`` (its last entry 1, unused), safe normaliser included: a unit whose
output does not vary gets the pattern 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.attention import AttentionHandler
from .statistics import LayerStatistics, Statistics

__all__ = ["AttentionRecorder", "ATTENTION_SUMS", "update_attention"]

#: The sums of an attention node (those of the linear estimator).
ATTENTION_SUMS = frozenset({"count", "sum_y", "sum_x", "sum_xy"})


@torch.no_grad()
def update_attention(stats: LayerStatistics, values: Tensor, out: Tensor) -> None:
    """Add one batch: values ``(N, H, S, C)`` and the weighted sum ``(N, H, L, C)``.

    Everything in float64 (one ``(H, L, S)`` product per batch: a few percent of the
    attention's own cost).
    """
    v = values.detach().to(torch.float64)
    y = out.detach().to(torch.float64)
    heads, length, source = y.shape[1], y.shape[2], v.shape[2]
    t = stats.tensors
    t["count"] += y.shape[0] * y.shape[3]
    sum_y = y.sum((0, 3)).reshape(-1)  # (H·L,)
    t["sum_y"] += sum_y
    sum_v = v.sum((0, 3))  # (H, S)
    t["sum_x"][:, :source] += sum_v[:, None, :].expand(heads, length, source).reshape(-1, source)
    t["sum_x"][:, source] += sum_y
    t["sum_xy"][:, :source] += torch.einsum("nhjc,nhic->hij", v, y).reshape(-1, source)
    t["sum_xy"][:, source] += (y * y).sum((0, 3)).reshape(-1)


class AttentionRecorder(AttentionHandler):
    """The fit's attention handler: computes the weighted sum and adds its statistics.

    Parameters
    ----------
    stats:
        The fit's :class:`~patternnet.patterns.statistics.Statistics`; each call
        ``"attention#k"`` becomes (or adds to) ``stats.layers["attention#k"]``.
    precision:
        Unused (attention sums are float64 products); kept for symmetry with the layers.
    """

    def __init__(self, stats: Statistics, precision: str = "float64") -> None:
        self.stats = stats
        self.precision = precision

    def weighted_sum(self, name: str, probs: Tensor, values: Tensor) -> Tensor:
        out = torch.matmul(probs, values)
        heads, length, source = probs.shape[1], probs.shape[2], probs.shape[3]
        units, width = heads * length, source + 1
        layer = self.stats.layers.get(name)
        if layer is None:
            device = out.device
            layer = LayerStatistics(units, units, width, ATTENTION_SUMS, device)
            self.stats.layers[name] = layer
        elif (layer.out_features, layer.patch_size) != (units, width):
            raise ValueError(
                f"{name} (attention) has {heads} heads × {length} queries × {source} keys in "
                f"this batch but {layer.out_features} units with {layer.patch_size - 1} keys "
                "before: its patterns are per query and key, so fit with sequences of one "
                "length (images of one size)"
            )
        update_attention(layer, values, out)
        return out
