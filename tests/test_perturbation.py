"""Region perturbation (method.md §6): hand-checked regions, order and values; AOPC."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from patternnet.evaluate.perturbation import (
    PerturbationCurves,
    aopc,
    bootstrap_interval,
    degradation_table,
    paired_difference,
    region_grid,
    region_ids,
    region_order,
    region_perturbation,
    region_scores,
    replacement_values,
)
from patternnet.groundtruth import linear_classifier, tetromino_simple, train_classifier


class Recorder(nn.Module):
    """Logits from a fixed linear map; remembers every input batch it saw."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.linear(x.flatten(1))


def test_region_grid_with_smaller_edge_regions():
    grid = region_grid(7, 5, 3)
    expected = torch.tensor([[0, 0, 0, 1, 1]] * 3 + [[2, 2, 2, 3, 3]] * 3 + [[4, 4, 4, 5, 5]])
    assert torch.equal(grid, expected)


def test_hand_checked_order_and_replaced_regions():
    # 1×1×6×6 image, k=3: regions 0 (top-left), 1 (top-right), 2 (bottom-left), 3 (bottom-right)
    image = torch.arange(36, dtype=torch.float32).view(1, 1, 6, 6)
    attribution = torch.zeros(1, 1, 6, 6)
    attribution[0, 0, 0, 0] = 2.0  # region 0: 2
    attribution[0, 0, 1, 4] = 5.0  # region 1: 5
    attribution[0, 0, 4, 1] = -1.0  # region 2: -1
    attribution[0, 0, 5, 5] = 3.0  # region 3: 3
    assert region_order(attribution, 3).tolist() == [[1, 3, 0, 2]]

    model = Recorder(36)
    curves = region_perturbation(model, image, attribution, k=3, steps=10, batch_size=100)
    assert curves.steps == 4  # capped at the number of regions
    (batch,) = [b for b in model.seen if b.shape[0] == 5]
    # region means of 0..35 laid out 6×6: top-left block rows 0-2, cols 0-2 -> mean 7, etc.
    means = {0: 7.0, 1: 10.0, 2: 25.0, 3: 28.0}
    blocks = {0: (slice(0, 3), slice(0, 3)), 1: (slice(0, 3), slice(3, 6)),
              2: (slice(3, 6), slice(0, 3)), 3: (slice(3, 6), slice(3, 6))}  # fmt: skip
    order = [1, 3, 0, 2]
    for step in range(5):
        expected = image[0, 0].clone()
        for region in order[:step]:
            expected[blocks[region]] = means[region]
        assert torch.equal(batch[step, 0], expected), f"step {step}"
    # the curve follows the class predicted on the unperturbed image
    with torch.no_grad():
        probs = torch.softmax(model.linear(batch.flatten(1)).double(), 1)
    target = int(probs[0].argmax())
    assert torch.allclose(curves.scores[0], probs[:, target])
    assert curves.target.tolist() == [target]


def test_replacements():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 5, generator=g)
    means = replacement_values(x, 2, "mean", edge="mean")
    # bottom-right corner region is a single pixel: its mean is the pixel itself
    assert torch.allclose(means[:, :, 4, 4], x[:, :, 4, 4])
    assert torch.allclose(means[:, :, 0, 0], x[:, :, :2, :2].mean((2, 3)))
    assert torch.equal(replacement_values(x, 2, "zeros"), torch.zeros_like(x))
    blurred = replacement_values(x, 2, "blur")
    assert blurred.shape == x.shape and blurred.std() < x.std()
    noise = replacement_values(x, 2, "uniform", generator=torch.Generator().manual_seed(1),
                               uniform_range=(-1.0, 2.0))  # fmt: skip
    assert noise.shape == x.shape
    assert noise.min() >= -1.0 and noise.max() <= 2.0 and noise.min() < 0 and noise.max() > 1
    # the range is fixed: the values do not depend on the rest of the batch
    alone = replacement_values(x[:1] * 0, 2, "uniform", generator=torch.Generator().manual_seed(1),
                               uniform_range=(-1.0, 2.0))  # fmt: skip
    assert torch.equal(alone[0], noise[0])
    per_channel = replacement_values(x, 2, "uniform", uniform_range=([0, 0, 5], [1, 1, 6]))
    assert per_channel[:, 2].min() >= 5 and per_channel[:, :2].max() <= 1
    with pytest.raises(ValueError, match="uniform_range"):
        replacement_values(x, 2, "uniform")
    with pytest.raises(ValueError, match="unknown replacement"):
        replacement_values(x, 2, "median")


def test_batched_and_unbatched_curves_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    x = torch.randn(3, 2, 8, 8)
    a = torch.randn(3, 2, 8, 8)
    big = region_perturbation(model, x, a, k=3, batch_size=1000, replacement="blur")
    small = region_perturbation(model, x, a, k=3, batch_size=4, replacement="blur")
    assert torch.allclose(big.scores, small.scores, atol=1e-6)
    assert big.scores.shape == (3, 10)


def test_oracle_beats_random_order():
    data = tetromino_simple(700, mode="lin", background="white", size=16, seed=2)
    train, test = data.split(600, 40)
    model = train_classifier(linear_classifier((1, 16, 16)), train, epochs=5, lr=1e-2)
    x = test.inputs
    # Oracle for a linear model: replacing a region changes the predicted logit margin by
    # exactly Σ (w_c − w_other)·(x − replacement) over the region.
    weight = model[1].weight.detach()
    predicted = model(x).argmax(1)
    margin = (weight[predicted] - weight[1 - predicted]).view_as(x)
    oracle = margin * (x - replacement_values(x, 4, "mean"))
    good = region_perturbation(model, x, oracle, k=4, steps=16)
    bad = region_perturbation(model, x, -oracle, k=4, steps=16)
    random = region_perturbation(model, x, "random", k=4, steps=16, seed=3)
    assert aopc(good) > aopc(random) + 0.05
    assert aopc(random) > aopc(bad)
    assert good.mean()[0] == random.mean()[0]  # same unperturbed start


def test_bad_inputs_are_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="do not match"):
        region_perturbation(model, x, torch.randn(2, 1, 5, 4), k=2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        region_perturbation(model, x.flatten(1), "random", k=2)
    with pytest.raises(ValueError, match="'random'"):
        region_perturbation(model, x, "shuffled", k=2)


# ---------------------------------------------------------------------------- edges
def test_reflect_edges_follow_innvestigate():
    # 7×5 image, k=3: padded to 9×6 by reflection, 1 row above / 1 below, 0 left / 1 right.
    x = torch.arange(35, dtype=torch.float64).view(1, 1, 7, 5)
    ids = region_ids(7, 5, 3, "reflect")
    # padded rows −1..7: region rows {−1,0,1}, {2,3,4}, {5,6,7}: image rows 0-1, 2-4, 5-6
    assert ids[:, 0].tolist() == [0, 0, 2, 2, 2, 4, 4]
    assert ids[0].tolist() == [0, 0, 0, 1, 1]
    padded = torch.nn.functional.pad(x, (0, 1, 1, 1), mode="reflect")
    means = replacement_values(x, 3, "mean", edge="reflect")
    assert means[0, 0, 0, 0] == padded[0, 0, 0:3, 0:3].mean()
    assert means[0, 0, 6, 4] == padded[0, 0, 6:9, 3:6].mean()
    # scores: mean attribution over the padded block
    a = torch.zeros(1, 1, 7, 5)
    a[0, 0, 6, 4] = 9.0  # bottom-right corner pixel
    scores = region_scores(a, 3, "reflect")
    block = torch.nn.functional.pad(a.double(), (0, 1, 1, 1), mode="reflect")[0, 0, 6:9, 3:6]
    assert scores[0, 5] == pytest.approx(float(block.mean()))
    assert region_order(a, 3)[0, 0] == 5


def test_edge_rules_rank_small_regions_fairly():
    # 5×5, k=2 (edge="mean"/"sum"): the corner region (4,4) is one pixel. With the same
    # attribution per pixel everywhere except a slightly larger corner value, "mean" ranks the
    # corner first, "sum" ranks it last (the artefact the mean rule removes).
    a = torch.ones(1, 1, 5, 5)
    a[0, 0, 4, 4] = 1.5
    assert region_order(a, 2, edge="mean")[0, 0] == 8
    assert region_order(a, 2, edge="sum")[0, -1] == 8
    # the three rules coincide when k divides the side
    b = torch.randn(2, 3, 6, 6)
    orders = [region_order(b, 3, edge=e) for e in ("reflect", "mean", "sum")]
    assert all(torch.equal(orders[0], o) for o in orders[1:])


def test_paper_setting_9x9_at_224():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, 5))
    x = torch.randn(2, 3, 224, 224)
    curves = region_perturbation(model, x, torch.randn_like(x), k=9, steps=100, batch_size=128)
    assert curves.scores.shape == (2, 101) and curves.order.shape == (2, 625)
    assert curves.edge == "reflect" and curves.direction == "morf"


# ---------------------------------------------------------------------------- MoRF / LeRF, CIs
def test_lerf_is_the_reverse_order_and_keeps_the_probability_up():
    data = tetromino_simple(300, mode="lin", background="white", size=16, seed=2)
    train, test = data.split(260, 40)
    model = train_classifier(linear_classifier((1, 16, 16)), train, epochs=5, lr=1e-2)
    x = test.inputs
    weight = model[1].weight.detach()
    predicted = model(x).argmax(1)
    margin = (weight[predicted] - weight[1 - predicted]).view_as(x)
    oracle = margin * (x - replacement_values(x, 4, "mean"))
    morf = region_perturbation(model, x, oracle, k=4, steps=16)
    lerf = region_perturbation(model, x, oracle, k=4, steps=16, order="lerf")
    assert torch.equal(lerf.order, region_order(-oracle, 4))
    assert lerf.direction == "lerf"
    assert aopc(lerf) < aopc(morf)
    interval = morf.aopc_interval(resamples=500)
    assert interval.low <= interval.estimate <= interval.high
    assert interval.estimate == pytest.approx(aopc(morf))
    low, high = morf.band(resamples=200)
    mean = morf.mean().double()
    assert (low <= mean + 1e-12).all() and (high >= mean - 1e-12).all()
    table = degradation_table({"oracle": morf, "oracle LeRF": lerf},
                              pairs=[("oracle", "oracle LeRF")], resamples=500)  # fmt: skip
    assert table.differences[0].significant and table.differences[0].difference > 0
    assert "significant" in table.to_markdown() and len(table.to_records()) == 3


def test_bootstrap_interval_covers_the_mean_at_the_nominal_rate():
    # coverage of the percentile bootstrap for the mean of 50 skewed draws: ~0.95 (±0.03)
    g = torch.Generator().manual_seed(0)
    hits = 0
    for trial in range(200):
        values = torch.rand(50, generator=g) ** 2  # mean 1/3
        interval = bootstrap_interval(values, resamples=400, seed=trial)
        hits += interval.low <= 1 / 3 <= interval.high
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_difference_matches_a_float64_reference_and_detects_no_difference():
    g = torch.Generator().manual_seed(1)
    start = torch.rand(60, 1, generator=g, dtype=torch.float64)
    a_scores = torch.cat([start, start * torch.rand(60, 5, generator=g, dtype=torch.float64)], 1)
    b_scores = torch.cat([start, start * torch.rand(60, 5, generator=g, dtype=torch.float64)], 1)
    target = torch.zeros(60, dtype=torch.long)
    a = PerturbationCurves(a_scores, torch.zeros(60, 5), target, 2, "mean", label="A")
    b = PerturbationCurves(b_scores, torch.zeros(60, 5), target, 2, "mean", label="B")
    result = paired_difference(a, b, resamples=1000, seed=3)
    diff = ((a_scores[:, :1] - a_scores).mean(1) - (b_scores[:, :1] - b_scores).mean(1)).numpy()
    assert result.difference == pytest.approx(float(diff.mean()))
    rng = torch.Generator().manual_seed(3)
    idx = torch.randint(60, (1000, 60), generator=rng)
    means = torch.from_numpy(diff)[idx].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert result.interval.low == pytest.approx(float(low))
    assert result.interval.high == pytest.approx(float(high))
    same = paired_difference(a, a, resamples=200)
    assert same.difference == 0 and not same.significant
    other = PerturbationCurves(b_scores[:30], torch.zeros(30, 5), target[:30], 2, "mean")
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, other)
