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

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .statistics import LayerStatistics

__all__ = [
    "ESTIMATORS",
    "MIN_NORMALISER_FRACTION",
    "LayerReport",
    "NonFiniteStatisticsError",
    "Workspace",
    "filter_pattern",
    "linear_pattern",
    "normalise",
    "one_thread",
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


#: Elements of one block of rows (units) solved at a time. A block's float64 buffers (a few
#: of 2 MB each) stay in the cache and are reused by every block and layer
#: (:class:`Workspace`): a fresh temporary of that size costs a page fault per 4 kB on first
#: touch, which made the solve of VGG16 take minutes.
BLOCK_ELEMENTS = 1 << 18

#: Layers of at least this many blocks are solved on two threads (:func:`_solve_blocks`).
PARALLEL_BLOCKS = 16


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (the previous count is restored).

    The solve is a sequence of cache-sized, memory-bound operations: on the shared 2-core
    machine, OpenMP's fork and join around each of them cost more than the second thread
    gained (VGG16's solve: 13-75 s of CPU time on two threads under load, 3-5 s on one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class NonFiniteStatisticsError(ValueError):
    """The sums hold NaN or Inf; ``names`` says which."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(f"the statistics hold NaN or Inf ({', '.join(names)})")


class Workspace:
    """Float64 buffers for one block of rows, reused from block to block and layer to layer.

    Pass one to several calls of :func:`two_component_patterns` / :func:`linear_pattern` (as
    :func:`~patternnet.patterns.fit.compute_patterns` does) so that the buffers are allocated
    once per fit.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._partner: Workspace | None = None

    def partner(self) -> Workspace:
        """A second workspace, kept with this one, for a second thread's blocks."""
        if self._partner is None:
            self._partner = Workspace()
        return self._partner

    def __call__(self, name: str, rows: int, cols: int, device: torch.device) -> Tensor:
        """A ``(rows, cols)`` float64 buffer (contents undefined)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < rows * cols or buffer.device != device:
            buffer = torch.empty(max(rows * cols, 1), dtype=torch.float64, device=device)
            self._buffers[name] = buffer
        return buffer[: rows * cols].view(rows, cols)


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
    degenerate = _degenerate(denominator, reference)
    safe = torch.where(degenerate, torch.ones_like(denominator), denominator)
    patterns = numerator / safe[:, None]
    patterns[degenerate] = 0.0
    return patterns, degenerate


def _degenerate(denominator: Tensor, reference: Tensor) -> Tensor:
    """Rows whose ``denominator`` is zero, rounding noise against ``reference``, or not finite."""
    degenerate = (denominator.abs() <= RELATIVE_TOLERANCE * reference) | (denominator == 0)
    return degenerate | ~torch.isfinite(denominator)


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


class _Block:
    """One block of rows ``start:stop`` of a layer: its float64 weight and row-wise dots.

    ``dot(T)`` is ``wᵀT`` per row and ``absdot(T)`` is ``|w|ᵀ|T|`` (the magnitude that the
    rounding of ``wᵀT`` scales with), both from one product ``w ⊙ T`` kept in the cache.
    """

    def __init__(self, weight: Tensor, start: int, stop: int, work: Workspace) -> None:
        self.start, self.stop = start, stop
        rows, cols = stop - start, weight.shape[1]
        self.work, self.device = work, weight.device
        self.w = work("w", rows, cols, weight.device).copy_(weight[start:stop])
        self.product = work("product", rows, cols, weight.device)

    def dots(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(wᵀt, |w|ᵀ|t|)`` per row (``t`` broadcastable to the block)."""
        torch.mul(self.w, t, out=self.product)
        return self.product.sum(1), torch.linalg.vector_norm(self.product, ord=1, dim=1)

    def dot(self, t: Tensor) -> Tensor:
        """``wᵀt`` per row."""
        return torch.mul(self.w, t, out=self.product).sum(1)

    def size(self, t: Tensor) -> Tensor:
        """``|w|ᵀ|t|`` per row."""
        torch.mul(self.w, t, out=self.product)
        return torch.linalg.vector_norm(self.product, ord=1, dim=1)

    def centred(self, name: str, sum_xy: Tensor, sum_x: Tensor, ey: Tensor) -> Tensor:
        """``sum_xy − sum_x · E[y]`` (per row) in the buffer ``name``."""
        out = self.work(name, self.stop - self.start, self.w.shape[1], self.device)
        return torch.addcmul(sum_xy, sum_x, ey[:, None], value=-1.0, out=out)


def _rows_of(t: Tensor, block: _Block) -> Tensor:
    return t[block.start : block.stop]


def _group_rows(sum_x: Tensor, out_features: int, block: _Block) -> Tensor:
    """The ``(G, D)`` per-group sums for the block's rows (broadcast when ``G == 1``)."""
    groups = sum_x.shape[0]
    if groups == 1:
        return sum_x
    index = torch.arange(block.start, block.stop, device=sum_x.device) // (out_features // groups)
    out = block.work("group", block.stop - block.start, sum_x.shape[1], block.device)
    return torch.index_select(sum_x, 0, index, out=out)


def _check_finite(stats: LayerStatistics, names: list[str] | None = None) -> None:
    """Raise :class:`NonFiniteStatisticsError` naming the sums (of ``names``) with NaN/Inf."""
    broken = sorted(k for k, t in stats.tensors.items()
                    if (names is None or k in names) and not torch.isfinite(t).all())  # fmt: skip
    if broken:
        raise NonFiniteStatisticsError(broken)


def _solve_blocks(weight: Tensor, work: Workspace, solve: Callable[[_Block], None]) -> None:
    """``solve(block)`` for every block of rows of a layer.

    A layer of at least :data:`PARALLEL_BLOCKS` blocks (VGG16's fc6 holds 1.6 GB of float64
    sums in 410 blocks) is solved on two threads, alternate blocks each, every thread with its
    own buffers and one intra-op thread: the blocks are independent and each is computed the
    same way as on one thread, so the patterns are identical; the solve streams the sums from
    memory, which two cores read faster than one. ``solve`` must write only the block's rows.
    """
    O, D = weight.shape
    rows = max(1, BLOCK_ELEMENTS // max(1, D))
    starts = list(range(0, O, rows))

    def run(part: list[int], buffers: Workspace) -> None:
        for start in part:
            solve(_Block(weight, start, min(O, start + rows), buffers))

    def worker(part: list[int], buffers: Workspace) -> None:
        torch.set_num_threads(1)  # this thread only runs these blocks (nothing to restore)
        run(part, buffers)

    if len(starts) < PARALLEL_BLOCKS or weight.device.type != "cpu":
        run(starts, work)
        return
    with one_thread(), ThreadPoolExecutor(1) as pool:
        other = pool.submit(worker, starts[1::2], work.partner())
        try:
            run(starts[0::2], work)
        finally:
            other.result()


def _weight(stats: LayerStatistics, weight: Tensor) -> Tensor:
    return weight.detach().reshape(stats.out_features, -1).to(stats.tensors["count"].device)


def _write(out: Tensor, block: _Block, values: Tensor, scale: Tensor) -> None:
    """``out[block] = values · scale`` (per row), rounded once into ``out``'s dtype."""
    torch.mul(values, scale[:, None], out=out[block.start : block.stop])


def linear_pattern(
    stats: LayerStatistics,
    weight: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    workspace: Workspace | None = None,
) -> tuple[Tensor, LayerReport]:
    """The linear estimator ``a = cov[x, y] / (wᵀ cov[x, y])`` (method.md §2).

    Computed in float64, a block of rows at a time: ``a = (Σxy − Σx·E[y]) / (n·wᵀcov)``
    with ``n·wᵀcov = wᵀΣxy − E[y]·wᵀΣx``. A row whose normaliser is below ``1e-12 ×
    (|wᵀΣxy| + |wᵀΣx|·|E[y]|)`` is zero (degenerate).

    Parameters
    ----------
    stats:
        Sums with ``count``, ``sum_x``, ``sum_y``, ``sum_xy``.
    weight:
        The layer's weight (``(O, ...)``, any float dtype).
    dtype:
        dtype of the returned patterns (rounded once from float64).
    workspace:
        Buffers to reuse (see :class:`Workspace`).

    Raises
    ------
    NonFiniteStatisticsError
        When the sums hold NaN or Inf.
    """
    w = _weight(stats, weight)
    O, D = w.shape
    n = stats["count"]
    a = torch.zeros((O, D), dtype=dtype, device=w.device)
    if n.item() == 0:
        return a, LayerReport(0, O, {"a": O}, {"a": 0})
    _check_finite(stats, ["count", "sum_y", "sum_x"])
    ey = stats["sum_y"] / n
    sum_x, sum_xy = stats["sum_x"], stats["sum_xy"]
    degenerate = torch.zeros(O, dtype=torch.bool, device=w.device)
    work = workspace or Workspace()

    def solve(block: _Block) -> None:
        x = _group_rows(sum_x, O, block)
        sxy = _rows_of(sum_xy, block)
        e = _rows_of(ey, block)
        dxy, dx = block.dot(sxy), block.dot(x)
        if not bool(torch.isfinite(dxy).all() & torch.isfinite(dx).all()):
            _check_finite(stats, ["sum_xy"])
        scale, dead = _linear_scale(dxy, dx, e)
        degenerate[block.start : block.stop] = dead
        _write(a, block, block.centred("linear", sxy, x, e), scale)

    _solve_blocks(w, work, solve)
    return a, LayerReport(int(n.item()), O, {"a": 0}, {"a": int(degenerate.sum())})


def _linear_scale(dxy: Tensor, dx: Tensor, ey: Tensor) -> tuple[Tensor, Tensor]:
    """Per row ``1 / (wᵀΣxy − E[y]·wᵀΣx)`` (0 where degenerate) and the degenerate mask."""
    denominator = dxy - dx * ey
    degenerate = _degenerate(denominator, dxy.abs() + dx.abs() * ey.abs())
    return torch.where(degenerate, 0.0, 1.0 / denominator), degenerate


def two_component_patterns(
    stats: LayerStatistics,
    weight: Tensor,
    negative: bool = True,
    *,
    dtype: torch.dtype = torch.float64,
    workspace: Workspace | None = None,
) -> tuple[dict[str, Tensor], LayerReport]:
    """The two-component estimator's ``a₊`` (and ``a₋``) (method.md §2).

    ``a₊ = (E₊[xy] − E₊[x] E[y]) / (wᵀE₊[xy] − wᵀE₊[x] E[y])`` where ``E₊`` averages over
    the samples with ``wᵀx + b > 0`` and ``E[y]`` over all samples; ``a₋`` is the same over
    the samples with ``wᵀx + b ≤ 0``.

    Computed in float64, a block of rows at a time, from the sums and a few row-wise dot
    products: per side ``a = (Σxy − Σx·E[y]) / (wᵀΣxy − E[y]·wᵀΣx)``. The inactive side's
    numerator is the linear numerator minus the active one's. A normaliser below ``1e-12 ×
    (|w|ᵀ|Σxy| + |w|ᵀ|Σx|·|E[y]|) / count`` (the size its rounding scales with; for a₋ the
    terms of both sums it is the difference of) is zero (degenerate); one at or below
    ``MIN_NORMALISER_FRACTION · Var(y)`` of the side falls back (module docstring).

    Parameters
    ----------
    stats:
        Sums with ``count``, ``sum_y``, ``count_plus``, ``sum_x_plus``, ``sum_xy_plus`` (and
        ``sum_x``, ``sum_xy`` or ``sum_x_minus``, ``sum_xy_minus`` for a₋).
    weight:
        The layer's weight.
    negative:
        Also compute ``a₋``.
    dtype:
        dtype of the returned patterns (rounded once from float64).
    workspace:
        Buffers to reuse (see :class:`Workspace`).

    Returns
    -------
    patterns, report:
        ``{"a_plus": (O, D)[, "a_minus": (O, D)]}`` and the :class:`LayerReport`.

    Raises
    ------
    NonFiniteStatisticsError
        When the sums hold NaN or Inf.
    """
    w = _weight(stats, weight)
    O, D = w.shape
    n = stats["count"]
    _check_finite(stats, ["count", "sum_y", "count_plus", "sum_x"])
    ey = stats["sum_y"] / n.clamp(min=1)
    count_plus = stats["count_plus"]
    direct = "sum_xy_minus" in stats.tensors  # collected directly (old float32 fits)
    has_all = "sum_xy" in stats.tensors
    if negative and not (direct or has_all):
        raise ValueError("a₋ needs sum_x and sum_xy (or sum_x_minus and sum_xy_minus)")
    counts = {"a_plus": count_plus}
    if negative:
        counts["a_minus"] = n - count_plus
    patterns = {name: torch.empty((O, D), dtype=dtype, device=w.device) for name in counts}
    degenerate = {name: torch.zeros(O, dtype=torch.bool, device=w.device) for name in counts}
    unsafe = {name: torch.zeros(O, dtype=torch.bool, device=w.device) for name in counts}
    fallback_to = "linear" if (direct or has_all) else "filter"
    work = workspace or Workspace()

    def solve(block: _Block) -> None:
        e = _rows_of(ey, block)
        rows = block.stop - block.start
        # Per side: the numerator Σxy − Σx·E[y] and the row dots wᵀΣxy, wᵀΣx with the
        # magnitudes |w|ᵀ|Σxy|, |w|ᵀ|Σx| their rounding scales with.
        plus_xy = _rows_of(stats.tensors["sum_xy_plus"], block)
        plus_x = _rows_of(stats.tensors["sum_x_plus"], block)
        (dxy, rxy), (dx, rx) = block.dots(plus_xy), block.dots(plus_x)
        sides = {"a_plus": (block.centred("plus", plus_xy, plus_x, e), dxy, dx, rxy, rx)}
        checked = [dxy, dx]
        if direct:  # a₋ from its own sums
            minus_xy = _rows_of(stats.tensors["sum_xy_minus"], block)
            minus_x = _rows_of(stats.tensors["sum_x_minus"], block)
            (mxy, rmxy), (mx, rmx) = block.dots(minus_xy), block.dots(minus_x)
        elif negative:  # inactive = all − active, differences of the float64 sums
            all_xy = _rows_of(stats.tensors["sum_xy"], block)
            all_x = _group_rows(stats.tensors["sum_x"], O, block)
            minus_xy = torch.sub(all_xy, plus_xy, out=block.work("minus_xy", rows, D, block.device))
            minus_x = torch.sub(all_x, plus_x, out=block.work("minus_x", rows, D, block.device))
            mxy, mx = block.dot(minus_xy), block.dot(minus_x)
            # their rounding: that of both terms
            rmxy, rmx = rxy + block.size(all_xy), rx + block.size(all_x)
        if direct or negative:
            checked += [mxy, mx]
            sides["a_minus"] = (block.centred("minus", minus_xy, minus_x, e), mxy, mx, rmxy, rmx)
        if not all(bool(torch.isfinite(t).all()) for t in checked):
            _check_finite(stats)
        for name in counts:
            numerator, side_xy, side_x, size_xy, size_x = sides[name]
            count = _rows_of(counts[name], block)
            alive = count > 0
            safe = torch.where(alive, count, torch.ones_like(count))
            # The normaliser E_side[y²] − E_side[y]E[y] against the side's variance of y.
            side_y2, side_y = side_xy / safe, side_x / safe
            normaliser = side_y2 - side_y * e
            reference = (size_xy + size_x * e.abs()) / safe
            bad = _degenerate(normaliser, reference)
            variance = (side_y2 - side_y * side_y).clamp(min=0)
            risky = alive & ~bad & (normaliser <= MIN_NORMALISER_FRACTION * variance)
            keep = alive & ~bad
            scale = torch.where(keep, 1.0 / (normaliser * safe), 0.0)
            _write(patterns[name], block, numerator, scale)
            degenerate[name][block.start : block.stop] = bad & alive
            unsafe[name][block.start : block.stop] = risky
            if bool(risky.any()):
                rows_ = risky.nonzero().flatten()
                out = patterns[name][block.start : block.stop]
                out[rows_] = _fallback_rows(stats, block, rows_, e).to(dtype)

    _solve_blocks(w, work, solve)
    dead = {name: int((c <= 0).sum()) for name, c in counts.items()}
    fraction = float((count_plus / n).mean()) if n.item() > 0 else None
    report = LayerReport(
        int(n.item()), O, dead,
        {name: int(m.sum()) for name, m in degenerate.items()}, fraction,
        {name: m.nonzero().flatten().tolist() for name, m in unsafe.items()}, fallback_to,
    )  # fmt: skip
    return patterns, report


def _fallback_rows(stats: LayerStatistics, block: _Block, rows: Tensor, ey: Tensor) -> Tensor:
    """The float64 patterns that ill-conditioned units ``rows`` of the block fall back to.

    The linear pattern ``cov[x, y] / wᵀcov[x, y]`` over all samples, from the sums the fit
    holds (``sum_x``/``sum_xy``, or active + inactive sums of an old float32 fit); without
    them (``negative=False``) the filter pattern ``w / wᵀw``, which needs no data.
    """
    w = block.w[rows]
    units = rows + block.start
    tensors = stats.tensors
    if "sum_xy_minus" in tensors:
        sum_xy = tensors["sum_xy_plus"][units] + tensors["sum_xy_minus"][units]
        sum_x = tensors["sum_x_plus"][units] + tensors["sum_x_minus"][units]
    elif "sum_xy" in tensors:
        sum_xy = tensors["sum_xy"][units]
        groups = tensors["sum_x"].shape[0]
        sum_x = tensors["sum_x"][units // (stats.out_features // groups)]
    else:
        norm = (w * w).sum(1)
        return w / torch.where(norm == 0, torch.ones_like(norm), norm)[:, None]
    count = stats.tensors["count"].clamp(min=1)
    ex, exy = sum_x / count, sum_xy / count
    e = ey[rows]
    reference = (w * exy).sum(1).abs() + (w * ex).sum(1).abs() * e.abs()
    return normalise(exy - ex * e[:, None], w, reference)[0]
