"""report.html: self-contained, honest about what is absent, and working in a real browser."""

from __future__ import annotations

import base64
import io
import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from browser import probe, screenshot
from patternnet.demo import run_demo
from patternnet.evaluate import estimator_quality, region_perturbation
from patternnet.methods.registry import get_method
from patternnet.patterns.fit import fit_patterns
from patternnet.report import (
    ExplanationGrid,
    Report,
    curve_summary,
    explanation_grid,
    method_kind,
    write_report,
)
from test_demo import small_config, synthetic_fashion


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(3, 6, 3, padding=1)), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(6 * 6 * 6, 4)),
    ])).eval()  # fmt: skip


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """A report with every section, made of real results on a tiny model."""
    model = tiny_model()
    x = torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    patterns = fit_patterns(model, x[:20], progress=False, negative=True)  # ρ(S) reads a₋
    names = ("pattern_net", "pattern_attribution", "gradient", "lrp_epsilon")
    explained = {}
    for name in names:
        options = {"patterns": patterns} if name.startswith("pattern") else {}
        explained[name] = get_method(name, model, **options).attribute(x[20:26])
    quality = estimator_quality(model, None, x[:20], x[20:], estimators=("random", "filter",
                                "two_component"), patterns={"two_component": patterns})  # fmt: skip
    curves = {name: region_perturbation(model, x[20:], explained_all, k=3, steps=8, label=name)
              for name, explained_all in (
                  ("pattern_attribution", get_method("pattern_attribution", model,
                                                     patterns=patterns).attribute(x[20:])),
                  ("gradient", get_method("gradient", model).attribute(x[20:])))}  # fmt: skip
    curves["random"] = region_perturbation(model, x[20:], "random", k=3, steps=8)
    sanity = [{"method": "gradient", "check": "cascading randomisation", "passed": True,
               "similarity": 0.12}]  # fmt: skip
    report = Report(
        title="tiny <run> & more",
        grid=ExplanationGrid.from_explanations(x[20:26], explained, row_titles=list("abcdef")),
        quality=quality,
        degradation=curves,
        sanity=sanity,
        settings={"model": "tiny", "k": 3},
        timings={"fit": 0.5, "explain": 0.25},
        figures={"an extra figure": _png(np.linspace(0, 1, 64).reshape(8, 8))},
    )
    folder = tmp_path_factory.mktemp("report")
    return report, report.write(folder / "report.html")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((array * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- the file
def test_page_is_self_contained(full_report):
    _, path = full_report
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<script" not in text  # hiding columns is CSS; nothing to run, nothing to fetch
    links = re.findall(r'(?:src|href)="([^"]*)"', text)
    outside = [link for link in links if not link.startswith(("data:image/png;base64,", "#"))]
    assert outside == []
    assert "@import" not in text and "url(" not in text
    sources = re.findall(r'src="data:image/png;base64,([^"]*)"', text)
    assert len(sources) == 6 * 5 + 3  # grid: 6 rows × (input + 4 methods); ρ, curves, extra
    for data in sources:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.verify()
    for table in ("quality-table", "degradation-table", "sanity-table", "settings-table",
                  "timings-table", "versions-table"):  # fmt: skip
        assert f'id="{table}"' in text
    assert "tiny &lt;run&gt; &amp; more" in text and "tiny <run>" not in text
    assert "Not in this run" not in text
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_absent_results_are_noted_not_invented(tmp_path):
    path = write_report(tmp_path / "r.html", title="nothing", settings={"a": 1})
    text = path.read_text()
    note = re.search(r'id="absent">Not in this run: ([^<]*) \(these', text).group(1)
    assert note.strip() == "Explanations, Signal estimator quality ρ(S), Image degradation, " \
                           "Sanity checks"
    for section in ("explanations", "quality", "degradation", "sanity"):
        assert f'<section id="{section}"' not in text
    assert '<section id="settings"' in text and "<img" not in text


def test_a_failed_render_keeps_the_old_file(tmp_path):
    class Broken:
        def rows(self):
            raise RuntimeError("no rows")

    path = write_report(tmp_path / "report.html", title="first")
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="no rows"):
        write_report(path, quality=Broken())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# ---------------------------------------------------------------------------- contents
def test_grid_columns_follow_the_method_kind(full_report):
    report, path = full_report
    kinds = {c.key: c.kind for c in report.grid.columns}
    assert kinds == {"pattern_net": "signal", "pattern_attribution": "attribution",
                     "gradient": "signal", "lrp_epsilon": "attribution"}  # fmt: skip
    text = path.read_text()
    for i, name in enumerate(kinds):
        assert f'<input type="checkbox" id="show-m{i}" data-method="{name}" checked>' in text
        assert f"#show-m{i}:not(:checked) ~ .grid-wrap .m{i} {{ display: none; }}" in text
        assert text.count(f'<td class="m{i}">') == 6


def test_explanation_grid_builds_methods_by_name_and_draws_them_by_kind(tmp_path):
    model = tiny_model()
    x = torch.randn(12, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    patterns = fit_patterns(model, x, progress=False)
    grid = explanation_grid(model, x[:3], {"pattern_net": "PatternNet", "lrp_epsilon": "LRP"},
                            patterns=patterns, row_titles=["a", "b", "c"])  # fmt: skip
    assert [(c.key, c.title, c.kind) for c in grid.columns] == [
        ("pattern_net", "PatternNet", "signal"), ("lrp_epsilon", "LRP", "attribution")]
    signal = get_method("pattern_net", model, patterns=patterns).attribute(x[:3])
    expected = ExplanationGrid.from_explanations(x[:3], {"pattern_net": signal})
    np.testing.assert_array_equal(grid.columns[0].pictures[1], expected.columns[0].pictures[1])
    seen = []
    explain = lambda method, inputs: seen.append(method.name) or method.attribute(inputs)  # noqa: E731
    explanation_grid(model, x[:2], ["gradient"], explain=explain)
    assert seen == ["gradient"]
    path = grid.save(tmp_path / "grid.png", title="t", row_titles=["a\n(x)", "b", "c"])
    with Image.open(path) as image:
        assert min(image.size) > 100


def test_method_kind_reads_the_method_first():
    class Custom:
        kind = "signal"

    assert method_kind(Custom()) == "signal"
    assert method_kind("pattern_net") == "signal"
    assert method_kind("pattern_attribution[filter]") == "attribution"
    assert method_kind("lrp_epsilon") == "attribution"
    assert method_kind("gradient") == "signal"


def test_grid_rejects_mismatched_columns():
    from patternnet.report import GridColumn

    with pytest.raises(ValueError, match="2 pictures for 3 inputs"):
        ExplanationGrid([np.zeros((4, 4))] * 3, [GridColumn("g", "g", "signal",
                                                            [np.zeros((4, 4))] * 2)])  # fmt: skip


def test_curve_interval_is_the_normal_interval_over_images():
    rng = np.random.default_rng(0)
    scores = np.sort(rng.uniform(size=(25, 11)), axis=1)[:, ::-1].copy()
    summary = curve_summary("m", torch.from_numpy(scores))
    n = scores.shape[0]
    mean = scores.mean(0)
    half = 1.959963984540054 * scores.std(0, ddof=1) / math.sqrt(n)
    np.testing.assert_allclose(summary.low, mean - half, rtol=0, atol=1e-12)
    np.testing.assert_allclose(summary.high, mean + half, rtol=0, atol=1e-12)
    per_image = (scores[:, :1] - scores).mean(1)
    assert summary.aopc == pytest.approx(per_image.mean(), abs=1e-12)
    width = 1.959963984540054 * per_image.std(ddof=1) / math.sqrt(n)
    assert summary.aopc_low == pytest.approx(per_image.mean() - width, abs=1e-12)
    assert summary.aopc_high == pytest.approx(per_image.mean() + width, abs=1e-12)
    assert "normal" in summary.interval and "25 images" in summary.interval
    assert curve_summary("one", torch.from_numpy(scores[:1])).low is None


def test_a_result_with_its_own_interval_is_shown_as_it_is():
    from dataclasses import dataclass

    @dataclass
    class Interval:  # the shape of patternnet.evaluate's bootstrap interval
        estimate: float
        low: float
        high: float
        confidence: float = 0.95
        resamples: int = 2000

    class Boot:
        scores = torch.tensor([[1.0, 0.5, 0.2], [0.9, 0.6, 0.1]])
        k, replacement = 9, "mean"

        def band(self):
            return torch.tensor([0.9, 0.5, 0.1]), torch.tensor([1.0, 0.6, 0.2])

        def aopc_interval(self):
            return Interval(0.3, 0.2, 0.4)

    summary = curve_summary("boot", Boot())
    assert (summary.aopc_low, summary.aopc_high) == (0.2, 0.4)
    np.testing.assert_allclose(summary.low, [0.9, 0.5, 0.1])
    assert summary.interval == "percentile bootstrap over the 2 images (2000 resamples, 95%)"


# ---------------------------------------------------------------------------- browser
def _check_in_browser(path, tables, tmp_path):
    seen = probe(path)
    assert seen.get("probed") == "yes", seen
    assert int(seen["images"]) > 0 and seen["decoded"] == seen["images"], seen
    assert set(tables) <= set(seen["tables"].split(",")), seen
    import json

    toggle = json.loads(seen["toggle"])
    assert toggle["before"] == [True, True, True]
    # unticked: the method's cells are hidden, the next method and the inputs stay
    assert toggle["hidden"] == [False, True, True, False]
    assert toggle["restored"] is True
    shot = screenshot(path, tmp_path / "shot.png", width=1200, height=1600)
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0).shape[0]
    assert colours > 200, colours  # heatmaps and figures were drawn, not a blank page
    return seen


def test_full_report_in_chromium(full_report, tmp_path):
    _, path = full_report
    seen = _check_in_browser(path, ["explanation-grid", "quality-table", "degradation-table",
                                    "sanity-table", "settings-table", "timings-table"], tmp_path)
    assert seen["images"] == "33"


def test_demo_writes_a_report_that_opens_in_chromium(tmp_path):
    (tmp_path / "fashion").mkdir()
    data = synthetic_fashion(tmp_path / "fashion")
    summary = run_demo(small_config(data, tmp_path / "out"))
    path = summary["files"]["report"]
    assert path == tmp_path / "out" / "report.html"
    assert "report" in summary["timings"]
    seen = _check_in_browser(path, ["explanation-grid", "quality-table", "degradation-table",
                                    "settings-table", "timings-table"], tmp_path)
    assert int(seen["images"]) == 3 * 7 + 2  # 3 rows × (input + 6 methods); ρ(S), curves
    assert "Sanity checks" in path.read_text()  # named as absent: the demo runs none
