"""Which modules of a model PatternNet can explain, checked before any data is read.

Every module of a model falls into one of these kinds (:func:`classify`):

``linear``
    ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (groups and depthwise included): each gets patterns
    and a weight-swap rule (method.md §3-§4).
``batchnorm``
    ``BatchNorm1d/2d/3d``/``SyncBatchNorm`` with running statistics. When it directly follows
    a Linear/Conv it is **folded** into that layer (:class:`~patternnet.engine.canonize.
    BatchNormFolding`). Otherwise it is **standalone** (pre-activation ResNets, BN after a
    ReLU): a fixed per-channel affine map ``y = s ⊙ x + t``, ``s = γ/√(σ²+ε)``, i.e. one
    linear unit with a single input per channel. Every signal estimator of such a unit gives
    the same normalised pattern ``a = 1/s`` (``wᵀa = 1`` with ``w = s``; no data needed), so
    :func:`standalone_batchnorm_rules` passes ``g/s`` back for PatternNet and ``g·s·a = g``
    (relevance conserved) for PatternAttribution; ``s = 0`` is a dead unit (pattern 0). The
    shift ``t`` is a bias, which no backward rule carries. Without these rules (the plain
    gradient, or a method that does not install them) the backward pass multiplies by ``s``.
``norm``
    ``LayerNorm``, ``GroupNorm`` and torchvision's ``LayerNorm2d``: per element a linear unit
    ``w = γ/σ`` whose scale ``1/σ`` is held constant and whose mean is an offset
    (:mod:`patternnet.engine.rules.norms`); PatternNet passes ``g ⊙ σ/γ`` back,
    PatternAttribution ``g``, the gradient and the other methods the normalisation's Jacobian.
``activation``
    Element-wise non-linearities (ReLU, LeakyReLU, PReLU, ELU, GELU, SiLU, sigmoid, tanh ...):
    the gradient's gate/derivative passes. The two-component estimator splits each unit by the
    sign of its pre-activation, so LeakyReLU/PReLU pass ``a₋`` on their negative side. GELU
    and SiLU: the pattern methods pass ``f′(z)`` with the linear patterns of the layers
    feeding them (``smooth="derivative"``, the default, chosen by measurement, method.md
    §10), or gate them at ``z > 0`` with those layers' two-component patterns
    (``smooth="gate"``); the fit stores both. For
    layers that feed another smooth activation (sigmoid, tanh ...; :data:`SMOOTH_ACTIVATIONS`),
    where the split has no meaning, the fit uses the linear pattern instead
    (:func:`linear_pattern_layers`).
``passthrough``
    Weight-free modules (pooling with its switches, Flatten, Dropout in eval mode, Identity,
    Upsample, padding, any parameter-free module of the user's): pure functions of their
    input, crossed by the gradient.
``container``
    Modules that only call children (``Sequential``, blocks).
``attention``
    ``nn.MultiheadAttention`` (self-attention, ``in_proj_weight``): run step by step
    (:mod:`patternnet.engine.attention`): its Q/K/V projection is a virtual Linear layer
    ``"<name>.in_proj"``, ``out_proj`` a Linear layer, the weighted sum over tokens a node with
    fitted patterns (method.md §12). ``nn.TransformerEncoderLayer`` is a container of it.
    Window attention of torchvision's Swin (V1 and V2) and MaxViT
    (:data:`~patternnet.engine.attention.WINDOW_ATTENTION`) is decomposed the same way: its
    ``qkv``/``proj`` (``to_qkv``/``merge``) Linear layers get patterns, the relative position
    bias (a parameter it holds, or Swin V2's MLP of fixed coordinates) and the shifted
    windows' mask are constants added to the scores, Swin V2's ``logit_scale`` a constant
    factor on them.
``unsupported``
    Modules with weights of their own that are not a Linear/Conv/BatchNorm/PReLU: LSTM/GRU,
    ``MultiheadAttention`` with separate key/value dimensions, ``add_bias_kv`` or
    ``add_zero_attn``, ``Embedding``, transposed convolutions,
    BatchNorm without running statistics, uninitialised lazy layers, and blocks holding a
    parameter directly other than class tokens and position embeddings
    (:data:`ADDITIVE_PARAMETERS`, biases). :func:`check_supported` raises one
    :class:`UnsupportedModuleError` naming all of them. A user who knows that a module of
    theirs is a pure per-element function may declare it with :func:`register_passthrough`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers import is_linear_layer
from .attention import attention_support, constant_modules, window_attention
from .backward import product_rules
from .canonize import batchnorm_scale_shift
from .graph import SMOOTH_ACTIVATIONS, ModelGraph, is_batchnorm
from .rules import ChannelScale
from .rules.norms import LAYER_SCALES, LayerScale, NormScale, is_norm, layer_scales

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "SMOOTH_ACTIVATIONS",
    "ModuleSupport",
    "UnsupportedModuleError",
    "check_supported",
    "classify",
    "RECTIFIERS",
    "attention_linear_patterns",
    "GATED_SMOOTH_ACTIVATIONS",
    "gated_smooth_layers",
    "linear_pattern_layers",
    "rectifier_free",
    "register_passthrough",
    "smooth_activation_layers",
    "layer_scale_rules",
    "norm_rules",
    "standalone_batchnorm_rules",
]

KINDS = ("linear", "batchnorm", "norm", "attention", "activation", "passthrough", "container",
         "unsupported")

#: Element-wise activation modules (weight-free, except PReLU's slope).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold, nn.Softmax,
    nn.LogSoftmax, nn.Softmax2d,
)

_PASSTHROUGH_TYPES: set[type[nn.Module]] = set()


class UnsupportedModuleError(TypeError):
    """A model holds modules with weights that PatternNet has no backward rule for.

    Attributes
    ----------
    modules:
        ``[(qualified name, type name, reason), ...]`` of every unsupported module.
    """

    def __init__(self, message: str, modules: list[tuple[str, str, str]]) -> None:
        super().__init__(message)
        self.modules = modules


@dataclass(frozen=True)
class ModuleSupport:
    """How one module is treated.

    Attributes
    ----------
    name:
        Qualified name (``""`` for the model itself).
    type:
        The module's class name.
    kind:
        One of :data:`KINDS`.
    note:
        Details: ``"folded into conv1"`` / ``"standalone"`` for BatchNorm, the reason for an
        unsupported module.
    """

    name: str
    type: str
    kind: str
    note: str = ""


def register_passthrough(*types: type[nn.Module]) -> None:
    """Declare module types (with weights) that the backward pass may cross like the gradient.

    Only for modules that are a per-element or otherwise *fixed* map of their input whose
    gradient is the right thing to pass backward; PatternNet learns no pattern for them.
    """
    for module_type in types:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_passthrough takes nn.Module subclasses, not {module_type!r}")
        _PASSTHROUGH_TYPES.add(module_type)


def _kind(module: nn.Module) -> tuple[str, str]:
    direct = [name for name, _ in module.named_parameters(recurse=False)]
    if any(
        isinstance(p, nn.parameter.UninitializedParameter)
        for p in module.parameters(recurse=False)
    ):
        return "unsupported", "uninitialised lazy layer: run one forward pass first"
    if is_linear_layer(module):
        return "linear", ""
    if is_batchnorm(module):
        if module.running_mean is None:
            return "unsupported", (
                "track_running_stats=False: normalises each batch by its own statistics even "
                "in eval mode (not a fixed map)"
            )
        return "batchnorm", ""
    if is_norm(module):
        return "norm", ""
    if isinstance(module, nn.MultiheadAttention):
        reason = attention_support(module)
        if reason is not None:
            return "unsupported", reason
        return "attention", "decomposed: in_proj and out_proj Linear, weighted sum a node"
    window = window_attention(module)
    if window is not None:
        qkv, proj, _ = window
        return "attention", (
            f"window attention decomposed: {qkv} and {proj} Linear, weighted sum a node, "
            "relative position bias and masks added to the scores (constants)"
        )
    scale = LAYER_SCALES.get(f"{type(module).__module__}.{type(module).__qualname__}")
    if scale is not None and direct == [scale]:
        return "container", f"{scale}: a fixed per-channel scale s (pattern 1/s)"
    if isinstance(module, tuple(_PASSTHROUGH_TYPES)):
        return "passthrough", "registered"
    if isinstance(module, ACTIVATIONS):
        return "activation", ""
    additive = [n for n in direct if _additive_parameter(n, getattr(module, n))]
    if direct and len(additive) == len(direct):
        return "container", f"{', '.join(additive)}: added to activations (biases)"
    if direct:
        return "unsupported", f"holds weights {', '.join(direct[:4])} with no PatternNet rule"
    if next(module.children(), None) is not None:
        return "container", ""
    return "passthrough", ""


#: Names of parameters that a block adds to (or concatenates with) its activations: class
#: tokens and position embeddings. Like biases they carry no signal back (method.md §10); a
#: parameter counts as one only with a leading dimension of 1 (shared by the batch).
ADDITIVE_PARAMETERS = frozenset({
    "class_token", "cls_token", "dist_token", "pos_embedding", "pos_embed",
    "position_embedding", "position_embeddings", "register_tokens", "mask_token",
})


def _additive_parameter(name: str, value: Any) -> bool:
    return name in ADDITIVE_PARAMETERS and value.dim() >= 2 and value.shape[0] == 1


def classify(model: nn.Module, *, folding: bool = True) -> dict[str, ModuleSupport]:
    """Say how every module of ``model`` is treated (see the module docstring).

    Parameters
    ----------
    model:
        Any ``nn.Module``.
    folding:
        Find which BatchNorms are folded (traces the model with ``torch.fx``); False leaves
        the note of BatchNorms empty.

    Returns
    -------
    dict
        ``{qualified name: ModuleSupport}`` in ``named_modules`` order. Supported modules
        inside an unsupported one (``MultiheadAttention.out_proj``) say so in their note.
    """
    folded: dict[str, str] = {}
    if folding:
        pairs = ModelGraph.of(model).batchnorm_pairs()
        folded = {bn: layer for layer, bn in pairs.items()}
    result: dict[str, ModuleSupport] = {}
    unsupported: list[str] = []
    for name, module in model.named_modules():
        kind, note = _kind(module)
        outer = next((p for p in unsupported if name.startswith(p + ".") or not p), None)
        if kind == "unsupported":
            unsupported.append(name)
        elif kind == "batchnorm" and folding:
            note = f"folded into {folded[name]}" if name in folded else "standalone"
        if outer is not None and kind != "unsupported":
            note = f"inside unsupported {outer or '<model>'}"
        result[name] = ModuleSupport(name, type(module).__name__, kind, note)
    return result


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModuleError` naming every module PatternNet cannot explain.

    Cheap (no tracing, no data): called by :func:`~patternnet.patterns.fit.collect_statistics`
    before it reads the first batch, and by methods that install backward rules before
    their forward pass.
    """
    bad = [
        (s.name or "<model>", s.type, s.note)
        for s in classify(model, folding=False).values()
        if s.kind == "unsupported"
    ]
    if not bad:
        return
    lines = "\n".join(f"  - {name} ({kind}): {reason}" for name, kind, reason in bad)
    counts: dict[str, int] = {}
    for _, kind, _ in bad:
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    raise UnsupportedModuleError(
        f"patternnet cannot explain {type(model).__name__}: {len(bad)} module(s) have weights "
        f"that no PatternNet rule covers ({summary}):\n{lines}\n"
        "Patterns exist for Linear and Conv1d/2d/3d layers (BatchNorm with running statistics "
        "is folded or crossed as a per-channel map); weight-free modules pass the gradient. "
        "Remove or replace these modules, explain a sub-network without them, or, if one is a "
        "fixed map whose gradient may pass, declare its type with "
        "patternnet.engine.support.register_passthrough(Type).",
        bad,
    )


def smooth_activation_layers(model: nn.Module) -> dict[str, str]:
    """Linear/Conv layers whose output (after a folded BatchNorm) feeds a smooth activation.

    Read from the model's one graph (:meth:`ModelGraph.smooth_activations
    <patternnet.engine.graph.ModelGraph.smooth_activations>`, no data); a model that cannot be
    traced gives ``{}``.

    Returns
    -------
    dict
        ``{layer name: activation name}`` for layers that feed only smooth activations
        (:data:`SMOOTH_ACTIVATIONS`, ``torch.sigmoid``, ``F.gelu`` ...). Their two-component
        split is meaningless: the fit gives them the linear pattern.
    """
    return ModelGraph.of(model).smooth_activations()


#: Piecewise-linear activations with a kink at 0: a unit they read is a ReLU-like neuron, the
#: model the two-component estimator is made for.
RECTIFIERS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Threshold,
)


def rectifier_free(model: nn.Module) -> bool:
    """Whether ``model`` certainly has no rectifier (ReLU, LeakyReLU, PReLU ... anywhere).

    Checks the modules, the activation of ``nn.Transformer*Layer`` (its ``F.relu`` is hidden
    from the graph) and the functions of the traced graph. False when unsure (the model
    cannot be traced, or a transformer layer has an activation other than ReLU or GELU).
    """
    constant = constant_modules(model)  # Swin V2's position-bias MLP reads no input
    for name, module in model.named_modules():
        if name in constant:
            continue
        if isinstance(module, RECTIFIERS):
            return False
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            if getattr(module, "activation_relu_or_gelu", 0) != 2:  # 1: ReLU, 0: unknown
                return False
    graph = ModelGraph.of(model)
    if not graph.traced or graph.graph is None:
        return False
    for node in graph.graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            if "relu" in name or "threshold" in name:
                return False
    return True


def attention_linear_patterns(model: nn.Module, negative: bool, attention: bool) -> bool:
    """Whether a two-component fit gives every layer and node the linear pattern.

    So for attention models without rectifiers (ViTs with GELU): no unit is read by a ReLU,
    so the split at ``y > 0`` has no meaning, and on a ViT trained on ground-truth data it
    flipped PatternNet's sign (method.md §12). Warns, naming the reason; needs the sums of the
    linear pattern (``negative=True``).
    """
    if not (attention and negative and rectifier_free(model)):
        return False
    warnings.warn(
        "the model has attention and no rectifier (ReLU, LeakyReLU ...): no unit has an "
        "active/inactive split, so the two-component fit gives every layer and node the "
        "linear pattern (method.md §12)",
        stacklevel=3,
    )
    return True


#: Smooth activations that approach ReLU away from zero (as :func:`smooth_activation_layers`
#: names them): a two-component fit gives the layers feeding them both their linear and
#: their two-component patterns (the pattern methods' ``smooth`` option, method.md §10).
GATED_SMOOTH_ACTIVATIONS = frozenset({"GELU", "SiLU", "gelu", "silu"})


def gated_smooth_layers(model: nn.Module) -> set[str]:
    """Layers whose output feeds only GELU/SiLU (:data:`GATED_SMOOTH_ACTIVATIONS`).

    A two-component fit gives them both their linear pattern ``a`` (used with the default
    ``smooth="derivative"``, where the activation passes ``f′(z)``) and their two-component
    patterns ``a₊``/``a₋`` (split at ``z > 0``, used with ``smooth="gate"``).
    """
    return {layer for layer, act in smooth_activation_layers(model).items()
            if act in GATED_SMOOTH_ACTIVATIONS}  # fmt: skip


def linear_pattern_layers(model: nn.Module, negative: bool = True) -> set[str]:
    """Layers a two-component fit gives the linear pattern only; warns once, naming them.

    These are the layers of :func:`smooth_activation_layers` other than those feeding GELU
    or SiLU (:func:`gated_smooth_layers`): sigmoid, tanh, softplus ... have no linear piece
    to gate. Their linear pattern ``a = cov[x, y] / wᵀcov[x, y]`` comes from the sums a
    two-component fit with ``negative=True`` already holds (``count, sum_x, sum_y, sum_xy``).
    With ``negative=False`` those sums are missing and the layers keep ``a₊`` (the warning
    says so).
    """
    smooth = smooth_activation_layers(model)
    # GELU/SiLU layers keep a₊/a₋ and get a too, where the fit holds its sums (negative=True)
    layers = {layer: act for layer, act in smooth.items()
              if act not in GATED_SMOOTH_ACTIVATIONS or not negative}  # fmt: skip
    if not layers:
        return set()
    names = ", ".join(f"{layer} (→ {act})" for layer, act in layers.items())
    if negative:
        warnings.warn(
            f"layers feeding a smooth activation have no active/inactive split; they get the "
            f"linear pattern instead of a₊/a₋: {names}",
            stacklevel=3,
        )
        return set(layers)
    warnings.warn(
        f"layers feeding a smooth activation have no active/inactive split, but "
        f"negative=False did not collect the sums of their linear pattern; they keep a₊: "
        f"{names}",
        stacklevel=3,
    )
    return set()


def standalone_batchnorm_rules(
    model: nn.Module, canonical: Any, *, attribution: bool
) -> dict[nn.Module, Any]:
    """Rules for the BatchNorms the canonical form did not fold (per-channel linear units).

    Parameters
    ----------
    model:
        The borrowed model.
    canonical:
        Its :class:`~patternnet.engine.canonize.Canonical` form (folded BatchNorms are in
        ``canonical.form.bypass`` and get no rule).
    attribution:
        False for PatternNet (pass ``g · a`` with the pattern ``a = 1/s``), True for
        PatternAttribution (pass ``g · s ⊙ a = g``).

    Returns
    -------
    dict
        ``{batchnorm module: ChannelScale rule}``, to merge into a method's module rules.
    """
    rules: dict[nn.Module, Any] = {}
    for name, module in model.named_modules():
        if not is_batchnorm(module) or name in canonical.form.bypass:
            continue
        if module.running_mean is None:
            continue  # reported by check_supported
        scale, _ = batchnorm_scale_shift(module)
        alive = scale != 0
        if attribution:
            factor = alive.to(torch.float64)
        else:
            factor = torch.where(alive, 1.0 / torch.where(alive, scale, 1.0), 0.0)
        rules[module] = ChannelScale(factor)
    return rules


def norm_rules(model: nn.Module, *, attribution: bool) -> dict[nn.Module, Any]:
    """PatternNet/PatternAttribution rules for the model's LayerNorms and GroupNorms.

    Each normalisation is, per element, a linear unit ``w = γ/σ`` with ``1/σ`` held constant
    (method.md §10); its pattern is ``σ/γ`` (:class:`~patternnet.engine.rules.norms.NormScale`).

    Parameters
    ----------
    model:
        The borrowed model.
    attribution:
        False for PatternNet (pass ``g ⊙ σ/γ``), True for PatternAttribution (pass ``g``).
    """
    return {m: NormScale(attribution) for m in model.modules() if is_norm(m)}


def layer_scale_rules(model: nn.Module, *, attribution: bool) -> dict[Any, Any]:
    """Function rules for the products ``s * x`` of the model's layer scales (ConvNeXt).

    Each is, per element, a one-input unit with the fixed weight ``s``: pattern ``1/s``
    (:class:`~patternnet.engine.rules.norms.LayerScale`). Empty when the model has none.
    """
    scales = layer_scales(model)
    return product_rules(LayerScale(scales, attribution)) if scales else {}
