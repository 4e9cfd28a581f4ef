"""Captum interoperability: a patternnet method where a Captum attribution stands.

:class:`CaptumAttribution` wraps any patternnet method (or a registry name) as a
``captum.attr.Attribution``, so Captum's own tools take it: ``NoiseTunnel`` (SmoothGrad,
SmoothGrad², VarGrad), ``captum.metrics.infidelity`` / ``sensitivity_max`` and
``captum.attr.visualization.visualize_image_attr``::

    from captum.attr import NoiseTunnel
    from patternnet.captum import CaptumAttribution

    pa = CaptumAttribution(patternnet.PatternAttribution(model, patterns))
    smooth = NoiseTunnel(pa).attribute(x, nt_type="smoothgrad", nt_samples=16, stdevs=0.1,
                                       target=3)

Why an adapter and not the methods themselves: patternnet's methods already have Captum's
call shape (``Method(model).attribute(inputs, target=None)`` returning a tensor shaped like
``inputs``), but being a Captum ``Attribution`` means subclassing Captum's class, and Captum is
not a dependency of patternnet (only of its tests). The adapter lives in this module, which
imports Captum; ``import patternnet`` never does. Duck typing would not be enough either:
``NoiseTunnel`` calls ``attribute.__wrapped__``, the function behind Captum's own
usage-logging decorator, which the adapter's ``attribute`` carries. The adapter also translates
what Captum's callers pass and patternnet does not take: inputs as a 1-tuple,
``additional_forward_args``.
"""

from __future__ import annotations

from typing import Any

from captum.attr import Attribution as _CaptumBase
from captum.log import log_usage
from torch import Tensor, nn

from .methods.base import Attribution, TargetType
from .methods.registry import build_method

__all__ = ["CaptumAttribution"]


class CaptumAttribution(_CaptumBase):
    """A patternnet method as a ``captum.attr.Attribution``.

    Parameters
    ----------
    method:
        A patternnet method object (e.g. ``patternnet.PatternNet(model, patterns)``) or a
        registry name (``"lrp_epsilon"``; then ``model`` is required).
    model:
        With a registry name: the classifier to explain.
    patterns:
        With a registry name: the patterns for the pattern methods.
    **options:
        With a registry name: the method's options (see :func:`patternnet.get_method`).

    Attributes
    ----------
    method:
        The wrapped patternnet method.
    forward_func:
        The model (what Captum's ``Attribution`` records).

    Examples
    --------
    >>> nt = NoiseTunnel(CaptumAttribution("pattern_net", model, patterns=p))  # doctest: +SKIP
    >>> nt.attribute(x, nt_type="smoothgrad", nt_samples=8, stdevs=0.1)        # doctest: +SKIP
    """

    def __init__(
        self,
        method: Attribution | str,
        model: nn.Module | None = None,
        *,
        patterns: Any = None,
        **options: Any,
    ) -> None:
        if isinstance(method, str):
            if model is None:
                raise TypeError(
                    f"CaptumAttribution({method!r}) needs the model: "
                    f"CaptumAttribution({method!r}, model)"
                )
            method = build_method(method, model, patterns, **options)
        elif not isinstance(method, Attribution):
            raise TypeError(
                "method must be a patternnet method (e.g. patternnet.PatternNet(model, "
                f"patterns)) or a registry name, not {type(method).__name__}"
            )
        elif model is not None or patterns is not None or options:
            raise TypeError(
                "model, patterns and options are for a registry name; a method object "
                "already has them"
            )
        self.method = method
        super().__init__(method.model)

    @property
    def multiplies_by_inputs(self) -> bool:
        """True for contributions (``kind == "attribution"``: × input, LRP, PA); False for
        signals and gradients."""
        return getattr(self.method, "kind", "attribution") == "attribution"

    def has_convergence_delta(self) -> bool:
        """No convergence delta (as Captum's Saliency, Guided BackProp)."""
        return False

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor | tuple[Tensor]:
        """Explain ``inputs`` with the wrapped method, the way Captum's methods are called.

        Parameters
        ----------
        inputs:
            A batch ``(N, ...)``, or a 1-tuple holding it (returned as a 1-tuple then).
        target:
            None (each sample's arg-max), an int, or one class per sample.
        additional_forward_args:
            Not supported (patternnet models take one input); must be None.

        Returns
        -------
        Tensor or tuple of one Tensor
            Shaped like the inputs.
        """
        if additional_forward_args is not None:
            raise ValueError(
                "patternnet explains models of one input; additional_forward_args are not "
                "supported (wrap the model so that it takes one tensor)"
            )
        is_tuple = isinstance(inputs, tuple)
        if is_tuple:
            if len(inputs) != 1:
                raise ValueError(
                    f"patternnet explains models of one input; got a tuple of {len(inputs)} "
                    "input tensors"
                )
            (inputs,) = inputs
        result = self.method.attribute(inputs, target=target)
        return (result,) if is_tuple else result

    def __repr__(self) -> str:
        return f"CaptumAttribution({self.method!r})"

