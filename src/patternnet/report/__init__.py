"""The HTML report of a run: one self-contained ``report.html`` a person opens.

:class:`Report` holds what a run produced (explanation grid, ρ(S), degradation curves with
intervals, sanity checks, settings, timings); :meth:`Report.write` renders it with figures
inline, no script and nothing fetched, so the file opens offline and can be mailed as it is.
``patternnet demo``, ``patternnet evaluate`` and ``patternnet reproduce`` write one.
"""

from __future__ import annotations

from .build import (
    CurveSummary,
    ExplanationGrid,
    GridColumn,
    Report,
    curve_summary,
    degradation_figure,
    explanation_grid,
    method_kind,
    write_report,
)
from .summary import Stopwatch, prediction_titles, summary_markdown

__all__ = [
    "CurveSummary",
    "ExplanationGrid",
    "GridColumn",
    "Report",
    "curve_summary",
    "degradation_figure",
    "explanation_grid",
    "method_kind",
    "prediction_titles",
    "Stopwatch",
    "summary_markdown",
    "write_report",
]
