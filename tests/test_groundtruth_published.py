"""The published ground-truth designs (Wilming et al. 2022; XAI-TRIS, Clark et al. 2024) and
their metrics (EMD, top-k precision) against hand-computed float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from patternnet import Gradient, PatternNet, fit_patterns
from patternnet.evaluate import (
    earth_movers_distance,
    emd_score,
    mask_auroc,
    region_mass,
    topk_precision,
)
from patternnet.groundtruth import (
    WILMING_SIGNAL_WEIGHTS,
    XAI_TRIS_ALPHA,
    linear_discriminant,
    wilming_suppressor,
    xai_tris,
)
from patternnet.groundtruth.noise import gaussian_filter
from patternnet.groundtruth.wilming import wilming_patterns
from patternnet.groundtruth.xaitris import xai_tris_shapes

pytest.importorskip("ot")


# ---------------------------------------------------------------------------- EMD by hand
def _image(h: int, w: int, *points: tuple[int, int, float]) -> torch.Tensor:
    out = torch.zeros(1, 1, h, w, dtype=torch.float64)
    for r, c, v in points:
        out[0, 0, r, c] = v
    return out


@pytest.mark.parametrize(
    ("explanation", "expected"),
    [
        (_image(2, 2, (0, 0, 1.0)), 0.0),  # all mass already on the mask
        (_image(2, 2, (0, 1, 3.0)), 1.0),  # one pixel to the right
        (_image(2, 2, (1, 1, -2.0)), math.sqrt(2.0)),  # diagonal; |e| counts, not the sign
        (_image(2, 2, (0, 0, 1.0), (1, 1, 1.0)), math.sqrt(2.0) / 2),
        (_image(2, 2, (0, 1, 1.0), (1, 0, 1.0), (1, 1, 2.0)), 0.25 + 0.25 + 0.5 * math.sqrt(2)),
    ],
)
def test_emd_by_hand(explanation: torch.Tensor, expected: float):
    mask = _image(2, 2, (0, 0, 1.0)) > 0
    assert float(earth_movers_distance(explanation, mask)[0]) == pytest.approx(expected, abs=1e-12)
    score = float(emd_score(explanation, mask)[0])
    assert score == pytest.approx(1 - expected / math.sqrt(2 * 4), abs=1e-12)


def test_emd_spreading_mass_from_a_mask_of_two_pixels():
    # mask: (0,0) and (0,2), half the mass each; explanation: all on (0,1) → each half moves 1
    mask = _image(3, 3, (0, 0, 1.0), (0, 2, 1.0)) > 0
    assert float(earth_movers_distance(_image(3, 3, (0, 1, 5.0)), mask)[0]) == pytest.approx(1.0)
    # explanation on (2,0) and (2,2): the optimal plan moves straight down, 2 each
    e = _image(3, 3, (2, 0, 1.0), (2, 2, 1.0))
    assert float(earth_movers_distance(e, mask)[0]) == pytest.approx(2.0)


def test_emd_equals_a_dense_linear_program():
    """The support-restricted transport equals the dense problem solved as an LP (float64)."""
    optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    h = w = 4
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
    grid = grid.reshape(-1, 2).double()
    cost = torch.cdist(grid, grid).numpy()
    for _ in range(3):
        e = torch.randn(1, 1, h, w, generator=g, dtype=torch.float64)
        e[e.abs() < 0.5] = 0
        mask = torch.rand(1, 1, h, w, generator=g) < 0.3
        a = mask.double().reshape(-1) / mask.sum()
        b = e.abs().reshape(-1) / e.abs().sum()
        d = h * w
        rows = [[1.0 if j // d == i else 0.0 for j in range(d * d)] for i in range(d)]
        cols = [[1.0 if j % d == i else 0.0 for j in range(d * d)] for i in range(d)]
        lp = optimize.linprog(
            cost.reshape(-1),
            A_eq=rows + cols,
            b_eq=torch.cat([a, b]).tolist(),
            bounds=(0, None),
            method="highs",
        )
        assert float(earth_movers_distance(e, mask)[0]) == pytest.approx(lp.fun, abs=1e-9)


def test_emd_of_a_zero_explanation_is_nan_and_bad_masks_are_named():
    mask = _image(2, 2, (0, 0, 1.0)) > 0
    assert math.isnan(float(earth_movers_distance(torch.zeros(1, 1, 2, 2), mask)[0]))
    with pytest.raises(ValueError, match="empty"):
        earth_movers_distance(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="images"):
        earth_movers_distance(torch.ones(1, 4), torch.ones(1, 4))


def test_topk_precision_counts_only_nonzero_attributions():
    mask = torch.tensor([[True, True, False, False]])
    assert float(topk_precision(torch.tensor([[2.0, -1.0, 0.5, 0.0]]), mask)[0]) == 1.0
    # one non-zero value, on the mask; the zero never counts although it is tied first by position
    assert float(topk_precision(torch.tensor([[0.0, 3.0, 0.0, 0.0]]), mask)[0]) == 0.5
    assert float(topk_precision(torch.zeros(1, 4), mask)[0]) == 0.0


# ---------------------------------------------------------------------------- XAI-TRIS
def test_gaussian_filter_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma in (1.5, 3.0, 10.0):
        ours = gaussian_filter(x, sigma)
        for i in range(2):
            ref = torch.from_numpy(ndimage.gaussian_filter(x[i].numpy(), sigma))
            assert torch.allclose(ours[i], ref, atol=1e-13)


def test_xai_tris_shapes_and_positions_as_published():
    t, l_shape = xai_tris_shapes(1)
    assert t.tolist() == [[1, 0], [1, 1], [1, 0]] and l_shape.tolist() == [[1, 0], [1, 0], [1, 1]]
    assert xai_tris_shapes(8)[0].shape == (24, 16)
    data = xai_tris(40, scenario="lin", background="white", size=8, seed=0)
    expect_t = torch.zeros(8, 8, dtype=torch.bool)
    expect_t[1:4, 1:3] = t.bool()
    expect_l = torch.zeros(8, 8, dtype=torch.bool)
    expect_l[4:7, 5:7] = l_shape.bool()
    own = data.regions["shape"][:, 0]
    assert all(torch.equal(own[i], expect_t) for i in torch.where(data.targets == 0)[0])
    assert all(torch.equal(own[i], expect_l) for i in torch.where(data.targets == 1)[0])
    # LIN/MULT/XOR are scored against the combined mask: both positions, disjoint, 8 pixels
    assert torch.equal(data.signal_mask[0, 0], expect_t | expect_l)
    assert not (expect_t & expect_l).any()
    assert int(data.targets.sum()) == 20


def test_xai_tris_mixing_and_normalisation():
    alpha = XAI_TRIS_ALPHA[("lin", "white", 8)]
    lin = xai_tris(400, scenario="lin", background="white", size=8, seed=3)
    background = lin.inputs.double() - lin.signal.double()
    # x = α·P/‖P‖_F + (1 − α)·B/‖B‖_F, then divided by max|x|: the Frobenius ratio is α/(1−α)
    ratio = float(lin.signal.double().norm() / background.norm())
    assert ratio == pytest.approx(alpha / (1 - alpha), rel=1e-5)
    assert float(lin.inputs.abs().max()) == pytest.approx(1.0)
    assert float(background.std()) > 0
    # MULT: on shape pixels x = c(1 − α)b and the background alone would give c·b
    mult = xai_tris(200, scenario="mult", background="white", size=8, seed=3)
    a_mult = XAI_TRIS_ALPHA[("mult", "white", 8)]
    shape = mult.regions["shape"]
    ratio = mult.signal[shape].double() / mult.inputs[shape].double()
    assert torch.allclose(ratio, torch.full_like(ratio, -a_mult / (1 - a_mult)), atol=1e-4)
    assert mult.signal[~shape].abs().max() == 0


def test_xai_tris_correlated_background_is_smooth():
    def neighbour_correlation(data):
        b = (data.inputs - data.signal).double()[:, 0]
        return float(
            torch.corrcoef(torch.stack([b[:, :, :-1].flatten(), b[:, :, 1:].flatten()]))[0, 1]
        )

    white = xai_tris(300, scenario="lin", background="white", size=8, seed=0)
    corr = xai_tris(300, scenario="lin", background="corr", size=8, seed=0)
    assert abs(neighbour_correlation(white)) < 0.1
    assert neighbour_correlation(corr) > 0.95


def test_xai_tris_xor_signs():
    data = xai_tris(400, scenario="xor", background="white", size=8, seed=1)
    p = data.signal[:, 0].double()
    first, second = p[:, 1, 1].sign(), p[:, 4, 5].sign()
    assert bool((first != 0).all() and (second != 0).all())
    assert torch.equal((first * second < 0).long(), data.targets)  # class 1: opposite signs
    for label in (0, 1):
        signs = first[data.targets == label]
        assert 0.3 < float((signs > 0).double().mean()) < 0.7  # both sign pairs in each class
    assert (data.signal_mask.flatten(1).sum(1) == 8).all()


def test_xai_tris_rigid_rotates_and_translates():
    data = xai_tris(300, scenario="rigid", background="white", size=8, seed=2)
    assert torch.equal(data.signal_mask, data.regions["shape"])
    rotations = {
        label: {tuple(map(tuple, torch.rot90(s, k).tolist())) for k in range(4)}
        for label, s in enumerate(xai_tris_shapes(1))
    }
    corners = set()
    for i in range(len(data)):
        m = data.signal_mask[i, 0]
        rows, cols = torch.where(m)
        assert len(rows) == 4
        box = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].float()
        assert tuple(map(tuple, box.tolist())) in rotations[int(data.targets[i])]
        corners.add((int(rows.min()), int(cols.min())))
    assert len(corners) > 20


def test_xai_tris_64_masks_and_determinism():
    data = xai_tris(8, scenario="lin", background="white", size=64, seed=0)
    assert data.inputs.shape == (8, 1, 64, 64)
    # smoothed shapes (σ = 1.5), binarised at ≥ 0.05: the mask grows beyond the 512 cell pixels
    assert int(data.signal_mask[0].sum()) > 512
    again = xai_tris(8, scenario="lin", background="white", size=64, seed=0)
    assert torch.equal(again.inputs, data.inputs)
    for scenario in ("lin", "mult", "rigid", "xor"):
        a = xai_tris(16, scenario=scenario, background="corr", size=8, seed=5)
        b = xai_tris(16, scenario=scenario, background="corr", size=8, seed=5)
        c = xai_tris(16, scenario=scenario, background="corr", size=8, seed=6)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.signal_mask, b.signal_mask)
        assert not torch.equal(a.inputs, c.inputs)
    with pytest.raises(ValueError, match="scenario"):
        xai_tris(8, scenario="xnor")
    with pytest.raises(ValueError, match="size"):
        xai_tris(8, size=16)


def test_a_perfect_map_scores_one():
    for scenario in ("lin", "mult", "rigid", "xor"):
        data = xai_tris(20, scenario=scenario, background="white", size=8, seed=0)
        perfect = data.signal_mask.double()
        assert (topk_precision(perfect, data.signal_mask) == 1.0).all()
        assert torch.allclose(
            emd_score(perfect, data.signal_mask), torch.ones(20, dtype=torch.float64)
        )


# ---------------------------------------------------------------------------- Wilming et al.
def test_wilming_patterns_as_published():
    a, d = wilming_patterns()
    blob = torch.tensor([[0, 0.5, 0.5, 0], [0.5, 1, 1, 0.5], [0.5, 1, 1, 0.5], [0, 0.5, 0.5, 0]])
    blob = blob.double()
    assert torch.equal(a[:4, :4], blob) and torch.equal(a[4:, :4], -blob)
    assert torch.equal(d[:4, :4], blob) and torch.equal(d[:4, 4:], -blob)
    assert a[:, 4:].abs().max() == 0 and d[4:, :].abs().max() == 0
    data = wilming_suppressor(200, seed=0)
    assert int(data.signal_mask[0].sum()) == 24
    assert int(data.regions["suppressor"][0].sum()) == 12
    assert not (data.signal_mask & data.regions["suppressor"]).any()
    assert WILMING_SIGNAL_WEIGHTS == (0.0, 0.02, 0.04, 0.06, 0.08)


def test_wilming_components_and_covariance():
    lam = 0.06
    data = wilming_suppressor(500, signal_weight=lam, seed=4)
    # the signal term is λ₁·S/‖S‖_F with S = z·aᵀ, z = ±1 by class
    assert float(data.signal.double().norm()) == pytest.approx(lam, rel=1e-6)
    a, _ = wilming_patterns()
    z = 2.0 * data.targets.double() - 1
    expected = lam * z[:, None] * a.reshape(1, -1) / (math.sqrt(500) * a.norm())
    assert torch.allclose(data.signal.double().reshape(500, -1), expected, atol=1e-7)
    assert data.params["distractor_weight"] == data.params["noise_weight"] == (1 - lam) / 2
    cov = data.params["noise_covariance"]
    assert torch.allclose(cov, cov.T)
    eig = torch.linalg.eigvalsh(cov)
    assert float(eig.max()) <= 1.01 + 1e-9
    assert float(eig.min()) >= 0.0099 * float(eig.max())
    # the rest of x: distractor plus noise, the two of equal Frobenius weight (1 − λ₁)/2
    rest = (data.inputs.double() - data.signal.double()).reshape(500, -1)
    assert float(rest.norm()) == pytest.approx((1 - lam) / 2 * math.sqrt(2), rel=0.15)
    assert int(data.targets.sum()) == 250
    same = wilming_suppressor(500, signal_weight=lam, seed=4)
    assert torch.equal(same.inputs, data.inputs)
    assert torch.equal(wilming_suppressor(10, signal_weight=0.0).signal, torch.zeros(10, 1, 8, 8))


def test_wilming_suppressor_claim_as_published():
    """On the published design the gradient of the optimal linear model shows the suppressor;
    PatternNet does not (Wilming et al. 2022, Figure 4: PatternNet among the best)."""
    data = wilming_suppressor(3000, signal_weight=0.08, seed=0)
    train, test = data.split(2400, 600)
    model = linear_discriminant(train)
    patterns = fit_patterns(model, train.inputs, estimator="linear", progress=False)
    signal = PatternNet(model, patterns).attribute(test.inputs, target=1)
    gradient = Gradient(model).attribute(test.inputs, target=1)
    suppressor = test.regions["suppressor"]
    # 12 of 64 pixels are suppressor; measured 0.066 (PatternNet) vs 0.22 (gradient)
    assert float(region_mass(signal, suppressor).mean()) < 0.1
    assert float(region_mass(gradient, suppressor).mean()) > 0.15
    assert float(topk_precision(signal, test.signal_mask).mean()) > 0.95
    assert float(topk_precision(gradient, test.signal_mask).mean()) < 0.7


def test_mask_auroc_by_hand():
    mask = torch.tensor([[True, True, False, False]])
    assert float(mask_auroc(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), mask)[0]) == 1.0
    assert float(mask_auroc(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), mask)[0]) == 0.0
    # pairs (pos, neg): (3,2) (3,0) (1,2) (1,0) → 3 of 4 won; |−2| = 2 counts as 2
    assert float(mask_auroc(torch.tensor([[3.0, 1.0, -2.0, 0.0]]), mask)[0]) == 0.75
    # a tie counts one half: (1,1) (1,0) (1,1) (1,0) → (0.5 + 1 + 0.5 + 1) / 4
    assert float(mask_auroc(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), mask)[0]) == 0.75
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(3)
    e = torch.randint(0, 4, (5, 30), generator=g).double()
    m = torch.rand(5, 30, generator=g) < 0.4
    ours = mask_auroc(e, m)
    for i in range(5):
        ref = metrics.roc_auc_score(m[i].numpy(), e[i].numpy())
        assert float(ours[i]) == pytest.approx(ref, abs=1e-12)


def test_reproduce_script_runs_on_tiny_sizes(tmp_path):
    from patternnet.groundtruth import reproduce

    rows = reproduce.run_wilming(datasets=1, n=200, epochs=2)
    assert {r["method"] for r in rows} == {"gradient", "PatternNet", "PatternAttribution", "random"}
    assert len(rows) == 4 * len(WILMING_SIGNAL_WEIGHTS)
    tris = reproduce.run_xai_tris(200, 1, scenarios=("lin",), backgrounds=("white",), log=print)
    assert {r["model"] for r in tris} <= {"LLR", "MLP", "CNN"} and tris
    assert all("±" in str(r["emd"]) for r in tris)
    assert reproduce.cnn8()(torch.zeros(2, 1, 8, 8)).shape == (2, 2)
