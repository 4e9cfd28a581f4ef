"""Pictures: signal images and heatmaps follow method.md §8; grids and overlays draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patternnet import viz


def test_signal_image_formula_keeps_channels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4))
    image = viz.signal_image(torch.from_numpy(x))
    assert image.shape == (5, 4, 3)
    expected = x / (2 * np.abs(x).max()) + 0.5
    np.testing.assert_allclose(image, expected.transpose(1, 2, 0))
    grey = viz.signal_image(x[:1])
    assert grey.shape == (5, 4)
    assert viz.signal_image(np.zeros((1, 2, 2))).tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_heatmap_sums_channels_red_positive_blue_negative_white_zero():
    a = np.zeros((2, 1, 3))
    a[0, 0, 0], a[1, 0, 0] = 2.0, 1.0  # summed: +3
    a[0, 0, 2] = -3.0  # summed: -3
    rgb = viz.heatmap(a)
    assert rgb.shape == (1, 3, 3)
    red, white, blue = rgb[0, 0], rgb[0, 1], rgb[0, 2]
    assert red[0] > 0.3 and red[0] > 2 * red[2]  # red dominates
    assert blue[2] > 0.3 and blue[2] > 2 * blue[0]
    assert np.all(white > 0.9)  # zero is (near) white
    # scale invariant: divided by max|.|
    np.testing.assert_allclose(viz.heatmap(10 * a), rgb)


def test_input_image_undoes_normalisation():
    x = torch.tensor([[[0.2, 0.8]]])
    normalised = (x - 0.5) / 0.25
    np.testing.assert_allclose(viz.input_image(normalised, mean=(0.5,), std=(0.25,)), x[0])
    np.testing.assert_allclose(viz.input_image(x), [[0.0, 1.0]])


def test_overlay_blends_by_magnitude():
    image = np.full((2, 2), 0.4)
    attribution = np.array([[[0.0, 1.0], [-1.0, 0.0]]])
    out = viz.overlay(image, attribution, alpha=1.0)
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[0, 0], [0.4, 0.4, 0.4])  # no attribution: the image
    np.testing.assert_allclose(out[0, 1], viz.heatmap(attribution)[0, 1])  # full: the colour
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, attribution, alpha=2)
    with pytest.raises(ValueError, match="2×2 but the attribution is 3×3"):
        viz.overlay(image, np.ones((3, 3)))


def test_grid_draws_and_saves(tmp_path):
    rows = [[np.zeros((4, 4)), np.ones((4, 4, 3)) * 0.5] for _ in range(3)]
    path = tmp_path / "sub" / "grid.png"
    figure = viz.grid(rows, column_titles=["a", "b"], row_titles=["1", "2", "3"], path=path)
    assert path.is_file() and path.stat().st_size > 1000
    assert len(figure.axes) == 6
    from PIL import Image

    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100
    with pytest.raises(ValueError, match="3 column titles for 2 columns"):
        viz.grid(rows, column_titles=["a", "b", "c"])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="one sample"):
        viz.heatmap(np.zeros((2, 1, 3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        viz.signal_image(np.full((2, 2), np.nan))


def test_viz_never_touches_pyplot_or_the_backend():
    """A fresh process: importing viz loads no matplotlib; drawing uses no pyplot."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from patternnet import viz\n"
        "assert 'matplotlib' not in sys.modules\n"
        "viz.heatmap(np.ones((2, 2))); viz.grid([[np.zeros((2, 2))]])\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_degradation_plot_draws_each_curve(tmp_path):
    class Curves:
        k = 4

        def __init__(self, scores):
            self.scores = torch.tensor(scores)

        def mean(self):
            return self.scores.mean(0)

        def aopc(self):
            return float((self.scores[:, :1] - self.scores).mean())

    curves = {"good": Curves([[0.9, 0.5, 0.1]]), "random order": Curves([[0.9, 0.8, 0.7]])}
    figure = viz.degradation_plot(curves, path=tmp_path / "d.png")
    ax = figure.axes[0]
    assert [line.get_label() for line in ax.lines] == [
        "good  (AOPC 0.400)", "random order  (AOPC 0.100)"
    ]  # fmt: skip
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.9, 0.5, 0.1], rtol=1e-6)
    assert (tmp_path / "d.png").is_file()
    with pytest.raises(ValueError, match="at least one curve"):
        viz.degradation_plot({})
