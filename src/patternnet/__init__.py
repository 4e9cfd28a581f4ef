"""patternnet: learn how to explain neural networks (PatternNet and PatternAttribution).

The public API; see the README for a tour. Data flows one way:
data → statistics → estimators → patterns → backward rules → explanations → evaluation.
"""

from __future__ import annotations

from .methods.base import Attribution
from .methods.gradient import Gradient, GradientXInput
from .methods.pattern import PatternAttribution, PatternNet
from .patterns.fit import collect_statistics, compute_patterns, fit_patterns
from .patterns.statistics import Statistics
from .patterns.store import Patterns

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Gradient",
    "GradientXInput",
    "PatternAttribution",
    "PatternNet",
    "Patterns",
    "Statistics",
    "collect_statistics",
    "compute_patterns",
    "fit_patterns",
]
