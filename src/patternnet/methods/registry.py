"""Every method by name: :func:`register` adds one, :func:`methods` lists them,
:func:`get_method` builds one, :func:`method_info` says what a name is.

A method registers itself where it is defined::

    @register("gradient")
    class Gradient(Attribution):
        kind = "signal"
        description = "gradient of the logit (saliency, signed)"

and a preset is the same class registered again with fixed options
(``register("lrp_epsilon", rules="epsilon")(LRP)``). Options of :func:`get_method` are the
keyword arguments of the method's class (e.g. ``epsilon`` for ``lrp_epsilon``, ``patterns``
for ``pattern_attribution``, ``n_samples`` for ``smoothgrad``) plus ``canonizers`` and
``output_selector`` for all. Methods that wrap another method (``wraps = True``: SmoothGrad,
Integrated Gradients) take ``inner``, the name of the wrapped method (default
``"gradient"``), and pass the options they do not take to it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from .base import Attribution

__all__ = ["MethodInfo", "build_method", "get_method", "method_info", "methods", "register"]

M = TypeVar("M", bound=type[Attribution])

#: Options every method takes (those of :class:`Attribution`).
_COMMON = frozenset({"canonizers", "output_selector"})


@dataclass(frozen=True)
class MethodInfo:
    """A registered name: the class it builds, with which fixed options, and what it is.

    Attributes
    ----------
    name:
        The registry name.
    cls:
        The :class:`~patternnet.methods.base.Attribution` subclass.
    description:
        One line (the class's ``description`` unless the registration gave one).
    fixed:
        Options the name fixes (e.g. ``{"rules": "epsilon"}`` for ``lrp_epsilon``).
    """

    name: str
    cls: type[Attribution]
    description: str
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"signal"`` or ``"attribution"`` (a wrapper's instance answers for its inner)."""
        return self.cls.kind

    @property
    def needs_patterns(self) -> bool:
        """Whether the method explains with fitted patterns."""
        return self.cls.needs_patterns

    @property
    def references(self) -> tuple[str, ...]:
        """The papers the method comes from."""
        return tuple(self.cls.references)

    def options(self) -> set[str]:
        """The options :func:`get_method` accepts for this name (wrappers: their own)."""
        accepted = set(_COMMON)
        for klass in self.cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            parameters = inspect.signature(init).parameters.values()
            variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            accepted |= {p.name for p in parameters if p.kind not in variadic}
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                break
        accepted -= {"self", "model", "method", *self.fixed}
        if self.cls.wraps:
            accepted.add("inner")
        return accepted

    def build(self, model: nn.Module, **options: Any) -> Attribution:
        """The method for ``model`` (see :func:`get_method`)."""
        if self.cls.wraps:
            inner = options.pop("inner", "gradient")
            if method_info(inner).cls.wraps:
                raise ValueError(
                    f"inner must be a method that is not itself a wrapper, not {inner!r}"
                )
            own = self.options() - {"inner"} - _COMMON
            mine = {k: v for k, v in options.items() if k in own}
            rest = {k: v for k, v in options.items() if k not in own}
            return self.cls(get_method(inner, model, **rest), **mine)
        unknown = sorted(set(options) - self.options())
        if unknown:
            raise TypeError(
                f"method {self.name!r} does not take the options {unknown}; it takes "
                f"{sorted(self.options())}"
            )
        return self.cls(model, **self.fixed, **options)


_REGISTRY: dict[str, MethodInfo] = {}


def register(
    name: str, *, description: str | None = None, **fixed: Any
) -> Callable[[M], M]:
    """Class decorator: make an :class:`Attribution` subclass available by ``name``.

    Parameters
    ----------
    name:
        The registry name (used by :func:`get_method`, the command line, :func:`compare`).
    description:
        One line; default the class's ``description``.
    **fixed:
        Options this name fixes (a preset), e.g. ``rules="epsilon"``.

    Raises
    ------
    ValueError
        The name is taken by another class, or no description is given.
    """

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Attribution)):
            raise TypeError(f"register decorates Attribution subclasses, not {cls!r}")
        text = description or cls.description
        if not text:
            raise ValueError(f"method {name!r} needs a description (class attribute or option)")
        known = _REGISTRY.get(name)
        if known is not None and known.cls is not cls:
            raise ValueError(f"method name {name!r} is taken by {known.cls.__name__}")
        if not fixed and "name" not in cls.__dict__:
            cls.name = name
        _REGISTRY[name] = MethodInfo(name, cls, text, dict(fixed))
        return cls

    return decorate


def methods() -> dict[str, str]:
    """Every method's registry name and a one-line description."""
    return {name: info.description for name, info in _REGISTRY.items()}


def method_info(name: str) -> MethodInfo:
    """What the registry name ``name`` is (class, kind, needs_patterns, options).

    Raises
    ------
    ValueError
        Unknown name (the message lists the known ones).
    """
    info = _REGISTRY.get(name)
    if info is None:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}")
    return info


def get_method(name: str, model: nn.Module, **options: Any) -> Attribution:
    """Build the method called ``name`` for ``model``.

    Parameters
    ----------
    name:
        A key of :func:`methods` (e.g. ``"lrp_epsilon"``).
    model:
        The classifier to explain.
    **options:
        Keyword arguments of the method (e.g. ``epsilon=0.1``, ``patterns=p``). For
        ``smoothgrad`` and ``integrated_gradients``, ``inner`` names the wrapped method and
        options the wrapper does not take go to it.

    Raises
    ------
    ValueError
        Unknown name (the message lists the known ones).
    TypeError
        An option the method does not take (the message lists those it takes).
    """
    return method_info(name).build(model, **options)


def build_method(
    name: str, model: nn.Module, patterns: Any = None, **options: Any
) -> Attribution:
    """:func:`get_method`, giving ``patterns`` to the methods that explain with them.

    The method asks for patterns by its ``needs_patterns`` (for a wrapper: its ``inner``
    method's); other methods ignore ``patterns``. The command line, the demo and
    :func:`~patternnet.evaluate.compare` build methods by name through this one function.
    """
    info = method_info(name)
    uses = info
    if info.cls.wraps:
        uses = method_info(options.get("inner", "gradient"))
    if uses.needs_patterns and patterns is not None:
        options.setdefault("patterns", patterns)
    return info.build(model, **options)
