"""Every method by name: :func:`methods` lists them, :func:`get_method` builds one.

The command line and the evaluation code choose methods by these names; options are the
keyword arguments of the method's class (e.g. ``epsilon`` for ``lrp_epsilon``, ``patterns``
for ``pattern_attribution``, ``n_samples`` for ``smoothgrad``) plus ``canonizers`` and
``output_selector`` for all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import Attribution
from .gradient import Gradient, GradientXInput, IntegratedGradients, SmoothGrad
from .guided import DeConvNet, GuidedBackprop
from .lrp import LRP, PRESETS, DeepTaylor
from .pattern import PatternAttribution, PatternNet

__all__ = ["methods", "get_method"]


@dataclass(frozen=True)
class _Entry:
    description: str
    build: Callable[..., Attribution]
    signature: Callable[..., Any]


_COMMON = ("canonizers", "output_selector")
_WRAPPED = {"inner": "gradient"}


def _wrapper(cls: type) -> Callable[..., Attribution]:
    def build(model: nn.Module, inner: str = "gradient", **options: Any) -> Attribution:
        own = set(inspect.signature(cls).parameters) - {"method"}
        mine = {k: v for k, v in options.items() if k in own}
        rest = {k: v for k, v in options.items() if k not in own}
        if inner in ("smoothgrad", "integrated_gradients"):
            raise ValueError(f"inner must be a method that is not itself a wrapper, not {inner!r}")
        return cls(get_method(inner, model, **rest), **mine)

    return build


def _lrp(preset: str) -> Callable[..., Attribution]:
    def build(model: nn.Module, **options: Any) -> Attribution:
        return LRP(model, preset, **options)

    return build


_REGISTRY: dict[str, _Entry] = {
    "gradient": _Entry("gradient of the logit (saliency, signed)", Gradient, Gradient),
    "gradient_x_input": _Entry("gradient × input", GradientXInput, GradientXInput),
    "smoothgrad": _Entry(
        "SmoothGrad: a method (option inner, default gradient) averaged over noisy inputs",
        _wrapper(SmoothGrad), SmoothGrad,
    ),
    "integrated_gradients": _Entry(
        "Integrated Gradients from a baseline (option inner, default gradient)",
        _wrapper(IntegratedGradients), IntegratedGradients,
    ),
    "deconvnet": _Entry("DeConvNet: ReLUs pass positive gradients, no gate", DeConvNet, DeConvNet),
    "guided_backprop": _Entry(
        "Guided BackProp: ReLU gate and positive gradients", GuidedBackprop, GuidedBackprop
    ),
}
for _preset, _text in PRESETS.items():
    _REGISTRY[f"lrp_{_preset}"] = _Entry(f"LRP: {_text}", _lrp(_preset), LRP)
_REGISTRY["deep_taylor"] = _Entry(
    "Deep Taylor: z⁺ above the input, z^B (options low, high) or w² at the input",
    DeepTaylor, DeepTaylor,
)
_REGISTRY["pattern_net"] = _Entry(
    "PatternNet: the signal, backward with the patterns (option patterns)", PatternNet,
    PatternNet,
)
_REGISTRY["pattern_attribution"] = _Entry(
    "PatternAttribution: contributions, backward with W ⊙ A (options patterns, estimator)",
    PatternAttribution, PatternAttribution,
)


def methods() -> dict[str, str]:
    """Every method's registry name and a one-line description."""
    return {name: entry.description for name, entry in _REGISTRY.items()}


def _accepted(name: str) -> set[str]:
    entry = _REGISTRY[name]
    parameters = inspect.signature(entry.signature).parameters.values()
    accepted = {p.name for p in parameters if p.kind is not p.VAR_KEYWORD}
    accepted -= {"model", "method", "rules"}
    accepted |= set(_COMMON)
    if name in ("smoothgrad", "integrated_gradients"):
        accepted |= set(_WRAPPED)
    if entry.signature is PatternNet:
        accepted |= {"patterns", "estimator"}
    return accepted


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
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}")
    if name not in ("smoothgrad", "integrated_gradients"):
        unknown = sorted(set(options) - _accepted(name))
        if unknown:
            raise TypeError(
                f"method {name!r} does not take the options {unknown}; it takes "
                f"{sorted(_accepted(name))}"
            )
    return _REGISTRY[name].build(model, **options)
