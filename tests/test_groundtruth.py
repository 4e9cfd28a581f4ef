"""Ground-truth benchmarks and metrics (Wilming et al. 2022; XAI-TRIS, Clark et al. 2024)."""

from __future__ import annotations

import pytest
import torch

from patternnet import Gradient, PatternAttribution, PatternNet, fit_patterns
from patternnet.evaluate import (
    ground_truth_metrics,
    region_mass,
    signal_cosine,
    topk_precision,
)
from patternnet.groundtruth import (
    accuracy,
    linear_classifier,
    linear_discriminant,
    small_cnn,
    suppressor_simple,
    tetromino_simple,
    toy_data,
    train_classifier,
)


# ---------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    e = torch.tensor([[3.0, -4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    signal = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False]])
    # |e| = (3, 4, 0, 0): cosine to (1, 0, 0, 0) = 3/5; second sample: orthogonal
    assert torch.allclose(signal_cosine(e, signal), torch.tensor([0.6, 0.0], dtype=torch.float64))
    assert topk_precision(e, mask).tolist() == [1.0, 0.0]
    assert topk_precision(e, mask, k=1).tolist() == [1.0, 0.0]
    assert region_mass(e, ~mask).tolist() == [0.0, 1.0]
    assert region_mass(torch.zeros(1, 4), mask).tolist() == [0.0]  # no NaN
    with pytest.raises(ValueError, match="must match"):
        signal_cosine(e, torch.ones(3, 4))
    with pytest.raises(ValueError, match="k must lie"):
        topk_precision(e, mask, k=9)


# ---------------------------------------------------------------------------- datasets
def test_benchmarks_are_reproducible_by_seed():
    for make in (
        lambda s: toy_data(50, seed=s),
        lambda s: suppressor_simple(20, seed=s, noise_smoothing=1.0),
        lambda s: tetromino_simple(20, mode="mult", background="corr", seed=s),
    ):
        a, b, c = make(4), make(4), make(5)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
        assert not torch.equal(a.inputs, c.inputs)


def test_dataset_construction():
    toy = toy_data(500, mu=0.5, sigma=1.0, seed=0)
    # x = a_s y + a_d ε: x₁ − x₂ = y exactly, and the signal lives in the first coordinate
    assert torch.allclose(toy.inputs[:, 0] - toy.inputs[:, 1], toy.targets, atol=1e-6)
    assert toy.signal[:, 1].abs().max() == 0
    sup = suppressor_simple(100, size=8, block=3, seed=0)
    assert sup.inputs.shape == (100, 1, 8, 8)
    assert int(sup.signal_mask[0].sum()) == 9 and int(sup.regions["suppressor"][0].sum()) == 9
    assert not (sup.signal_mask & sup.regions["suppressor"]).any()
    # the suppressor region holds the distractor only: identical in both classes on average
    assert sup.signal[sup.regions["suppressor"]].abs().max() == 0
    tris = tetromino_simple(60, mode="lin", size=16, seed=0)
    # the 6 cells (of 2×2 pixels) where T and L differ; the shared anchor cell is not signal
    assert (tris.signal_mask.flatten(1).sum(1) == 24).all()
    assert int(tris.regions["shared"][0].sum()) == 4
    assert not (tris.signal_mask & tris.regions["shared"]).any()
    assert tris.signal[tris.regions["shared"]].abs().max() == 0
    # a map of exactly the class information (|H_L − H_T|) scores 1.0 top-k precision
    perfect = (tris.signal[tris.targets == 1][:1] - tris.signal[tris.targets == 0][:1]).abs()
    assert float(topk_precision(perfect, tris.signal_mask[:1])[0]) == 1.0
    fit, rest = tris.split(40, 20)
    assert len(fit) == 40 and torch.equal(rest.inputs, tris.inputs[40:])
    with pytest.raises(ValueError, match="mode"):
        tetromino_simple(10, mode="xor")


def test_tetromino_models_learn_quickly():
    data = tetromino_simple(900, mode="mult", background="white", size=16, seed=1)
    train, test = data.split(700, 200)
    model = train_classifier(small_cnn((1, 16, 16), seed=0), train, epochs=6, lr=3e-3)
    assert accuracy(model, test.inputs, test.targets) > 0.85


# ---------------------------------------------------------------------------- the claim
@pytest.fixture(scope="module")
def suppressor_setup():
    data = suppressor_simple(3500, size=8, block=3, seed=0)
    train, fit, test = data.split(2000, 1000, 500)
    # Fisher's discriminant: the Bayes-optimal linear model, free of optimiser noise
    model = linear_discriminant(train)
    assert accuracy(model, test.inputs, test.targets) > 0.9
    return model, train, fit, test


def test_patternnet_recovers_the_signal_and_ignores_the_suppressor(suppressor_setup):
    model, _, fit, test = suppressor_setup
    patterns = fit_patterns(model, fit.inputs, estimator="linear", progress=False)
    signal = PatternNet(model, patterns).attribute(test.inputs, target=1)
    metrics = ground_truth_metrics(signal, test)
    assert metrics["signal_cosine"] >= 0.95
    assert metrics["topk_precision"] == 1.0
    assert metrics["mass_suppressor"] < 0.05
    attribution = PatternAttribution(model, patterns).attribute(test.inputs, target=1)
    assert ground_truth_metrics(attribution, test)["mass_suppressor"] < 0.05


def test_gradient_shows_the_suppressor(suppressor_setup):
    model, *_, test = suppressor_setup
    gradient = Gradient(model).attribute(test.inputs, target=1)
    metrics = ground_truth_metrics(gradient, test)
    # the optimal filter cancels the distractor with opposite weights on the suppressor block
    assert metrics["signal_cosine"] < 0.8
    assert metrics["mass_suppressor"] > 0.15
    w = model[1].weight.detach()[1].view(8, 8)
    assert w[4:7, 4:7].mean() < -0.8 * w[1:4, 1:4].mean()


def test_same_finding_with_a_trained_classifier(suppressor_setup):
    _, train, fit, test = suppressor_setup
    model = train_classifier(linear_classifier((1, 8, 8)), train, epochs=15, lr=1e-2)
    patterns = fit_patterns(model, fit.inputs, estimator="linear", progress=False)
    signal = ground_truth_metrics(PatternNet(model, patterns).attribute(test.inputs, 1), test)
    gradient = ground_truth_metrics(Gradient(model).attribute(test.inputs, 1), test)
    # Adam leaves the distractor imperfectly cancelled, so some of it leaks into the pattern
    assert signal["signal_cosine"] >= 0.95 > gradient["signal_cosine"]
    assert signal["mass_suppressor"] < 0.15 < gradient["mass_suppressor"]


def test_benchmarks_alias_is_deprecated_and_the_same_objects():
    import importlib
    import sys

    import patternnet.groundtruth as groundtruth
    import patternnet.groundtruth.noise as noise

    sys.modules.pop("patternnet.benchmarks", None)
    with pytest.warns(DeprecationWarning, match="patternnet.groundtruth"):
        alias = importlib.import_module("patternnet.benchmarks")
    assert alias.tetromino_simple is groundtruth.tetromino_simple
    assert importlib.import_module("patternnet.benchmarks.noise") is noise
