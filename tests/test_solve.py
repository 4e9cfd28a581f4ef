"""The pattern solve against explicit float64 formulas (estimators.py, method.md §2, §11).

The estimators solve a block of rows at a time from the sums and a few row-wise dot products;
here every unit's pattern is recomputed from the samples themselves, one unit at a time:
dead units zero, constant units (zero normaliser) zero, ill-conditioned units their linear
pattern, every other unit the paper's ``cov_side[x, y] / wᵀcov_side[x, y]``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from patternnet.patterns import estimators
from patternnet.patterns.estimators import MIN_NORMALISER_FRACTION
from patternnet.patterns.statistics import LayerStatistics


def samples(units: int, groups: int, size: int, n: int, seed: int = 0):
    """Inputs ``(n, O, D)`` with a large mean, weights, biases, outputs and masks.

    Unit 0 never fires, unit 1 always does, unit 2 has zero weights (constant output), and
    units 3-5 have biases that make them fire on mostly negative ``y`` (ill-conditioned).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, groups, size, generator=g, dtype=torch.float64)
    x = x + 3.0 * torch.rand(groups, size, generator=g, dtype=torch.float64)
    w = torch.randn(units, size, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(units, generator=g, dtype=torch.float64)
    b[0], b[1], w[2] = -1e6, 1e6, 0.0
    w[3:6] = -w[3:6].abs()  # y mostly negative (the inputs' mean is positive) ...
    X = x.repeat_interleave(units // groups, dim=1)
    y = (X * w).sum(-1)
    b[3:6] = -y[:, 3:6].mean(0) - 0.5 * y[:, 3:6].std(0)  # ... yet the unit fires: E₊[y] < 0
    return x, X, w, y, y + b > 0


def sums(x: Tensor, X: Tensor, y: Tensor, active: Tensor, direct: bool = False) -> dict:
    m = active.double()
    out = {"count": torch.tensor(float(x.shape[0]), dtype=torch.float64), "sum_y": y.sum(0),
           "count_plus": m.sum(0), "sum_x_plus": (X * m[..., None]).sum(0),
           "sum_xy_plus": (X * (y * m)[..., None]).sum(0)}
    if direct:
        out["sum_x_minus"] = (X * (1 - m)[..., None]).sum(0)
        out["sum_xy_minus"] = (X * (y * (1 - m))[..., None]).sum(0)
    else:
        out["sum_x"], out["sum_xy"] = x.sum(0), (X * y[..., None]).sum(0)
    return out


def statistics(units: int, groups: int, size: int, tensors: dict) -> LayerStatistics:
    return LayerStatistics(units, groups, size, frozenset(tensors), "cpu", tensors)


def reference(X: Tensor, w: Tensor, y: Tensor, active: Tensor, side: bool, linear: bool):
    """One unit at a time: (pattern, dead, degenerate, fell back) of one side."""
    ey = y.mean(0)
    rows, dead, degenerate, fell = [], [], [], []
    for j in range(w.shape[0]):
        m = active[:, j] if side else ~active[:, j]
        zero = torch.zeros(w.shape[1], dtype=torch.float64)
        if not m.any():
            rows.append(zero), dead.append(j)
            continue
        Xj, yj = X[m, j], y[m, j]
        cov = (Xj * yj[:, None]).mean(0) - Xj.mean(0) * ey[j]
        normaliser = (yj * yj).mean() - yj.mean() * ey[j]
        if w[j].abs().sum() == 0:
            rows.append(zero), degenerate.append(j)
            continue
        if normaliser <= MIN_NORMALISER_FRACTION * yj.var(unbiased=False):
            fell.append(j)
            if linear:
                full = (X[:, j] * y[:, j, None]).mean(0) - X[:, j].mean(0) * ey[j]
                rows.append(full / (w[j] * full).sum())
            else:
                rows.append(w[j] / (w[j] * w[j]).sum())
            continue
        rows.append(cov / (w[j] * cov).sum())
    return torch.stack(rows), dead, degenerate, fell


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("direct", [False, True])
def test_two_component_matches_the_formula_unit_by_unit(groups: int, direct: bool) -> None:
    x, X, w, y, active = samples(32, groups, 12, 400)
    stats = statistics(32, groups, 12, sums(x, X, y, active, direct))
    patterns, report = estimators.two_component_patterns(stats, w.float())
    w32 = w.float().double()  # the estimator sees the float32 weight
    for name, side in (("a_plus", True), ("a_minus", False)):
        expected, dead, degenerate, fell = reference(X, w32, y, active, side, linear=True)
        torch.testing.assert_close(patterns[name], expected, rtol=1e-9, atol=1e-12)
        assert report.dead[name] == len(dead)
        assert report.degenerate[name] == len(degenerate)
        assert report.fallback[name] == fell
    assert report.fallback["a_plus"], "the test needs ill-conditioned units"
    assert report.fallback_to == "linear"


def test_without_linear_sums_units_fall_back_to_the_filter_pattern() -> None:
    x, X, w, y, active = samples(16, 1, 10, 300, seed=1)
    tensors = sums(x, X, y, active)
    del tensors["sum_x"], tensors["sum_xy"]
    patterns, report = estimators.two_component_patterns(statistics(16, 1, 10, tensors), w,
                                                         negative=False)
    expected, _, _, fell = reference(X, w, y, active, True, linear=False)
    assert fell and report.fallback == {"a_plus": fell} and report.fallback_to == "filter"
    torch.testing.assert_close(patterns["a_plus"], expected, rtol=1e-9, atol=1e-12)


def test_linear_pattern_matches_the_formula() -> None:
    x, X, w, y, _ = samples(16, 2, 10, 300, seed=2)
    tensors = {"count": torch.tensor(300.0, dtype=torch.float64), "sum_y": y.sum(0),
               "sum_x": x.sum(0), "sum_xy": (X * y[..., None]).sum(0)}
    a, report = estimators.linear_pattern(statistics(16, 2, 10, tensors), w)
    full = (X * y[..., None]).mean(0) - X.mean(0) * y.mean(0)[:, None]
    expected = full / (w * full).sum(1, keepdim=True)
    expected[2] = 0.0  # zero weights: degenerate
    assert report.degenerate == {"a": 1}
    torch.testing.assert_close(a, expected, rtol=1e-9, atol=1e-12)


def test_blocks_of_rows_give_the_same_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    x, X, w, y, active = samples(40, 1, 30, 300, seed=3)
    stats = statistics(40, 1, 30, sums(x, X, y, active))
    whole, whole_report = estimators.two_component_patterns(stats, w)
    monkeypatch.setattr(estimators, "BLOCK_ELEMENTS", 7 * 30)  # blocks of 7 rows, 6 blocks
    work = estimators.Workspace()
    blocked, report = estimators.two_component_patterns(stats, w, workspace=work)
    single, _ = estimators.two_component_patterns(stats, w, dtype=torch.float32, workspace=work)
    assert report == whole_report
    for name in whole:
        torch.testing.assert_close(blocked[name], whole[name], rtol=1e-14, atol=0)
        assert single[name].dtype == torch.float32
        torch.testing.assert_close(single[name], whole[name].float(), rtol=0, atol=0)


def test_non_finite_sums_are_named() -> None:
    x, X, w, y, active = samples(8, 1, 5, 50)
    tensors = sums(x, X, y, active)
    tensors["sum_xy"][3, 2] = float("nan")
    with pytest.raises(estimators.NonFiniteStatisticsError, match="sum_xy"):
        estimators.two_component_patterns(statistics(8, 1, 5, tensors), w)
