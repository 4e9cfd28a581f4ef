"""Statistics and patterns of the attention's weighted sum over tokens (method.md §12).

The weighted sum ``y[n, h, i, c] = Σ_j P[n, h, i, j] · v[n, h, j, c]`` is linear in the
values ``v`` with the attention probabilities ``P`` as weights. Following the paper's logic
(method.md §10: linear operations get patterns, data-dependent factors are held), ``P`` is
held on the way back and the sum gets a **fitted pattern per head, query and key**,

    a[h, i, j] = Σ_c cov(v_jc, y_ic) / Σ_c var(y_ic),

the paper's linear estimator ``a = cov[x, y] / σ²_y`` (for a fixed weight
``wᵀcov[x, y] = var(y)``; here the weight changes from sample to sample, and ``var(y)`` is
what it normalises by). Covariances are taken per channel ``c`` (each channel about its own
mean over the samples) and pooled over the head's channels, which share the pattern: a
ViT-B/16 block holds ``12 × 197 × 197`` pattern entries rather than 64 times as many. Means
pooled over channels instead would count the channels' different means (position
embedding, biases) as covariance: on the small ViT of the ground-truth test that moved most
of PatternNet's signal onto background tokens.

The node is one :class:`~patternnet.patterns.statistics.LayerStatistics` named
``"attention#k"`` (merged, all-reduced and copied with the layers) holding float64 sums
``count`` (samples), ``sum_v (H, S, C)``, ``sum_y (H, L, C)``, ``sum_vy (H, L, S)``,
``sum_yy (H, L)`` and ``sum_yiyk (H, L, L)``; :func:`attention_pattern` turns them into ``a``,
``(H·L, S)``, :func:`attention_joint_pattern` into the joint pattern ``a_joint``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.attention import AttentionHandler
from .estimators import RELATIVE_TOLERANCE, LayerReport
from .statistics import LayerStatistics, Statistics

__all__ = ["ATTENTION_SUMS", "JOINT_RTOL", "AttentionRecorder", "attention_joint_pattern",
           "attention_pattern", "update_attention"]

#: Relative cut-off of the pseudo-inverse in :func:`attention_joint_pattern`: eigenvalues of a
#: head's query covariance below ``JOINT_RTOL`` times its largest are dropped (queries whose
#: outputs are linearly dependent, e.g. constant ones).
JOINT_RTOL = 1e-6

#: The float64 sums of an attention node.
ATTENTION_SUMS = frozenset({"count", "sum_v", "sum_y", "sum_vy", "sum_yy", "sum_yiyk"})


def new_attention_statistics(heads: int, length: int, source: int, channels: int,
                             device: torch.device | str) -> LayerStatistics:  # fmt: skip
    """Empty sums of an attention node (``out_features = H·L``, ``groups = H``, ``D = S``)."""

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=device)

    tensors = {
        "count": zeros(),
        "sum_v": zeros(heads, source, channels),
        "sum_y": zeros(heads, length, channels),
        "sum_vy": zeros(heads, length, source),
        "sum_yy": zeros(heads, length),
        "sum_yiyk": zeros(heads, length, length),
    }
    return LayerStatistics(heads * length, heads, source, ATTENTION_SUMS, device, tensors)


@torch.no_grad()
def update_attention(stats: LayerStatistics, values: Tensor, out: Tensor) -> None:
    """Add one batch: values ``(N, H, S, C)`` and the weighted sum ``(N, H, L, C)``.

    Everything in float64 (an ``(H, L, S)`` and an ``(H, L, L)`` product per batch, for ``a``
    and ``a_joint``: a few percent of the attention's own cost).
    """
    v = values.detach().to(torch.float64)
    y = out.detach().to(torch.float64)
    t = stats.tensors
    t["count"] += y.shape[0]
    t["sum_v"] += v.sum(0)
    t["sum_y"] += y.sum(0)
    t["sum_vy"] += torch.einsum("nhjc,nhic->hij", v, y)
    t["sum_yy"] += (y * y).sum((0, 3))
    if "sum_yiyk" in t:  # absent in statistics saved before the joint pattern existed
        t["sum_yiyk"] += torch.einsum("nhic,nhkc->hik", y, y)


def attention_pattern(stats: LayerStatistics) -> tuple[Tensor, LayerReport]:
    """``a (H·L, S)`` from an attention node's sums (module docstring), with its report.

    Units whose output does not vary (``Σ_c var(y_ic)`` below rounding noise of the
    uncentred sum) get the pattern 0 and count as degenerate.
    """
    t = stats.tensors
    n = t["count"]
    units = stats.out_features
    if n.item() == 0:
        zero = torch.zeros(units, stats.patch_size, dtype=torch.float64)
        return zero, LayerReport(0, units, {"a": units}, {"a": 0})
    channels = t["sum_v"].shape[-1]
    cross = torch.einsum("hjc,hic->hij", t["sum_v"], t["sum_y"]) / n
    cov = (t["sum_vy"] - cross) / (n * channels)
    var = (t["sum_yy"] - (t["sum_y"] ** 2).sum(-1) / n) / (n * channels)
    reference = t["sum_yy"] / (n * channels)
    degenerate = (var <= RELATIVE_TOLERANCE * reference) | (var <= 0) | ~torch.isfinite(var)
    a = cov / torch.where(degenerate, torch.ones_like(var), var)[..., None]
    a[degenerate] = 0.0
    report = LayerReport(int(n.item()), units, {"a": 0}, {"a": int(degenerate.sum())})
    return a.reshape(units, -1), report


def attention_joint_pattern(stats: LayerStatistics) -> Tensor | None:
    """The joint pattern ``a_joint (H·L, S)`` of an attention node, or None without its sums.

    The per-query pattern ``a[h, i] = cov(v, y_i) / var(y_i)`` treats every query's output as
    if it were the only one. The outputs of one head's queries share the values they read, so
    ``Σ_i a[h, i]ᵀ s_i`` counts a signal shared by several queries once per query (the
    composition ``W Aᵀ`` of method.md §12 is not the identity). The joint pattern regresses
    the values on all queries of the head at once,

        a_joint[h] = C_yy[h]⁺ · C_yv[h],   C_yy[h][i, k] = Σ_c cov(y_ic, y_kc),
        C_yv[h][i, j] = Σ_c cov(y_ic, v_jc),

    (the multivariate pattern of Haufe et al. 2014, ``cov[x, y] cov[y]⁻¹``; per-query
    covariances pooled over the head's channels as for ``a``); with one query it is ``a``.
    The pseudo-inverse drops eigenvalues below :data:`JOINT_RTOL` times the largest.
    """
    t = stats.tensors
    if "sum_yiyk" not in t or t["count"].item() == 0:
        return None
    n = t["count"]
    channels = t["sum_v"].shape[-1]
    scale = n * channels
    cross = torch.einsum("hjc,hic->hij", t["sum_v"], t["sum_y"]) / n
    cov = (t["sum_vy"] - cross) / scale
    outer = torch.einsum("hic,hkc->hik", t["sum_y"], t["sum_y"]) / n
    cyy = (t["sum_yiyk"] - outer) / scale
    cyy = 0.5 * (cyy + cyy.transpose(-2, -1))
    joint = torch.linalg.pinv(cyy, rtol=JOINT_RTOL, hermitian=True) @ cov
    return joint.reshape(stats.out_features, -1)


class AttentionRecorder(AttentionHandler):
    """The fit's attention handler: computes the weighted sum and adds its statistics.

    Parameters
    ----------
    stats:
        The fit's :class:`~patternnet.patterns.statistics.Statistics`; each call
        ``"attention#k"`` becomes (or adds to) ``stats.layers["attention#k"]``.
    """

    def __init__(self, stats: Statistics) -> None:
        self.stats = stats

    def weighted_sum(self, name: str, probs: Tensor, values: Tensor) -> Tensor:
        out = torch.matmul(probs, values)
        heads, length, source = probs.shape[1], probs.shape[2], probs.shape[3]
        channels = values.shape[-1]
        layer = self.stats.layers.get(name)
        if layer is None:
            layer = new_attention_statistics(heads, length, source, channels, out.device)
            self.stats.layers[name] = layer
        elif tuple(layer.tensors["sum_vy"].shape) != (heads, length, source) or \
                layer.tensors["sum_v"].shape[-1] != channels:  # fmt: skip
            raise ValueError(
                f"{name} (attention) has {heads} heads × {length} queries × {source} keys in "
                f"this batch but {tuple(layer.tensors['sum_vy'].shape)} before: its patterns "
                "are per query and key, so fit with sequences of one length (images of one "
                "size)"
            )
        update_attention(layer, values, out)
        return out
