"""Methods: each is a choice of rules and a start value over the one engine, describing itself.

Every method class says what it is (``kind``: ``"signal"`` or ``"attribution"``,
``needs_patterns``, ``description``, ``references``) and registers itself by name with
:func:`~patternnet.methods.registry.register`; importing this package imports every method
module, so the registry is complete. :func:`available_methods` (also
``patternnet.available_methods``) lists every registered name with a one-line description.
"""

from __future__ import annotations

from . import base, gradient, guided, lrp, pattern, registry
from .registry import get_method, method_info, register
from .registry import methods as available_methods

__all__ = ["available_methods", "base", "get_method", "gradient", "guided", "lrp",
           "method_info", "pattern", "register", "registry"]  # fmt: skip
