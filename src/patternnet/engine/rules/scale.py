"""The consistency scale of a layer's patterns (method.md §12, "Signal growth").

Each output unit ``j`` of a Linear/Conv layer has a pattern ``a_j`` with ``w_jᵀa_j = 1``: the
signal ``a_j y_j`` reproduces the unit's own output. PatternNet passes the sum
``s_x = Aᵀ s_y`` over the units, and ``W s_x = (W Aᵀ) s_y``, where
``(W Aᵀ)[j, k] = w_jᵀ a_k = cov(y_j, y_k) / var(y_k)``: where the units' outputs are correlated
the signal they share is counted once per unit, and ``W s_x`` overshoots ``s_y`` by up to the
largest eigenvalue of the outputs' correlation matrix. The exact correction is the joint
pattern ``Aᵀ (W Aᵀ)⁻¹`` (the multivariate pattern of Haufe et al. 2014); the **consistency
scale** is the scalar closest to it,

    c = argmin_c ‖c · W Aᵀ − I‖_F = tr(W Aᵀ) / ‖W Aᵀ‖²_F,

one number per layer (per projection for an attention's Q/K/V input projection, per group
for a grouped convolution), computed once from the weight and the pattern (no data). It
changes no unit's pattern direction; PatternNet with ``rescale`` passes ``c·Aᵀ s_y``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["cached_consistency_scale", "consistency_scale", "squared_frobenius_product"]

#: ``{(id(weight), id(pattern), blocks): (weight ref, pattern ref, versions, factor)}``: the
#: scales of :func:`cached_consistency_scale`, kept while both tensors live.
_CACHE: dict[tuple[int, int, int], tuple[Any, Any, tuple[int, int], Tensor]] = {}


def squared_frobenius_product(weight: Tensor, pattern: Tensor) -> Tensor:
    """``‖W Aᵀ‖²_F`` for ``(O, D)`` matrices, by the cheaper of ``W Aᵀ`` (``O²D``) and
    ``Σ (WᵀW) ⊙ (AᵀA)`` (``2·D²O``)."""
    out, inputs = weight.shape
    if out <= 2 * inputs:
        product = weight @ pattern.T
        return (product * product).sum()
    return ((weight.T @ weight) * (pattern.T @ pattern)).sum()


def _block_scale(weight: Tensor, pattern: Tensor) -> Tensor:
    trace = (weight * pattern).sum()
    norm = squared_frobenius_product(weight, pattern)
    if not bool(torch.isfinite(norm)) or float(norm) <= 0.0:
        return torch.ones((), dtype=weight.dtype, device=weight.device)
    return trace / norm


@torch.no_grad()
def consistency_scale(module: nn.Module, weight: Tensor, pattern: Tensor,
                      blocks: int = 1) -> Tensor:  # fmt: skip
    """Per-output-unit factors ``c`` (shape ``(O,)``, constant within a block).

    Parameters
    ----------
    module:
        The layer (its ``groups`` for a convolution).
    weight, pattern:
        The layer's weight and one of its patterns, shaped alike (``(O, ...)``).
    blocks:
        Consecutive blocks of output units scaled separately (3 for an attention's Q/K/V
        input projection, which are three layers in one weight).

    Returns
    -------
    Tensor
        Float tensor of length ``O`` on the pattern's device; ones where the layer is neither
        a Linear nor a convolution (a transposed convolution, whose weight is laid out by
        input channel).
    """
    out = weight.shape[0]
    dtype = torch.promote_types(pattern.dtype, torch.float32)
    result = torch.ones(out, dtype=dtype, device=pattern.device)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return result
    groups = int(getattr(module, "groups", 1) or 1)
    w = weight.detach().to(device=pattern.device, dtype=dtype).reshape(out, -1)
    a = pattern.detach().to(dtype).reshape(out, -1)
    if out % (blocks * groups):
        return result
    if groups > 1:  # each group a layer of its own inputs
        size = out // groups
        for start in range(0, out, size):
            rows = slice(start, start + size)
            result[rows] = _block_scale(w[rows], a[rows])
        return result
    size = out // blocks
    for start in range(0, out, size):
        rows = slice(start, start + size)
        result[rows] = _block_scale(w[rows], a[rows])
    return result


def cached_consistency_scale(module: nn.Module, weight: Tensor, pattern: Tensor,
                             blocks: int = 1) -> Tensor:  # fmt: skip
    """:func:`consistency_scale`, computed once per (weight, pattern) pair of tensors.

    A new method object built on the same model and patterns (e.g. ``PatternNet(model,
    patterns)`` per call) reuses the factors while neither tensor is changed in place or
    freed; a ViT-B/16's take about half a forward pass of 8 images to compute.
    """
    key = (id(weight), id(pattern), int(blocks))
    versions = (weight._version, pattern._version)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is weight and entry[1]() is pattern \
            and entry[2] == versions:  # fmt: skip
        return entry[3]
    factor = consistency_scale(module, weight, pattern, blocks)

    def forget(_: Any, key: tuple[int, int, int] = key) -> None:
        _CACHE.pop(key, None)

    _CACHE[key] = (weakref.ref(weight, forget), weakref.ref(pattern, forget), versions, factor)
    return factor
