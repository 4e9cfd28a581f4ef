"""Deprecated alias of :mod:`patternnet.groundtruth` (renamed; removed in a later release).

``import patternnet.benchmarks`` and ``from patternnet.benchmarks.<module> import …`` keep
working for one release and emit a :class:`DeprecationWarning`; the submodules are the very
module objects of :mod:`patternnet.groundtruth`, so nothing is duplicated.
"""

from __future__ import annotations

import sys
import warnings

from .. import groundtruth as _groundtruth
from ..groundtruth import *  # noqa: F403
from ..groundtruth import (
    __all__,  # noqa: F401
    base,
    noise,
    suppressor,
    tetromino,
    toy,
    train,
)

warnings.warn(
    "patternnet.benchmarks was renamed patternnet.groundtruth; import that instead "
    "(the alias will be removed in a later release)",
    DeprecationWarning,
    stacklevel=2,
)

for _module in (base, noise, suppressor, tetromino, toy, train):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
del _module, _groundtruth
