"""PatternNet and PatternAttribution through sums, average pools and means (method.md §10).

A node (:mod:`patternnet.engine.nodes`) is a neuron with fixed weights ``w`` (ones for a sum,
``1/k`` for a pool or mean) and fitted patterns ``p``. On the way back:

- PatternNet passes ``p·s`` to each input (summand ``i`` gets ``p_i·s``), not the gradient's
  ``w·s`` (a copy of the signal to both summands, ``1/k`` through a pool);
- PatternAttribution passes ``(w ⊙ p)·r``; for a sum that is ``p_i·r``, conserving since
  ``Σᵢ p_i = 1`` (it replaces the proportional split of LRP for the pattern methods).

With two-component patterns the unit's output decides, as for a layer: ``p₊`` where
``y > 0``, ``p₋`` elsewhere (``p₊`` everywhere when the fit kept no ``p₋``). The filter
estimator needs no fit: ``p = w / wᵀw``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..patterns.estimators import filter_pattern
from .nodes import NodeCall, NodeTracker, fixed_weight, is_node_name

__all__ = ["NodePatterns"]


class _NodeFunction(torch.autograd.Function):
    """The node's value on the way forward; ``backward(g)`` per input on the way back."""

    @staticmethod
    def forward(ctx: Any, backward: Callable, box: list, *inputs: Tensor) -> Tensor:
        ctx.backward_fn = backward
        return box[0]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        return (None, None, *ctx.backward_fn(grad_output))


class NodePatterns:
    """The pattern rule of every node of a forward pass, as a context (a :class:`NodeTracker`).

    Parameters
    ----------
    patterns:
        Fitted :class:`~patternnet.patterns.store.Patterns` (their ``nodes``), or None for the
        filter estimator.
    estimator:
        ``"two_component"``, ``"linear"`` or ``"filter"``.
    attribution:
        False: PatternNet (``p``); True: PatternAttribution (``w ⊙ p``).
    """

    def __init__(self, patterns: Any, estimator: str, *, attribution: bool) -> None:
        self.patterns = patterns
        self.estimator = estimator
        self.attribution = attribution
        self._cache: dict[tuple[str, torch.dtype, torch.device], tuple[Tensor, Tensor | None]] = {}

    def tracker(self) -> NodeTracker:
        """A fresh tracker for one forward pass (enter it around the forward pass)."""
        return NodeTracker(self._handle)

    # ------------------------------------------------------------------ patterns
    def _weights(self, name: str, call: NodeCall, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(U, D)`` maps for active and inactive units (``p`` or ``w ⊙ p``)."""
        key = (name, like.dtype, like.device)
        cached = self._cache.get(key)
        if cached is not None and cached[0].shape == (call.units, call.width):
            return cached
        w = fixed_weight(call.kind, call.units, call.width)
        if self.estimator == "filter":
            positive, negative = filter_pattern(w)[0], None
        else:
            positive, negative = self._fitted(name, call)
        if self.attribution:
            positive = w * positive.to(w)
            negative = None if negative is None else w * negative.to(w)
        result = (
            positive.to(device=like.device, dtype=like.dtype),
            None if negative is None else negative.to(device=like.device, dtype=like.dtype),
        )
        self._cache[key] = result
        return result

    def _fitted(self, name: str, call: NodeCall) -> tuple[Tensor, Tensor | None]:
        nodes = getattr(self.patterns, "nodes", {}) or {}
        tensors = nodes.get(name)
        what = f"{name} (a {call.kind} of {call.units} units with {call.width} inputs each)"
        if tensors is None and getattr(self.patterns, "node_weights", False):
            return fixed_weight(call.kind, call.units, call.width), None
        if tensors is None:
            fitted = sorted(nodes) if nodes else "none"
            raise ValueError(
                f"the patterns hold no pattern for {what}; nodes with patterns: {fitted}. "
                "They were fitted on another model or graph, or built by hand without node "
                "patterns: fit them with patternnet.fit_patterns(model, data)"
            )
        if "a_plus" in tensors:
            positive, negative = tensors["a_plus"], tensors.get("a_minus")
        elif "a" in tensors:
            positive, negative = tensors["a"], None
        else:
            raise ValueError(f"the patterns of {name} hold {sorted(tensors)}, not 'a'/'a_plus'")
        for tensor in (positive, negative):
            if tensor is not None and tuple(tensor.shape) != (call.units, call.width):
                raise ValueError(
                    f"the patterns of {name} are {tuple(tensor.shape)} but the model's {what} "
                    f"needs ({call.units}, {call.width}): they were fitted on another model "
                    "or on inputs of another size; fit them again"
                )
        return positive, negative

    # ------------------------------------------------------------------ the rule
    def _handle(self, name: str, call: NodeCall) -> Tensor | None:
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in call.inputs):
            return None
        value = call.result.detach()
        positive, negative = self._weights(name, call, value)
        mask = None
        if negative is not None:
            mask = (call.to_output(value) > 0).to(value.dtype)
        if call.layout == "window":
            backward = _window_backward(call, positive, negative, mask)
        else:
            backward = _channelwise_backward(call, positive, negative, mask)
        return _NodeFunction.apply(backward, [value], *call.inputs)


def _channelwise_backward(
    call: NodeCall, positive: Tensor, negative: Tensor | None, mask: Tensor | None
) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``g (N, U, P)`` → ``g[:, :, None] · p[None, :, :, None]`` per input ``d``."""
    to_output, to_inputs = call.to_output, call.to_inputs

    def backward(grad: Tensor) -> tuple[Tensor, ...]:
        g = to_output(grad)[:, :, None, :]  # (N, U, 1, P)
        if mask is None:
            coefficient = positive[None, :, :, None]
        else:
            m = mask[:, :, None, :]
            coefficient = negative[None, :, :, None] + m * (positive - negative)[None, :, :, None]
        return to_inputs(g * coefficient)

    return backward


def _window_backward(
    call: NodeCall, positive: Tensor, negative: Tensor | None, mask: Tensor | None
) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """The transposed depthwise convolution with the pattern (two maps with a mask)."""
    geometry, shape = call.geometry, call.inputs[0].shape
    assert geometry is not None
    weight_shape = call.weight_shape()
    plus = positive.reshape(weight_shape)
    minus = None if negative is None else negative.reshape(weight_shape)

    def backward(grad: Tensor) -> tuple[Tensor, ...]:
        if mask is None:
            return (geometry.transpose(grad, plus, shape),)
        active = grad * mask
        result = geometry.transpose(active, plus, shape)
        result += geometry.transpose(grad - active, minus, shape)
        return (result,)

    return backward


def node_names(patterns: Any) -> list[str]:
    """The node names a :class:`~patternnet.patterns.store.Patterns` holds."""
    return [name for name in getattr(patterns, "nodes", {}) if is_node_name(name)]
