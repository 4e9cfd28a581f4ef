"""Judge explanations: estimator quality ρ(S), image degradation, ground-truth metrics.

- :func:`estimator_quality` — ρ(S) per layer and signal estimator (method.md §5, the paper's
  Figure 3), returned as a :class:`QualityTable`;
- :func:`region_perturbation`, :func:`aopc` — image degradation by region perturbation
  (method.md §6, Samek et al. 2016; MoRF and LeRF orders) and the area over the perturbation
  curve; :meth:`PerturbationCurves.aopc_interval` (bootstrap over images),
  :func:`paired_difference` (paired bootstrap of an AOPC difference) and
  :func:`degradation_table` (:class:`DegradationTable`, ``to_records()``/``to_markdown()``);
- :func:`signal_cosine`, :func:`topk_precision`, :func:`region_mass`,
  :func:`ground_truth_metrics` — explanations against a known signal
  (:mod:`patternnet.groundtruth`);
- :func:`sanity_checks` — every registered method against model-parameter randomisation
  (Adebayo et al. 2018), cosine convergence and class sensitivity (Sixt et al. 2020) and
  input invariance (Kindermans et al. 2019), as a :class:`SanityResult`;
- :func:`compare` — all metrics for several methods, as one Markdown/CSV report with figures.
"""

from __future__ import annotations

from .compare import ComparisonReport, compare
from .groundtruth import (
    earth_movers_distance,
    emd_score,
    ground_truth_metrics,
    mask_auroc,
    region_mass,
    signal_cosine,
    topk_precision,
)
from .perturbation import (
    EDGES,
    REPLACEMENTS,
    DegradationTable,
    Interval,
    PairedDifference,
    PerturbationCurves,
    aopc,
    bootstrap_interval,
    degradation_table,
    paired_difference,
    region_perturbation,
)
from .plots import plot_degradation, plot_quality
from .quality import (
    QUALITY_ESTIMATORS,
    QualityTable,
    estimator_quality,
    layers_without_a_minus,
    quality_over_splits,
)
from .sanity import CHECKS, SanityResult, sanity_checks

__all__ = [
    "CHECKS",
    "EDGES",
    "QUALITY_ESTIMATORS",
    "REPLACEMENTS",
    "ComparisonReport",
    "DegradationTable",
    "Interval",
    "PairedDifference",
    "PerturbationCurves",
    "QualityTable",
    "SanityResult",
    "aopc",
    "bootstrap_interval",
    "degradation_table",
    "paired_difference",
    "compare",
    "earth_movers_distance",
    "emd_score",
    "estimator_quality",
    "layers_without_a_minus",
    "quality_over_splits",
    "ground_truth_metrics",
    "mask_auroc",
    "plot_degradation",
    "plot_quality",
    "region_mass",
    "region_perturbation",
    "sanity_checks",
    "signal_cosine",
    "topk_precision",
]
