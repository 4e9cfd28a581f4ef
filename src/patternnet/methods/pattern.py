"""PatternNet and PatternAttribution (Kindermans et al. 2018, method.md §3-§4).

Both are the gradient of the selected logit with every Linear/Conv weight swapped on the way
back, starting from the logit's value ``y_c``:

- PatternNet (the signal): ``W → A`` — the two-component rule ``A₊`` where the unit was active
  and ``A₋`` where it was not (``a`` for the linear estimator, ``w/wᵀw`` for the filter one);
- PatternAttribution (the contribution): ``W → W ⊙ A₊``; for a linear model exactly
  ``w ⊙ a · y``, and relevance is conserved per neuron since ``wᵀa = 1``.

ReLU gates and max-pool switches are the gradient's (no rule needed). Residual sums, average
pools and means are neurons with fixed weights and fitted patterns
(:class:`patternnet.engine.rules.NodePatterns`, method.md §10): PatternNet passes ``p·s``,
PatternAttribution ``(w ⊙ p)·r``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.attention import AttentionHandler
from ..engine.backward import Rule, smooth_gate_rules
from ..engine.canonize import Canonical, Canonizer
from ..engine.gates import RELU, SUM, gated_nodes, relu_gates
from ..engine.graph import ModelGraph
from ..engine.rules import (
    Gate,
    NodePatterns,
    WeightSwap,
    as_dtype,
    elementwise_product,
    identity_estimator_rules,
)
from ..engine.rules.attention import AttentionPatterns
from ..engine.rules.scale import cached_consistency_scale
from ..engine.support import layer_scale_rules, norm_rules, standalone_batchnorm_rules
from ..patterns.estimators import filter_pattern
from ..patterns.fit import linear_layers
from ..patterns.store import Patterns
from .base import Attribution
from .registry import register

__all__ = ["PatternNet", "PatternAttribution"]


def _pattern_pair(patterns: Patterns, name: str) -> tuple[Tensor, Tensor | None]:
    tensors = patterns[name]
    if "a_plus" in tensors:
        return tensors["a_plus"], tensors.get("a_minus")
    if "a" in tensors:
        return tensors["a"], None
    raise ValueError(
        f"patterns for layer {name!r} hold {sorted(tensors)}; PatternNet needs 'a' or 'a_plus'"
    )


#: What GELU and SiLU pass backward in the pattern methods (method.md §10, measured there):
#: ``"derivative"`` (default) the gradient's ``g·f′(z)`` with the linear pattern of the layer
#: feeding them; ``"gate"`` ``g·[z > 0]`` with that layer's two-component patterns, as for a
#: ReLU (it recovered the ground-truth signal worse on every benchmark measured).
SMOOTH_RULES = ("gate", "derivative")


class _PatternMethod(Attribution):
    _attribution = False
    #: ReLUs pass the gradient's gate backward (no ReLU rule is installed), so layers read
    #: only by ReLUs never need a₋. A subclass that installs a ReLU rule must set it False.
    _gradient_relus = True

    def __init__(
        self,
        model: nn.Module,
        patterns: Patterns | None = None,
        *,
        estimator: str | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        output_selector: Callable[[Any], Tensor] | None = None,
        smooth: str = "derivative",
    ) -> None:
        super().__init__(model, canonizers=canonizers, output_selector=output_selector)
        if smooth not in SMOOTH_RULES:
            raise ValueError(
                f"smooth must be one of {', '.join(map(repr, SMOOTH_RULES))}, not {smooth!r}"
            )
        self.smooth = smooth
        if patterns is not None and not isinstance(patterns, Patterns):
            raise TypeError(
                f"patterns must be a Patterns object, not {type(patterns).__name__}: fit them "
                "with patternnet.fit_patterns(model, data) or read a file with "
                "Patterns.load(path, model=model)"
            )
        if estimator is None:
            if patterns is None:
                raise ValueError(
                    f"{type(self).__name__} needs patterns: fit them with "
                    "patternnet.fit_patterns(model, data) or load them with Patterns.load(path)"
                )
            estimator = patterns.estimator
        if estimator not in ("two_component", "linear", "filter", "identity"):
            raise ValueError(
                f"unknown estimator {estimator!r}; choose 'two_component', 'linear', 'filter' "
                "or 'identity'"
            )
        if estimator in ("two_component", "linear"):
            if patterns is None:
                raise ValueError(f"estimator {estimator!r} needs fitted patterns")
            if patterns.estimator != estimator:
                raise ValueError(
                    f"the patterns were fitted with estimator {patterns.estimator!r}, not "
                    f"{estimator!r}"
                )
            patterns.check(model)
        self.patterns = patterns
        self.estimator = estimator
        self._swap_cache: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._stacked_cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def refresh(self) -> _PatternMethod:
        """See :meth:`Attribution.refresh`; also forgets the swapped weights (``W ⊙ A``)."""
        super().refresh()
        self._swap_cache.clear()
        self._stacked_cache.clear()
        return self

    def _layer_patterns(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.estimator == "filter":
            a, _ = filter_pattern(weight)
            return a.reshape(weight.shape), None
        assert self.patterns is not None
        tensors = self.patterns[name]
        if self.smooth == "derivative" and "a" in tensors and "a_plus" in tensors:
            return tensors["a"], None  # a layer feeding GELU/SiLU: its linear pattern
        positive, negative = _pattern_pair(self.patterns, name)
        return positive, negative

    def _swap(self, weight: Tensor, pattern: Tensor) -> Tensor:
        raise NotImplementedError

    def _cached_swap(self, name: str, side: str, weight: Tensor, pattern: Tensor) -> Tensor:
        """``_swap(weight, pattern)``, reused across calls while neither tensor changes.

        The cache holds the very tensors it was computed from and their in-place version
        counters: a weight updated in place (training) or replaced gives a new swapped weight.
        Folded weights (BatchNorm folded in) are the same tensors across calls while the
        model is unchanged: the method's canonizers reuse them (``BatchNormFolding``).
        """
        cached = self._swap_cache.get((name, side))
        if (
            cached is not None
            and cached[0] is weight
            and cached[1] is pattern
            and cached[2] == (weight._version, pattern._version)
        ):
            return cached[3]
        swapped = self._swap(weight, pattern)
        versions = (weight._version, pattern._version)
        self._swap_cache[(name, side)] = (weight, pattern, versions, swapped)
        return swapped

    def _stacked_swap(
        self, name: str, weight: Tensor, positive: Tensor, negative: Tensor
    ) -> Tensor:
        """``[swap(A₊); swap(A₋)]`` along the output dimension, reused like the swaps."""
        plus = self._cached_swap(name, "plus", weight, positive)
        minus = self._cached_swap(name, "minus", weight, negative)
        cached = self._stacked_cache.get(name)
        if cached is not None and cached[0] is plus and cached[1] is minus:
            return cached[2]
        stacked = torch.cat([plus, minus])
        self._stacked_cache[name] = (plus, minus, stacked)
        return stacked

    def rules(
        self, canonical: Canonical
    ) -> tuple[dict[nn.Module, Rule], dict[Callable[..., Any], Rule]]:
        module_rules: dict[nn.Module, Rule] = {}
        # Layers read only by ReLUs: the gate zeroes what reaches their inactive units, so
        # the a₋ map is always zero there and no mask is needed (see engine.gates).
        gates = relu_gates(self.model, canonical.form.bypass) if self._gradient_relus else {}
        for name, module in linear_layers(self.model).items():
            # not detached: the swap cache recognises the same parameter object across calls
            weight = canonical.weight(name)
            positive, negative = self._layer_patterns(name, weight)
            if gates.get(name) == RELU:
                negative = None
            module_rules[module] = WeightSwap(
                module,
                self._cached_swap(name, "plus", weight, positive),
                # computed only if some inactive unit receives a gradient (see WeightSwap)
                None
                if negative is None
                else partial(self._cached_swap, name, "minus", weight, negative),
                # a layer feeding a residual sum: its inactive units receive gradient
                check_inactive=gates.get(name) != SUM,
                stacked=None
                if negative is None
                else partial(self._stacked_swap, name, weight, positive, negative),
            )
        # BatchNorms that follow no Linear/Conv are per-channel linear units with pattern 1/s.
        module_rules.update(
            standalone_batchnorm_rules(self.model, canonical, attribution=self._attribution)
        )
        # LayerNorm/GroupNorm: per-element units γ/σ with 1/σ held, pattern σ/γ (method.md §10).
        module_rules.update(norm_rules(self.model, attribution=self._attribution))
        # ConvNeXt's layer scale s * x: per-element units with fixed weight s, pattern 1/s.
        function_rules = dict(layer_scale_rules(self.model, attribution=self._attribution))
        if self.smooth == "gate":  # GELU/SiLU pass g·[z > 0], as a ReLU (method.md §10)
            function_rules.update(smooth_gate_rules(Gate()))
        return module_rules, function_rules

    def graph_context(self, canonical: Canonical) -> Any:
        """Sums, average pools and means pass their patterns back (method.md §10)."""
        # Nodes read only by ReLUs (a ResNet's sums): their inactive units receive nothing,
        # so no mask and no p₋ (as for the layers of engine.gates).
        gated = gated_nodes(self.model, canonical.form.bypass) if self._gradient_relus else ()
        return NodePatterns(
            self.patterns, self.estimator, attribution=self._attribution, gated=gated
        ).tracker(ModelGraph.of(self.model).linear_nodes())

    def attention_handler(self, canonical: Canonical) -> AttentionHandler:
        """Attention's weighted sum passes its fitted pattern, probabilities held (§12):
        PatternNet the joint pattern, PatternAttribution the per-query one (each chosen by
        ground truth, method.md §12)."""
        return AttentionPatterns(self.patterns, self.estimator, attribution=self._attribution,
                                 joint=not self._attribution)  # fmt: skip

    def start(self, logits: Tensor, target: Tensor) -> Tensor:
        """Start from the selected logit's value ``y_c`` (zeros elsewhere)."""
        start = logits.new_zeros(logits.shape)
        start.scatter_(1, target[:, None], logits.gather(1, target[:, None]))
        return start


@register("pattern_net")
class PatternNet(_PatternMethod):
    """PatternNet: the signal ``s`` the network detects for a class (method.md §3).

    Parameters
    ----------
    model:
        The classifier (borrowed, never changed).
    patterns:
        From :func:`patternnet.fit_patterns` or :meth:`Patterns.load`, fitted on ``model``.
    estimator:
        Defaults to the patterns' estimator; ``"filter"`` needs no patterns (``a = w/wᵀw``).
    smooth:
        GELU and SiLU: ``"derivative"`` (default) passes the gradient's ``g·f′(z)`` and uses
        the linear pattern of the layer feeding them; ``"gate"`` passes ``g·[z > 0]`` and
        uses that layer's two-component patterns, as for a ReLU (a two-component fit stores
        both; method.md §10 has the measurements that chose the default).
    rescale:
        Multiply each layer's patterns by its consistency scale
        ``c = tr(W Aᵀ) / ‖W Aᵀ‖²_F`` (:func:`patternnet.engine.rules.scale.consistency_scale`),
        the scalar that brings ``W (c Aᵀ s)`` closest to ``s``. Without it the signal grows
        by the units' shared signal at every layer: 10⁵–10⁶ per block of a ViT, past
        float32's range after about seven blocks. ``None`` (default): on when the patterns
        hold attention nodes (chosen there by ground truth, method.md §12), off otherwise
        (CNNs keep the paper's and iNNvestigate's result exactly).
    canonizers, output_selector:
        See :class:`~patternnet.methods.base.Attribution`.

    Examples
    --------
    >>> signal = PatternNet(model, patterns).attribute(images, target=None)  # doctest: +SKIP
    >>> signal.shape == images.shape                                        # doctest: +SKIP

    References
    ----------
    Kindermans et al., "Learning how to explain neural networks: PatternNet and
    PatternAttribution", ICLR 2018, Sec. 4.
    """

    kind = "signal"
    needs_patterns = True
    description = "PatternNet: the signal, backward with the patterns (option patterns)"
    references = (
        "Kindermans et al., Learning how to explain neural networks: PatternNet and "
        "PatternAttribution, ICLR 2018",
    )

    def __init__(
        self,
        model: nn.Module,
        patterns: Patterns | None = None,
        *,
        rescale: bool | None = None,
        **options: Any,
    ):
        super().__init__(model, patterns, **options)
        if self.estimator == "identity":
            raise ValueError(
                "PatternNet needs a pattern; the identity estimator has none (its attribution "
                "is LRP-z: use PatternAttribution(..., estimator='identity'))"
            )
        if rescale is None:
            nodes = getattr(patterns, "nodes", None) or {}
            rescale = any(name.startswith("attention#") for name in nodes)
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be True, False or None, not {rescale!r}")
        self.rescale = rescale
        self._scaled: dict[str, tuple[Any, ...]] = {}

    def refresh(self) -> PatternNet:
        """See :meth:`Attribution.refresh`; also forgets the rescaled patterns."""
        super().refresh()
        self._scaled.clear()
        return self

    def _layer_patterns(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        positive, negative = super()._layer_patterns(name, weight)
        if not self.rescale:
            return positive, negative
        # One factor per layer (per projection of Q/K/V), from the pattern used where the
        # unit is active, for both sides: the direction of every unit's pattern is kept.
        versions = (weight._version, positive._version)
        cached = self._scaled.get(name)
        if (cached is not None and cached[0] is weight and cached[1] is positive
                and cached[2] is negative and cached[3] == versions):  # fmt: skip
            return cached[4], cached[5]
        module = linear_layers(self.model)[name]
        projection = name == "in_proj" or name.endswith(".in_proj")
        factor = cached_consistency_scale(module, weight, positive,
                                          blocks=3 if projection else 1)  # fmt: skip
        shape = (-1,) + (1,) * (positive.dim() - 1)
        scaled = positive * factor.reshape(shape).to(positive)
        scaled_negative = (
            None if negative is None else negative * factor.reshape(shape).to(negative)
        )
        self._scaled[name] = (weight, positive, negative, versions, scaled, scaled_negative)
        return scaled, scaled_negative

    def _swap(self, weight: Tensor, pattern: Tensor) -> Tensor:
        return as_dtype(pattern, weight)


@register("pattern_attribution")
class PatternAttribution(_PatternMethod):
    """PatternAttribution: each input's contribution to the class's logit (method.md §4).

    The backward pass of PatternNet with ``W ⊙ A`` in place of ``W``: Deep Taylor
    decomposition with the learned root point ``x₀ = x − a₊ wᵀx``. The ``estimator`` option
    selects the estimator view of §4: ``"two_component"`` (PatternAttribution), ``"linear"``
    (linear PatternAttribution), ``"filter"`` (the w² rule), ``"identity"`` (LRP-z).

    Parameters
    ----------
    model:
        The classifier (borrowed, never changed).
    patterns:
        Fitted patterns (not needed for ``"filter"`` and ``"identity"``).
    estimator:
        Defaults to the patterns' estimator.
    smooth:
        GELU and SiLU: ``"derivative"`` (default) passes the gradient's ``g·f′(z)`` and uses
        the linear pattern of the layer feeding them; ``"gate"`` passes ``g·[z > 0]`` and
        uses that layer's two-component patterns, as for a ReLU (a two-component fit stores
        both; method.md §10 has the measurements that chose the default).
    canonizers, output_selector:
        See :class:`~patternnet.methods.base.Attribution`.

    References
    ----------
    Kindermans et al., ICLR 2018, Sec. 4; Montavon et al., "Explaining nonlinear
    classification decisions with deep Taylor decomposition", Pattern Recognition 2017.
    """

    needs_patterns = True
    description = (
        "PatternAttribution: contributions, backward with W ⊙ A (options patterns, estimator)"
    )
    references = PatternNet.references + (
        "Montavon et al., Explaining nonlinear classification decisions with deep Taylor "
        "decomposition, Pattern Recognition 2017",
    )
    _attribution = True

    def _swap(self, weight: Tensor, pattern: Tensor) -> Tensor:
        return elementwise_product(weight, pattern)

    def rules(
        self, canonical: Canonical
    ) -> tuple[dict[nn.Module, Rule], dict[Callable[..., Any], Rule]]:
        if self.estimator == "identity":
            return identity_estimator_rules(self.model, canonical)
        # Residual sums, average pools and means pass (w ⊙ p)·r (graph_context): for a sum
        # p_i·r, conserving since Σᵢ p_i = 1.
        return super().rules(canonical)

    def graph_context(self, canonical: Canonical) -> Any:
        if self.estimator == "identity":  # LRP-z: its own sum and pool rules
            return super(_PatternMethod, self).graph_context(canonical)
        return super().graph_context(canonical)

    def attention_handler(self, canonical: Canonical) -> AttentionHandler:
        if self.estimator == "identity":  # LRP-z: the gradient through attention for now
            return AttentionHandler()
        return super().attention_handler(canonical)
