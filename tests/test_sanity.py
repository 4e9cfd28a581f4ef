"""Sanity checks (patternnet.evaluate.sanity): measures against float64 references, model
variants that compute what they claim, and the published outcomes where they are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from patternnet.evaluate.sanity import (
    CHECKS,
    cosine_similarity,
    randomise_layers,
    sanity_checks,
    shift_compensated_model,
    spearman,
)


def _reference_spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(v):
        out = np.empty(len(v))
        for i, value in enumerate(v):
            out[i] = (v < value).sum() + ((v == value).sum() + 1) / 2
        return out

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_spearman_with_ties_and_cosine_match_references():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 11), generator=g).double()  # many ties
    b = torch.randn(3, 11, generator=g, dtype=torch.float64)
    got = spearman(a, b).numpy()
    expected = [_reference_spearman(a[i].numpy(), b[i].numpy()) for i in range(3)]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    cos = cosine_similarity(a, b).numpy()
    ref = [float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(3)]
    np.testing.assert_allclose(cos, ref, atol=1e-12)
    assert torch.isnan(spearman(torch.ones(1, 5), b[:1, :5])).all()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def test_randomise_layers_copies_and_changes_only_the_named_layers():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variant = randomise_layers(model, ["4"], seed=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert torch.equal(variant[0].weight, model[0].weight)
    assert not torch.equal(variant[4].weight, model[4].weight)
    std = float(model[4].weight.detach().std())
    assert 0.3 * std < float(variant[4].weight.std()) < 3 * std
    with pytest.raises(KeyError, match="not a Linear/Conv"):
        randomise_layers(model, ["1"])


def test_shift_compensated_model_computes_the_same_function():
    x = torch.randn(10, 6)
    model = _mlp()
    moved = shift_compensated_model(model, 0.7)
    torch.testing.assert_close(moved(x + 0.7), model(x), atol=1e-5, rtol=1e-5)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    images = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(shift_compensated_model(conv, -1.5)(images - 1.5), conv(images),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    padded = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 36, 2))
    with pytest.raises(ValueError, match="pads"):
        shift_compensated_model(padded, 1.0)


NAMES = ["gradient", "gradient_x_input", "pattern_net", "pattern_attribution", "lrp_z"]


def _setup():
    model = _mlp(1)
    g = torch.Generator().manual_seed(2)
    mixing = torch.randn(6, 6, generator=g)
    fit = torch.randn(3000, 6, generator=g) @ mixing + 0.5
    inputs = torch.randn(40, 6, generator=g) @ mixing + 0.5
    return model, fit, inputs


@pytest.fixture(scope="module")
def result():
    model, fit, inputs = _setup()
    return sanity_checks(model, inputs, methods_=NAMES, fit_data=fit, shift=2.0)


def test_every_method_meets_every_check(result):
    pairs = {(r["method"], r["check"]) for r in result.records}
    assert len(pairs) == 5 * len(CHECKS)
    table = result.table()
    assert table.count("\n") == 2 + 5
    assert "✓" in table and "✗" in table
    records = result.to_records()
    assert {"method", "check", "score", "passed", "measure"} <= set(records[0])
    assert result.curves["gradient"][0] == (0, 1.0, 1.0, 1.0)
    assert len(result.curves["gradient"]) == 1 + 3  # trained + three layers randomised


def test_input_invariance_outcomes_of_kindermans_et_al(result):
    # exact in the mathematics: the gradient, and the pattern methods with REFITTED LINEAR
    # patterns, do not change; gradient × input and LRP-z (x ⊙ gradient here) move with the
    # shift.
    model, fit, inputs = _setup()
    linear = sanity_checks(model, inputs, methods_=NAMES, fit_data=fit, shift=2.0,
                           checks=["input_invariance"], estimator="linear")  # fmt: skip
    score = {r["method"]: r for r in linear.records}
    for name in ("gradient", "pattern_net", "pattern_attribution"):
        assert score[name]["passed"], (name, score[name]["score"])
    for name in ("gradient_x_input", "lrp_z"):
        assert not score[name]["passed"], (name, score[name]["score"])
    # The paper's two-component estimator is not shift invariant (E[y] over all samples, see
    # the module docstring): its refitted first-layer patterns move by Δ(E₊[y] − E[y]).
    two = {r["method"]: r for r in result.records if r["check"] == "input_invariance"}
    assert two["gradient"]["passed"]
    assert not two["pattern_net"]["passed"] and not two["pattern_attribution"]["passed"]


def test_class_sensitivity_of_the_gradient_of_a_linear_model_is_the_weight_cosine():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(20, 4)
    out = sanity_checks(model, x, methods_=["gradient"], checks=["class_sensitivity"])
    top2 = model(x).topk(2, 1).indices
    w = model[0].weight.detach().double()
    expected = torch.nn.functional.cosine_similarity(w[top2[:, 0]], w[top2[:, 1]]).mean()
    assert out.records[0]["score"] == pytest.approx(float(expected), abs=1e-6)


def test_plot_and_bad_arguments(result, tmp_path):
    result.plot(tmp_path / "sanity.png")
    assert (tmp_path / "sanity.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown checks"):
        sanity_checks(_mlp(), torch.randn(2, 6), methods_=["gradient"], checks=["magic"])
    with pytest.raises(ValueError, match="fit_data"):
        sanity_checks(_mlp(), torch.randn(2, 6), methods_=["pattern_net"])
