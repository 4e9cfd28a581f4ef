"""Deprecated alias of :mod:`patternnet.groundtruth` (renamed; removed in a later release).

``import patternnet.benchmarks`` and ``from patternnet.benchmarks.<module> import …`` keep
working for one release and emit a :class:`DeprecationWarning`; the submodules are the very
module objects of :mod:`patternnet.groundtruth`, so nothing is duplicated.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from ..groundtruth import *  # noqa: F403
from ..groundtruth import __all__  # noqa: F401

warnings.warn(
    "patternnet.benchmarks was renamed patternnet.groundtruth; import that instead "
    "(the alias will be removed in a later release)",
    DeprecationWarning,
    stacklevel=2,
)

for _name in ("base", "noise", "suppressor", "tetromino", "toy", "train", "wilming", "xaitris"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"patternnet.groundtruth.{_name}")
del _name
