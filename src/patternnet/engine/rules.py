"""The rules: what each kind of operation passes backward (method.md §3, §4, §7).

A rule is small: it says what to remember from the forward pass and how to map the quantity
arriving at an operation's output to its input. All of them run inside the one engine of
:mod:`patternnet.engine.backward`.

Linear/Conv rules
    :class:`WeightSwap` — the layer's transposed map with another weight: a pattern ``A``
    (PatternNet), ``W ⊙ A`` (PatternAttribution), or ``W`` itself (the gradient). With two
    weights it is the two-component rule: ``A₊ᵀ(g ⊙ m) + A₋ᵀ(g ⊙ (1 − m))`` with the mask
    ``m = [Wx + b > 0]`` of the forward pass.

ReLU rules
    :class:`DeconvNetReLU` (pass positive values, ignore the forward gate) and
    :class:`GuidedReLU` (forward gate and positive values). The gradient needs no rule.

LRP rules (Linear/Conv unless said otherwise)
    :class:`Epsilon` / :class:`Z`, :class:`AlphaBeta` / :class:`ZPlus`, :class:`Gamma`,
    :class:`WSquare`, :class:`Flat`, :class:`ZBox`; :class:`Norm` for average pools,
    :class:`Pass` for activations. :func:`identity_estimator_rules` is PatternAttribution's
    identity estimator.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import LayerGeometry, geometry, is_linear_layer
from .backward import Rule, addition_rules

__all__ = [
    "WeightSwap", "DeconvNetReLU", "GuidedReLU",
    "Epsilon", "Z", "AlphaBeta", "ZPlus", "Gamma", "WSquare", "Flat", "ZBox", "Norm", "Pass",
    "AVERAGE_POOLS", "identity_estimator_rules", "stabilize", "relevance_ratio",
    "ProportionalSum", "ChannelScale",
]


class WeightSwap(Rule):
    """Backward through a Linear/Conv layer with ``weight`` in place of ``W``, no bias.

    Parameters
    ----------
    module:
        The layer (its geometry: stride, padding, groups ...).
    positive:
        The weight used where the unit was active (``Wx + b > 0``), or everywhere when
        ``negative`` is None. Shaped like the layer's weight.
    negative:
        The weight used where the unit was not active (two-component rule), or None; a
        callable is called once, when first needed.
    check_inactive:
        With ``negative``: test on the way back whether any inactive unit receives something,
        and use one map when none does (e.g. a ReLU after the layer zeroed them; one
        reduction, and a host-device synchronisation on a GPU). False where inactive units are
        known to receive gradient (a layer feeding a residual sum, see
        :func:`patternnet.engine.gates.relu_gates`): the two maps without the test.
    stacked:
        ``[positive; negative]`` concatenated along the output dimension (or a callable
        giving it, called once when first needed); built here when not given. With one
        convolution group the two maps are one: ``[A₊; A₋]ᵀ [g ⊙ m; g ⊙ (1 − m)]``, which
        spares a pass and ran 10–15% faster than two maps and a sum on CPU.
    """

    def __init__(
        self,
        module: nn.Module,
        positive: Tensor,
        negative: Tensor | Callable[[], Tensor] | None = None,
        *,
        check_inactive: bool = True,
        stacked: Tensor | Callable[[], Tensor] | None = None,
    ):
        self.geometry: LayerGeometry = geometry(module)
        self.positive = positive.detach()
        # A callable negative weight is computed on first use only (in a ReLU network only the
        # layers without a ReLU after them, usually the last one, ever need it).
        self.negative = negative.detach() if isinstance(negative, Tensor) else negative
        self.check_inactive = bool(check_inactive)
        self.stacked = stacked.detach() if isinstance(stacked, Tensor) else stacked

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        if self.negative is None:
            return x.shape, None
        # The mask as 0/1 in the output's dtype: comparing into a float buffer, and later
        # multiplying by it, are plain vectorised passes (a bool mask, torch.where and
        # Tensor.any took 3-5× longer each on CPU).
        output = output.detach()
        return x.shape, torch.gt(output, 0, out=torch.empty_like(output))

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        shape, mask = state
        if mask is None:
            return self.geometry.transpose(grad_output, self.positive, shape)
        # On a CPU, a few samples at a time: buffers of a few MB stay in cache and in the
        # allocator's heap (a 50 MB buffer is mapped afresh, page by page, at every call).
        rows = grad_output.shape[0] if grad_output.dim() > 1 else 1
        size = 2 * grad_output.numel() * grad_output.element_size()
        step = rows
        if grad_output.device.type == "cpu" and size > _CHUNK_BYTES and rows > 1:
            step = max(1, rows * _CHUNK_BYTES // size)
        if step >= rows:
            return self._two_component(grad_output, mask, shape)
        parts = [
            self._two_component(
                grad_output[start : start + step],
                mask[start : start + step],
                (min(step, rows - start), *shape[1:]),
            )
            for start in range(0, rows, step)
        ]
        return torch.cat(parts)

    def _two_component(self, grad_output: Tensor, mask: Tensor, shape: Any) -> Tensor:
        """``A₊ᵀ(g ⊙ m) + A₋ᵀ(g ⊙ (1 − m))`` for one batch (or a slice of one)."""
        # g ⊙ m and g ⊙ (1 − m) (exactly g − g ⊙ m), side by side along the output channels
        dim = 1 if self.geometry.kind != "linear" else grad_output.dim() - 1
        stacked_shape = list(grad_output.shape)
        channels = stacked_shape[dim]
        stacked_shape[dim] *= 2
        both = grad_output.new_empty(stacked_shape)
        active = torch.mul(grad_output, mask, out=both.narrow(dim, 0, channels))
        inactive = torch.sub(grad_output, active, out=both.narrow(dim, channels, channels))
        # In a ReLU network the gate already zeroed the inactive units: one map.
        if self.check_inactive and not _any_nonzero(inactive):
            return self.geometry.transpose(grad_output, self.positive, shape)
        if callable(self.negative):
            self.negative = self.negative().detach()
        if self.geometry.groups != 1:  # grouped outputs: [A₊; A₋] would mix the groups
            result = self.geometry.transpose(active, self.positive, shape)
            result += self.geometry.transpose(inactive, self.negative, shape)
            return result
        if self.stacked is None:
            self.stacked = torch.cat([self.positive, self.negative])
        elif callable(self.stacked):
            self.stacked = self.stacked().detach()
        return self.geometry.transpose(both, self.stacked, shape)


#: Largest buffer of stacked ``[g ⊙ m; g ⊙ (1 − m)]`` formed at once on a CPU (bytes).
_CHUNK_BYTES = 16 * 2**20


def _any_nonzero(values: Tensor) -> bool:
    """Whether any entry is non-zero (or NaN): one vectorised min/max pass."""
    if values.numel() == 0:
        return False
    low, high = torch.aminmax(values)
    return bool((low != 0) | (high != 0))


class DeconvNetReLU(Rule):
    """DeConvNet (Zeiler & Fergus 2014): ReLU passes ``max(g, 0)``, whatever the input was."""

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output.clamp(min=0)


class GuidedReLU(Rule):
    """Guided BackProp (Springenberg et al. 2015): ``g · [x > 0] · [g > 0]``."""

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        return x > 0

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output.clamp(min=0) * state


def as_dtype(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` on ``like``'s device and dtype (patterns are stored apart from the model)."""
    return tensor.detach().to(device=like.device, dtype=like.dtype)


def elementwise_product(weight: Tensor, pattern: Tensor) -> Tensor:
    """``W ⊙ A`` — the PatternAttribution weight (method.md §4)."""
    return weight.detach() * as_dtype(pattern, weight)




# ------------------------------------------------------------------------------ LRP rules
#
# Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2017, 2019). Each rule
# maps the relevance ``R`` at a layer's output to its input as
#
#     R_in = Σ_k  x_k ⊙ W_kᵀ (R / stab(z))          z = Σ_k W_k x_k (+ b_k)
#
# with its own modified inputs ``x_k`` and weights ``W_k`` (e.g. ``x⁺, W⁺`` for z⁺). The rules
# hold only their hyper-parameters: the layer's weight, bias and geometry are read from the
# module during the forward pass (inside a canonical form, i.e. BatchNorm already folded), so
# one rule object may serve many layers. ``stab(z) = z + ε·sign(z)`` with sign(0) = +1, the
# convention Zennit uses; ``ε = 0`` means a plain division where units with ``z = 0`` pass no
# relevance.
#
# Cost (perf/README.md): what a rule needs of the layer's output is taken in the forward
# pass (the model may overwrite the output in place later, as ``out += identity`` does); what
# needs only the input (z⁺'s ``W⁺x``) is formed on the way back, so that no layer holds it until
# then; ratios are divided into the rule's own buffers and products multiplied in place, so
# the saved values serve one backward pass (a second one is refused, not silently wrong).


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + ε·sign(z)`` with ``sign(0) = +1``, so that no denominator is zero."""
    # z + 0.0 turns −0.0 into +0.0, so copysign gives +ε for both zeros; written into one
    # buffer this is ~4× faster than torch.where with scalar operands.
    shifted = z + 0.0
    torch.copysign(_constant(epsilon, z.dtype, z.device), shifted, out=shifted)
    return shifted.add_(z)


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor holding ``value``, made once per dtype and device.

    Made anew at every call it is a copy from the host to the GPU, which waits for the GPU
    (one synchronisation per stabilised layer and residual sum: 19 per ResNet-50 explanation).
    """
    return torch.tensor(value, dtype=dtype, device=device)


def relevance_ratio(relevance: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """``R / stab(z)``; for ``ε = 0`` units with ``z = 0`` pass nothing (no NaN)."""
    if epsilon:
        denominator = stabilize(z, epsilon)
        if denominator.shape != relevance.shape:  # a per-layer denominator (w², flat)
            return relevance / denominator
        return torch.div(relevance, denominator, out=denominator)
    return (relevance / z).masked_fill_(z == 0, 0.0)


def _denominator(z: Tensor, epsilon: float, *, fresh: bool) -> Tensor:
    """``stab(z)`` (``z`` itself for ``ε = 0``) as a tensor of the rule's own, taken in the
    forward pass; ``fresh`` says ``z`` is already one (not the module's output)."""
    if epsilon:
        return stabilize(z, epsilon)
    return z if fresh else z.clone()


def _divide(relevance: Tensor, denominator: Tensor, epsilon: float) -> Tensor:
    """``R / denominator`` written into the denominator (from :func:`_denominator`); for
    ``ε = 0`` units with ``z = 0`` pass nothing, as in :func:`relevance_ratio`."""
    if epsilon:
        return torch.div(relevance, denominator, out=denominator)
    return torch.div(relevance, denominator).masked_fill_(denominator == 0, 0.0)


def _consume(box: list) -> Any:
    """Take what a rule saved for one backward pass (it is then overwritten in place).

    LRP rules divide into the denominators they computed in the forward pass instead of
    allocating new tensors; a second backward pass through the same forward pass
    (``retain_graph=True``) would read overwritten values, so it is refused.
    """
    if not box:
        raise RuntimeError(
            "this LRP rule's forward values were already used by a backward pass and are "
            "overwritten; run the forward pass again for each backward pass (retain_graph is "
            "not supported by LRP rules)"
        )
    return box.pop()


def _layer(module: nn.Module | None, rule: Rule) -> tuple[LayerGeometry, Tensor, Tensor | None]:
    """Geometry, weight and bias of the Linear/Conv layer a rule is applied to."""
    if module is None or not is_linear_layer(module):
        where = "a function" if module is None else type(module).__name__
        raise TypeError(
            f"{type(rule).__name__} is a rule for Linear/Conv layers and was applied to {where}; "
            "put it on nn.Linear/nn.Conv1d/2d/3d modules only"
        )
    bias = module.bias.detach() if module.bias is not None else None
    return geometry(module), module.weight.detach(), bias


def _check_epsilon(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{name} must be a number ≥ 0, got {value!r}")
    return value


class Epsilon(Rule):
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
        self.epsilon = _check_epsilon("epsilon", epsilon)
        self.bias = bool(bias)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = _layer(module, self)
        output = output.detach()
        z = _without_bias(output, bias, layer, self.bias)
        return layer, weight, x.detach(), [_denominator(z, self.epsilon, fresh=z is not output)]

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        layer, weight, x, box = state
        ratio = _divide(grad_output, _consume(box), self.epsilon)
        return layer.transpose(ratio, weight, x.shape).mul_(x)


class Z(Epsilon):
    """LRP-0, the z rule: :class:`Epsilon` with ``ε = 0`` (gradient × input for bias-free nets).

    The identity signal estimator gives exactly this rule (method.md §4).
    """

    def __init__(self, *, bias: bool = True) -> None:
        super().__init__(0.0, bias=bias)


class AlphaBeta(Rule):
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
        self.stabilizer = _check_epsilon("stabilizer", stabilizer)
        self.bias = bool(bias)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = _layer(module, self)
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
            return layer, weight, x_in, x_in._version, [(b_pos, None)], presized, signed
        w_in = self._weights(weight, signed)
        positive = layer.forward(x_in, w_in[0], b_pos)
        negative = _without_bias(output.detach(), bias, layer, self.bias) - positive
        return layer, w_in, x_in, x_in._version, [(positive, negative)], presized, signed

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
        layer, weights, x, version, box, presized, signed = state
        positive, negative = _consume(box)
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


class Gamma(Rule):
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
        self.gamma = _check_epsilon("gamma", gamma)
        self.stabilizer = _check_epsilon("stabilizer", stabilizer)
        self.bias = bool(bias)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = _layer(module, self)
        x_pos, x_neg = _signed_input(x)
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        b_pos = bias.clamp(min=0) if (self.bias and bias is not None) else None
        positive = _positive_preactivation(layer, x_pos, x_neg, w_pos, w_neg, b_pos)
        full = output.detach()  # Wx + b: selects the units' sign, as in Zennit
        z = _without_bias(full, bias, layer, self.bias)
        up = (weight + self.gamma * w_pos, weight + self.gamma * w_neg)
        denominators = (z + self.gamma * positive, z + self.gamma * (z - positive))
        masks = (full > 0, full < 0)
        return layer, up, (x_pos, x_neg), denominators, masks

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        layer, (w_up, w_down), (x_pos, x_neg), denominators, masks = state
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


class _InputFree(Rule):
    """Rules that ignore the input's values: ``R_in = Vᵀ(R / V·1)`` for a weight ``V``."""

    def __init__(self, *, stabilizer: float = 1e-6) -> None:
        self.stabilizer = _check_epsilon("stabilizer", stabilizer)

    def _weight(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, _ = _layer(module, self)
        weight = self._weight(weight)
        # The denominator does not depend on the sample: one row of ones gives it for all.
        ones = x.new_ones((1,) + tuple(x.shape[1:]))
        return layer, weight, x.shape, layer.forward(ones, weight)

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        layer, weight, shape, z = state
        return layer.transpose(relevance_ratio(grad_output, z, self.stabilizer), weight, shape)


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
        bound = _constant(float(value), x.dtype, x.device)
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


class ZBox(Rule):
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
        self.stabilizer = _check_epsilon("stabilizer", stabilizer)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = _layer(module, self)
        low, high = _bound(self.low, x, "low"), _bound(self.high, x, "high")
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        z = _without_bias(output.detach(), bias, layer, keep=False)
        z = z - layer.forward(low, w_pos) - layer.forward(high, w_neg)
        return layer, (weight, w_pos, w_neg), (x.detach(), low, high), z

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        layer, (weight, w_pos, w_neg), (x, low, high), z = state
        ratio = relevance_ratio(grad_output, z, self.stabilizer)
        shape = x.shape
        result = layer.transpose(ratio, weight, shape).mul_(x)
        result = result.sub_(layer.transpose(ratio, w_pos, shape).mul_(low))
        return result.sub_(layer.transpose(ratio, w_neg, shape).mul_(high))


class Norm(Rule):
    """Relevance split in proportion to the inputs of a linear, weight-free module.

    ``R_in = x ⊙ J_fᵀ(R / stab(f(x)))`` — the ε rule for average pooling (and sums) as in
    Zennit's composites; the module's own ``forward`` (without hooks) gives ``J_fᵀ``.
    """

    def __init__(self, *, stabilizer: float = 1e-6) -> None:
        self.stabilizer = _check_epsilon("stabilizer", stabilizer)

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        if module is None:
            raise TypeError("Norm is a rule for modules (e.g. nn.AvgPool2d), not for functions")
        # The denominator is taken now: the model may change its output in place later.
        return x.detach(), [_denominator(output.detach(), self.stabilizer, fresh=False)]

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        x, box = state
        ratio = _divide(grad_output, _consume(box), self.stabilizer)
        with torch.enable_grad():
            probe = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(module.forward(probe), probe, ratio)
        return x * grad


class Pass(Rule):
    """Pass what arrives unchanged (LRP through an activation, ignoring its gate, as Zennit)."""

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output


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


def identity_estimator_rules(
    model: nn.Module, canonical: Any = None
) -> tuple[dict[nn.Module, Rule], dict[Any, Rule]]:
    """PatternAttribution with the identity estimator ``S_x(x) = x``: LRP-z (method.md §4).

    The z rule on every Linear/Conv layer, :class:`Norm` on average pools and
    :class:`ProportionalSum` on residual sums, all without stabiliser, so that for ReLU
    networks the result is gradient × input (Ancona et al. 2018), ResNets included.

    Parameters
    ----------
    model:
        The borrowed model.
    canonical:
        Its canonical form (unused: the rules read the canonical weights during the forward
        pass).
    """
    z, norm = Z(), Norm(stabilizer=0.0)
    rules: dict[nn.Module, Rule] = {}
    for module in model.modules():
        if is_linear_layer(module):
            rules[module] = z
        elif isinstance(module, AVERAGE_POOLS):
            rules[module] = norm
    return rules, addition_rules(ProportionalSum(stabilizer=0.0))


# ------------------------------------------------------------------------ additions


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
        self.stabilizer = _check_epsilon("stabilizer", stabilizer)
        self.absolute = bool(absolute)

    def save(self, module: nn.Module | None, x: Any, output: Tensor) -> Any:
        # References only (no work in the forward pass), with their in-place version counters:
        # the summands' absolute values are formed on the way back, in buffers that then
        # become the results.
        a, b = x
        if self.absolute:  # the sum itself is not needed: do not keep it alive
            return a, b, None, (a._version, b._version, None)
        return a, b, output, (a._version, b._version, output._version)

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Any:
        a, b, z, versions = state
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
