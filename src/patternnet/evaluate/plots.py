"""Figures of the evaluation: ρ per layer (the paper's Figure 3) and degradation curves.

Matplotlib is imported only when a figure is drawn, and only its object-oriented API is used
(``Figure`` with an Agg canvas): no pyplot state, no change of the user's backend. Every
function returns the ``Figure`` and writes it to ``path`` when given (format from the suffix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..viz import degradation_plot

__all__ = ["plot_degradation", "plot_quality"]

#: Display names of the estimators (the paper's notation).
ESTIMATOR_LABELS = {
    "identity": "S_x (identity)",
    "filter": "S_w (filter)",
    "linear": "S_a (linear)",
    "two_component": "S_a+- (two-component)",
    "random": "random",
}


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is in the viz extra
        raise ImportError("figures need matplotlib: pip install 'patternnet[viz]'") from error
    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, bbox_inches="tight")


def plot_quality(
    table: Any,
    path: str | Path | None = None,
    *,
    estimators: Sequence[str] | None = None,
    title: str = "Signal estimator quality ρ(S) per layer",
) -> Any:
    """The paper's Figure 3: ρ(S) per layer, one line per estimator, with error bars (the
    table's ``stderr``) on layers whose coordinates were sampled.

    Parameters
    ----------
    table:
        From :func:`patternnet.evaluate.estimator_quality`.
    path:
        Where to write the figure (optional).
    estimators:
        Which columns to draw (default: all but ``"identity"``, whose ρ = 1 is trivial).
    title:
        Axes title.
    """
    chosen = (
        [e for e in table.estimators if e != "identity"] if estimators is None else list(estimators)
    )
    figure = _figure(max(4.0, 0.6 * len(table.layers) + 2.5), 3.2)
    ax = figure.add_subplot(1, 1, 1)
    positions = list(range(len(table.layers)))
    markers = "osD^vx"
    stderr = getattr(table, "stderr", None)
    for i, estimator in enumerate(chosen):
        j = table.estimators.index(estimator)
        errors = None if stderr is None else stderr[:, j].nan_to_num(0.0).tolist()
        ax.errorbar(
            positions, table.rho[:, j].tolist(), yerr=errors if errors and any(errors) else None,
            marker=markers[i % len(markers)], capsize=3,
            label=ESTIMATOR_LABELS.get(estimator, estimator),
        )  # fmt: skip
    sampled = [name for name in table.layers if not table.info.get(name, {}).get("exact", True)]
    if sampled:
        ax.text(0.0, -0.32, "error bars: spread over coordinate draws (sampled layers: "
                + ", ".join(n or "(model)" for n in sampled) + "); other layers exact",
                transform=ax.transAxes, fontsize="x-small", va="top")  # fmt: skip
    ax.set_xticks(positions)
    ax.set_xticklabels([name or "(model)" for name in table.layers], rotation=45, ha="right")
    ax.set_xlabel("layer")
    ax.set_ylabel("ρ(S)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(figure, path)
    return figure


def plot_degradation(
    curves: Mapping[str, Any] | Sequence[Any],
    path: str | Path | None = None,
    *,
    title: str = "Image degradation (region perturbation)",
) -> Any:
    """Mean perturbation curves of several methods, AOPC in the legend.

    The drawing is :func:`patternnet.viz.degradation_plot` (colour-blind-safe lines); this
    adds the sequence form used by the evaluation code.

    Parameters
    ----------
    curves:
        ``{label: curves}`` or a sequence of :class:`PerturbationCurves` (their ``label``).
    path:
        Where to write the figure (optional).
    title:
        Axes title.
    """
    items = dict(curves) if isinstance(curves, Mapping) else {c.label: c for c in curves}
    if not items:
        raise ValueError("no curves to plot")
    return degradation_plot(items, title=title, path=path)
