"""One table of every metric for every method: the comparison runner.

:func:`compare` explains the same inputs with several methods and measures, per method,

- the area over the perturbation curve (:func:`~patternnet.evaluate.perturbation.aopc`) for
  image inputs, next to a random-order baseline;
- with a :class:`~patternnet.groundtruth.GroundTruthData`, the ground-truth metrics of
  :mod:`patternnet.evaluate.groundtruth` (cosine to the true signal, top-k precision, mass on
  each region without signal);
- the time the method took.

The :class:`ComparisonReport` it returns prints as Markdown, writes CSV, and
:meth:`ComparisonReport.save` writes ``report.md``, ``metrics.csv`` and the figures (the
degradation curves, and the Figure-3 plot of a :class:`~patternnet.evaluate.QualityTable`
passed as ``quality=``) into one folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .. import viz
from ..methods.registry import build_method
from .groundtruth import ground_truth_metrics
from .perturbation import (
    RESAMPLES,
    PairedDifference,
    PerturbationCurves,
    aopc,
    paired_differences,
    region_perturbation,
)
from .plots import plot_degradation
from .quality import QualityTable

__all__ = ["ComparisonReport", "compare"]

MethodSpec = Any  # an Attribution, a registry name, or a callable (inputs, target) -> Tensor

def _label(spec: MethodSpec) -> str:
    if isinstance(spec, str):
        return spec
    name = getattr(spec, "name", "") or type(spec).__name__
    estimator = getattr(spec, "estimator", None)
    if estimator and estimator != "two_component":
        name = f"{name}[{estimator}]"
    return name


def _build(
    model: nn.Module,
    spec: MethodSpec,
    patterns: Any,
    options: Mapping[str, Any],
) -> tuple[Callable[[Tensor, Any], Tensor], str]:
    """Turn a method spec into ``explain(inputs, target) -> Tensor`` and the method's kind
    (``"signal"`` or ``"attribution"``; a plain callable counts as an attribution)."""
    if isinstance(spec, str):
        spec = build_method(spec, model, patterns, **options)
    if hasattr(spec, "attribute"):
        return spec.attribute, getattr(spec, "kind", "attribution")
    if callable(spec):
        return spec, "attribution"
    raise TypeError(
        f"a method must be an Attribution, a registry name or a callable (inputs, target), "
        f"not {type(spec).__name__}"
    )


def _methods(methods: Any) -> list[tuple[str, MethodSpec]]:
    if isinstance(methods, Mapping):
        items = list(methods.items())
    elif isinstance(methods, (str, bytes)) or not isinstance(methods, Sequence):
        items = [(_label(methods), methods)]
    else:
        items = [(_label(m), m) for m in methods]
    labels = [label for label, _ in items]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(
            f"methods {duplicates} appear twice; pass a dict {{label: method}} to name them"
        )
    if not items:
        raise ValueError("no methods to compare")
    return items


@dataclass
class ComparisonReport:
    """What :func:`compare` measured.

    Attributes
    ----------
    rows:
        One dict per method (and one for the random baseline): ``method``, ``aopc``,
        ground-truth metrics, ``seconds``.
    curves:
        Perturbation curves by method label (``"random"`` included).
    explanations:
        The explanations by method label.
    kinds:
        Each method's ``kind`` by label (``"signal"`` or ``"attribution"``): how its
        explanations are drawn.
    quality:
        The ρ(S) table passed in, if any.
    settings:
        The settings used (k, steps, replacement, samples, ...).
    inputs:
        The explained inputs (for the example figure).
    lerf_curves:
        Least-relevant-first curves by method label (with ``lerf=True``).
    differences:
        Paired-bootstrap AOPC differences (``pairs=``), MoRF.
    """

    rows: list[dict[str, Any]]
    curves: dict[str, PerturbationCurves] = field(default_factory=dict)
    explanations: dict[str, Tensor] = field(default_factory=dict)
    quality: QualityTable | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: Tensor | None = None
    kinds: dict[str, str] = field(default_factory=dict)
    lerf_curves: dict[str, PerturbationCurves] = field(default_factory=dict)
    differences: list[PairedDifference] = field(default_factory=list)

    def to_records(self) -> list[dict[str, Any]]:
        """The metric rows (plain numbers), then one record per paired difference
        (``method`` = ``"A − B"``, ``kind = "difference"``)."""
        records = [{"kind": "method", **row} for row in self.rows]
        for difference in self.differences:
            for record in difference.to_records():
                label = f"{difference.a} − {difference.b}"
                records.append({"kind": "difference", "method": label, **record})
        return records

    def columns(self) -> list[str]:
        """Column names in a stable order."""
        out: list[str] = []
        for row in self.rows:
            out += [key for key in row if key not in out]
        return out

    def to_markdown(self, digits: int = 3) -> str:
        """The metrics table in Markdown (NaN / missing shown as ``–``)."""
        columns = self.columns()
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            cells = []
            for column in columns:
                value = row.get(column)
                if isinstance(value, float):
                    cells.append("–" if math.isnan(value) else f"{value:.{digits}f}")
                else:
                    cells.append("–" if value is None else str(value))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV text of the metrics table (written to ``path`` if given)."""
        columns = self.columns()
        lines = [",".join(columns)]
        for row in self.rows:
            lines.append(",".join("" if row.get(c) is None else str(row[c]) for c in columns))
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def save(self, directory: str | Path, *, examples: int = 4) -> dict[str, Path]:
        """Write ``report.md``, ``metrics.csv`` and the figures; return the paths written.

        Figures: ``degradation.png`` (image inputs), ``explanations.png`` (the first
        ``examples`` images and every method's explanation, drawn as its kind says; 0 for
        none) and, with a quality table,
        ``rho.png``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        parts = ["# Comparison of explanation methods\n"]
        parts.append("Settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()) + "\n")
        parts += ["## Metrics\n", self.to_markdown()]
        if self.differences:
            parts += ["Paired differences:\n"]
            parts += [f"- {d.to_markdown()}" for d in self.differences] + [""]
        parts.append(
            "aopc: area over the most-relevant-first perturbation curve (larger = steeper "
            "degradation = better), aopc_low/aopc_high: its bootstrap interval over images; "
            "lerf_aopc: least relevant first (smaller = better); "
            "signal_cosine / topk_precision: agreement with the true signal (larger = better); "
            "mass_<region>: share of |explanation| on a region without signal (smaller = better)."
            "\n"
        )
        written["metrics.csv"] = directory / "metrics.csv"
        self.to_csv(written["metrics.csv"])
        if self.curves:
            written["degradation.png"] = directory / "degradation.png"
            plot_degradation(self.curves, written["degradation.png"])
            parts += ["## Image degradation\n", "![degradation](degradation.png)\n"]
            if self.lerf_curves:
                written["degradation_lerf.png"] = directory / "degradation_lerf.png"
                plot_degradation(self.lerf_curves, written["degradation_lerf.png"],
                                 title="Image degradation, least relevant first "
                                 "(flatter = better)")  # fmt: skip
                parts += ["![degradation, LeRF](degradation_lerf.png)\n"]
        if examples > 0 and self.inputs is not None and self.inputs.dim() == 4:
            written["explanations.png"] = directory / "explanations.png"
            self._example_figure(written["explanations.png"], examples)
            parts += ["## Explanations\n", "![explanations](explanations.png)\n"]
        if self.quality is not None:
            written["rho.png"] = directory / "rho.png"
            written["rho.csv"] = directory / "rho.csv"
            self.quality.plot(written["rho.png"])
            self.quality.to_csv(written["rho.csv"])
            parts += ["## Signal estimator quality ρ(S)\n", self.quality.to_markdown()]
            parts.append("![rho](rho.png)\n")
        written["report.md"] = directory / "report.md"
        written["report.md"].write_text("\n".join(parts))
        return written

    def _example_figure(self, path: Path, examples: int) -> None:
        labels = list(self.explanations)
        rows = []
        for i in range(min(examples, self.inputs.shape[0])):
            row = [viz.input_image(self.inputs[i])]
            row += [
                viz.picture(self.explanations[label][i], self.kinds.get(label, "attribution"))
                for label in labels
            ]
            rows.append(row)
        viz.grid(rows, column_titles=["input", *labels], path=path)


def compare(
    model: nn.Module,
    methods: Mapping[str, MethodSpec] | Sequence[MethodSpec],
    data: Any,
    *,
    patterns: Any = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    target: Any = None,
    k: int = 9,
    steps: int = 100,
    replacement: str = "mean",
    random_baseline: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    quality: QualityTable | None = None,
    output_dir: str | Path | None = None,
    lerf: bool = False,
    pairs: Sequence[tuple[str, str]] = (),
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    edge: str = "reflect",
    uniform_range: tuple[Any, Any] | None = None,
) -> ComparisonReport:
    """Explain ``data`` with every method and tabulate every metric.

    Parameters
    ----------
    model:
        The classifier (borrowed, never changed).
    methods:
        A list of :class:`~patternnet.Attribution` instances, registry names
        (:func:`patternnet.methods.registry.methods`) or callables ``f(inputs, target)``, or a
        dict ``{label: method}``.
    data:
        ``(N, ...)`` input tensor, or a :class:`~patternnet.groundtruth.GroundTruthData` (adds
        the ground-truth metrics).
    patterns:
        Patterns given to the registry's ``pattern_net``/``pattern_attribution``.
    method_options:
        Extra options per registry name, e.g. ``{"lrp_epsilon": {"epsilon": 0.1}}``.
    target:
        Class to explain and to follow in the degradation: None (the prediction), an int, or
        one class per sample.
    k, steps, replacement:
        Region perturbation settings (:func:`region_perturbation`); only for image inputs
        ``(N, C, H, W)``.
    random_baseline:
        Add the random-order perturbation baseline as a row.
    batch_size:
        Perturbed images per forward pass.
    seed:
        Seed of the random baseline and noise replacements.
    quality:
        A ρ(S) table to include in the saved report.
    output_dir:
        If given, :meth:`ComparisonReport.save` is called on it.
    lerf:
        Also measure least-relevant-first curves (``lerf_aopc`` with its interval).
    pairs:
        ``(label_a, label_b)`` methods whose AOPC difference gets a paired bootstrap
        interval (:func:`~patternnet.evaluate.perturbation.paired_difference`).
    confidence, resamples:
        Of the bootstrap intervals over images (``aopc_low``/``aopc_high`` in every row).
    edge, uniform_range:
        As for :func:`region_perturbation`.

    Returns
    -------
    ComparisonReport
        ``.rows``, ``.to_markdown()``, ``.to_csv()``, ``.save(directory)``.
    """
    truth = None
    if hasattr(data, "signal") and hasattr(data, "inputs"):
        truth, inputs = data, data.inputs
    elif isinstance(data, Tensor):
        inputs = data
    else:
        raise TypeError(
            f"data must be an input tensor (N, ...) or a GroundTruthData, not {type(data).__name__}"
        )
    images = inputs.dim() == 4
    options = method_options or {}
    rows: list[dict[str, Any]] = []
    curves: dict[str, PerturbationCurves] = {}
    lerf_curves: dict[str, PerturbationCurves] = {}
    explanations: dict[str, Tensor] = {}
    kinds: dict[str, str] = {}
    for label, spec in _methods(methods):
        explain, kinds[label] = _build(model, spec, patterns, options.get(label, {}))
        started = time.perf_counter()
        explanation = explain(inputs, target).detach()
        seconds = time.perf_counter() - started
        if explanation.shape != inputs.shape:
            raise ValueError(
                f"method {label!r} returned shape {tuple(explanation.shape)} for inputs "
                f"{tuple(inputs.shape)}"
            )
        explanations[label] = explanation
        row: dict[str, Any] = {"method": label}
        if images:
            common = {"k": k, "steps": steps, "replacement": replacement, "target": target,
                      "batch_size": batch_size, "seed": seed, "label": label, "edge": edge,
                      "uniform_range": uniform_range}  # fmt: skip
            curve = region_perturbation(model, inputs, explanation, **common)
            curves[label] = curve
            interval = curve.aopc_interval(confidence=confidence, resamples=resamples, seed=seed)
            row.update(aopc=aopc(curve), aopc_low=interval.low, aopc_high=interval.high)
            if lerf:
                back = region_perturbation(model, inputs, explanation, order="lerf", **common)
                lerf_curves[label] = back
                interval = back.aopc_interval(confidence=confidence, resamples=resamples,
                                              seed=seed)  # fmt: skip
                row.update(lerf_aopc=interval.estimate, lerf_low=interval.low,
                           lerf_high=interval.high)  # fmt: skip
        if truth is not None:
            row.update(ground_truth_metrics(explanation, truth))
        row["seconds"] = seconds
        rows.append(row)
    if images and random_baseline:
        curve = region_perturbation(
            model, inputs, "random", k=k, steps=steps, replacement=replacement, target=target,
            batch_size=batch_size, seed=seed, label="random", edge=edge,
            uniform_range=uniform_range,
        )  # fmt: skip
        curves["random"] = curve
        interval = curve.aopc_interval(confidence=confidence, resamples=resamples, seed=seed)
        rows.append({"method": "random", "aopc": aopc(curve), "aopc_low": interval.low,
                     "aopc_high": interval.high})  # fmt: skip
        if lerf:
            lerf_curves["random"] = curve
    differences = paired_differences(curves, pairs, confidence=confidence, resamples=resamples,
                                     seed=seed)  # fmt: skip
    settings: dict[str, Any] = {"samples": int(inputs.shape[0])}
    if images:
        settings.update(k=k, steps=min(steps, next(iter(curves.values())).steps),
                        replacement=replacement, edge=edge,
                        interval=f"{confidence:.0%} bootstrap, {resamples} resamples")  # fmt: skip
    if truth is not None:
        settings["data"] = truth.name or "ground truth"
    if target is not None:
        settings["target"] = target if isinstance(target, int) else "given"
    report = ComparisonReport(rows, curves, explanations, quality, settings, inputs.detach(),
                              kinds, lerf_curves, differences)  # fmt: skip
    if output_dir is not None:
        report.save(output_dir)
    return report
