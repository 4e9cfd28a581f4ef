"""ρ(S) (method.md §5): the paper's toy example and a float64 reference by explicit regression."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patternnet import fit_patterns
from patternnet.evaluate import estimator_quality, layers_without_a_minus
from patternnet.evaluate.quality import QUALITY_ESTIMATORS
from patternnet.groundtruth import toy_data, toy_model


@pytest.fixture(scope="module")
def toy_table():
    # The linear pattern's sampling error is ~ 0.7/sqrt(n); ρ(S_a) ≥ 0.99 needs n ≳ 10⁴.
    data = toy_data(40000, mu=0.5, sigma=1.0, seed=3)
    fit, regression, evaluation = data.split(20000, 10000, 10000)
    table = estimator_quality(
        toy_model(), fit.inputs, regression.inputs, evaluation.inputs, random_draws=64, seed=1
    )
    return table, evaluation


def test_toy_linear_estimator_is_nearly_perfect(toy_table):
    table, _ = toy_table
    assert table["", "linear"] >= 0.99


def test_toy_filter_estimator_matches_hand_computation(toy_table):
    table, evaluation = toy_table
    # S_w(x) = w wᵀx / wᵀw = (y/2, −y/2), so both residual coordinates are y/2 + ε.
    x = evaluation.inputs.double()
    y = x[:, 0] - x[:, 1]
    residual = x[:, 0] - y / 2
    hand = 1 - abs(np.corrcoef(y.numpy(), residual.numpy())[0, 1])
    assert abs(table["", "filter"] - hand) < 0.05
    assert abs(hand - (1 - 1 / math.sqrt(13))) < 0.02  # σ_y² = 1/3, σ = 1: about 0.72


def test_toy_random_and_identity(toy_table):
    table, _ = toy_table
    # In 2-D a normalised random direction keeps one degree of freedom (expected ρ ≈ 0.57).
    assert table["", "random"] < table["", "filter"] < table["", "linear"]
    assert table["", "random"] < 0.7
    assert table["", "identity"] == 1.0  # zero residual: nothing correlates with y


# ---------------------------------------------------------------------------- reference
def _layer_io(model: nn.Module, layer: nn.Module, x: torch.Tensor):
    """Explicit patches (M, D), outputs without bias (M, O) and masks, in float64."""
    store = {}

    def hook(mod, args, out):
        store["x"], store["out"] = args[0].detach(), out.detach()

    handle = layer.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    handle.remove()
    inp, out = store["x"].double(), store["out"].double()
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(inp, layer.kernel_size, padding=layer.padding, stride=layer.stride)
        patches = patches.permute(0, 2, 1).reshape(-1, patches.shape[1])
        out = out.flatten(2).permute(0, 2, 1).reshape(-1, out.shape[1])
    else:
        patches = inp
    y = out - layer.bias.detach().double()
    return patches, y, out > 0


def _reference_rho(d_reg, y_reg, d_eval, y_eval) -> float:
    design = np.c_[d_reg, np.ones(len(d_reg))]
    coef, *_ = np.linalg.lstsq(design, y_reg, rcond=None)
    z = d_eval @ coef[:-1]
    return 1 - max(0.0, np.corrcoef(z, y_eval)[0, 1])


def _residual(patches, y, mask, estimator, tensors, weight, j):
    w = weight[j].double().flatten()
    if estimator == "filter":
        a = w / (w @ w)
        return patches - y[:, j, None] * a
    if estimator == "linear":
        return patches - y[:, j, None] * tensors["a"][j].double().flatten()
    plus = tensors["a_plus"][j].double().flatten()
    minus = tensors["a_minus"][j].double().flatten()
    a = torch.where(mask[:, j, None], plus, minus)
    return patches - y[:, j, None] * a


def _small_cnn(seed: int = 0, channels: int = 1) -> nn.Module:
    # float64 so that y = wᵀx carries no float32 rounding that a regression could fit
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5),
        nn.ReLU(), nn.Linear(5, 2),
    ).double()  # fmt: skip


def _smooth_images(n: int, seed: int, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 6, 6, generator=g, dtype=torch.float64)
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1) + 0.3


@pytest.mark.parametrize("layer_name", ["0", "3"])
@pytest.mark.parametrize("estimator", ["filter", "linear", "two_component"])
def test_matches_explicit_regression(layer_name, estimator):
    # three input channels: the 108 inputs of layer "3" have a well-conditioned covariance (one
    # channel gives 108 features of 36 pixels, nearly singular: then ρ is decided by rounding
    # and by the regulariser, see test_singular_inputs_are_stable)
    model = _small_cnn(channels=3)
    fit, regression, evaluation = (_smooth_images(2000, s, channels=3) for s in (1, 2, 3))
    # negative=True: the quality of the estimator's a₋ too, also where a ReLU makes it unused
    patterns = fit_patterns(model, fit, estimator=estimator, progress=False, negative=True)
    table = estimator_quality(
        model, fit, regression, evaluation, estimators=[estimator], layers=[layer_name],
        patterns={estimator: patterns} if estimator != "filter" else None,
        max_neurons=None, max_dims=None, positions=None,
    )  # fmt: skip
    layer = dict(model.named_modules())[layer_name]
    p_r, y_r, m_r = _layer_io(model, layer, regression)
    p_e, y_e, m_e = _layer_io(model, layer, evaluation)
    tensors = patterns[layer_name] if estimator != "filter" else {}
    expected = []
    for j in range(y_r.shape[1]):
        d_r = _residual(p_r, y_r, m_r, estimator, tensors, layer.weight.detach(), j)
        d_e = _residual(p_e, y_e, m_e, estimator, tensors, layer.weight.detach(), j)
        expected.append(_reference_rho(d_r.numpy(), y_r[:, j].numpy(), d_e.numpy(),
                                       y_e[:, j].numpy()))  # fmt: skip
    got = table.per_neuron[(layer_name, estimator)].numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_sampled_neurons_and_dims_match_the_explicit_subset():
    model = _small_cnn(1)
    fit, regression, evaluation = (_smooth_images(300, s) for s in (4, 5, 6))
    patterns = fit_patterns(model, fit, estimator="linear", progress=False)
    full = estimator_quality(
        model, fit, regression, evaluation, estimators=["linear"], layers=["3"],
        patterns={"linear": patterns}, max_neurons=None, max_dims=None, seed=7,
    )  # fmt: skip
    sampled = estimator_quality(
        model, fit, regression, evaluation, estimators=["linear"], layers=["3"],
        patterns={"linear": patterns}, max_neurons=3, max_dims=40, seed=7,
    )  # fmt: skip
    info = sampled.info["3"]
    assert (info["neurons"], info["dims"], info["exact"]) == (3, 40, False)
    assert full.info["3"]["exact"]
    # Reference: the same neurons, the regression restricted to the same 40 coordinates.
    generator = torch.Generator().manual_seed(7)
    neurons = torch.randperm(5, generator=generator)[:3].sort().values
    dims = torch.randperm(108, generator=generator)[:40].sort().values
    layer = model[3]
    p_r, y_r, _ = _layer_io(model, layer, regression)
    p_e, y_e, _ = _layer_io(model, layer, evaluation)
    a = patterns["3"]["a"].double()
    expected = []
    for j in neurons.tolist():
        d_r = (p_r - y_r[:, j, None] * a[j])[:, dims]
        d_e = (p_e - y_e[:, j, None] * a[j])[:, dims]
        expected.append(_reference_rho(d_r.numpy(), y_r[:, j].numpy(), d_e.numpy(),
                                       y_e[:, j].numpy()))  # fmt: skip
    np.testing.assert_allclose(sampled.per_neuron[("3", "linear")].numpy(), expected, atol=2e-4)


def test_table_outputs_and_model_untouched(tmp_path):
    model = _small_cnn(2)
    model.train()
    flags = [m.training for m in model.modules()]
    data = _smooth_images(200, 9)
    table = estimator_quality(model, data[:80], data[80:140], data[140:], max_neurons=2)
    assert [m.training for m in model.modules()] == flags
    assert table.layers == ["0", "3", "5"]
    assert table.estimators == list(QUALITY_ESTIMATORS)
    assert table.rho.shape == (3, 5)
    markdown = table.to_markdown()
    assert markdown.count("\n") == 5 and "two_component" in markdown
    csv = table.to_csv(tmp_path / "rho.csv")
    assert (tmp_path / "rho.csv").read_text() == csv
    assert csv.splitlines()[0].startswith("layer,identity,filter")


def test_bad_arguments_are_named():
    model = _small_cnn()
    data = _smooth_images(30, 0)
    with pytest.raises(ValueError, match="unknown estimators"):
        estimator_quality(model, data, data, data, estimators=["magic"])
    with pytest.raises(KeyError, match="not Linear/Conv"):
        estimator_quality(model, data, data, data, layers=["1"])
    with pytest.raises(ValueError, match="needs fit_data"):
        estimator_quality(model, None, data, data, estimators=["linear"])


def test_conv1d_layer_matches_explicit_regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 10, 2)).double()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = [F.avg_pool1d(torch.randn(1500, 2, 12, generator=g, dtype=torch.float64), 3, 1)
            for _ in range(3)]  # fmt: skip
    patterns = fit_patterns(model, data[0], estimator="linear", progress=False)
    table = estimator_quality(model, None, data[1], data[2], estimators=["linear"], layers=["0"],
                              patterns={"linear": patterns}, positions=None)  # fmt: skip
    layer, a = model[0], patterns["0"]["a"].double().flatten(1)

    def io(x):
        patches = F.pad(x, (1, 1)).unfold(2, 3, 1)  # (N, C, L, k)
        patches = patches.permute(0, 2, 1, 3).reshape(-1, 6)  # (C, k) order of weight.view
        y = patches @ layer.weight.detach().flatten(1).T
        return patches, y

    p_r, y_r = io(data[1])
    p_e, y_e = io(data[2])
    expected = [
        _reference_rho((p_r - y_r[:, j, None] * a[j]).numpy(), y_r[:, j].numpy(),
                       (p_e - y_e[:, j, None] * a[j]).numpy(), y_e[:, j].numpy())
        for j in range(3)
    ]  # fmt: skip
    np.testing.assert_allclose(table.per_neuron[("0", "linear")].numpy(), expected, atol=2e-4)


def _loop_patches_3d(layer: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Patches ``(M, C·k₁k₂k₃)`` of a zero-padded Conv3d by explicit loops over positions."""
    (p1, p2, p3), (s1, s2, s3), (d1, d2, d3) = layer.padding, layer.stride, layer.dilation
    k1, k2, k3 = layer.kernel_size
    x = F.pad(x, (p3, p3, p2, p2, p1, p1))
    rows = []
    span = [(n - d * (k - 1) - 1) // s + 1
            for n, d, k, s in zip(x.shape[2:], (d1, d2, d3), (k1, k2, k3), (s1, s2, s3))]
    for i in range(span[0]):
        for j in range(span[1]):
            for m in range(span[2]):
                rows.append(x[:, :, i * s1 : i * s1 + d1 * (k1 - 1) + 1 : d1,
                              j * s2 : j * s2 + d2 * (k2 - 1) + 1 : d2,
                              m * s3 : m * s3 + d3 * (k3 - 1) + 1 : d3].flatten(1))
    return torch.stack(rows, 1).reshape(-1, rows[0].shape[1])  # image-major, positions row-major


@pytest.mark.parametrize("estimator", ["linear", "two_component"])
def test_conv3d_layer_matches_explicit_regression(estimator):
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 3 * 2, 2)).double()
    g = torch.Generator().manual_seed(1)
    data = [F.avg_pool3d(torch.randn(300, 2, 5, 6, 7, generator=g, dtype=torch.float64), 2, 1)
            + 0.3 for _ in range(3)]  # fmt: skip
    patterns = fit_patterns(model, data[0], estimator=estimator, progress=False, negative=True)
    table = estimator_quality(model, None, data[1], data[2], estimators=[estimator], layers=["0"],
                              patterns={estimator: patterns}, positions=None,
                              max_neurons=None, max_dims=None)  # fmt: skip
    assert table.info["0"]["exact"]
    weight, bias = conv.weight.detach().flatten(1), conv.bias.detach()
    tensors = patterns["0"]

    def io(x):
        patches = _loop_patches_3d(conv, x)
        y = patches @ weight.T
        return patches, y, y + bias > 0

    (p_r, y_r, m_r), (p_e, y_e, m_e) = io(data[1]), io(data[2])
    assert p_r.shape == (300 * 30, 36)
    expected = []
    for j in range(3):
        d_r = _residual(p_r, y_r, m_r, estimator, tensors, conv.weight.detach(), j)
        d_e = _residual(p_e, y_e, m_e, estimator, tensors, conv.weight.detach(), j)
        expected.append(_reference_rho(d_r.numpy(), y_r[:, j].numpy(), d_e.numpy(),
                                       y_e[:, j].numpy()))  # fmt: skip
    np.testing.assert_allclose(table.per_neuron[("0", estimator)].numpy(), expected, atol=2e-4)


def test_conv3d_network_gets_a_full_table():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv3d(4, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4 * 4, 3))  # fmt: skip
    data = torch.randn(90, 1, 4, 4, 4) + 0.2
    table = estimator_quality(model, data[:30], data[30:60], data[60:], max_neurons=2,
                              positions=8)  # fmt: skip
    assert table.layers == ["0", "2", "5"]
    assert torch.isfinite(table.rho).all()


# ---------------------------------------------------------------------------- exact path
def _moments(model, layer_name, data, dims, active=True):
    from patternnet.evaluate.quality import LayerMoments, collect_moments

    layer = dict(model.named_modules())[layer_name]
    neurons = torch.arange(layer.weight.shape[0])
    moments = LayerMoments(neurons, dims, active)
    collect_moments(model, data, {layer_name: moments})
    return moments


@pytest.mark.parametrize("estimator", ["filter", "linear", "two_component", "random"])
def test_reduced_form_equals_general_form_and_a_full_sampling_draw(estimator):
    # The exact path (y = wᵀx, one side dropped) and the bordered form used for sampled
    # coordinates must agree when the "sample" is every coordinate, in any order.
    from patternnet.evaluate.quality import _neuron_patterns, layer_quality

    model = _small_cnn(3, channels=3)
    fit, regression, evaluation = (_smooth_images(1500, s, channels=3) for s in (11, 12, 13))
    kind = estimator if estimator in ("linear", "two_component") else "two_component"
    fitted = {kind: fit_patterns(model, fit, estimator=kind, progress=False, negative=True)}
    layer = model[3]
    weight = layer.weight.detach().double()
    order = torch.randperm(108, generator=torch.Generator().manual_seed(0))
    reg, ev = (_moments(model, "3", d, torch.arange(108)) for d in (regression, evaluation))
    reg_p, ev_p = (_moments(model, "3", d, order) for d in (regression, evaluation))
    patterns = _neuron_patterns(estimator, "3", weight, torch.arange(5), fitted,
                                torch.Generator().manual_seed(1))  # fmt: skip
    exact = layer_quality(reg, ev, estimator, patterns, weight=weight)
    general = layer_quality(reg, ev, estimator, patterns)
    permuted = layer_quality(reg_p, ev_p, estimator, patterns)
    np.testing.assert_allclose(general.numpy(), exact.numpy(), atol=1e-7)
    np.testing.assert_allclose(permuted.numpy(), exact.numpy(), atol=1e-7)
    table = estimator_quality(model, None, regression, evaluation, estimators=[estimator],
                              layers=["3"], patterns=fitted if estimator == kind else None,
                              max_dims=108, seed=0)  # fmt: skip
    assert table.info["3"]["exact"] and table.info["3"]["dim_seeds"] == 1
    assert float(table.stderr[0, 0]) == 0.0


def test_constant_input_coordinate_is_handled_exactly():
    # A coordinate that never varies makes Σ_xx singular. If the filter w uses it, the filter
    # residual there is −w_i y / wᵀw: exactly proportional to y, so ρ(S_w) = 0; the linear
    # pattern has a_i = 0 there and is unaffected (its ρ equals that without the coordinate).
    g = torch.Generator().manual_seed(0)
    n, D = 3000, 6
    mixing = torch.randn(D - 1, D - 1, generator=g, dtype=torch.float64)
    data = [torch.cat([torch.randn(n, D - 1, generator=g, dtype=torch.float64) @ mixing,
                       torch.zeros(n, 1, dtype=torch.float64)], 1) for _ in range(3)]  # fmt: skip
    model = nn.Sequential(nn.Linear(D, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(2, D, generator=g, dtype=torch.float64))
    table = estimator_quality(model, data[0], data[1], data[2],
                              estimators=["filter", "linear"])  # fmt: skip
    assert np.allclose(table.per_neuron[("0", "filter")].numpy(), 0.0, atol=1e-6)
    reduced = nn.Sequential(nn.Linear(D - 1, 2)).double()
    with torch.no_grad():
        reduced[0].weight.copy_(model[0].weight[:, : D - 1])
        reduced[0].bias.copy_(model[0].bias)
    small = estimator_quality(reduced, *(d[:, : D - 1] for d in data), estimators=["linear"])
    np.testing.assert_allclose(table.per_neuron[("0", "linear")].numpy(),
                               small.per_neuron[("0", "linear")].numpy(), atol=1e-6)  # fmt: skip


def test_sampled_layer_reports_spread_and_convergence():
    model = _small_cnn(1, channels=3)
    fit, regression, evaluation = (_smooth_images(400, s, channels=3) for s in (4, 5, 6))
    table = estimator_quality(model, fit, regression, evaluation, estimators=["linear", "filter"],
                              layers=["0", "3"], max_dims=40, dim_seeds=3)  # fmt: skip
    assert table.info["0"]["exact"] and not table.info["3"]["exact"]
    assert table.info["3"]["dim_seeds"] == 3 and table.info["3"]["dims"] == 40
    assert (table.stderr[0] == 0).all() and (table.stderr[1] > 0).all()
    points = table.convergence[("3", "linear")]
    assert [p[0] for p in points] == [10, 20, 40]
    assert points[-1][1] == pytest.approx(table["3", "linear"])
    markdown = table.to_markdown()
    assert "±" in markdown and "40/108 ×3 draws" in markdown and "Convergence" in markdown
    records = table.to_records()
    assert len(records) == 4 and {"rho", "stderr", "exact", "layer"} <= set(records[0])
    assert "convergence" in records[-1]


def test_singular_inputs_give_finite_values_in_range():
    # one input channel: layer "3" sees 108 features of 36 pixels (nearly singular Σ_xx)
    model = _small_cnn()
    fit, regression, evaluation = (_smooth_images(1000, s) for s in (1, 2, 3))
    table = estimator_quality(model, fit, regression, evaluation)
    values = torch.cat([v for v in table.per_neuron.values()])
    assert torch.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()


def test_quality_over_splits_is_the_mean_with_its_standard_error():
    from patternnet.evaluate import quality_over_splits

    model = _small_cnn(4)
    data = _smooth_images(260, 11)
    fitted = {"two_component": fit_patterns(model, data[:80], progress=False, negative=True),
              "linear": fit_patterns(model, data[:80], estimator="linear", progress=False)}
    splits = [(data[80 + 60 * i : 110 + 60 * i], data[110 + 60 * i : 140 + 60 * i])
              for i in range(3)]  # fmt: skip
    options = {"patterns": fitted, "estimators": ("random", "filter", "linear", "two_component")}
    tables = [estimator_quality(model, None, r, e, **options) for r, e in splits]
    combined = quality_over_splits(model, splits, **options)
    rho = torch.stack([t.rho for t in tables]).double()
    torch.testing.assert_close(combined.rho.double(), rho.mean(0))
    # exact tables: the error is the spread over the pairs divided by sqrt(pairs)
    std = rho.std(0)
    torch.testing.assert_close(combined.spread.double(), std)
    torch.testing.assert_close(combined.stderr.double(), std / math.sqrt(3))
    assert combined.stderr.max() > 0 and all(v["splits"] == 3 for v in combined.info.values())
    assert "±" in combined.to_markdown()
    with pytest.raises(ValueError, match="at least 2 pairs"):
        quality_over_splits(model, splits[:1], **options)


def test_every_linear_of_a_vit_gets_rho_including_the_attention_projections():
    """The Q/K/V projection (inside ``in_proj_weight``) and ``out_proj`` are never called as
    modules by PyTorch: ρ(S) sees them through the attention's decomposition, as the fit does."""
    from patternnet.groundtruth.vit import small_vit

    model = small_vit(seed=1).eval()
    data = torch.randn(180, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    fitted = {"linear": fit_patterns(model, data[:60], estimator="linear", progress=False)}
    table = estimator_quality(model, None, data[60:120], data[120:], patterns=fitted,
                              estimators=("random", "filter", "linear"))  # fmt: skip
    assert "blocks.0.self_attn.in_proj" in table.layers
    assert "blocks.1.self_attn.out_proj" in table.layers and "blocks.0.linear1" in table.layers
    assert torch.isfinite(table.rho).all()
    for layer in table.layers:
        assert table[layer, "linear"] > table[layer, "random"], layer
    assert table.info["blocks.0.self_attn.in_proj"]["out_features"] == 3 * 16


def test_two_component_rho_refuses_patterns_without_a_minus():
    # The default fit (negative="auto") leaves a₋ out of layers read only through ReLUs; ρ(S)
    # of S_a+- must not quietly measure a₊ on both halves there (as it once did).
    model = _small_cnn(channels=3)
    fit, regression, evaluation = (_smooth_images(400, s, channels=3) for s in (1, 2, 3))
    default = fit_patterns(model, fit, progress=False)
    assert layers_without_a_minus(default) == ["0", "3"]
    with pytest.raises(ValueError, match=r"no a₋ for 0, 3.*negative=True"):
        estimator_quality(model, None, regression, evaluation, estimators=["two_component"],
                          patterns={"two_component": default})  # fmt: skip
    full = fit_patterns(model, fit, progress=False, negative=True)
    assert layers_without_a_minus(full) == []
    table = estimator_quality(model, None, regression, evaluation,
                              estimators=["two_component"], patterns={"two_component": full},
                              max_neurons=None, max_dims=None, positions=None)  # fmt: skip
    assert all(0.0 <= table[name, "two_component"] <= 1.0 for name in ("0", "3", "5"))
