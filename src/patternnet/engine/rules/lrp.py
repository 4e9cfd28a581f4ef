"""LRP rules (Bach et al. 2015; Montavon et al. 2017, 2019), fused for speed.

Each Linear/Conv rule is a :class:`~patternnet.engine.rules.base.LayerRule`: its
:meth:`~patternnet.engine.rules.base.LayerRule.shares` state the rule as data (the formula),
and its ``save``/``backward`` compute the same thing fused — fewer products and buffers
reused in place. ``tests/test_rules_declarative.py`` checks every rule against its own
declarative form in float64.

The rules hold only their hyper-parameters: the layer's weight, bias and geometry are read
from the module during the forward pass (inside a canonical form, i.e. BatchNorm already
folded), so one rule object may serve many layers.

Cost (perf/README.md): what a rule needs of the layer's output is taken in the forward pass
(the model may overwrite the output in place later, as ``out += identity`` does); what needs
only the input (z⁺'s ``W⁺x``) is formed on the way back, so that no layer holds it until then;
ratios are divided into the rule's own buffers and products multiplied in place, so the saved
values serve one backward pass (a second one is refused, not silently wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...layers import LayerGeometry
from ..backward import Rule
from ._numerics import (
    check_nonnegative,
    constant,
    consume,
    denominator,
    divide,
    relevance_ratio,
)
from .base import LayerRule, Share, Term, layer_of

__all__ = [
    "AVERAGE_POOLS", "AlphaBeta", "Epsilon", "Flat", "Gamma", "Norm", "WSquare", "Z", "ZBox",
    "ZPlus",
]


def _positive(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _negative(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def _ones(t: Tensor) -> Tensor:
    return torch.ones_like(t)


def _keep(t: Tensor) -> Tensor:
    return t


@dataclass
class _ProductState:
    """What :class:`Epsilon` keeps: the layer, its weight, the input, and the stabilised
    denominator in a box emptied by the one backward pass it serves."""

    layer: LayerGeometry
    weight: Tensor
    x: Tensor
    box: list


class Epsilon(LayerRule):
    """LRP-ε (Bach et al. 2015): ``R_in = x ⊙ Wᵀ(R / stab(z))``, ``z = Wx + b``.

    ``z`` is the layer's own output: no extra forward is needed. Its stabilised value is
    taken in the forward pass, not read back later: the model may overwrite the output in
    place afterwards (``out += identity`` in torchvision's residual blocks).

    Parameters
    ----------
    epsilon:
        Added to ``|z|`` (with z's sign); it absorbs weak or contradictory relevance. 0 is
        the z rule (:class:`Z`).
    bias:
        Whether the bias is part of ``z`` (it then absorbs its share of relevance). With
        ``bias=False`` (or bias-free layers) and ``ε = 0`` relevance is conserved.
    """

    def __init__(self, epsilon: float = 1e-6, *, bias: bool = True) -> None:
        self.epsilon = check_nonnegative("epsilon", epsilon)
        self.bias = bool(bias)

    @property
    def stabilizer(self) -> float:  # type: ignore[override]
        """ε (the declarative base's name for it)."""
        return self.epsilon

    def shares(self) -> Sequence[Share]:
        return [Share((Term(bias=_keep if self.bias else None),))]

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = layer_of(module, self)
        output = output.detach()
        z = _without_bias(output, bias, layer, self.bias)
        return _ProductState(
            layer, weight, x.detach(), [denominator(z, self.epsilon, fresh=z is not output)]
        )

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        ratio = divide(grad_output, consume(state.box), self.epsilon)
        return state.layer.transpose(ratio, state.weight, state.x.shape).mul_(state.x)


class Z(Epsilon):
    """LRP-0, the z rule: :class:`Epsilon` with ``ε = 0`` (gradient × input for bias-free nets).

    The identity signal estimator gives exactly this rule (method.md §4).
    """

    def __init__(self, *, bias: bool = True) -> None:
        super().__init__(0.0, bias=bias)


@dataclass
class _SignedState:
    """What :class:`AlphaBeta` keeps.

    Attributes
    ----------
    layer:
        The layer's geometry.
    weights:
        ``(W⁺, W⁻)`` meeting the input (stacked ``[W⁺, W⁻]``, ``[W⁻, W⁺]`` for signed inputs),
        or, for z⁺, the layer's weight itself (the pair is formed on the way back).
    x:
        The input (``[x⁺, x⁻]`` stacked along the channels for signed inputs).
    version:
        The input's in-place version counter when saved.
    box:
        ``[(p + ε, n − ε)]`` (for z⁺: ``[(b⁺ + ε, None)]``), emptied by the backward pass.
    presized:
        Whether the denominators already hold ε.
    signed:
        Whether the input had negative values (stacked layout).
    """

    layer: LayerGeometry
    weights: Any
    x: Tensor
    version: int
    box: list
    presized: bool
    signed: bool


class AlphaBeta(LayerRule):
    """LRP-αβ (Bach et al. 2015): positive and negative contributions weighted apart.

    With ``p = W⁺x⁺ + W⁻x⁻ (+ b⁺)`` and ``n = W⁻x⁺ + W⁺x⁻ (+ b⁻) = z − p``::

        R_in = α [x⁺ ⊙ W⁺ᵀ(R/p) + x⁻ ⊙ W⁻ᵀ(R/p)] − β [x⁺ ⊙ W⁻ᵀ(R/n) + x⁻ ⊙ W⁺ᵀ(R/n)]

    (each denominator stabilised). ``n`` is taken from the saved output, so one extra
    forward (``W⁺x⁺``) is needed for non-negative inputs, two for signed inputs.

    Parameters
    ----------
    alpha, beta:
        Non-negative with ``α − β = 1`` (relevance is then conserved): (1, 0) is z⁺,
        (2, 1) the common choice for lower layers.
    stabilizer:
        ε of the denominators.
    bias:
        Whether ``b⁺`` counts as a positive and ``b⁻`` as a negative contribution (Zennit's
        convention).
    """

    def __init__(
        self, alpha: float = 2.0, beta: float = 1.0, *, stabilizer: float = 1e-6,
        bias: bool = True,
    ) -> None:
        alpha, beta = float(alpha), float(beta)
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
            raise ValueError(
                f"AlphaBeta needs alpha ≥ 0, beta ≥ 0 and alpha − beta = 1 (conservation); got "
                f"alpha={alpha}, beta={beta} (e.g. alpha=1, beta=0 or alpha=2, beta=1)"
            )
        self.alpha, self.beta = alpha, beta
        self.stabilizer = check_nonnegative("stabilizer", stabilizer)
        self.bias = bool(bias)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = layer_of(module, self)
        # Above a ReLU the input is non-negative: no copies, one extra forward (W⁺x), and z⁺
        # needs no W⁻ (dense layers of VGG-sized models: hundreds of MB per copy).
        x_pos, x_neg = _signed_input(x)
        signed = x_neg is not None
        # Signed inputs: [x⁺, x⁻] stacked along the channels meet [W⁺, W⁻] (positive
        # contributions) and [W⁻, W⁺] (negative ones): one product each way instead of two.
        x_in = _stack_channels(layer, x_pos, x_neg) if signed else x_pos
        b_pos = bias.clamp(min=0) if (self.bias and bias is not None) else None
        # p = W⁺x⁺ + W⁻x⁻ + b⁺ ≥ 0 and n = z − p ≤ 0 (every term has its sign): the
        # stabilised denominators are p + ε (added through the forward's bias, for free) and
        # n − ε = z − (p + ε).
        presized = self.stabilizer > 0
        if presized:
            shift = weight.new_full((weight.shape[0],), self.stabilizer)
            b_pos = shift if b_pos is None else b_pos + shift
        if not self.beta:
            # z⁺ needs nothing of the forward pass but x: W⁺ and p are formed on the way back,
            # where their buffers are reused layer after layer instead of every layer holding
            # them until the backward pass (ResNet-50, batch 8 at 224²: 430 MB less held;
            # measured 10% faster at 112², fewer fresh pages to fault in).
            return _SignedState(layer, weight, x_in, x_in._version, [(b_pos, None)], presized,
                                signed)
        w_in = self._weights(weight, signed)
        positive = layer.forward(x_in, w_in[0], b_pos)
        negative = _without_bias(output.detach(), bias, layer, self.bias) - positive
        return _SignedState(layer, w_in, x_in, x_in._version, [(positive, negative)], presized,
                            signed)

    def shares(self) -> Sequence[Share]:
        bias_pos = _positive if self.bias else None
        bias_neg = _negative if self.bias else None
        shares = [Share((Term(_positive, _positive, bias_pos), Term(_negative, _negative)),
                        self.alpha)]
        if self.beta:
            shares.append(Share((Term(_positive, _negative, bias_neg),
                                 Term(_negative, _positive)), -self.beta))
        return shares

    def _weights(self, weight: Tensor, signed: bool) -> tuple[Tensor, Tensor | None]:
        """The weights meeting the input for the positive and the negative contributions."""
        w_pos = weight.clamp(min=0)
        w_neg = weight.clamp(max=0) if (signed or self.beta) else None
        if not signed:
            return w_pos, w_neg
        return torch.cat([w_pos, w_neg], 1), torch.cat([w_neg, w_pos], 1) if self.beta else None

    def _ratio(self, relevance: Tensor, denominator: Tensor, presized: bool) -> Tensor:
        if presized:  # the denominator is ours: divide into it
            return torch.div(relevance, denominator, out=denominator)
        return relevance_ratio(relevance, denominator, self.stabilizer)

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        layer, weights, x, presized, signed = (
            state.layer, state.weights, state.x, state.presized, state.signed
        )
        version = state.version
        positive, negative = consume(state.box)
        if x._version != version:
            raise RuntimeError(
                f"the input of a layer with the {type(self).__name__} rule was changed in place "
                "after the layer ran; LRP needs it unchanged (use an out-of-place operation)"
            )
        if not self.beta:  # z⁺: weights is the layer's weight, positive holds b⁺ (+ ε)
            weights = self._weights(weights, signed)
            positive = layer.forward(x, weights[0], positive)
        w_pos, w_neg = weights
        ratio = self._ratio(grad_output, positive, presized)
        if self.alpha != 1:
            ratio = ratio.mul_(self.alpha)
        result = layer.transpose(ratio, w_pos, x.shape)
        del ratio, positive
        if negative is not None:
            ratio = self._ratio(grad_output, negative, presized).mul_(self.beta)
            result.sub_(layer.transpose(ratio, w_neg, x.shape))
        result.mul_(x)
        return _sum_stacked(layer, result) if signed else result


class ZPlus(AlphaBeta):
    """LRP-z⁺ (Montavon et al. 2017): :class:`AlphaBeta` with ``α = 1, β = 0``.

    For the non-negative inputs of ReLU layers, ``R_in = x ⊙ W⁺ᵀ(R / W⁺x)``: Deep Taylor
    decomposition with the root point on the segment to the origin.
    """

    def __init__(self, *, stabilizer: float = 1e-6, bias: bool = True) -> None:
        super().__init__(1.0, 0.0, stabilizer=stabilizer, bias=bias)


@dataclass
class _GammaState:
    """What :class:`Gamma` keeps: ``(W + γW⁺, W + γW⁻)``, ``x⁺`` and ``x⁻`` (None for
    non-negative inputs), the denominators ``(z + γP, z + γN)`` and the masks
    ``([z > 0], [z < 0])`` of the layer's output."""

    layer: LayerGeometry
    weights: tuple[Tensor, Tensor]
    x_pos: Tensor
    x_neg: Tensor | None
    z: tuple[Tensor, Tensor]
    masks: tuple[Tensor, Tensor]


class Gamma(LayerRule):
    """The γ rule (Montavon et al. 2019), generalised to signed inputs as in Zennit.

    Positive contributions are favoured by ``γ``: with ``z = Wx + b``, ``P = W⁺x⁺ + W⁻x⁻ + b⁺``
    (the positive part) and ``N = z − P``, units with ``z > 0`` use the weights ``W + γW⁺`` on
    ``x⁺`` (``W + γW⁻`` on ``x⁻``) and the denominator ``z + γP``; units with ``z < 0`` the
    mirrored weights and ``z + γN``. ``γ = 0`` is the z rule, ``γ → ∞`` tends to z⁺. One extra
    forward (``W⁺x⁺``) as for :class:`AlphaBeta`.

    Parameters
    ----------
    gamma:
        ``γ ≥ 0`` (0.25 is common for convolutions).
    stabilizer:
        ε of the denominators.
    bias:
        Whether the bias takes part in ``z`` and ``b⁺``, ``b⁻`` in ``P`` and ``N`` (Zennit's
        convention).
    """

    def __init__(
        self, gamma: float = 0.25, *, stabilizer: float = 1e-6, bias: bool = True
    ) -> None:
        self.gamma = check_nonnegative("gamma", gamma)
        self.stabilizer = check_nonnegative("stabilizer", stabilizer)
        self.bias = bool(bias)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = layer_of(module, self)
        x_pos, x_neg = _signed_input(x)
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        b_pos = bias.clamp(min=0) if (self.bias and bias is not None) else None
        positive = _positive_preactivation(layer, x_pos, x_neg, w_pos, w_neg, b_pos)
        full = output.detach()  # Wx + b: selects the units' sign, as in Zennit
        z = _without_bias(full, bias, layer, self.bias)
        up = (weight + self.gamma * w_pos, weight + self.gamma * w_neg)
        denominators = (z + self.gamma * positive, z + self.gamma * (z - positive))
        masks = (full > 0, full < 0)
        return _GammaState(layer, up, x_pos, x_neg, denominators, masks)

    def shares(self) -> Sequence[Share]:
        gamma = self.gamma

        def up(w: Tensor) -> Tensor:
            return w + gamma * w.clamp(min=0)

        def down(w: Tensor) -> Tensor:
            return w + gamma * w.clamp(max=0)

        bias_up = up if self.bias else None
        bias_down = down if self.bias else None
        return [
            Share((Term(_positive, up, bias_up), Term(_negative, down)),
                  units=lambda z: z > 0),
            Share((Term(_positive, down, bias_down), Term(_negative, up)),
                  units=lambda z: z < 0),
        ]

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        layer, (w_up, w_down) = state.layer, state.weights
        x_pos, x_neg, denominators, masks = state.x_pos, state.x_neg, state.z, state.masks
        shape = x_pos.shape
        ratios = [
            relevance_ratio(grad_output, denominator, self.stabilizer).mul_(mask)
            for denominator, mask in zip(denominators, masks)
        ]
        # Active units favour positive contributions (W + γW⁺ on x⁺, W + γW⁻ on x⁻),
        # inactive units negative ones (the weights swap roles).
        result = layer.transpose(ratios[0], w_up, shape)
        result = result.add_(layer.transpose(ratios[1], w_down, shape)).mul_(x_pos)
        if x_neg is not None:
            on_neg = layer.transpose(ratios[0], w_down, shape)
            on_neg = on_neg.add_(layer.transpose(ratios[1], w_up, shape)).mul_(x_neg)
            result = result.add_(on_neg)
        return result


@dataclass
class _InputFreeState:
    """What the w² and flat rules keep: the modified weight ``V``, the input's shape and the
    one-row denominator ``V·1``."""

    layer: LayerGeometry
    weight: Tensor
    shape: torch.Size
    z: Tensor


class _InputFree(LayerRule):
    """Rules that ignore the input's values: ``R_in = Vᵀ(R / V·1)`` for a weight ``V``."""

    def __init__(self, *, stabilizer: float = 1e-6) -> None:
        self.stabilizer = check_nonnegative("stabilizer", stabilizer)

    def _weight(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, _ = layer_of(module, self)
        weight = self._weight(weight)
        # The denominator does not depend on the sample: one row of ones gives it for all.
        ones = x.new_ones((1,) + tuple(x.shape[1:]))
        return _InputFreeState(layer, weight, x.shape, layer.forward(ones, weight))

    def shares(self) -> Sequence[Share]:
        return [Share((Term(_ones, self._weight),))]

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        ratio = relevance_ratio(grad_output, state.z, self.stabilizer)
        return state.layer.transpose(ratio, state.weight, state.shape)


class WSquare(_InputFree):
    """The w² rule (Montavon et al. 2017): ``R_i = Σ_j w_ij² / Σ_i' w_i'j² · R_j``.

    Deep Taylor decomposition for an unbounded input domain; the filter signal estimator gives
    this rule (method.md §4). At the zero-padded border of a convolution the sum runs over the
    inputs inside the image only (so relevance is conserved), as in Zennit; no bias.
    """

    def _weight(self, weight: Tensor) -> Tensor:
        return weight * weight


class Flat(_InputFree):
    """The flat rule (Lapuschkin et al. 2019): relevance spread evenly over the receptive field."""

    def _weight(self, weight: Tensor) -> Tensor:
        return torch.ones_like(weight)


def _bound(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    """A bound of the input domain broadcast to ``(1 or N, *x.shape[1:])``."""
    if isinstance(value, (int, float)):  # made once per dtype/device (no copy to the GPU)
        bound = constant(float(value), x.dtype, x.device)
    else:
        bound = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    try:
        if bound.dim() == x.dim():
            return bound.expand((bound.shape[0],) + tuple(x.shape[1:]))
        return bound.expand((1,) + tuple(x.shape[1:]))
    except RuntimeError as error:
        raise ValueError(
            f"{name} has shape {tuple(bound.shape)}, which does not broadcast to the layer's "
            f"input {tuple(x.shape)}; give a number or e.g. a (1, C, 1, 1) tensor per channel"
        ) from error


@dataclass
class _BoxState:
    """What :class:`ZBox` keeps: ``W``, ``W⁺``, ``W⁻``, the input, the bounds broadcast to
    it and ``z = Wx − W⁺l − W⁻h``."""

    layer: LayerGeometry
    weight: Tensor
    w_pos: Tensor
    w_neg: Tensor
    x: Tensor
    low: Tensor
    high: Tensor
    z: Tensor


class ZBox(LayerRule):
    """The z^B rule for a bounded input domain ``low ≤ x ≤ high`` (Montavon et al. 2017).

    ``z = Wx − W⁺l − W⁻h`` and ``R_in = x ⊙ Wᵀs − l ⊙ W⁺ᵀs − h ⊙ W⁻ᵀs`` with
    ``s = R / stab(z)``; the bias cancels. Meant for the first layer (pixels).

    Parameters
    ----------
    low, high:
        The smallest and largest possible input values: numbers, or tensors that broadcast to
        the input (e.g. ``(1, 3, 1, 1)`` per channel after normalisation).
    stabilizer:
        ε of the denominator.
    """

    def __init__(
        self, low: float | Tensor, high: float | Tensor, *, stabilizer: float = 1e-6
    ) -> None:
        if low is None or high is None:
            raise ValueError(
                "ZBox needs the input domain's bounds low and high (e.g. low=0, high=1 for "
                "pixels in [0, 1], or the normalised bounds per channel)"
            )
        try:
            inverted = bool((torch.as_tensor(low) > torch.as_tensor(high)).any())
        except RuntimeError as error:
            raise ValueError(
                f"low {tuple(torch.as_tensor(low).shape)} and high "
                f"{tuple(torch.as_tensor(high).shape)} do not broadcast together"
            ) from error
        if inverted:
            raise ValueError("ZBox needs low ≤ high (the input domain's bounds), got low > high")
        self.low, self.high = low, high
        self.stabilizer = check_nonnegative("stabilizer", stabilizer)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = layer_of(module, self)
        low, high = _bound(self.low, x, "low"), _bound(self.high, x, "high")
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        z = _without_bias(output.detach(), bias, layer, keep=False)
        z = z - layer.forward(low, w_pos) - layer.forward(high, w_neg)
        return _BoxState(layer, weight, w_pos, w_neg, x.detach(), low, high, z)

    def shares(self) -> Sequence[Share]:
        return [Share((
            Term(),
            Term(lambda x: _bound(self.low, x, "low"), lambda w: -w.clamp(min=0)),
            Term(lambda x: _bound(self.high, x, "high"), lambda w: -w.clamp(max=0)),
        ))]

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        layer, weight, w_pos, w_neg = state.layer, state.weight, state.w_pos, state.w_neg
        x, low, high, z = state.x, state.low, state.high, state.z
        ratio = relevance_ratio(grad_output, z, self.stabilizer)
        shape = x.shape
        result = layer.transpose(ratio, weight, shape).mul_(x)
        result = result.sub_(layer.transpose(ratio, w_pos, shape).mul_(low))
        return result.sub_(layer.transpose(ratio, w_neg, shape).mul_(high))


@dataclass
class _NormState:
    """What :class:`Norm` keeps: the module's input and its stabilised output in a box."""

    x: Tensor
    box: list


class Norm(Rule):
    """Relevance split in proportion to the inputs of a linear, weight-free module.

    ``R_in = x ⊙ J_fᵀ(R / stab(f(x)))`` — the ε rule for average pooling (and sums) as in
    Zennit's composites; the module's own ``forward`` (without hooks) gives ``J_fᵀ``.
    """

    def __init__(self, *, stabilizer: float = 1e-6) -> None:
        self.stabilizer = check_nonnegative("stabilizer", stabilizer)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        if module is None:
            raise TypeError("Norm is a rule for modules (e.g. nn.AvgPool2d), not for functions")
        # The denominator is taken now: the model may change its output in place later.
        return _NormState(x.detach(), [denominator(output.detach(), self.stabilizer, fresh=False)])

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        x = state.x
        ratio = divide(grad_output, consume(state.box), self.stabilizer)
        with torch.enable_grad():
            probe = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(module.forward(probe), probe, ratio)
        return x * grad


def _channel_view(bias: Tensor, z: Tensor, layer: LayerGeometry) -> Tensor:
    """The bias shaped to broadcast against a layer output ``z``."""
    if layer.kind == "linear":
        return bias.to(z.dtype)
    return bias.to(z.dtype).reshape((-1,) + (1,) * layer.spatial_dims)


#: Autograd nodes whose output is non-negative given a non-negative input (followed back),
#: and those whose output is non-negative whatever the input (a ReLU).
_MONOTONE_NODES = frozenset({
    "MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0", "AvgPool2DBackward0", "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0", "AdaptiveMaxPool2DBackward0",
})
_NON_NEGATIVE_NODES = frozenset({"ReluBackward0"})


def _known_non_negative(x: Tensor) -> bool:
    """True when autograd's record shows ``x`` is a ReLU's output (possibly pooled).

    The node of a tensor is that of the last operation that wrote it (an in-place change
    replaces it), so no scan over the values is needed for the inputs of most layers.
    """
    node = x.grad_fn
    while node is not None and type(node).__name__ in _MONOTONE_NODES:
        node = node.next_functions[0][0] if node.next_functions else None
    return node is not None and type(node).__name__ in _NON_NEGATIVE_NODES


def _signed_input(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(x⁺, x⁻)`` of ``x`` (detached); ``x⁻`` is None (and ``x⁺`` is ``x``, no copy) for
    non-negative inputs."""
    known = _known_non_negative(x)
    x = x.detach()
    if not known and bool(x.amin() < 0):
        return x.clamp(min=0), x.clamp(max=0)
    return x, None


def _stack_channels(layer: LayerGeometry, a: Tensor, b: Tensor) -> Tensor:
    """``[a, b]`` along the input channels, so that a weight ``cat([U, V], 1)`` gives
    ``U a + V b`` in one product (per group for grouped convolutions)."""
    if layer.kind == "linear":
        return torch.cat([a, b], -1)
    n, c, rest = a.shape[0], a.shape[1], tuple(a.shape[2:])
    g = layer.groups
    halves = [t.reshape((n, g, c // g) + rest) for t in (a, b)]
    return torch.cat(halves, 2).reshape((n, 2 * c) + rest)


def _sum_stacked(layer: LayerGeometry, t: Tensor) -> Tensor:
    """The two halves of a :func:`_stack_channels` layout added: ``t_a + t_b``."""
    if layer.kind == "linear":
        half = t.shape[-1] // 2
        return t[..., :half] + t[..., half:]
    n, c2, rest = t.shape[0], t.shape[1], tuple(t.shape[2:])
    g = layer.groups
    split = t.reshape((n, g, 2, c2 // (2 * g)) + rest)
    return (split[:, :, 0] + split[:, :, 1]).reshape((n, c2 // 2) + rest)


def _positive_preactivation(
    layer: LayerGeometry,
    x_pos: Tensor,
    x_neg: Tensor | None,
    w_pos: Tensor,
    w_neg: Tensor | None,
    b_pos: Tensor | None,
) -> Tensor:
    """``p = W⁺x⁺ + W⁻x⁻ + b⁺``: the positive contributions to each unit (one product)."""
    if x_neg is None:
        return layer.forward(x_pos, w_pos, b_pos)
    stacked = _stack_channels(layer, x_pos, x_neg)
    return layer.forward(stacked, torch.cat([w_pos, w_neg], 1), b_pos)


def _without_bias(z: Tensor, bias: Tensor | None, layer: LayerGeometry, keep: bool) -> Tensor:
    """``z`` (the layer's output), minus its bias unless ``keep``."""
    if not keep and bias is not None:
        return z - _channel_view(bias, z, layer)
    return z


#: Modules whose relevance is split by :class:`Norm` in the LRP presets (as Zennit does).
AVERAGE_POOLS: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)


