"""Metrics of an explanation against a known signal (ground-truth benchmarks).

All metrics work per sample on the flattened explanation and return one value per sample
(``(N,)`` float64); average them for a table. Explanations of any method are compared by their
magnitude ``|e|`` (the sign of an explanation is method-specific; where the signal lives is not).

- :func:`signal_cosine` — cosine similarity of ``|e|`` to ``|true signal|`` (1 = the explanation
  has exactly the shape of the signal);
- :func:`topk_precision` — the fraction of the ``k`` features with the largest ``|e|`` that lie
  in the signal mask (``k`` = the mask's size by default; features with ``e = 0`` are never
  selected, as in XAI-TRIS);
- :func:`mask_auroc` — ROC-AUC of ``|e|`` as a detector of the mask's features (Wilming et
  al. 2022's main metric; 1 = every mask feature above every other);
- :func:`earth_movers_distance`, :func:`emd_score` — the optimal-transport distance between
  ``|e|`` and the mask, both normalised to sum 1, with Euclidean pixel distances as the cost,
  and XAI-TRIS's score ``1 − EMD/√(2·H·W)`` (exact, by the network simplex of POT);
- :func:`region_mass` — the fraction of ``Σ|e|`` that falls in a region (e.g. the suppressor
  region, which holds no information about the target and should get none);
- :func:`ground_truth_metrics` — all of them for one explanation of a
  :class:`~patternnet.groundtruth.GroundTruthData`.

References
----------
Wilming et al., "Scrutinizing XAI using linear ground-truth data with suppressor variables",
Machine Learning 2022; Clark et al., "XAI-TRIS", Machine Learning 2024.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "earth_movers_distance",
    "emd_score",
    "ground_truth_metrics",
    "mask_auroc",
    "region_mass",
    "signal_cosine",
    "topk_precision",
]

EPS = 1e-30


def _flat(name: str, tensor: Tensor, n: int | None = None) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, not {type(tensor).__name__}")
    if tensor.dim() < 2:
        raise ValueError(f"{name} must be a batch (N, ...), got shape {tuple(tensor.shape)}")
    if n is not None and tensor.shape[0] != n:
        raise ValueError(f"{name} has {tensor.shape[0]} samples, the explanation has {n}")
    return tensor.detach().reshape(tensor.shape[0], -1).to("cpu")


def _same_shape(explanation: Tensor, other: Tensor, name: str) -> Tensor:
    if other.shape != explanation.shape:
        try:
            other = other.expand_as(explanation)
        except RuntimeError:
            raise ValueError(
                f"{name} has shape {tuple(other.shape)}, the explanation "
                f"{tuple(explanation.shape)}; they must match"
            ) from None
    return other


def signal_cosine(explanation: Tensor, signal: Tensor) -> Tensor:
    """Cosine similarity of ``|explanation|`` and ``|signal|`` per sample.

    Parameters
    ----------
    explanation:
        ``(N, ...)`` explanations.
    signal:
        The true signal (or its pattern, or its 0/1 mask), broadcastable to ``explanation``.

    Returns
    -------
    Tensor
        ``(N,)`` float64 in ``[0, 1]``; 0 for an all-zero explanation or signal.
    """
    signal = _same_shape(explanation, signal, "signal")
    e = _flat("explanation", explanation).abs().double()
    s = _flat("signal", signal, e.shape[0]).abs().double()
    return (e * s).sum(1) / (e.norm(dim=1) * s.norm(dim=1)).clamp(min=EPS)


def topk_precision(explanation: Tensor, mask: Tensor, k: int | None = None) -> Tensor:
    """Fraction of the ``k`` largest ``|explanation|`` features that lie in ``mask``.

    Parameters
    ----------
    explanation:
        ``(N, ...)`` explanations.
    mask:
        Boolean signal mask broadcastable to ``explanation``.
    k:
        How many top features to count; default: each sample's number of mask features.
        Ties are broken by position (the first features win). Features with ``e = 0`` are
        never selected (an all-zero explanation scores 0), as XAI-TRIS counts them.

    Returns
    -------
    Tensor
        ``(N,)`` float64 in ``[0, 1]``.
    """
    mask = _same_shape(explanation, mask, "mask")
    e = _flat("explanation", explanation).abs().double()
    m = _flat("mask", mask, e.shape[0]).bool()
    sizes = m.sum(1) if k is None else torch.full((e.shape[0],), int(k))
    if bool((sizes < 1).any()) or bool((sizes > e.shape[1]).any()):
        raise ValueError(f"k must lie in 1 … {e.shape[1]}; got {sizes.tolist()[:5]}")
    # stable sort so that equal magnitudes keep their order (deterministic ties)
    order = torch.sort(e, dim=1, descending=True, stable=True).indices
    hits = (torch.gather(m, 1, order) & (torch.gather(e, 1, order) > 0)).double()
    rank = torch.arange(e.shape[1])[None, :]
    return (hits * (rank < sizes[:, None])).sum(1) / sizes.double()


def mask_auroc(explanation: Tensor, mask: Tensor) -> Tensor:
    """ROC-AUC of ``|explanation|`` against the binary ``mask``, per sample.

    The probability that a feature in the mask gets a larger ``|e|`` than one outside it, ties
    counting one half (the Mann–Whitney statistic; what ``sklearn.metrics.roc_auc_score``
    gives). Wilming et al. 2022 score explanations this way.

    Returns
    -------
    Tensor
        ``(N,)`` float64 in ``[0, 1]`` (0.5 = chance).
    """
    mask = _same_shape(explanation, mask, "mask")
    e = _flat("explanation", explanation).abs().double()
    m = _flat("mask", mask, e.shape[0]).bool()
    out = torch.empty(e.shape[0], dtype=torch.float64)
    for i in range(e.shape[0]):
        pos, neg = e[i][m[i]], e[i][~m[i]]
        if pos.numel() == 0 or neg.numel() == 0:
            raise ValueError(f"the mask of sample {i} must have features inside and outside")
        # average ranks handle ties exactly: AUC = (Σ ranks of pos − p(p+1)/2) / (p·q)
        values, inverse, counts = torch.unique(e[i], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        average_rank = ends - (counts.double() - 1) / 2
        ranks = average_rank[inverse]
        p, q = pos.numel(), neg.numel()
        out[i] = (ranks[m[i]].sum() - p * (p + 1) / 2) / (p * q)
        del values
    return out


def _pixel_grid(shape: tuple[int, ...]) -> Tensor:
    """``(H·W, 2)`` float64 pixel coordinates (row, column) of an image of ``shape[-2:]``."""
    h, w = shape[-2], shape[-1]
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], 1)


def earth_movers_distance(explanation: Tensor, mask: Tensor) -> Tensor:
    """Earth mover's distance between ``|explanation|`` and ``mask`` per image, in pixels.

    Both are normalised to sum 1 and the cost of moving mass is the Euclidean distance between
    pixel centres (XAI-TRIS, Clark et al. 2024, ``eval/eval_utils.py``). Solved exactly (POT's
    network simplex, ``ot.emd2``) between the two supports, which gives the same optimum as the
    dense problem and keeps 64×64 images fast.

    Parameters
    ----------
    explanation:
        ``(N, H, W)`` or ``(N, 1, H, W)`` explanations (several channels are summed in
        ``|e|`` first).
    mask:
        The ground truth, broadcastable to ``explanation`` (boolean or non-negative weights).

    Returns
    -------
    Tensor
        ``(N,)`` float64; ``nan`` where the explanation is all zero (no distribution to move).

    Raises
    ------
    ImportError
        Without POT: ``pip install pot`` (or ``pip install 'patternnet[groundtruth]'``).
    """
    try:
        import ot  # optional dependency: the exact transport solver
    except ImportError:  # pragma: no cover - exercised only without POT
        raise ImportError(
            "earth_movers_distance needs POT: pip install pot (or 'patternnet[groundtruth]')"
        ) from None
    if explanation.dim() not in (3, 4):
        raise ValueError(
            f"explanation must be images (N, H, W) or (N, C, H, W), got {tuple(explanation.shape)}"
        )
    mask = _same_shape(explanation, mask, "mask")
    e = explanation.detach().abs().double().cpu()
    m = mask.detach().double().cpu()
    if bool((m < 0).any()):
        raise ValueError("mask must be non-negative (a 0/1 mask or weights)")
    if e.dim() == 4:
        e, m = e.sum(1), m.amax(1)
    grid = _pixel_grid(tuple(e.shape))
    out = torch.full((e.shape[0],), float("nan"), dtype=torch.float64)
    for i in range(e.shape[0]):
        a, b = m[i].reshape(-1), e[i].reshape(-1)
        if float(a.sum()) <= 0:
            raise ValueError(f"the mask of sample {i} is empty")
        if float(b.sum()) <= 0:
            continue
        ia, ib = a.nonzero().squeeze(1), b.nonzero().squeeze(1)
        cost = torch.cdist(grid[ia], grid[ib])
        pa, pb = a[ia] / a[ia].sum(), b[ib] / b[ib].sum()
        out[i] = float(ot.emd2(pa.numpy(), pb.numpy(), cost.numpy(), numItermax=1_000_000))
    return out


def emd_score(explanation: Tensor, mask: Tensor) -> Tensor:
    """XAI-TRIS's EMD score ``1 − EMD/√(2·H·W)`` per image (1 = all mass on the mask).

    The normaliser is the one their code uses, ``√(n_dim + n_dim)`` with ``n_dim = H·W``
    (11.31 at 8×8, 90.51 at 64×64; slightly more than the largest pixel distance
    ``√2·(H − 1)``), so scores are comparable with their figures. See
    :func:`earth_movers_distance` for the distance and its arguments.
    """
    h, w = explanation.shape[-2], explanation.shape[-1]
    return 1.0 - earth_movers_distance(explanation, mask) / (2.0 * h * w) ** 0.5


def region_mass(explanation: Tensor, region: Tensor) -> Tensor:
    """Fraction of ``Σ|explanation|`` inside ``region`` per sample (0 for a zero explanation)."""
    region = _same_shape(explanation, region, "region")
    e = _flat("explanation", explanation).abs().double()
    r = _flat("region", region, e.shape[0]).bool()
    return (e * r).sum(1) / e.sum(1).clamp(min=EPS)


def ground_truth_metrics(
    explanation: Tensor, data: Any, *, k: int | None = None, emd: bool = False
) -> dict[str, float]:
    """All ground-truth metrics of ``explanation`` on ``data``, averaged over samples.

    Parameters
    ----------
    explanation:
        ``(N, ...)`` explanations of ``data.inputs`` (or of its first ``N`` samples).
    data:
        A :class:`~patternnet.groundtruth.GroundTruthData`.
    k:
        For :func:`topk_precision` (default: the mask size).
    emd:
        Also compute :func:`emd_score` against the signal mask (images only; needs POT).

    Returns
    -------
    dict
        ``{"signal_cosine", "topk_precision", "mass_<region>" for each region}``, and
        ``"emd_score"`` (mean over images with a non-zero explanation) when ``emd``.
    """
    n = explanation.shape[0]
    truth = data.subset(slice(0, n))
    if truth.inputs.shape != explanation.shape:
        raise ValueError(
            f"explanation has shape {tuple(explanation.shape)}, the data's inputs "
            f"{tuple(truth.inputs.shape)}"
        )
    out = {
        "signal_cosine": float(signal_cosine(explanation, truth.signal).mean()),
        "topk_precision": float(topk_precision(explanation, truth.signal_mask, k).mean()),
    }
    for name, region in truth.regions.items():
        out[f"mass_{name}"] = float(region_mass(explanation, region).mean())
    if emd:
        out["emd_score"] = float(emd_score(explanation, truth.signal_mask).nanmean())
    return out
