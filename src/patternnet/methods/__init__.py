"""Methods: each is a choice of rules and a start value over the one engine.

The package is callable: ``patternnet.methods()`` is :func:`patternnet.methods.registry.methods`
(every method's name → a one-line description), while ``patternnet.methods.lrp`` and
``import patternnet.methods`` keep working as for any package.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict[str, str]:
        """Every method's registry name and a one-line description."""
        from .registry import methods

        return methods()


sys.modules[__name__].__class__ = _CallableModule
