"""Rules for sums and per-channel maps: how what arrives is split between the inputs.

:class:`ProportionalSum` splits the relevance arriving at a residual sum ``a + b`` between the
summands (installed on every spelling of an addition with
:func:`~patternnet.engine.backward.addition_rules`); :class:`ChannelScale` is the rule of a
standalone BatchNorm seen as one linear unit per channel. Both are LRP's (and the identity
estimator's) rules.

:class:`NodePatterns` is the pattern methods' rule for residual sums, average pools and means,
each a neuron with fixed weights and fitted patterns (:mod:`patternnet.engine.nodes`):
PatternNet and PatternAttribution through sums, average pools and means (method.md §10).

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

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...patterns.estimators import filter_pattern
from ..backward import Rule
from ..graph import NodePlan
from ..nodes import NodeCall, NodeTracker, fixed_weight
from ._numerics import check_nonnegative, relevance_ratio

__all__ = ["ChannelScale", "NodePatterns", "ProportionalSum", "SumState"]


@dataclass
class SumState:
    """What :class:`ProportionalSum` keeps: the summands, the sum (None for the absolute
    split) and their in-place version counters at the time of the sum."""

    a: Tensor
    b: Tensor
    z: Tensor | None
    versions: tuple[int, int, int | None]


class ProportionalSum(Rule):
    """Split what arrives at a sum ``z = a + b`` in proportion to the summands.

    ``R_a = a ⊙ R / stab(z)`` and ``R_b = b ⊙ R / stab(z)``, so ``R_a + R_b = R`` up to the
    stabiliser: the z rule of LRP applied to the addition of a residual block (what Zennit's
    ResNet canonizer does with its ``Sum`` module and ``Norm`` rule). Installed with
    :func:`~patternnet.engine.backward.addition_rules`; the engine hands ``save`` the pair
    ``(a, b)`` and expects a pair back from ``backward``.

    This is the rule for *relevance* (PatternAttribution, LRP): a relevance decomposition
    must split a sum, whereas the gradient — and PatternNet's signal, a modified gradient —
    passes the same value to both summands (no rule). With it, PatternAttribution conserves
    relevance through a residual block: each Linear/Conv layer conserves it (``Σᵢ wᵢaᵢ = 1``)
    and so does the sum.

    With ``absolute=True`` the shares are ``|a| / (|a| + |b|)`` and ``|b| / (|a| + |b|)``:
    the same split where the summands share a sign, but bounded in [0, 1] where they cancel.
    Use it when the relevance arriving at a unit is not proportional to the unit's value, as
    in PatternAttribution: there the signed ratio ``R / z`` explodes where ``z ≈ 0`` (measured
    on a random ResNet-50: relevance totals of −8·10⁸ for logits of 83 with the signed split).

    Parameters
    ----------
    stabilizer:
        ε in ``stab(z) = z + ε·sign(z)`` (sign(0) = +1); 0 gives nothing to both summands
        where ``z = 0``.
    absolute:
        Split by absolute values (see above).
    """

    def __init__(self, *, stabilizer: float = 1e-6, absolute: bool = False) -> None:
        self.stabilizer = check_nonnegative("stabilizer", stabilizer)
        self.absolute = bool(absolute)

    def save(self, module: nn.Module | None, x: Any, output: Tensor) -> Any:
        # References only (no work in the forward pass), with their in-place version counters:
        # the summands' absolute values are formed on the way back, in buffers that then
        # become the results.
        a, b = x
        if self.absolute:  # the sum itself is not needed: do not keep it alive
            return SumState(a, b, None, (a._version, b._version, None))
        return SumState(a, b, output, (a._version, b._version, output._version))

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Any:
        a, b, z, versions = state.a, state.b, state.z, state.versions
        if (a._version, b._version) != versions[:2]:
            raise RuntimeError(
                "a summand of a residual sum was modified in place after the sum (e.g. "
                "x.relu_() after y = x + h); the relevance split needs its value: write the "
                "later operation out of place (x = x.relu())"
            )
        if not self.absolute:
            if z._version != versions[2]:  # the sum itself changed in place (y.relu_())
                z = a + b
            ratio = relevance_ratio(grad_output, z, self.stabilizer)
            to_b = b * ratio
            return ratio.mul_(a), to_b
        # |a| + |b| ≥ 0, so stab(z) = z + ε: seven passes over the sum's shape and three
        # buffers, all in the backward pass.
        to_a, to_b = a.abs(), b.abs()
        z = to_a + to_b
        if self.stabilizer:
            ratio = torch.div(grad_output, z.add_(self.stabilizer), out=z)
        else:
            ratio = (grad_output / z).masked_fill_(z == 0, 0.0)
        return to_a.mul_(ratio), to_b.mul_(ratio)


class ChannelScale(Rule):
    """Multiply what passes back through a per-channel map by a fixed factor per channel.

    The rule of a standalone BatchNorm ``y = s ⊙ x + t`` seen as one linear unit per channel
    (see :func:`patternnet.engine.support.standalone_batchnorm_rules`): its normalised pattern
    is ``a = 1/s``, so PatternNet passes ``g / s`` and PatternAttribution ``g · s · (1/s) = g``.

    Parameters
    ----------
    factor:
        ``(C,)`` factors for the channels (dimension 1 of the module's input).
    """

    def __init__(self, factor: Tensor) -> None:
        self.factor = factor.detach()

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        shape = [1] * grad_output.dim()
        shape[1] = -1
        return grad_output * self.factor.to(grad_output).view(shape)


# ------------------------------------------------------------------ pattern nodes


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
    gated:
        Names of nodes whose output only ReLUs read, and those ReLUs pass the gradient's gate
        backward (:func:`patternnet.engine.gates.gated_nodes`): what arrives at their
        inactive units is zero, so they pass ``p₊·g`` with no mask (the ``p₋`` term would be
        zero everywhere).
    """

    def __init__(
        self, patterns: Any, estimator: str, *, attribution: bool,
        gated: Collection[str] = (),
    ) -> None:  # fmt: skip
        self.patterns = patterns
        self.estimator = estimator
        self.attribution = attribution
        self.gated = frozenset(gated)
        self._cache: dict[tuple[str, torch.dtype, torch.device], tuple[Tensor, Tensor | None]] = {}

    def tracker(self, plan: NodePlan | None = None) -> NodeTracker:
        """A fresh tracker for one forward pass (enter it around the forward pass).

        ``plan``: the model's nodes, ``ModelGraph.of(model).linear_nodes()`` (the fit's);
        None finds them by the probe.
        """
        return NodeTracker(self._handle, plan=plan)

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
        if name in self.gated:  # only ReLUs read it: nothing arrives where y ≤ 0
            negative = None
        if call.layout == "window":
            mask = None if negative is None else (call.to_output(value) > 0).to(value.dtype)
            backward = _window_backward(call, positive, negative, mask)
        else:
            mask = None if negative is None else call.to_output(value) > 0
            backward = _channelwise_backward(call, positive, negative, mask)
        return _NodeFunction.apply(backward, [value], *call.inputs)


def _channelwise_backward(
    call: NodeCall, positive: Tensor, negative: Tensor | None, mask: Tensor | None
) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``g (N, U, P)`` → ``g[:, :, None] · p[None, :, :, None]`` per input ``d``; with a mask
    (bool ``(N, U, P)``, ``y > 0``) ``p₊`` where it is set, ``p₋`` elsewhere.

    A sum's summands get one tensor each, shaped like the summand (``g · p_d`` per channel):
    the next layer's backward reads it as is, and each is a separate allocation — one
    ``(N, U, D, P)`` buffer is above glibc's mmap threshold (32 MB) from ResNet-50's first
    stage on at batch 8, mapped afresh page by page at every call: 27 ms against 5 ms for the
    same products into two buffers, measured on this CPU.
    """
    to_output, to_inputs = call.to_output, call.to_inputs
    plus = positive[None, :, :, None]
    minus = None if negative is None else negative[None, :, :, None]
    shapes = [u.shape for u in call.inputs]

    def share(g: Tensor, d: int) -> Tensor:
        """``g · p_d`` (``g (N, U, P)``), the side's pattern of each unit when masked."""
        if mask is None:
            return g * plus[:, :, d]
        return torch.where(mask, plus[:, :, d], minus[:, :, d]).mul_(g)  # type: ignore[index]

    def backward(grad: Tensor) -> tuple[Tensor, ...]:
        g = to_output(grad)  # (N, U, P)
        if call.kind == "sum":
            return tuple(share(g, d).view(shape) for d, shape in enumerate(shapes))
        g = g[:, :, None, :]  # a mean's input: (N, U, D, P) in its own layout
        if mask is None:
            return to_inputs(g * plus)
        return to_inputs(torch.where(mask[:, :, None, :], plus, minus).mul_(g))

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
