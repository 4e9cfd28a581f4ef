"""Signal estimators: pure functions from statistics (and weights) to patterns.

method.md §2. Every function takes the float64 sums of one layer
(:class:`~patternnet.patterns.statistics.LayerStatistics`) and the layer's weight, and returns
float64 patterns shaped ``(O, D)`` (reshape to the weight's shape) plus a small report.

- identity ``S_x(x) = x``: no pattern (its attribution is LRP-z, an input-dependent rule);
- filter ``S_w(x) = w wᵀx / (wᵀw)``: ``a = w / (wᵀw)``;
- linear ``S_a(x) = a y`` with ``a = cov[x, y] / (wᵀ cov[x, y])``;
- two-component ``S_a+-``: ``a₊ = (E₊[xy] − E₊[x] E[y]) / wᵀ(…)`` over active samples, and
  ``a₋`` likewise over inactive ones, with ``E[y]`` over ALL samples.

Dead units (no sample on that side) and zero denominators give zero patterns, never NaN, and
are counted in the report. A denominator counts as zero when it is below ``1e-12`` times the
magnitude of the two terms whose difference it is (the cancellation is then pure rounding).

The two-component normaliser is not sign-definite (method.md §11). On the active side
``wᵀ(E₊[xy] − E₊[x]E[y]) = E₊[y²] − E₊[y]E[y] = Var₊(y) + E₊[y]·(E₊[y] − E[y])``, and since
``E₊[y] ≥ E[y]`` (the active side is the upper part of ``y + b``) it falls below ``Var₊(y)``
exactly when ``E₊[y] < 0``: a unit whose bias lets it fire on mostly negative ``y`` (a bias
offset, BatchNorm folded in). Then the pattern flips sign or blows up. A unit whose normaliser
is ``≤ MIN_NORMALISER_FRACTION · Var₊(y)`` (likewise ``Var₋(y)`` for ``a₋``) **falls back to
its linear pattern** ``a = cov[x, y] / Var(y)`` on that side; the report counts them and the
fit records which units they are. Where ``E₊[y] ≥ 0`` (every ReLU unit without bias, and most
with one) the normaliser is at least ``Var₊(y)`` and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .statistics import LayerStatistics

__all__ = [
    "ESTIMATORS",
    "MIN_NORMALISER_FRACTION",
    "LayerReport",
    "filter_pattern",
    "linear_pattern",
    "normalise",
    "two_component_patterns",
]

#: The estimator names, in the paper's order.
ESTIMATORS = ("identity", "filter", "linear", "two_component")

#: Relative size under which a denominator is rounding noise.
RELATIVE_TOLERANCE = 1e-12

#: A two-component normaliser at or below this fraction of the side's variance ``Var₊(y)``
#: (``Var₋(y)`` for a₋) is ill-conditioned: the unit falls back to its linear pattern. At this
#: value the normaliser amplifies the side's covariance at most tenfold; in a ReLU unit
#: without bias the ratio is ≥ 1, so fallbacks only happen where ``E₊[y] < 0``.
MIN_NORMALISER_FRACTION = 0.1


@dataclass
class LayerReport:
    """What a fit saw in one layer.

    Attributes
    ----------
    samples:
        Samples (rows or positions × images) accumulated.
    units:
        Output units of the layer.
    dead:
        Units with a zero pattern because they never fired (a₊) / never were silent (a₋)
        on the data, per pattern name.
    degenerate:
        Units with a zero pattern because the normaliser was zero (constant output), per
        pattern name.
    active_fraction:
        Mean over units of the fraction of samples where the unit was active (two-component).
    fallback:
        Two-component only: per pattern name, the indices of the units whose normaliser was
        ill-conditioned (``≤ MIN_NORMALISER_FRACTION · Var(y)`` on that side) and which got
        their linear pattern instead (the filter pattern ``w/wᵀw`` when the fit did not
        collect the linear sums, ``negative=False``).
    fallback_to:
        ``"linear"`` or ``"filter"``: what those units got.
    """

    samples: int
    units: int
    dead: dict[str, int]
    degenerate: dict[str, int]
    active_fraction: float | None = None
    fallback: dict[str, list[int]] | None = None
    fallback_to: str | None = None


def _per_unit(sum_x: Tensor, out_features: int) -> Tensor:
    """Expand ``(G, D)`` per-group sums to ``(O, D)`` per-unit sums."""
    groups = sum_x.shape[0]
    return sum_x.repeat_interleave(out_features // groups, dim=0)


def normalise(numerator: Tensor, weight: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Divide each row by ``wᵀ row``; rows whose normaliser is rounding noise become zero.

    Parameters
    ----------
    numerator:
        ``(O, D)`` unnormalised patterns (covariances).
    weight:
        ``(O, D)`` float64 weights.
    reference:
        ``(O,)`` magnitude of the terms whose difference ``wᵀ numerator`` is; a normaliser
        smaller than ``RELATIVE_TOLERANCE × reference`` (or exactly zero) counts as zero.

    Returns
    -------
    patterns, degenerate:
        ``(O, D)`` patterns with ``wᵀa = 1`` on live rows, and the ``(O,)`` boolean mask of
        rows set to zero.
    """
    denominator = (weight * numerator).sum(1)
    degenerate = (denominator.abs() <= RELATIVE_TOLERANCE * reference) | (denominator == 0)
    degenerate |= ~torch.isfinite(denominator)
    safe = torch.where(degenerate, torch.ones_like(denominator), denominator)
    patterns = numerator / safe[:, None]
    patterns[degenerate] = 0.0
    return patterns, degenerate


def filter_pattern(weight: Tensor) -> tuple[Tensor, LayerReport]:
    """The filter estimator's pattern ``a = w / (wᵀw)`` (needs no data).

    Parameters
    ----------
    weight:
        ``(O, D)`` weights (any float dtype; computed in float64).
    """
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    norm = (w * w).sum(1)
    degenerate = norm == 0
    a = w / torch.where(degenerate, torch.ones_like(norm), norm)[:, None]
    report = LayerReport(0, w.shape[0], {"a": 0}, {"a": int(degenerate.sum())})
    return a, report


def linear_pattern(stats: LayerStatistics, weight: Tensor) -> tuple[Tensor, LayerReport]:
    """The linear estimator ``a = cov[x, y] / (wᵀ cov[x, y])`` (method.md §2).

    Parameters
    ----------
    stats:
        Sums with ``count``, ``sum_x``, ``sum_y``, ``sum_xy``.
    weight:
        The layer's weight (``(O, ...)``, any float dtype).
    """
    w = weight.detach().to(torch.float64).reshape(stats.out_features, -1).to(stats["count"].device)
    n = stats["count"]
    O = stats.out_features
    if n.item() == 0:
        zero = torch.zeros_like(w)
        return zero, LayerReport(0, O, {"a": O}, {"a": 0})
    ex = _per_unit(stats["sum_x"], O) / n
    ey = stats["sum_y"] / n
    exy = stats["sum_xy"] / n
    cov = exy - ex * ey[:, None]
    reference = (w * exy).sum(1).abs() + (w * ex).sum(1).abs() * ey.abs()
    a, degenerate = normalise(cov, w, reference)
    return a, LayerReport(int(n.item()), O, {"a": 0}, {"a": int(degenerate.sum())})


def two_component_patterns(
    stats: LayerStatistics, weight: Tensor, negative: bool = True
) -> tuple[dict[str, Tensor], LayerReport]:
    """The two-component estimator's ``a₊`` (and ``a₋``) (method.md §2).

    ``a₊ = (E₊[xy] − E₊[x] E[y]) / (wᵀE₊[xy] − wᵀE₊[x] E[y])`` where ``E₊`` averages over
    the samples with ``wᵀx + b > 0`` and ``E[y]`` over all samples; ``a₋`` is the same over
    the samples with ``wᵀx + b ≤ 0``.

    Parameters
    ----------
    stats:
        Sums with ``count``, ``sum_y``, ``count_plus``, ``sum_x_plus``, ``sum_xy_plus`` (and
        ``sum_x``, ``sum_xy`` or ``sum_x_minus``, ``sum_xy_minus`` for a₋).
    weight:
        The layer's weight.
    negative:
        Also compute ``a₋``.

    Returns
    -------
    patterns, report:
        ``{"a_plus": (O, D)[, "a_minus": (O, D)]}`` and the :class:`LayerReport`.
    """
    O = stats.out_features
    w = weight.detach().to(torch.float64).reshape(O, -1).to(stats["count"].device)
    n = stats["count"]
    ey = stats["sum_y"] / n.clamp(min=1)
    # Each side: count, sums, and the magnitudes the sums' rounding scales with (a₋'s sums are
    # differences all − plus, so their rounding is that of both terms, not of the result).
    plus_x, plus_xy = stats["sum_x_plus"], stats["sum_xy_plus"]
    sides = {"a_plus": (stats["count_plus"], plus_x, plus_xy, plus_x.abs(), plus_xy.abs())}
    direct = "sum_xy_minus" in stats.tensors  # collected directly (float32 fits)
    if negative and direct:
        minus_x, minus_xy = stats["sum_x_minus"], stats["sum_xy_minus"]
        sides["a_minus"] = (n - stats["count_plus"], minus_x, minus_xy, minus_x.abs(),
                            minus_xy.abs())  # fmt: skip
    elif negative:
        count_minus = n - stats["count_plus"]
        all_x = _per_unit(stats["sum_x"], O)
        sum_x_minus = all_x - plus_x
        sum_xy_minus = stats["sum_xy"] - plus_xy
        sides["a_minus"] = (
            count_minus,
            sum_x_minus,
            sum_xy_minus,
            all_x.abs() + plus_x.abs(),
            stats["sum_xy"].abs() + plus_xy.abs(),
        )
    patterns: dict[str, Tensor] = {}
    dead: dict[str, int] = {}
    degenerate_counts: dict[str, int] = {}
    fallback: dict[str, list[int]] = {}
    replacement: Tensor | None = None
    fallback_to = "linear" if (direct or "sum_xy" in stats.tensors) else "filter"
    for name, (count, sum_x, sum_xy, size_x, size_xy) in sides.items():
        alive = count > 0
        safe = torch.where(alive, count, torch.ones_like(count))[:, None]
        ex, exy = sum_x / safe, sum_xy / safe
        numerator = exy - ex * ey[:, None]
        reference = (w.abs() * size_xy / safe).sum(1) + (w.abs() * size_x / safe).sum(
            1
        ) * ey.abs()
        a, degenerate = normalise(numerator, w, reference)
        a[~alive] = 0.0
        # The normaliser E_side[y²] − E_side[y]E[y] against the side's variance of y.
        side_y2, side_y = (w * exy).sum(1), (w * ex).sum(1)
        variance = (side_y2 - side_y * side_y).clamp(min=0)
        normaliser = (w * numerator).sum(1)
        unsafe = alive & ~degenerate & (normaliser <= MIN_NORMALISER_FRACTION * variance)
        if bool(unsafe.any()):
            if replacement is None:
                replacement = _fallback_patterns(stats, w, direct)
            a[unsafe] = replacement[unsafe]
        patterns[name] = a
        dead[name] = int((~alive).sum())
        degenerate_counts[name] = int((degenerate & alive).sum())
        fallback[name] = unsafe.nonzero().flatten().tolist()
    fraction = None
    if n.item() > 0:
        fraction = float((stats["count_plus"] / n).mean())
    report = LayerReport(
        int(n.item()), O, dead, degenerate_counts, fraction, fallback, fallback_to
    )
    return patterns, report


def _fallback_patterns(stats: LayerStatistics, w: Tensor, direct: bool) -> Tensor:
    """The ``(O, D)`` patterns ill-conditioned two-component units fall back to.

    The linear pattern ``cov[x, y] / wᵀcov[x, y]`` over all samples, from the sums the fit
    holds (``sum_x``/``sum_xy``, or active + inactive sums of a float32 fit); without them
    (``negative=False``) the filter pattern ``w / wᵀw``, which needs no data.
    """
    O = w.shape[0]
    n = stats["count"]
    if direct:
        sum_x = stats["sum_x_plus"] + stats["sum_x_minus"]
        sum_xy = stats["sum_xy_plus"] + stats["sum_xy_minus"]
    elif "sum_xy" in stats.tensors:
        sum_x, sum_xy = _per_unit(stats["sum_x"], O), stats["sum_xy"]
    else:
        return filter_pattern(w)[0]
    count = n.clamp(min=1)
    ex, ey, exy = sum_x / count, stats["sum_y"] / count, sum_xy / count
    reference = (w * exy).sum(1).abs() + (w * ex).sum(1).abs() * ey.abs()
    a, _ = normalise(exy - ex * ey[:, None], w, reference)
    return a
