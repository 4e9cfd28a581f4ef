"""Layer-wise relevance propagation and Deep Taylor decomposition on the one engine.

LRP (Bach et al. 2015) redistributes the selected logit ``y_c`` layer by layer; each
Linear/Conv layer gets a rule from :mod:`patternnet.engine.rules` (z, ε, z⁺, αβ, w², flat,
z^B). Everything else follows the gradient: ReLU gates and max-pool switches (winner takes
all), flatten and views. The sums of skip connections split relevance in proportion to the
summands (:class:`~patternnet.engine.rules.ProportionalSum`, what Zennit's ResNet canonizer and
``Norm`` rule do), or, with ``additions="copy"``, pass it to both branches as the gradient does
(Zennit without a canonizer). Average pools split relevance in proportion to their inputs
(:class:`~patternnet.engine.rules.Norm`, as Zennit's composites do). BatchNorm is folded into
the layer before it by the canonizers.

Presets (the composites of the literature, named as in Zennit where it has them) are listed
once, in :data:`PRESETS`; each is registered as the method ``lrp_<preset>``. Any preset takes
``low`` and ``high`` (the input domain's bounds) to put z^B on the first layer.

References
----------
Bach et al., "On pixel-wise explanations for non-linear classifier decisions by layer-wise
relevance propagation", PLoS ONE 2015. Montavon et al., "Explaining nonlinear classification
decisions with deep Taylor decomposition", Pattern Recognition 2017. Montavon et al.,
"Layer-wise relevance propagation: an overview", 2019. Kindermans et al., ICLR 2018, Sec. 4
(the estimator view: identity → z rule, filter → w² rule).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.attention import AttentionHandler, attention_projections
from ..engine.backward import Rule, addition_rules, matmul_rules, product_rules, relu_rules
from ..engine.canonize import Canonical, Canonizer
from ..engine.rules import (
    AVERAGE_POOLS,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Pass,
    ProportionalSum,
    WSquare,
    Z,
    ZBox,
    ZPlus,
)
from ..engine.rules.lrp_attention import (
    AttentionLRP,
    BilinearProduct,
    ConstantProduct,
    Identity,
    NormIdentity,
    ResidualAndBiasSum,
)
from ..engine.rules.norms import NORMS
from ..engine.support import UnsupportedModuleError, classify
from ..layers import is_linear_layer
from .base import Attribution
from .registry import register

__all__ = ["LRP", "AttnLRP", "DeepTaylor", "PRESETS", "logit_start"]

CONVOLUTIONS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DENSE: tuple[type[nn.Module], ...] = (nn.Linear,)
LINEAR_AND_CONV: tuple[type[nn.Module], ...] = CONVOLUTIONS + DENSE

# name: (one-line description, rule on convolutions, rule on dense layers, first-layer rule)
_PRESET_TABLE: dict[str, tuple[str, str, str, str | None]] = {
    "z": ("z rule (LRP-0) on every Linear/Conv layer", "z", "z", None),
    "epsilon": ("ε rule on every Linear/Conv layer", "epsilon", "epsilon", None),
    "zplus": ("z⁺ rule on every Linear/Conv layer", "zplus", "zplus", None),
    "alpha1beta0": ("αβ rule with α=1, β=0 on every Linear/Conv layer", "alpha1beta0",
                    "alpha1beta0", None),
    "alpha2beta1": ("αβ rule with α=2, β=1 on every Linear/Conv layer", "alpha2beta1",
                    "alpha2beta1", None),
    "w2": ("w² rule on every Linear/Conv layer", "w2", "w2", None),
    "flat": ("flat rule on every Linear/Conv layer", "flat", "flat", None),
    "epsilon_plus": ("z⁺ on convolutions, ε on dense layers", "zplus", "epsilon", None),
    "epsilon_plus_flat": ("flat on the first layer, z⁺ on convolutions, ε on dense layers",
                          "zplus", "epsilon", "flat"),
    "epsilon_alpha2beta1": ("α2β1 on convolutions, ε on dense layers", "alpha2beta1",
                            "epsilon", None),
    "epsilon_alpha2beta1_flat": ("flat on the first layer, α2β1 on convolutions, ε on dense "
                                 "layers", "alpha2beta1", "epsilon", "flat"),
    "gamma": ("γ rule on every Linear/Conv layer", "gamma", "gamma", None),
    "epsilon_gamma": ("γ on convolutions, ε on dense layers (options low, high: z^B on the "
                      "first layer)", "gamma", "epsilon", None),
}

#: Preset name → one-line description (the presets are defined once, in ``_PRESET_TABLE``).
PRESETS: dict[str, str] = {name: row[0] for name, row in _PRESET_TABLE.items()}


def _rule(key: str, epsilon: float, stabilizer: float, gamma: float) -> Rule:
    """A fresh rule by its short name in ``_PRESET_TABLE``."""
    if key == "z":
        return Z()
    if key == "epsilon":
        return Epsilon(epsilon)
    if key == "zplus":
        return ZPlus(stabilizer=stabilizer)
    if key == "alpha1beta0":
        return AlphaBeta(1.0, 0.0, stabilizer=stabilizer)
    if key == "alpha2beta1":
        return AlphaBeta(2.0, 1.0, stabilizer=stabilizer)
    if key == "w2":
        return WSquare(stabilizer=stabilizer)
    if key == "flat":
        return Flat(stabilizer=stabilizer)
    if key == "gamma":
        return Gamma(gamma, stabilizer=stabilizer)
    raise KeyError(key)


LayerKey = str | type | tuple[type, ...]
RuleSpec = str | Rule | Mapping[LayerKey, Rule]


def logit_start(logits: Tensor, target: Tensor) -> Tensor:
    """The selected logit's value ``y_c`` at the target, zeros elsewhere."""
    start = logits.new_zeros(logits.shape)
    start.scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    return start


def _preset(
    name: str, epsilon: float, stabilizer: float, gamma: float
) -> tuple[list[tuple[LayerKey, Rule]], Rule | None]:
    """The layer map and first-layer rule of a preset."""
    if name not in _PRESET_TABLE:
        raise ValueError(f"unknown LRP preset {name!r}; choose one of {', '.join(PRESETS)}")
    _, conv, dense, first = _PRESET_TABLE[name]
    first_rule = None if first is None else _rule(first, epsilon, stabilizer, gamma)
    if conv == dense:
        return [(LINEAR_AND_CONV, _rule(conv, epsilon, stabilizer, gamma))], first_rule
    layer_map: list[tuple[LayerKey, Rule]] = [
        (CONVOLUTIONS, _rule(conv, epsilon, stabilizer, gamma)),
        (DENSE, _rule(dense, epsilon, stabilizer, gamma)),
    ]
    return layer_map, first_rule


def _check_rule(rule: Any, where: str) -> Rule:
    if not isinstance(rule, Rule):
        raise TypeError(
            f"{where} must be a rule from patternnet.engine.rules (e.g. Epsilon(), ZPlus()), "
            f"not {type(rule).__name__}"
        )
    return rule


class LRP(Attribution):
    """Layer-wise relevance propagation with a rule per layer.

    Parameters
    ----------
    model:
        The classifier (borrowed, never changed).
    rules:
        A preset name (see the module docstring / :data:`PRESETS`), one rule for every
        Linear/Conv layer, or a mapping from layer keys to rules, tried in this order: a
        qualified module name (``"features.0"``), then module types (``nn.Conv2d`` or a tuple
        of types) in the mapping's order. Average pools get :class:`Norm` unless the mapping
        names them.
    epsilon:
        ε of the ε rule in presets.
    stabilizer:
        ε of the other rules' denominators (z⁺, αβ, γ, w², flat, z^B, average pools, sums).
    gamma:
        γ of the γ rule in presets.
    low, high:
        Bounds of the input domain (numbers or tensors broadcasting to the input, e.g.
        ``(1, 3, 1, 1)`` per channel): the first layer then gets the z^B rule.
    first:
        A rule for the first Linear/Conv layer (in the order of ``model.named_modules()``),
        e.g. ``ZBox(low=0, high=1)`` for pixels; overrides the preset's first layer and
        ``low``/``high``.
    additions:
        ``"proportional"`` (default): a residual sum ``a + b`` gives ``a/(a + b)`` of its
        relevance to ``a`` (conserving); ``"copy"``: both summands get all of it (the
        gradient's behaviour).
    pass_relu:
        If True, relevance passes ReLUs without their gate (Zennit's ``Pass`` rule). It only
        matters for rules that give relevance to inactive units (w², flat, z^B above a ReLU);
        the default keeps the gradient's gate, as PatternAttribution does.
    canonizers, output_selector:
        See :class:`~patternnet.methods.base.Attribution`.

    Examples
    --------
    >>> relevance = LRP(model, "epsilon_plus_flat").attribute(images)  # doctest: +SKIP
    >>> from patternnet.engine.rules import Epsilon, ZPlus, ZBox        # doctest: +SKIP
    >>> LRP(model, {nn.Conv2d: ZPlus(), nn.Linear: Epsilon(0.25)},
    ...     first=ZBox(low=-2.2, high=2.7))                            # doctest: +SKIP

    Notes
    -----
    The backward pass starts from the selected logit's value ``y_c``; for bias-free layers
    and ``ε → 0`` the input relevance sums to ``y_c`` (rules that give relevance to inactive
    units, w² and flat above a ReLU, lose it at the ReLU's gate unless ``pass_relu``).
    """

    name = "lrp"
    description = "LRP with a rule per layer (a preset name or a mapping of rules)"
    references = (
        "Bach et al., On pixel-wise explanations for non-linear classifier decisions by "
        "layer-wise relevance propagation, PLoS ONE 2015",
        "Montavon et al., Layer-wise relevance propagation: an overview, 2019",
    )

    def __init__(
        self,
        model: nn.Module,
        rules: RuleSpec = "epsilon_plus",
        *,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        gamma: float = 0.25,
        low: float | Tensor | None = None,
        high: float | Tensor | None = None,
        first: Rule | None = None,
        pass_relu: bool = False,
        additions: str = "proportional",
        canonizers: Sequence[Canonizer] | None = None,
        output_selector: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__(model, canonizers=canonizers, output_selector=output_selector)
        self.preset = rules if isinstance(rules, str) else None
        if (low is None) != (high is None):
            raise ValueError("give both low and high (the input domain's bounds) or neither")
        if additions not in ("proportional", "copy"):
            raise ValueError(f"additions must be 'proportional' or 'copy', not {additions!r}")
        # The z preset divides without stabiliser (exactly gradient × input for ReLU nets).
        exact = rules == "z"
        pool_rule: Rule = Norm(stabilizer=0.0 if exact else stabilizer)
        self.sum_rule = ProportionalSum(stabilizer=0.0 if exact else stabilizer)
        self.additions = additions
        if first is None and low is not None:
            first = ZBox(low, high, stabilizer=stabilizer)
        if isinstance(rules, str):
            layer_map, preset_first = _preset(rules, epsilon, stabilizer, gamma)
            first = first if first is not None else preset_first
        elif isinstance(rules, Rule):
            layer_map = [(LINEAR_AND_CONV, rules)]
        elif isinstance(rules, Mapping):
            layer_map = [(key, _check_rule(rule, f"rules[{key!r}]")) for key, rule in rules.items()]
        else:
            raise TypeError(
                "rules must be a preset name, a rule, or a mapping {layer name or type: rule}; "
                f"got {type(rules).__name__}"
            )
        self.first = None if first is None else _check_rule(first, "first")
        self.layer_map = layer_map
        self.pool_rule = pool_rule
        self.pass_relu = bool(pass_relu)
        self.assignment = self._assign()

    def _match(self, name: str, module: nn.Module) -> Rule | None:
        for key, rule in self.layer_map:
            if isinstance(key, str):
                if key == name:
                    return rule
            elif isinstance(module, key):
                return rule
        return None

    def _assign(self) -> dict[nn.Module, Rule]:
        """The rule of every Linear/Conv layer and average pool; clear errors for gaps."""
        names = {key for key, _ in self.layer_map if isinstance(key, str)}
        modules = dict(self.model.named_modules())
        unknown = sorted(names - set(modules))
        if unknown:
            raise ValueError(
                f"rules name layers the model does not have: {unknown}; names are qualified "
                "module names as in model.named_modules()"
            )
        assignment: dict[nn.Module, Rule] = {}
        missing = []
        first_done = False
        for name, module in modules.items():
            if is_linear_layer(module):
                by_name = next((r for k, r in self.layer_map if k == name), None)
                rule = by_name
                if rule is None and self.first is not None and not first_done:
                    rule = self.first
                if rule is None:
                    rule = self._match(name, module)
                first_done = True
                if rule is None:
                    missing.append(f"{name} ({type(module).__name__})")
                else:
                    assignment[module] = rule
            elif isinstance(module, AVERAGE_POOLS):
                assignment[module] = self._match(name, module) or self.pool_rule
        if missing:
            raise ValueError(
                f"no LRP rule for the layers {missing}; add their types or names to rules, "
                "e.g. {nn.Conv2d: ZPlus(), nn.Linear: Epsilon()}"
            )
        if not any(is_linear_layer(m) for m in assignment):
            raise ValueError(
                f"{type(self.model).__name__} has no Linear/Conv layer for LRP rules to act on"
            )
        return assignment

    def rules(
        self, canonical: Canonical
    ) -> tuple[dict[nn.Module, Rule], dict[Callable[..., Any], Rule]]:
        """The assigned rules; ReLUs keep their gate unless ``pass_relu``; sums split."""
        functions: dict[Callable[..., Any], Rule] = relu_rules(Pass()) if self.pass_relu else {}
        if self.additions == "proportional":
            functions.update(addition_rules(self.sum_rule))
        return dict(self.assignment), functions

    def start(self, logits: Tensor, target: Tensor) -> Tensor:
        """Start from the selected logit's value ``y_c`` (zeros elsewhere)."""
        return logit_start(logits, target)

    def __repr__(self) -> str:
        what = repr(self.preset) if self.preset else "custom rules"
        return f"{type(self).__name__}({type(self.model).__name__}, {what})"


# Every preset is a registered method (``lrp_epsilon`` ...), in the order of the table.
for _name, _text in PRESETS.items():
    register(f"lrp_{_name}", description=f"LRP: {_text}", rules=_name)(LRP)


@register(
    "deep_taylor",
    description="Deep Taylor: z⁺ above the input, z^B (options low, high) or w² at the input",
)
class DeepTaylor(LRP):
    """Deep Taylor decomposition (Montavon et al. 2017) for ReLU networks.

    z⁺ on every Linear/Conv layer above the input (their inputs are ReLU outputs, ``x ≥ 0``);
    at the input layer z^B for a bounded domain ``[low, high]``, or w² when no bounds are
    given (the unbounded domain ℝᵈ). Biases take no relevance (the root points of the
    derivation ignore them), so relevance is conserved where the network has no biases.

    Parameters
    ----------
    model:
        The classifier (borrowed, never changed).
    low, high:
        The input domain's bounds (numbers or tensors broadcasting to the input, e.g.
        ``(1, 3, 1, 1)`` per channel); both or neither.
    stabilizer:
        ε of the denominators.
    pass_relu, additions, canonizers, output_selector:
        See :class:`LRP`.
    """

    references = (
        "Montavon et al., Explaining nonlinear classification decisions with deep Taylor "
        "decomposition, Pattern Recognition 2017",
    )

    def __init__(
        self,
        model: nn.Module,
        low: float | Tensor | None = None,
        high: float | Tensor | None = None,
        *,
        stabilizer: float = 1e-6,
        pass_relu: bool = False,
        additions: str = "proportional",
        canonizers: Sequence[Canonizer] | None = None,
        output_selector: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if (low is None) != (high is None):
            raise ValueError(
                "DeepTaylor needs both low and high (a bounded input domain, z^B rule) or "
                "neither (unbounded, w² rule)"
            )
        first: Rule
        if low is None:
            first = WSquare(stabilizer=stabilizer)
        else:
            first = ZBox(low, high, stabilizer=stabilizer)
        super().__init__(
            model,
            {LINEAR_AND_CONV: ZPlus(stabilizer=stabilizer, bias=False)},
            stabilizer=stabilizer,
            first=first,
            pass_relu=pass_relu,
            additions=additions,
            canonizers=canonizers,
            output_selector=output_selector,
        )
        self.preset = "deep_taylor"


#: Element-wise activations that AttnLRP crosses with the identity rule (``R_x = R``).
IDENTITY_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.LeakyReLU, nn.ReLU6,
)

#: Parameters held by a block that enter the model as biases (added to, or concatenated with,
#: the activations): ``{qualified class name: parameter names}``. Under AttnLRP they absorb
#: their share of relevance like a layer's bias.
ADDITIVE_PARAMETERS: dict[str, frozenset[str]] = {
    "torchvision.models.vision_transformer.VisionTransformer": frozenset({"class_token"}),
    "torchvision.models.vision_transformer.Encoder": frozenset({"pos_embedding"}),
}


def _qualified(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


@register(
    "lrp_attnlrp",
    description="AttnLRP (transformers): ε on Linear/Conv, softmax and bilinear attention rules, "
    "identity on LayerNorm scale and GELU",
)
class AttnLRP(LRP):
    """LRP for transformers following AttnLRP (Achtibat et al., ICML 2024).

    The rules (:mod:`patternnet.engine.rules.lrp_attention`): the ε rule on every Linear/Conv
    layer (in-projections and output projections of ``nn.MultiheadAttention`` included), the
    softmax rule and the uniform rule on the products ``q kᵀ`` and ``A V`` inside attention, the
    identity rule on LayerNorm's ``γ/σ`` (the z rule on its centring) and on element-wise
    activations (GELU, SiLU, ...), the z rule on residual sums, and added parameters (position
    embeddings) and concatenated ones (class tokens) as biases.

    Parameters
    ----------
    model:
        The transformer (borrowed, never changed).
    epsilon:
        ε of every denominator. The default 0 is the form ``lxt`` implements (gradient × input
        with modified gradients): relevance is conserved up to biases, and a unit whose value is
        exactly 0 passes nothing.
    conservative:
        True: CP-LRP inside attention (Ali et al., ICML 2022; attention probabilities held
        fixed), what ``lxt`` applies to torchvision's vision transformers (registered as
        ``lrp_attnlrp_cp``).
    canonizers, output_selector:
        See :class:`~patternnet.methods.base.Attribution`.

    Notes
    -----
    ``nn.MultiheadAttention`` (self-attention) and ``F.scaled_dot_product_attention`` are
    covered with every mask (boolean or float ``attn_mask``, ``key_padding_mask``,
    ``is_causal``): as in AttnLRP and ``lxt``, a masked position gets probability 0 and no
    relevance, and a float mask is a fixed summand of the scores (a bias: it absorbs its
    share); tests/test_attnlrp_masks.py. Cross-attention and the attention options that the
    decomposition refuses (``kdim``/``vdim``, ``add_bias_kv``, ``add_zero_attn``) raise a clear
    error naming what is missing.
    """

    name = "lrp_attnlrp"
    references = (
        "Achtibat et al., AttnLRP: Attention-aware layer-wise relevance propagation for "
        "transformers, ICML 2024",
        "Ali et al., XAI for transformers: better explanations through conservative "
        "propagation, ICML 2022",
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        epsilon: float = 0.0,
        conservative: bool = False,
        canonizers: Sequence[Canonizer] | None = None,
        output_selector: Callable[[Any], Tensor] | None = None,
    ) -> None:
        self.linear_rule = Epsilon(epsilon)
        super().__init__(
            model, {LINEAR_AND_CONV: self.linear_rule}, epsilon=epsilon, stabilizer=epsilon,
            canonizers=canonizers, output_selector=output_selector,
        )
        self.preset = "attnlrp_cp" if conservative else "attnlrp"
        self.conservative = bool(conservative)
        self.sum_rule = ResidualAndBiasSum(stabilizer=epsilon)
        self.handler = AttentionLRP(epsilon, conservative=conservative)
        self.product_rule = BilinearProduct(epsilon)
        norm, identity = NormIdentity(epsilon), Identity()
        for module in model.modules():
            if isinstance(module, NORMS):
                self.assignment[module] = norm
            elif isinstance(module, IDENTITY_ACTIVATIONS):
                self.assignment[module] = identity
        # Activations called as functions (TransformerEncoderLayer's activation="gelu").
        self.call_rules: dict[Callable[..., Any], Rule] = {F.gelu: identity, F.silu: identity}

    def rules(
        self, canonical: Canonical
    ) -> tuple[dict[nn.Module, Rule], dict[Callable[..., Any], Rule]]:
        """LRP's rules, the ε rule on attention's virtual input projections, the bilinear
        rule on ``q kᵀ`` and the identity rule on functional GELU/SiLU."""
        modules, functions = super().rules(canonical)
        for projection in attention_projections(self.model).values():
            modules[projection] = self.linear_rule
        functions.update(matmul_rules(self.product_rule))
        functions.update(product_rules(ConstantProduct()))
        functions.update(self.call_rules)
        return modules, functions

    def attention_handler(self, canonical: Canonical) -> AttentionHandler:
        """The softmax and weighted-sum rules of AttnLRP (or CP-LRP)."""
        return self.handler

    def check_model(self, module_rules: dict[nn.Module, Rule]) -> None:
        """Refuse modules with weights that no AttnLRP rule covers (clear error, all named)."""
        modules = dict(self.model.named_modules())
        covered = [name for name, module in modules.items()
                   if module in module_rules or isinstance(module, nn.MultiheadAttention)]
        bad = []
        for name, support in classify(self.model, folding=False).items():
            if support.kind != "unsupported":
                continue
            if any(name == c or name.startswith(c + ".") for c in covered):
                continue
            module = modules[name]
            own = {p for p, _ in module.named_parameters(recurse=False)}
            if own and own <= ADDITIVE_PARAMETERS.get(_qualified(module), frozenset()):
                continue
            bad.append((name or "<model>", support.type, support.note))
        if bad:
            lines = "\n".join(f"  - {name} ({kind}): {note}" for name, kind, note in bad)
            raise UnsupportedModuleError(
                f"AttnLRP cannot explain {type(self.model).__name__}: no rule covers\n{lines}\n"
                "AttnLRP has rules for Linear/Conv, nn.MultiheadAttention (self-attention), "
                "LayerNorm/GroupNorm, element-wise activations, and the class token and "
                "position embedding of torchvision's VisionTransformer.",
                bad,
            )


register(
    "lrp_attnlrp_cp",
    description="AttnLRP with CP-LRP inside attention (attention probabilities held fixed), "
    "as lxt applies it to torchvision ViTs",
    conservative=True,
)(AttnLRP)
