"""The comparison runner: one table, CSV, Markdown and figures for several methods."""

from __future__ import annotations

import pytest
import torch

from patternnet import Gradient, GradientXInput, PatternAttribution, fit_patterns
from patternnet.evaluate import (
    compare,
    estimator_quality,
    plot_degradation,
    plot_quality,
    region_perturbation,
)
from patternnet.groundtruth import small_cnn, tetromino_simple, train_classifier


@pytest.fixture(scope="module")
def setup():
    data = tetromino_simple(900, mode="lin", background="white", size=16, seed=0)
    train, fit, test = data.split(700, 150, 24)
    model = train_classifier(small_cnn((1, 16, 16), channels=4, hidden=16), train, epochs=4,
                             lr=3e-3)  # fmt: skip
    patterns = fit_patterns(model, fit.inputs, progress=False)
    return model, patterns, fit, test


def test_compare_instances_names_and_callables(setup, tmp_path):
    model, patterns, fit, test = setup
    methods = {
        "PatternAttribution": PatternAttribution(model, patterns),
        "gradient": "gradient",
        "guided": "guided_backprop",
        "g×i": lambda x, target: GradientXInput(model).attribute(x, target),
    }
    quality = estimator_quality(model, fit.inputs[:75], fit.inputs[75:], test.inputs,
                                max_neurons=4, max_dims=32)  # fmt: skip
    report = compare(model, methods, test, k=4, steps=8, quality=quality, output_dir=tmp_path)
    labels = [row["method"] for row in report.rows]
    assert labels == ["PatternAttribution", "gradient", "guided", "g×i", "random"]
    for row in report.rows[:-1]:
        assert {"aopc", "signal_cosine", "topk_precision", "mass_background", "seconds"} <= set(row)
        assert 0.0 <= row["signal_cosine"] <= 1.0
    assert set(report.rows[-1]) == {"method", "aopc", "aopc_low", "aopc_high"}
    for row in report.rows:
        assert row["aopc_low"] <= row["aopc"] <= row["aopc_high"]
    # the AOPC in the table is the one of the stored curve, recomputed independently
    again = region_perturbation(model, test.inputs, report.explanations["gradient"], k=4, steps=8)
    assert report.rows[1]["aopc"] == pytest.approx(again.aopc())
    assert torch.allclose(report.explanations["gradient"], Gradient(model).attribute(test.inputs))
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "report.md",
        "metrics.csv",
        "degradation.png",
        "rho.png",
        "rho.csv",
        "explanations.png",
    } <= files
    text = (tmp_path / "report.md").read_text()
    assert "| PatternAttribution |" in text and "ρ(S)" in text
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("method,aopc,aopc_low,aopc_high,signal_cosine") and len(csv) == 6


def test_registry_pattern_methods_get_the_patterns(setup):
    model, patterns, _, test = setup
    report = compare(model, ["pattern_net", "pattern_attribution"], test.inputs, patterns=patterns,
                     k=8, steps=4, random_baseline=False)  # fmt: skip
    assert [row["method"] for row in report.rows] == ["pattern_net", "pattern_attribution"]
    expected = PatternAttribution(model, patterns).attribute(test.inputs)
    assert torch.allclose(report.explanations["pattern_attribution"], expected)
    assert "signal_cosine" not in report.rows[0]  # no ground truth for a plain tensor


def test_vector_inputs_skip_degradation():
    from patternnet.groundtruth import toy_data, toy_model

    data = toy_data(50, seed=0)
    model = torch.nn.Sequential(toy_model(), torch.nn.Linear(1, 2))
    report = compare(model, ["gradient"], data)
    assert report.curves == {} and "aopc" not in report.rows[0]
    assert "signal_cosine" in report.rows[0]


def test_bad_methods_are_named(setup):
    model, _, _, test = setup
    with pytest.raises(ValueError, match="unknown method"):
        compare(model, ["no_such_method"], test.inputs)
    with pytest.raises(ValueError, match="twice"):
        compare(model, ["gradient", "gradient"], test.inputs)
    with pytest.raises(TypeError, match="data must be"):
        compare(model, ["gradient"], [1, 2, 3])


def test_plots_write_files(setup, tmp_path):
    model, _, fit, test = setup
    curves = [region_perturbation(model, test.inputs, "random", k=4, steps=5, label="random")]
    figure = plot_degradation(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert len(figure.axes[0].lines) == 1
    table = estimator_quality(model, fit.inputs[:60], fit.inputs[60:], test.inputs,
                              max_neurons=2, max_dims=16)  # fmt: skip
    figure = plot_quality(table, tmp_path / "sub" / "rho.svg")
    assert (tmp_path / "sub" / "rho.svg").exists()
    # identity is left out by default; the sampled layers carry error bars
    assert len(figure.axes[0].get_legend().get_texts()) == 4
    assert any(info["dims"] == 16 and not info["exact"] for info in table.info.values())


def test_compare_lerf_and_paired_difference(setup, tmp_path):
    model, _, _, test = setup
    report = compare(model, ["gradient", "gradient_x_input"], test.inputs[:30], k=4, steps=8,
                     lerf=True, pairs=[("gradient", "gradient_x_input")], resamples=300,
                     output_dir=tmp_path)  # fmt: skip
    row = report.rows[0]
    assert row["lerf_low"] <= row["lerf_aopc"] <= row["lerf_high"]
    assert set(report.lerf_curves) == {"gradient", "gradient_x_input", "random"}
    (difference,) = report.differences
    expected = report.curves["gradient"].aopc() - report.curves["gradient_x_input"].aopc()
    assert difference.difference == pytest.approx(expected)
    text = (tmp_path / "report.md").read_text()
    assert "paired bootstrap" in text and (tmp_path / "degradation_lerf.png").exists()
    assert report.to_records()[-1]["kind"] == "difference"
    with pytest.raises(KeyError, match="pairs"):
        compare(model, ["gradient"], test.inputs[:4], k=4, steps=2, pairs=[("gradient", "x")])
