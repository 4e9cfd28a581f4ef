"""Judge explanations: estimator quality ρ(S), image degradation, ground-truth metrics.

- :func:`estimator_quality` — ρ(S) per layer and signal estimator (method.md §5, the paper's
  Figure 3), returned as a :class:`QualityTable`;
- :func:`region_perturbation`, :func:`aopc` — image degradation by region perturbation
  (method.md §6, Samek et al. 2016) and the area over the perturbation curve;
- :func:`signal_cosine`, :func:`topk_precision`, :func:`region_mass`,
  :func:`ground_truth_metrics` — explanations against a known signal
  (:mod:`patternnet.groundtruth`);
- :func:`compare` — all metrics for several methods, as one Markdown/CSV report with figures.
"""

from __future__ import annotations

from .compare import ComparisonReport, compare
from .groundtruth import ground_truth_metrics, region_mass, signal_cosine, topk_precision
from .perturbation import REPLACEMENTS, PerturbationCurves, aopc, region_perturbation
from .plots import plot_degradation, plot_quality
from .quality import QUALITY_ESTIMATORS, QualityTable, estimator_quality

__all__ = [
    "QUALITY_ESTIMATORS",
    "REPLACEMENTS",
    "ComparisonReport",
    "PerturbationCurves",
    "QualityTable",
    "aopc",
    "compare",
    "estimator_quality",
    "ground_truth_metrics",
    "plot_degradation",
    "plot_quality",
    "region_mass",
    "region_perturbation",
    "signal_cosine",
    "topk_precision",
]
