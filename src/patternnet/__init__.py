"""patternnet: learn how to explain neural networks (PatternNet and PatternAttribution).

The public API; see the README for a tour. Data flows one way:
data → statistics → estimators → patterns → backward rules → explanations → evaluation.
"""

from __future__ import annotations

from . import evaluate, groundtruth, methods, models
from ._version import __version__ as __version__
from .engine.canonize import BatchNormFolding
from .engine.support import (
    UnsupportedModuleError,
    check_supported,
    classify,
    register_passthrough,
)
from .evaluate import aopc, compare, estimator_quality, region_perturbation
from .methods.base import Attribution
from .methods.gradient import Gradient, GradientXInput, IntegratedGradients, SmoothGrad
from .methods.guided import DeConvNet, GuidedBackprop
from .methods.lrp import LRP, DeepTaylor
from .methods.pattern import PatternAttribution, PatternNet
from .methods.registry import get_method
from .methods.registry import methods as available_methods
from .patterns.fit import FitOptions, collect_statistics, compute_patterns, fit_patterns
from .patterns.statistics import Statistics
from .patterns.store import Patterns
from .quantus import quantus_explain
from .reproduction import reproduce

__all__ = [
    "LRP",
    "Attribution",
    "BatchNormFolding",
    "DeConvNet",
    "DeepTaylor",
    "FitOptions",
    "Gradient",
    "GradientXInput",
    "GuidedBackprop",
    "IntegratedGradients",
    "PatternAttribution",
    "PatternNet",
    "Patterns",
    "SmoothGrad",
    "Statistics",
    "UnsupportedModuleError",
    "aopc",
    "available_methods",
    "check_supported",
    "classify",
    "collect_statistics",
    "compare",
    "compute_patterns",
    "estimator_quality",
    "evaluate",
    "fit_patterns",
    "get_method",
    "groundtruth",
    "methods",
    "models",
    "quantus_explain",
    "region_perturbation",
    "register_passthrough",
    "reproduce",
]
