"""LayerNorm and GroupNorm as linear units whose scale is a data-dependent factor (method.md §10).

A normalisation ``y = γ ⊙ (x − μ(x)) / σ(x) + β`` has two data-dependent quantities. The mean
``μ`` is an offset, like a bias, and carries no signal back; the scale ``1/σ`` is a
multiplicative factor, held constant on the way back like a ReLU's mask (method.md §10). What
is left is, per element, a linear unit with one input and the weight ``w = γ/σ``. Every
signal estimator gives such a unit the normalised pattern ``a = 1/w = σ/γ`` (``wᵀa = 1``, no
data needed; the same argument as for a standalone BatchNorm), so

- PatternNet passes ``g ⊙ σ/γ`` back (:class:`NormScale` with ``attribution=False``);
- PatternAttribution passes ``g ⊙ w ⊙ a = g`` (relevance conserved);
- a unit with ``γ = 0`` is dead: its pattern is 0.

The gradient (and the methods that pass it through normalisations: LRP, DeconvNet, Guided
BackProp) multiplies by the full Jacobian of the normalisation instead.

The modules are ``nn.LayerNorm`` (normalised over its trailing ``normalized_shape``),
``nn.GroupNorm`` (over each group of channels and all positions) and torchvision's
``LayerNorm2d`` (a LayerNorm over the channels of an NCHW tensor), see :func:`norm_axes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backward import Rule

__all__ = ["LAYER_SCALES", "LayerScale", "NORMS", "NormScale", "is_norm", "layer_scales",
           "norm_scale"]

#: Blocks that hold a per-channel layer scale ``s`` as a parameter and multiply an activation
#: by it (``s * x``): ``{qualified class name: parameter name}``.
LAYER_SCALES: dict[str, str] = {"torchvision.models.convnext.CNBlock": "layer_scale"}

#: Normalisation module types with a rule (``LayerNorm2d`` is a ``LayerNorm`` subclass).
NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)


def _channels_first(module: nn.Module) -> bool:
    """torchvision's ``LayerNorm2d``: a LayerNorm over dimension 1 of an NCHW tensor."""
    return isinstance(module, nn.LayerNorm) and type(module).__name__ == "LayerNorm2d"


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation this module has a rule for."""
    return isinstance(module, NORMS)


def norm_scale(module: nn.Module, x: Tensor) -> Tensor:
    """The per-element weight ``w = γ/σ`` of the normalisation ``module`` at input ``x``.

    Returns a tensor shaped like ``x`` (``γ = 1`` without an affine weight).
    """
    if isinstance(module, nn.GroupNorm):
        n, c = x.shape[:2]
        grouped = x.reshape(n, module.num_groups, -1)
        var = grouped.var(dim=-1, unbiased=False, keepdim=True)
        inv = torch.rsqrt(var + module.eps).expand_as(grouped).reshape(x.shape)
        gamma_shape = [1, c] + [1] * (x.dim() - 2)
    elif _channels_first(module):
        var = x.var(dim=1, unbiased=False, keepdim=True)
        inv = torch.rsqrt(var + module.eps).expand_as(x)
        gamma_shape = [1, -1] + [1] * (x.dim() - 2)
    elif isinstance(module, nn.LayerNorm):
        dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        inv = torch.rsqrt(var + module.eps).expand_as(x)
        gamma_shape = list(module.normalized_shape)
    else:
        raise TypeError(f"no normalisation rule for {type(module).__name__}")
    weight = getattr(module, "weight", None)
    if weight is None:
        return inv
    return inv * weight.detach().to(x.dtype).reshape(gamma_shape)


class NormScale(Rule):
    """PatternNet/PatternAttribution through a LayerNorm/GroupNorm (see the module docstring).

    Parameters
    ----------
    attribution:
        False: pass ``g ⊙ σ/γ`` (PatternNet); True: pass ``g`` where ``γ ≠ 0``
        (PatternAttribution).
    """

    def __init__(self, attribution: bool) -> None:
        self.attribution = attribution

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        assert module is not None
        with torch.no_grad():
            fast = _layer_norm_scale(module, x.detach())
            if fast is not None:  # a LayerNorm whose units are all alive (the usual case)
                # PatternAttribution passes g unchanged; PatternNet g ⊙ σ/γ
                return None if self.attribution else fast.reciprocal_()
            scale = norm_scale(module, x.detach())
            alive = scale != 0
            if self.attribution:
                return alive.to(x.dtype)
            return torch.where(alive, 1.0 / torch.where(alive, scale, 1.0), 0.0)

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        if state is None:
            return grad_output
        return grad_output * state.to(grad_output.dtype)


def _layer_norm_scale(module: nn.Module, x: Tensor) -> Tensor | None:
    """``γ/σ`` of an ``nn.LayerNorm`` over trailing dimensions with ``1/σ`` as the module's
    own kernel computes it (one fused pass, 6× faster on CPU than the variance of
    :func:`norm_scale`), when every entry is non-zero; None otherwise (another
    normalisation, a dead unit with ``γ = 0``, an underflow, NaN): then :func:`norm_scale`.
    """
    if type(module) is not nn.LayerNorm or not x.is_floating_point():
        return None
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape:
        return None
    _, _, inv = torch.native_layer_norm(x, shape, None, None, module.eps)  # 1/σ, (..., 1)
    weight = getattr(module, "weight", None)
    gamma = None if weight is None else weight.detach().to(x.dtype)
    smallest = inv.amin() if gamma is None else inv.amin() * gamma.abs().amin()
    if not bool(smallest > 0):  # |γ_c / σ_t| ≥ this > 0 for every unit: all alive
        return None
    return inv.expand_as(x).clone() if gamma is None else inv * gamma


def _qualified(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def layer_scales(model: nn.Module) -> list[Tensor]:
    """The layer-scale parameters of the blocks of :data:`LAYER_SCALES` in ``model``."""
    found = []
    for module in model.modules():
        name = LAYER_SCALES.get(_qualified(module))
        if name is not None and isinstance(getattr(module, name, None), Tensor):
            found.append(getattr(module, name))
    return found


class LayerScale(Rule):
    """PatternNet/PatternAttribution through ``s * x`` with a fixed per-channel scale ``s``.

    The product is, per element, a linear unit with one input and the fixed weight ``s``; its
    normalised pattern is ``1/s`` (no data needed), so PatternNet passes ``g / s`` and
    PatternAttribution ``g · s · (1/s) = g``; ``s = 0`` is a dead unit (pattern 0). Installed
    for products (:func:`patternnet.engine.backward.product_rules`); only products with one of
    ``scales`` are claimed (:meth:`operands`).

    Parameters
    ----------
    scales:
        The layer-scale parameters (:func:`layer_scales`).
    attribution:
        False: PatternNet; True: PatternAttribution.
    """

    def __init__(self, scales: list[Tensor], attribution: bool) -> None:
        self._ids = {id(s) for s in scales}
        self.attribution = attribution

    def operands(self, a: Any, b: Any) -> tuple[Tensor, Tensor] | None:
        """``(x, s)`` when one operand is a known scale and the other carries the graph."""
        for scale, x in ((a, b), (b, a)):
            if id(scale) in self._ids and isinstance(x, Tensor) and x.requires_grad:
                return x, scale
        return None

    def save(self, module: nn.Module | None, x: Any, output: Tensor) -> Any:
        _, scale = x
        alive = scale != 0
        if self.attribution:
            return alive.to(output.dtype)
        return torch.where(alive, 1.0 / torch.where(alive, scale, 1.0), 0.0).to(output.dtype)

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        return grad_output * state.to(grad_output.dtype)
