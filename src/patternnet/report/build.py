"""The report a person opens: one self-contained ``report.html`` for a run.

:class:`Report` gathers whatever a run produced and :meth:`Report.write` renders it into one
HTML file that opens offline (figures inline as base64 PNG, inline CSS, no script needed):

- the **explanation grid**: one row per image, the input and then one column per method
  (signals as grey-centred images, attributions as red/blue heatmaps, method.md §8); a
  checkbox per method hides or shows its column (CSS only);
- **ρ(S)** per layer and estimator (method.md §5, the paper's Figure 3): table and figure;
- **image degradation** (method.md §6, Figure 4): the mean curves with their intervals, the
  AOPC of each method with its interval;
- the **sanity checks** table (:mod:`patternnet.evaluate.sanity`, when a run made one);
- the run's **settings and timings**, and the software versions.

A section whose result is absent is left out with a note saying so; the page never claims a
result the run did not compute. Results are read through small duck-typed interfaces
(``to_records()`` or ``rows()`` for tables, ``plot()`` for figures), so the report renders the
evaluation objects of :mod:`patternnet.evaluate` as they are and as they grow.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import __version__, viz
from ..methods.registry import build_method, method_info
from ..patterns.store import atomic_write
from . import page

__all__ = [
    "CurveSummary",
    "ExplanationGrid",
    "GridColumn",
    "Report",
    "curve_summary",
    "degradation_figure",
    "explanation_grid",
    "method_kind",
    "write_report",
]

#: Display side, in CSS pixels, of a picture in the explanation grid.
CELL_PIXELS = 128

#: z of a two-sided 95 % normal interval.
Z95 = 1.959963984540054


def method_kind(method: Any) -> str:
    """``"signal"`` or ``"attribution"``: how a method's output is drawn.

    Parameters
    ----------
    method:
        A method object or class (its ``kind`` attribute is used when it has one), or a
        registry name such as ``"pattern_net"`` (optionally with a suffix in brackets, as
        :func:`patternnet.evaluate.compare` labels estimator variants).
    """
    kind = getattr(method, "kind", None)
    if kind in ("signal", "attribution"):
        return kind
    if isinstance(method, str):
        name = method.split("[", 1)[0].strip()
        try:
            return method_info(name).kind
        except ValueError:  # not a registry name (a user's label): an attribution
            return "attribution"
    return "attribution"


# ---------------------------------------------------------------------------- grid
@dataclass
class GridColumn:
    """One method's column of the explanation grid.

    Attributes
    ----------
    key:
        The method's name (registry name or label).
    title:
        Column heading.
    kind:
        ``"signal"`` or ``"attribution"`` (how the pictures were drawn).
    pictures:
        One ``(H, W)`` or ``(H, W, 3)`` array in ``[0, 1]`` per row.
    """

    key: str
    title: str
    kind: str
    pictures: list[np.ndarray]


@dataclass
class ExplanationGrid:
    """Inputs (rows) × methods (columns), as pictures ready to show.

    Attributes
    ----------
    inputs:
        One picture per row (the input as an image).
    columns:
        The methods, in order.
    row_titles:
        A label per row (class, prediction), or None.
    """

    inputs: list[np.ndarray]
    columns: list[GridColumn]
    row_titles: list[str] | None = None

    def __post_init__(self) -> None:
        for column in self.columns:
            if len(column.pictures) != len(self.inputs):
                raise ValueError(
                    f"column {column.key!r} has {len(column.pictures)} pictures for "
                    f"{len(self.inputs)} inputs"
                )
        if self.row_titles is not None and len(self.row_titles) != len(self.inputs):
            raise ValueError(f"{len(self.row_titles)} row titles for {len(self.inputs)} inputs")

    @classmethod
    def from_explanations(
        cls,
        inputs: Tensor,
        explanations: Mapping[str, Tensor],
        *,
        kinds: Mapping[str, str] | None = None,
        titles: Mapping[str, str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        row_titles: Sequence[str] | None = None,
        max_rows: int | None = None,
    ) -> ExplanationGrid:
        """Draw raw explanations: signals with :func:`patternnet.viz.signal_image`,
        attributions with :func:`patternnet.viz.heatmap`.

        Parameters
        ----------
        inputs:
            ``(N, C, H, W)`` model inputs.
        explanations:
            ``{method name: (N, C, H, W) explanation}``.
        kinds:
            ``{name: "signal" | "attribution"}``; default :func:`method_kind` of the name.
        titles:
            Column headings by name (default: the name).
        mean, std:
            The normalisation of ``inputs``, undone to show them (default: min–max scaling).
        row_titles:
            A label per input.
        max_rows:
            Show at most this many inputs.
        """
        count = inputs.shape[0] if max_rows is None else min(max_rows, inputs.shape[0])
        shown = [viz.input_image(inputs[i], mean, std) for i in range(count)]
        columns = []
        for name, values in explanations.items():
            if values.shape[0] < count:
                raise ValueError(f"explanation {name!r} has {values.shape[0]} samples, not {count}")
            kind = (kinds or {}).get(name) or method_kind(name)
            if kind not in ("signal", "attribution"):
                raise ValueError(
                    f"kind of {name!r} must be 'signal' or 'attribution', not {kind!r}"
                )
            pictures = [viz.picture(values[i], kind) for i in range(count)]
            columns.append(GridColumn(name, (titles or {}).get(name, name), kind, pictures))
        rows = list(row_titles[:count]) if row_titles is not None else None
        return cls(shown, columns, rows)

    def save(
        self,
        path: str | Path,
        *,
        title: str | None = None,
        row_titles: Sequence[str] | None = None,
    ) -> Path:
        """Draw the grid as one image file (:func:`patternnet.viz.grid`): the input, then
        one column per method.

        Parameters
        ----------
        path:
            The file (PNG, PDF or SVG by the suffix).
        title:
            A title above the grid.
        row_titles:
            Labels left of the rows (default: :attr:`row_titles`); may hold line breaks.
        """
        rows = [[picture, *(column.pictures[r] for column in self.columns)]
                for r, picture in enumerate(self.inputs)]  # fmt: skip
        viz.grid(rows, column_titles=["Input", *(column.title for column in self.columns)],
                 row_titles=row_titles if row_titles is not None else self.row_titles,
                 title=title, path=path)  # fmt: skip
        return Path(path)


def explanation_grid(
    model: torch.nn.Module,
    inputs: Tensor,
    methods: Mapping[str, str] | Sequence[str],
    *,
    patterns: Any = None,
    explain: Callable[[Any, Tensor], Tensor] | None = None,
    **grid_options: Any,
) -> ExplanationGrid:
    """Explain ``inputs`` with each registered method and draw the results as a grid.

    Each method is built by name (:func:`~patternnet.methods.registry.build_method`: the
    methods that need patterns get ``patterns``) and drawn as its ``kind`` says.

    Parameters
    ----------
    model:
        The classifier.
    inputs:
        ``(N, C, H, W)`` inputs, one row each.
    methods:
        Registry names, or ``{name: column title}``.
    patterns:
        Fitted patterns for PatternNet, PatternAttribution and their kin.
    explain:
        ``explain(method, inputs) -> explanation`` (default ``method.attribute(inputs)``, the
        predicted class), e.g. to split a large batch.
    **grid_options:
        ``mean``, ``std``, ``row_titles``, ``max_rows`` of
        :meth:`ExplanationGrid.from_explanations`.
    """
    titles = dict(methods) if isinstance(methods, Mapping) else {name: name for name in methods}
    explained, kinds = {}, {}
    for name in titles:
        method = build_method(name, model, patterns)
        kinds[name] = method.kind
        explained[name] = (explain(method, inputs) if explain is not None
                           else method.attribute(inputs)).detach()  # fmt: skip
    return ExplanationGrid.from_explanations(inputs, explained, kinds=kinds, titles=titles,
                                             **grid_options)  # fmt: skip


# ---------------------------------------------------------------------------- curves
@dataclass
class CurveSummary:
    """A degradation curve reduced to what the report shows.

    Attributes
    ----------
    label:
        The method (or ``"random"``).
    mean, low, high:
        ``(steps + 1,)`` mean probability after each step and its interval (None when there
        is no interval, e.g. one image).
    aopc, aopc_low, aopc_high:
        Area over the perturbation curve and its interval.
    images:
        Images the curve averages.
    interval:
        How the interval was made (shown in the report).
    k, replacement:
        The region size and replacement, when known.
    """

    label: str
    mean: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    aopc: float
    aopc_low: float | None
    aopc_high: float | None
    images: int
    interval: str
    k: int | None = None
    replacement: str | None = None


def _array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _interval_pair(value: Any) -> tuple[float, float] | None:
    """``(low, high)`` of an interval object (``.low``/``.high``), a mapping or a pair."""
    if value is None:
        return None
    if hasattr(value, "low") and hasattr(value, "high"):
        return float(value.low), float(value.high)
    if isinstance(value, Mapping):
        value = (value.get("low"), value.get("high"))
    low, high = value[0], value[1]
    return float(low), float(high)


def _interval_text(interval: Any, images: int) -> str:
    """How an interval object was made, for the report's note."""
    confidence = getattr(interval, "confidence", None)
    resamples = getattr(interval, "resamples", None)
    if confidence is None or resamples is None:
        return "the result's own interval"
    return (f"percentile bootstrap over the {images} images ({resamples} resamples, "
            f"{confidence:.0%})")  # fmt: skip


def curve_summary(label: str, curve: Any) -> CurveSummary:
    """Reduce a degradation result to a :class:`CurveSummary`.

    A result that carries its own intervals is read as it is: ``aopc_interval()`` (an
    interval with ``low``/``high``, e.g. the bootstrap
    :class:`~patternnet.evaluate.perturbation.Interval`, or a ``(low, high)`` pair) and
    ``mean_interval()`` or ``band()`` (the ``(low, high)`` band of the mean curve), described by
    ``interval_method`` where it has one. A result without them gets the
    normal 95 % interval over its images, ``mean ± 1.96 s/√n`` of the per-image curves and
    per-image AOPCs, named so in the report.
    """
    scores = _array(curve.scores if hasattr(curve, "scores") else curve)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"curve {label!r}: scores must be (N, steps + 1), got {scores.shape}")
    n = scores.shape[0]
    mean = scores.mean(0)
    per_image_aopc = (scores[:, :1] - scores).mean(1)
    aopc = float(per_image_aopc.mean())
    k = getattr(curve, "k", None)
    replacement = getattr(curve, "replacement", None)
    def read(name: str) -> Any:
        value = getattr(curve, name, None)
        return value() if callable(value) else value

    own_aopc = getattr(curve, "aopc_interval", None)
    own_band = getattr(curve, "mean_interval", None) or getattr(curve, "band", None)
    if n >= 2 and (callable(own_aopc) or callable(own_band)):
        low = high = None
        if callable(own_band):
            band = own_band()
            low, high = _array(band[0]), _array(band[1])
        interval = own_aopc() if callable(own_aopc) else None
        pair = _interval_pair(interval) or (None, None)
        text = read("interval_method") or _interval_text(interval, n)
        return CurveSummary(label, mean, low, high, aopc, *pair, n, str(text), k,
                            replacement)  # fmt: skip
    if n < 2:
        return CurveSummary(label, mean, None, None, aopc, None, None, n,
                            "none (one image)", k, replacement)  # fmt: skip
    root = math.sqrt(n)
    half = Z95 * scores.std(0, ddof=1) / root
    aopc_half = Z95 * float(per_image_aopc.std(ddof=1)) / root
    return CurveSummary(
        label, mean, mean - half, mean + half, aopc, aopc - aopc_half, aopc + aopc_half, n,
        f"normal 95 % interval over the {n} images (mean ± 1.96·s/√n)", k, replacement,
    )  # fmt: skip


def _curves(degradation: Any) -> dict[str, Any]:
    """``{label: curve}`` from a mapping, a sequence of labelled curves, or a result object."""
    for name in ("curves", "results"):
        inner = getattr(degradation, name, None)
        if isinstance(inner, Mapping):
            return dict(inner)
    if isinstance(degradation, Mapping):
        return dict(degradation)
    if isinstance(degradation, Sequence):
        return {getattr(c, "label", "") or f"curve {i}": c for i, c in enumerate(degradation)}
    raise TypeError(
        f"degradation must be {{label: curves}} or a sequence of curves, not "
        f"{type(degradation).__name__}"
    )


# Okabe & Ito's palette (as in patternnet.viz): safe with colour-vision deficiency
_COLOURS = ("#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


def degradation_figure(summaries: Sequence[CurveSummary]) -> Any:
    """Mean curves with shaded intervals (the paper's Figure 4), as a matplotlib Figure."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    ax = figure.subplots()
    for i, summary in enumerate(summaries):
        colour = "#777777" if "random" in summary.label else _COLOURS[i % len(_COLOURS)]
        steps = np.arange(summary.mean.shape[0])
        ax.plot(steps, summary.mean, color=colour, linewidth=1.6,
                label=f"{summary.label} (AOPC {summary.aopc:.3f})")  # fmt: skip
        if summary.low is not None and summary.high is not None:
            ax.fill_between(steps, summary.low, summary.high, color=colour, alpha=0.18,
                            linewidth=0)  # fmt: skip
    first = summaries[0]
    where = f"{first.k}×{first.k} px regions" if first.k else "regions"
    replaced = f", replaced by {first.replacement}" if first.replacement else ""
    ax.set_xlabel(f"{where} replaced{replaced}")
    ax.set_ylabel("probability of the followed class")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Image degradation (steeper = better); shading: interval", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return figure


# ---------------------------------------------------------------------------- report
def _records(result: Any) -> list[dict[str, Any]]:
    """Table rows of a result: ``to_records()``, ``rows()``, or a sequence of dicts."""
    for name in ("to_records", "rows"):
        method = getattr(result, name, None)
        if callable(method):
            return [dict(r) for r in method()]
    if isinstance(result, Sequence) and all(isinstance(r, Mapping) for r in result):
        return [dict(r) for r in result]
    raise TypeError(
        f"cannot tabulate a {type(result).__name__}: give it to_records() or rows(), or pass "
        "a list of dicts"
    )


def _versions() -> dict[str, str]:
    return {
        "patternnet": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


@dataclass
class Report:
    """Everything one run shows in its ``report.html``; absent parts are noted as absent.

    Attributes
    ----------
    title:
        Page title.
    grid:
        The explanation grid (:class:`ExplanationGrid`).
    quality:
        The ρ(S) result: anything with ``to_records()`` or ``rows()`` (one row per layer),
        e.g. :class:`~patternnet.evaluate.QualityTable`; its ``plot()`` gives the figure.
    degradation:
        ``{label: curves}`` (:class:`~patternnet.evaluate.PerturbationCurves` or results
        with their own intervals, see :func:`curve_summary`), or a result holding them.
    sanity:
        The sanity-check result (``to_records()``; ``plot()`` if it draws figures).
    settings:
        The run's settings, shown as a table.
    timings:
        Seconds per stage of the run.
    figures:
        More figures: ``{caption: matplotlib Figure, PNG bytes or PNG file}``.
    notes:
        Sentences shown under the title.
    descriptions:
        A paragraph per section key (``"quality"``, ``"degradation"``, ...) replacing the
        default explanation text.
    """

    title: str = "patternnet report"
    grid: ExplanationGrid | None = None
    quality: Any = None
    degradation: Any = None
    sanity: Any = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ sections
    def _grid_section(self) -> str:
        grid = self.grid
        assert grid is not None
        ids = [f"m{i}" for i in range(len(grid.columns))]
        toggles = "".join(
            f'<input type="checkbox" id="show-{i}" data-method="{page.escape(c.key)}" checked>'
            f'<label for="show-{i}">{page.escape(c.title)}</label>'
            for i, c in zip(ids, grid.columns)
        )
        head = '<tr><th></th><th class="input">input</th>' + "".join(
            f'<th class="{i}" data-method="{page.escape(c.key)}">{page.escape(c.title)}'
            f"<small>{page.escape(c.kind)}</small></th>"
            for i, c in zip(ids, grid.columns)
        ) + "</tr>"  # fmt: skip
        rows = []
        for r, picture in enumerate(grid.inputs):
            title = grid.row_titles[r] if grid.row_titles else f"#{r + 1}"
            cells = [f'<th class="row">{page.escape(title)}</th>',
                     f'<td class="input">{_picture_tag(picture, f"input {title}")}</td>']
            for i, column in zip(ids, grid.columns):
                alt = f"{column.title}, {title}"
                cells.append(f'<td class="{i}">{_picture_tag(column.pictures[r], alt)}</td>')
            rows.append("<tr>" + "".join(cells) + "</tr>")
        text = self.descriptions.get(
            "explanations",
            "One row per image. Signals (PatternNet, gradient, DeConvNet, Guided BackProp) are "
            "drawn as images with grey = 0; attributions (PatternAttribution, LRP, ...) as "
            "heatmaps, red positive, blue negative, white 0, each scaled by its own max |·|. "
            "Untick a method to hide its column.",
        )
        return (
            f'<p class="caption">{page.escape(text)}</p>'
            f'<div class="toggles">{toggles}<div class="grid-wrap">'
            f'<table class="grid" id="explanation-grid"><thead>{head}</thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div></div>"
        ), page.toggle_css(ids)

    def _quality_section(self) -> str:
        records = _records(self.quality)
        estimators = list(getattr(self.quality, "estimators", []))
        first = ["layer", *estimators]
        columns = [c for c in first if any(c in r for r in records)]
        for record in records:
            columns += [k for k in record if k not in columns]
        for record in records:
            if record.get("layer") == "":
                record["layer"] = "(model)"
        text = self.descriptions.get(
            "quality",
            "ρ(S) = 1 − max_v corr(wᵀx, vᵀ(x − S(x))) per layer (method.md §5; the paper's "
            "Figure 3): how little of the output the estimator leaves in the residual. Higher "
            "is better. S_x (identity) scores 1 by definition.",
        )
        parts = [f'<p class="caption">{page.escape(text)}</p>',
                 page.table(records, columns, css_id="quality-table", digits=3)]  # fmt: skip
        parts.append(_figure_of(self.quality, "ρ(S) per layer"))
        return "".join(parts)

    def _degradation_section(self) -> str:
        summaries = [curve_summary(label, c) for label, c in _curves(self.degradation).items()]
        if not summaries:
            raise ValueError("no degradation curves")
        records = []
        for s in summaries:
            interval = (
                f"[{s.aopc_low:.4f}, {s.aopc_high:.4f}]"
                if s.aopc_low is not None and s.aopc_high is not None
                else "–"
            )
            records.append({"method": s.label, "AOPC": s.aopc, "95 % interval": interval,
                            "images": s.images, "steps": s.mean.shape[0] - 1})  # fmt: skip
        methods = sorted({s.interval for s in summaries})
        text = self.descriptions.get(
            "degradation",
            "Regions are replaced in the order of each explanation (most relevant first) and "
            "the probability of the class is followed (method.md §6; the paper's Figure 4). "
            "AOPC: area over the perturbation curve, larger = steeper decay = better.",
        )
        figure = degradation_figure(summaries)
        return (
            f'<p class="caption">{page.escape(text)}</p>'
            + page.table(records, css_id="degradation-table")
            + f'<p class="note">Intervals: {page.escape("; ".join(methods))}.</p>'
            + _figure_html(page.figure_png(figure), "degradation curves with intervals")
        )

    def _sanity_section(self) -> str:
        records = _records(self.sanity)
        text = self.descriptions.get(
            "sanity",
            "Sanity checks (patternnet.evaluate.sanity): model-parameter randomisation "
            "(Adebayo et al. 2018), convergence (Sixt et al. 2020), input invariance "
            "(Kindermans et al. 2019).",
        )
        return (
            f'<p class="caption">{page.escape(text)}</p>'
            + page.table(records, css_id="sanity-table", digits=3)
            + _figure_of(self.sanity, "sanity checks")
        )

    def _settings_section(self) -> str:
        settings = [{"setting": k, "value": v} for k, v in self.settings.items()]
        versions = [{"software": k, "version": v} for k, v in _versions().items()]
        parts = []
        if settings:
            parts.append(page.table(settings, css_id="settings-table"))
        if self.timings:
            total = self.timings.get("total")
            timings = [{"stage": k, "seconds": float(v)} for k, v in self.timings.items()]
            if total is None:
                timings.append({"stage": "total", "seconds": float(sum(self.timings.values()))})
            parts.append(page.table(timings, css_id="timings-table", digits=3))
            parts.append('<p class="note">Wall time of each stage of this run.</p>')
        parts.append(page.table(versions, css_id="versions-table"))
        return "".join(parts)

    # ------------------------------------------------------------------ page
    def to_html(self) -> str:
        """The complete page (a string; :meth:`write` saves it)."""
        sections: list[tuple[str, str, str]] = []  # (id, heading, html)
        absent: list[str] = []
        css = ""
        plan: list[tuple[str, str, Any, Callable[[], Any]]] = [
            ("explanations", "Explanations", self.grid, self._grid_section),
            ("quality", "Signal estimator quality ρ(S)", self.quality, self._quality_section),
            ("degradation", "Image degradation", self.degradation, self._degradation_section),
            ("sanity", "Sanity checks", self.sanity, self._sanity_section),
        ]
        for key, heading, value, render in plan:
            if value is None:
                absent.append(heading)
                continue
            made = render()
            if isinstance(made, tuple):
                made, more_css = made
                css += more_css
            sections.append((key, heading, made))
        if self.figures:
            html = "".join(_figure_html(_png_of(v), caption) for caption, v in self.figures.items())
            sections.append(("figures", "More figures", html))
        sections.append(("settings", "Settings, timings and versions", self._settings_section()))
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        header = [f"<header><h1>{page.escape(self.title)}</h1>",
                  f'<p class="meta">written {stamp} by patternnet {_versions()["patternnet"]}'
                  "</p>"]  # fmt: skip
        for note in self.notes:
            header.append(f'<p class="note">{page.escape(note)}</p>')
        if absent:
            header.append(
                f'<p class="absent" id="absent">Not in this run: {page.escape(", ".join(absent))}'
                " (these results were not computed, so their sections are left out).</p>"
            )
        links = "".join(f'<a href="#{key}">{page.escape(h)}</a>' for key, h, _ in sections)
        header.append(f"<nav>{links}</nav></header>")
        body = "\n".join(header)
        for key, heading, html in sections:
            body += f'\n<section id="{key}"><h2>{page.escape(heading)}</h2>{html}</section>'
        return page.page(self.title, body, extra_css=css)

    def write(self, path: str | Path) -> Path:
        """Write the page to ``path`` atomically (a complete file or the old one); returns it."""
        text = self.to_html()
        path = Path(path)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return path

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_comparison(cls, comparison: Any, **fields: Any) -> Report:
        """A report of a :class:`~patternnet.evaluate.ComparisonReport` (grid of its first
        inputs, its curves, its ρ(S) table, its settings and per-method seconds).

        ``fields`` set or override any :class:`Report` attribute.
        """
        grid = None
        inputs = getattr(comparison, "inputs", None)
        explanations = getattr(comparison, "explanations", None) or {}
        if inputs is not None and inputs.dim() == 4 and explanations:
            grid = ExplanationGrid.from_explanations(inputs, explanations, max_rows=6)
        timings = {
            f"explain: {row['method']}": float(row["seconds"])
            for row in comparison.rows
            if row.get("seconds") is not None
        }
        settings = dict(getattr(comparison, "settings", {}) or {})
        values: dict[str, Any] = {
            "grid": grid,
            "quality": getattr(comparison, "quality", None),
            "degradation": getattr(comparison, "curves", None) or None,
            "settings": settings,
            "timings": timings,
        }
        values.update(fields)
        return cls(**values)


def _picture_tag(picture: np.ndarray, alt: str) -> str:
    array = np.asarray(picture)
    height, width = array.shape[:2]
    scale = CELL_PIXELS / max(height, width)
    pixelated = scale > 1
    if pixelated:
        scale = max(1, math.floor(scale))
    return page.img_tag(page.image_png(array), alt, width=round(width * scale),
                        height=round(height * scale), pixelated=pixelated)  # fmt: skip


def _png_of(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, Path)):
        return Path(value).read_bytes()
    return page.figure_png(value)


def _figure_html(png: bytes, caption: str) -> str:
    return (
        f"<figure>{page.img_tag(png, caption)}"
        f'<figcaption class="caption">{page.escape(caption)}</figcaption></figure>'
    )


def _figure_of(result: Any, caption: str) -> str:
    """The result's own figure (``result.plot()``), or nothing when it draws none."""
    plot = getattr(result, "plot", None)
    if not callable(plot):
        return ""
    figure = plot()
    if figure is None:
        return ""
    return _figure_html(page.figure_png(figure), caption)


def write_report(path: str | Path, **fields: Any) -> Path:
    """Write a ``report.html`` of ``fields`` (see :class:`Report`) to ``path``; returns it."""
    return Report(**fields).write(path)
