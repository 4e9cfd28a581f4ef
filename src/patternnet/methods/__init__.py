"""Methods: each is a choice of rules and a start value over the one engine, describing itself.

Every method class says what it is (``kind``: ``"signal"`` or ``"attribution"``,
``needs_patterns``, ``description``, ``references``) and registers itself by name with
:func:`~patternnet.methods.registry.register`; importing this package imports every method
module, so the registry is complete.

``patternnet.methods()`` is :func:`patternnet.methods.registry.methods` (every method's name →
a one-line description), while ``patternnet.methods.lrp`` and ``import patternnet.methods``
keep working as for any package: a module cannot be called, so this one is an instance of a
module type that can (``_CallableModule``, below).
"""

from __future__ import annotations

import sys
import types

from . import base, gradient, guided, lrp, pattern, registry
from .registry import get_method, method_info, register

__all__ = ["base", "get_method", "gradient", "guided", "lrp", "method_info", "pattern",
           "register", "registry"]


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict[str, str]:
        """Every method's registry name and a one-line description."""
        return registry.methods()


sys.modules[__name__].__class__ = _CallableModule
