"""ρ(S) of sums, pools and means (patternnet.evaluate.node_quality, method.md §5 and §10)."""

from __future__ import annotations

import torch
from torch import nn

import patternnet as pn
from patternnet.evaluate.node_quality import (
    _residual,
    _rho,
    filter_node_patterns,
    node_quality,
    node_samples,
)


class Net(nn.Module):
    """Conv, a residual sum with a ReLU branch, an average pool and the global mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = torch.relu(h + self.branch(torch.relu(h)))
        return self.head(self.pool(h).mean((2, 3)))


def splits() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(90, 2, 8, 8, dtype=torch.float64)
    return model, x[:30], x[30:60], x[60:]


def test_rho_matches_a_least_squares_fit_by_hand() -> None:
    model, fit, reg, ev = splits()
    patterns = pn.fit_patterns(model, fit, estimator="linear", progress=False)
    samples_reg = node_samples(model, reg, positions=None)
    samples_eval = node_samples(model, ev, positions=None)
    assert sorted(samples_reg) == ["mean#0", "pool#0", "sum#0"]
    assert samples_reg["pool#0"][0].shape == (4, 4, 30 * 16)  # 2×2 windows of 8×8
    for name in samples_reg:
        (xr, yr), (xe, ye) = samples_reg[name], samples_eval[name]
        tensors = patterns.nodes[name]
        got = _rho(_residual(xr, yr, tensors), yr, _residual(xe, ye, tensors), ye)
        for unit in range(xr.shape[0]):  # float64 lstsq with intercept on the residual
            d = (xr[unit] - tensors["a"][unit].double()[:, None] * yr[unit]).T
            design = torch.cat([d, torch.ones(d.shape[0], 1, dtype=d.dtype)], 1)
            v = torch.linalg.lstsq(design, yr[unit, :, None]).solution[:-1, 0]
            de = (xe[unit] - tensors["a"][unit].double()[:, None] * ye[unit]).T
            corr = torch.corrcoef(torch.stack([de @ v, ye[unit]]))[0, 1]
            expected = 1 - max(float(corr), 0.0)
            assert abs(float(got[unit]) - expected) < 1e-5, (name, unit)


def test_fitted_patterns_beat_the_filter_pattern() -> None:
    model, fit, reg, ev = splits()
    linear = pn.fit_patterns(model, fit, estimator="linear", progress=False)
    two = pn.fit_patterns(model, fit, progress=False, negative=True)  # ρ(S) reads a₋
    table = node_quality(model, {"filter": filter_node_patterns(linear), "linear": linear,
                                 "two_component": two}, reg, ev)  # fmt: skip
    assert sorted(table) == ["mean#0", "pool#0", "sum#0"]
    for name, rows in table.items():
        assert set(rows) == {"filter", "linear", "two_component"}
        for row in rows.values():
            assert 0.0 <= row["rho"] <= 1.0 and row["units"] >= 1 and row["stderr"] >= 0
        # (the mean has one sample per image: 30 samples for 16 inputs, too few to compare)
        if name != "mean#0":
            assert rows["linear"]["rho"] > rows["filter"]["rho"], (name, rows)
