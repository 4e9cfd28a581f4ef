"""The declarative base for relevance rules on Linear/Conv layers: write a rule as data.

Every LRP rule of a Linear/Conv layer (and PatternAttribution's identity and filter
estimators, method.md §4) has one shape. With ``R`` the relevance at the layer's output,

.. math::

    R_\\text{in} = \\sum_s c_s \\sum_{k \\in s} x_k \\odot W_k^\\top
                   \\frac{m_s \\odot R}{\\operatorname{stab}(z_s)},
    \\qquad z_s = \\sum_{k \\in s} (W_k x_k + b_k)

A rule says, per **share** ``s`` (a :class:`Share`): its **terms** (a :class:`Term` each:
an *input modifier* ``x → x_k``, a *weight modifier* ``W → W_k`` and a *bias modifier*
``b → b_k``), its coefficient ``c_s`` and, optionally, the units it covers ``m_s`` (a
0/1 mask computed from the layer's output ``Wx + b``); the *reducer* is the sum above.
``stab(z) = z + ε·sign(z)`` (:func:`~patternnet.engine.rules._numerics.stabilize`).

=============  ======================================================================
ε rule         one share, one term ``(x, W, b)``
z⁺ / αβ        ``α · [(x⁺, W⁺, b⁺), (x⁻, W⁻)]`` and ``−β · [(x⁺, W⁻, b⁻), (x⁻, W⁺)]``
γ              ``(x⁺, W + γW⁺), (x⁻, W + γW⁻)`` on units with ``z > 0``, mirrored on ``z < 0``
w² / flat      input modifier ``x → 1``, weight ``W²`` / ``1``
z^B            ``(x, W), (l, −W⁺), (h, −W⁻)`` for bounds ``l ≤ x ≤ h``
=============  ======================================================================

Subclass :class:`LayerRule` and return the shares from :meth:`LayerRule.shares`: that is
the whole rule (see docs/how-to-custom-rule.md). The generic :meth:`LayerRule.save` and
:meth:`LayerRule.backward` run it with one transposed map per term, which is clear but not
fast; the rules shipped in :mod:`patternnet.engine.rules.lrp` override them with fused code
(fewer products, buffers reused in place) and are tested against their own declarative
form (:meth:`LayerRule.declarative`) in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...layers import LayerGeometry, geometry, is_linear_layer
from ..backward import Rule
from ._numerics import check_nonnegative, relevance_ratio

__all__ = ["LayerRule", "LayerState", "Share", "Term", "layer_of"]


def _same(value: Tensor) -> Tensor:
    return value


@dataclass(frozen=True)
class Term:
    """One product ``W_k x_k + b_k`` of a :class:`Share`.

    Attributes
    ----------
    input:
        The input modifier ``x → x_k`` (e.g. ``lambda x: x.clamp(min=0)``); its result must
        broadcast against ``x``.
    weight:
        The weight modifier ``W → W_k``.
    bias:
        The bias modifier ``b → b_k``, or None when this term has no bias (layers without a
        bias never have one).
    """

    input: Callable[[Tensor], Tensor] = _same
    weight: Callable[[Tensor], Tensor] = _same
    bias: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class Share:
    """A group of terms that share one denominator ``z_s`` (see the module docstring).

    Attributes
    ----------
    terms:
        The terms ``(x_k, W_k, b_k)``.
    scale:
        The coefficient ``c_s`` (``α``, ``−β`` ...).
    units:
        Optional: the layer's output ``Wx + b`` → a 0/1 mask of the units this share covers
        (e.g. ``lambda z: z > 0``); None covers every unit.
    """

    terms: tuple[Term, ...]
    scale: float = 1.0
    units: Callable[[Tensor], Tensor] | None = None


@dataclass
class LayerState:
    """What :meth:`LayerRule.save` keeps for the backward pass (the generic form)."""

    layer: LayerGeometry
    weight: Tensor
    bias: Tensor | None
    x: Tensor
    output: Tensor


def layer_of(module: nn.Module | None, rule: Rule) -> tuple[LayerGeometry, Tensor, Tensor | None]:
    """Geometry, weight and bias (detached) of the Linear/Conv layer ``rule`` is applied to.

    The weight and bias are read from the module during the forward pass, so inside a
    canonical form they are the folded ones (BatchNorm already merged).

    Raises
    ------
    TypeError
        ``module`` is a function or not a Linear/Conv layer (the message names the rule).
    """
    if module is None or not is_linear_layer(module):
        where = "a function" if module is None else type(module).__name__
        raise TypeError(
            f"{type(rule).__name__} is a rule for Linear/Conv layers and was applied to {where}; "
            "put it on nn.Linear/nn.Conv1d/2d/3d modules only"
        )
    bias = module.bias.detach() if module.bias is not None else None
    return geometry(module), module.weight.detach(), bias


class LayerRule(Rule):
    """A relevance rule for Linear/Conv layers, written as data (see the module docstring).

    Subclasses set :attr:`stabilizer` (usually in ``__init__``) and implement
    :meth:`shares`. One rule object may serve many layers: the layer's weight, bias and
    geometry are read from the module in the forward pass.

    Attributes
    ----------
    stabilizer:
        ε of ``stab(z) = z + ε·sign(z)``; 0 divides plainly, and units with ``z = 0`` pass
        nothing.

    Examples
    --------
    The ε rule in full:

    >>> class MyEpsilon(LayerRule):
    ...     def __init__(self, epsilon=1e-6):
    ...         self.stabilizer = epsilon
    ...     def shares(self):
    ...         return [Share((Term(bias=lambda b: b),))]
    """

    stabilizer: float = 1e-6

    def shares(self) -> Sequence[Share]:
        """The rule as data: its shares (see :class:`Share`, :class:`Term`)."""
        raise NotImplementedError(f"{type(self).__name__} must define shares()")

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        layer, weight, bias = layer_of(module, self)
        # The output is copied: the model may overwrite it in place later (out += identity).
        return LayerState(layer, weight, bias, x.detach(), output.detach().clone())

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        layer, x = state.layer, state.x
        result = torch.zeros_like(x)
        epsilon = check_nonnegative("stabilizer", self.stabilizer)
        for share in self.shares():
            inputs, weights, z = [], [], None
            for term in share.terms:
                x_k, w_k = term.input(x), term.weight(state.weight)
                b_k = None
                if term.bias is not None and state.bias is not None:
                    b_k = term.bias(state.bias)
                product = layer.forward(x_k, w_k, b_k)
                z = product if z is None else z + product
                inputs.append(x_k)
                weights.append(w_k)
            if z is None:
                continue
            ratio = relevance_ratio(grad_output, z.expand_as(grad_output), epsilon)
            if share.units is not None:
                ratio = ratio * share.units(state.output).to(ratio.dtype)
            for x_k, w_k in zip(inputs, weights):
                result = result + share.scale * x_k * layer.transpose(ratio, w_k, x.shape)
        return result

    def declarative(self) -> LayerRule:
        """This rule run by the generic :class:`LayerRule` code (the reference for tests)."""
        return _Declarative(self)


class _Declarative(LayerRule):
    """A rule's shares run by the generic code, whatever its own save/backward do."""

    def __init__(self, rule: LayerRule) -> None:
        self.rule = rule
        self.stabilizer = rule.stabilizer

    def shares(self) -> Sequence[Share]:
        return self.rule.shares()

    def __repr__(self) -> str:
        return f"declarative({self.rule!r})"
