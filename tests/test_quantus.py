"""patternnet.quantus_explain under real Quantus 0.6 metrics (faithfulness, robustness,
randomisation), and its contract: numpy in/out, keywords, the method built once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import patternnet
from patternnet import quantus as pq

quantus = pytest.importorskip("quantus")

METHODS = ["pattern_attribution", "pattern_net", "gradient", "lrp_epsilon"]


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor, patternnet.Patterns]:
    """A small CNN trained to 100 % on 8×8 images: a cross whose sign is the class, plus a
    distractor square of random amplitude and white noise."""
    generator = torch.Generator().manual_seed(0)
    n = 512
    signal = torch.zeros(1, 8, 8)
    signal[0, 2:6, 3] = 1.0
    signal[0, 3, 2:6] = 1.0
    distractor = torch.zeros(1, 8, 8)
    distractor[0, 1:7, 1:7] = 0.5
    labels = torch.randint(0, 2, (n,), generator=generator)
    x = (
        (2 * labels.float() - 1)[:, None, None, None] * signal
        + torch.randn(n, 1, 1, 1, generator=generator) * distractor
        + 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 2),
    )
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        index = torch.randint(0, n, (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[index]), labels[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    assert (model(x).argmax(1) == labels).float().mean() > 0.95
    patterns = patternnet.fit_patterns(model, x, progress=False)
    return model, x[:8].numpy(), labels[:8].numpy(), patterns


def _kwargs(name: str, patterns: patternnet.Patterns) -> dict:
    if name.startswith("pattern"):
        return {"method": name, "patterns": patterns}
    return {"method": name}


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    pq.clear_cache()


def test_contract_numpy_in_numpy_out(trained) -> None:
    model, x, y, patterns = trained
    out = patternnet.quantus_explain(
        model=model, inputs=x, targets=y, method="pattern_attribution", patterns=patterns
    )
    assert type(out) is np.ndarray and out.shape == x.shape and out.dtype == np.float32
    expected = patternnet.PatternAttribution(model, patterns).attribute(
        torch.from_numpy(x), target=torch.from_numpy(y)
    )
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6, atol=1e-7)
    # Quantus's own reduction keywords: one value per pixel
    summed = patternnet.quantus_explain(
        model=model, inputs=x, targets=y, method="gradient", reduce_axes=(1,)
    )
    assert summed.shape == (x.shape[0], 1, *x.shape[2:])


def test_constant_explanation_refused_with_advice(trained) -> None:
    _, x, y, _ = trained
    dead = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    nn.init.zeros_(dead[1].weight)
    with pytest.raises(ValueError, match="the same value 0.0 everywhere"):
        patternnet.quantus_explain(model=dead, inputs=x, targets=y, method="gradient")


def test_bad_inputs_name_the_fix(trained) -> None:
    model, x, y, _ = trained
    with pytest.raises(TypeError, match="float32"):
        patternnet.quantus_explain(model=model, inputs=x.astype(np.uint8), targets=y)
    with pytest.raises(ValueError, match="unknown method"):
        patternnet.quantus_explain(model=model, inputs=x, targets=y, method="nope")
    with pytest.raises(TypeError, match="does not take the options"):
        patternnet.quantus_explain(model=model, inputs=x, targets=y, method="gradient",
                                   softmax=True)


def test_max_sensitivity_builds_the_method_once(trained, tmp_path) -> None:
    """Default MaxSensitivity: 201 calls for the batch, one method built, one file read."""
    model, x, y, patterns = trained
    path = patterns.save(tmp_path / "p.safetensors")
    metric = quantus.MaxSensitivity(disable_warnings=True, display_progressbar=False)
    scores = metric(
        model=model, x_batch=x, y_batch=y, device="cpu",
        explain_func=patternnet.quantus_explain,
        explain_func_kwargs={"method": "pattern_attribution", "patterns": str(path)},
    )
    info = pq.cache_info()
    assert info["calls"] == 1 + 200
    assert info["methods_built"] == 1 and info["patterns_loaded"] == 1
    assert np.all(np.isfinite(scores)) and len(scores) == len(x)


@pytest.mark.parametrize("name", METHODS)
def test_pixel_flipping_beats_a_random_ranking(trained, name) -> None:
    """Faithfulness: flipping the pixels ranked by the method lowers the target's output
    sooner (smaller area under the curve) than flipping them in a random order."""
    model, x, y, patterns = trained
    metric = quantus.PixelFlipping(
        features_in_step=8, perturb_baseline="black", disable_warnings=True
    )
    # (return_auc_per_sample needs np.trapz, gone in NumPy 2.4: the curves are integrated here)
    curves = np.asarray(metric(
        model=model, x_batch=x, y_batch=y, explain_func=patternnet.quantus_explain,
        explain_func_kwargs=_kwargs(name, patterns),
    ))
    rng = np.random.default_rng(0)

    def random_ranking(model, inputs, targets, **kwargs):
        return rng.random(inputs.shape).astype(np.float32)

    random_curves = np.asarray(metric(
        model=model, x_batch=x, y_batch=y, explain_func=random_ranking
    ))
    assert curves.shape == random_curves.shape == (len(x), 8)
    area = np.trapezoid(curves, axis=1).mean()
    random_area = np.trapezoid(random_curves, axis=1).mean()
    # measured: PA 0.70, PatternNet 0.17, gradient 0.08, LRP-ε 0.36 of the random area
    assert area < 0.8 * random_area, (area, random_area)
    assert pq.cache_info()["methods_built"] == 1


@pytest.mark.filterwarnings("ignore:the weights of layer")
@pytest.mark.parametrize("name", METHODS)
def test_model_parameter_randomisation_changes_the_explanation(trained, name) -> None:
    """Randomisation: with every layer re-initialised (bottom-up cascade), the explanation's
    rank correlation with the trained model's is far from 1. The patterns stay those of the
    trained model: they are part of the explainer, as Quantus keeps explain_func fixed."""
    model, x, y, patterns = trained
    metric = quantus.MPRT(layer_order="bottom_up", return_last_correlation=True,
                          disable_warnings=True)
    before = [p.detach().clone() for p in model.parameters()]
    last = np.asarray(metric(
        model=model, x_batch=x, y_batch=y, explain_func=patternnet.quantus_explain,
        explain_func_kwargs=_kwargs(name, patterns),
    ))
    assert last.shape == (len(x),) and np.all(np.isfinite(last))
    assert last.mean() < 0.8, last
    # the trained model and Quantus's one randomised copy: two methods, built once each
    assert pq.cache_info()["methods_built"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
