"""Region perturbation (method.md §6): hand-checked regions, order and values; AOPC."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from patternnet.evaluate.perturbation import (
    aopc,
    region_grid,
    region_order,
    region_perturbation,
    replacement_values,
)
from patternnet.groundtruth import linear_classifier, tetromino_images, train_classifier


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
    means = replacement_values(x, 2, "mean")
    # bottom-right corner region is a single pixel: its mean is the pixel itself
    assert torch.allclose(means[:, :, 4, 4], x[:, :, 4, 4])
    assert torch.allclose(means[:, :, 0, 0], x[:, :, :2, :2].mean((2, 3)))
    assert torch.equal(replacement_values(x, 2, "zeros"), torch.zeros_like(x))
    blurred = replacement_values(x, 2, "blur")
    assert blurred.shape == x.shape and blurred.std() < x.std()
    noise = replacement_values(x, 2, "uniform", generator=torch.Generator().manual_seed(1))
    assert noise.shape == x.shape
    assert (noise >= x.amin((0, 2, 3)).view(1, 3, 1, 1)).all()
    assert (noise <= x.amax((0, 2, 3)).view(1, 3, 1, 1)).all()
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
    data = tetromino_images(700, mode="lin", background="white", size=16, seed=2)
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
