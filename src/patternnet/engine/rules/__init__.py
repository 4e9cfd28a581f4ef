"""The rules: what each kind of operation passes backward (method.md §3, §4, §7), by family.

A rule says what to remember from the forward pass and how to map the quantity arriving at an
operation's output to its input; all of them run inside the one engine of
:mod:`patternnet.engine.backward`.

==========================  ==============================================================
:mod:`.base`                the declarative base for Linear/Conv rules (:class:`LayerRule`:
                            input, weight and bias modifiers per term, shares, the reducer)
:mod:`.pattern`             :class:`WeightSwap` (PatternNet, PatternAttribution, gradient)
:mod:`.lrp`                 :class:`Epsilon`/:class:`Z`, :class:`AlphaBeta`/:class:`ZPlus`,
                            :class:`Gamma`, :class:`WSquare`, :class:`Flat`, :class:`ZBox`,
                            :class:`Norm` for average pools
:mod:`.relu`                :class:`DeconvNetReLU`, :class:`GuidedReLU`, :class:`Pass`
:mod:`.lrp_attention`       AttnLRP: :class:`AttentionLRP` (attention handler),
                            :class:`BilinearProduct` (``q kᵀ``), :class:`NormIdentity`,
                            :class:`Identity`, :class:`BiasShare`
:mod:`.sums`                :class:`ProportionalSum` (residual sums), :class:`ChannelScale`
:mod:`._numerics`           ``stab(z)``, ``R / stab(z)``, one-use buffers
==========================  ==============================================================

Writing a rule: docs/how-to-custom-rule.md.
"""

from __future__ import annotations

from ..backward import Rule
from ._numerics import relevance_ratio, stabilize
from .base import LayerRule, LayerState, Share, Term, layer_of
from .lrp import AVERAGE_POOLS, AlphaBeta, Epsilon, Flat, Gamma, Norm, WSquare, Z, ZBox, ZPlus
from .lrp_attention import (
    AttentionLRP,
    BiasShare,
    BilinearProduct,
    Identity,
    NormIdentity,
    ResidualAndBiasSum,
)
from .pattern import (
    SwapState,
    WeightSwap,
    as_dtype,
    elementwise_product,
    identity_estimator_rules,
)
from .relu import DeconvNetReLU, Gate, GuidedReLU, Pass
from .sums import ChannelScale, NodePatterns, ProportionalSum, SumState

__all__ = [
    "Rule", "LayerRule", "LayerState", "Share", "Term", "layer_of",
    "WeightSwap", "SwapState", "DeconvNetReLU", "Gate", "GuidedReLU",
    "Epsilon", "Z", "AlphaBeta", "ZPlus", "Gamma", "WSquare", "Flat", "ZBox", "Norm", "Pass",
    "AVERAGE_POOLS", "identity_estimator_rules", "stabilize", "relevance_ratio",
    "ProportionalSum", "ChannelScale", "SumState", "NodePatterns", "as_dtype",
    "elementwise_product", "AttentionLRP", "BiasShare", "BilinearProduct", "Identity",
    "NormIdentity", "ResidualAndBiasSum",
]
