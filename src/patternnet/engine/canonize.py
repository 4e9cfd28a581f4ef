"""Canonical forms of a borrowed model: graph rewrites that are undone on exit.

A canonizer turns the user's model into an equivalent one that the rules understand (for
example, a BatchNorm folded into the convolution before it). Nothing is rewritten in place:
a canonizer only *describes* the rewrite as

- ``parameters``: replacement tensors by qualified parameter name (e.g. a folded conv weight
  and bias), applied for the duration of one forward call with
  :func:`torch.func.functional_call`, and
- ``bypass``: modules whose forward becomes the identity for that call (the folded BatchNorm).

:class:`Canonical` applies a list of canonizers to one model and runs forward passes in the
canonical form; the user's module objects, parameters and buffers are never changed.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .attention import attention_projections
from .graph import BATCHNORMS, ModelGraph, is_batchnorm, probed_batchnorm_pairs

__all__ = [
    "BATCHNORMS",
    "BatchNormFolding",
    "Canonical",
    "CanonicalForm",
    "Canonizer",
    "batchnorm_scale_shift",
    "default_canonizers",
    "fold_batchnorm",
    "is_batchnorm",
    "probed_batchnorm_pairs",
    "traced_batchnorm_pairs",
]


@dataclass
class CanonicalForm:
    """A rewrite of a model, as data.

    Attributes
    ----------
    parameters:
        Replacement tensors by qualified parameter (or buffer) name.
    bypass:
        Qualified names of modules whose output is replaced by their input.
    notes:
        Human-readable lines saying what was rewritten (shown in reports).
    """

    parameters: dict[str, Tensor] = field(default_factory=dict)
    bypass: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def update(self, other: CanonicalForm) -> None:
        """Add another rewrite (later canonizers see earlier ones' results)."""
        self.parameters.update(other.parameters)
        self.bypass |= other.bypass
        self.notes += other.notes


class Canonizer(Protocol):
    """Describes a rewrite of a model (see :class:`CanonicalForm`)."""

    def __call__(self, model: nn.Module, form: CanonicalForm) -> CanonicalForm:
        """Return the rewrite for ``model`` given what earlier canonizers rewrote."""
        ...


def _passthrough(*args: Any, **kwargs: Any) -> Any:
    """The forward of a bypassed module: its (first) input, unchanged, nothing computed."""
    return args[0] if args else next(iter(kwargs.values()))


_ABSENT = object()


class Canonical:
    """Run a model in canonical form without changing it.

    Parameters
    ----------
    model:
        The user's model (borrowed).
    canonizers:
        Canonizers applied in order; None (the default) means :func:`default_canonizers`,
        an empty sequence the model as it is.
    """

    def __init__(self, model: nn.Module, canonizers: Sequence[Canonizer] | None = None) -> None:
        self.model = model
        self.form = CanonicalForm()
        for canonizer in default_canonizers() if canonizers is None else canonizers:
            self.form.update(canonizer(model, self.form))
        self._modules = dict(model.named_modules())
        # the virtual Q/K/V projections of attention modules (engine/attention.py)
        self._modules.update(attention_projections(model))

    def parameter(self, name: str) -> Tensor | None:
        """The canonical value of a parameter (e.g. ``"features.0.weight"``), or None."""
        if name in self.form.parameters:
            return self.form.parameters[name]
        module_name, _, attr = name.rpartition(".")
        module = self._modules.get(module_name)
        return getattr(module, attr, None) if module is not None else None

    def weight(self, layer: str) -> Tensor:
        """The canonical weight of a Linear/Conv layer."""
        weight = self.parameter(f"{layer}.weight" if layer else "weight")
        if weight is None:
            raise KeyError(f"layer {layer!r} has no weight")
        return weight

    def bias(self, layer: str) -> Tensor | None:
        """The canonical bias of a Linear/Conv layer (None if it has none)."""
        return self.parameter(f"{layer}.bias" if layer else "bias")

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within this block, bypassed modules return their input (restored on exit).

        The module's ``forward`` is shadowed for the block, so a folded BatchNorm costs
        nothing (a forward hook replacing the output would still compute it: 7% of a
        ResNet-50 gradient on CPU).
        """
        shadowed: list[tuple[nn.Module, Any]] = []
        try:
            for name in self.form.bypass:
                module = self._modules[name]
                shadowed.append((module, module.__dict__.get("forward", _ABSENT)))
                module.forward = _passthrough
            yield
        finally:
            for module, previous in reversed(shadowed):
                if previous is _ABSENT:
                    del module.forward
                else:
                    module.forward = previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One forward pass in canonical form (use inside :meth:`active`)."""
        if not self.form.parameters:
            return self.model(*args, **kwargs)
        return torch.func.functional_call(
            self.model, self.form.parameters, args, kwargs, tie_weights=False, strict=False
        )



# ---------------------------------------------------------------------- BatchNorm folding

def batchnorm_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """The eval-mode BatchNorm as ``y = s ⊙ x + t`` per channel, in float64.

    ``s = γ / √(σ² + ε)`` and ``t = β − μ s`` (``γ = 1``, ``β = 0`` without ``affine``).

    Raises
    ------
    ValueError
        If the BatchNorm keeps no running statistics (it then normalises each batch by its own
        statistics even in eval mode, which is not a fixed affine map).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has track_running_stats=False: in eval mode it normalises "
            "each batch by that batch's statistics, which is not a fixed per-channel map"
        )
    var = bn.running_var.detach().to(torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    return scale, shift


def fold_batchnorm(
    weight: Tensor, bias: Tensor | None, bn: nn.Module
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the Linear/Conv layer before it.

    ``BN(W x + b) = (s ⊙ W) x + (s ⊙ b + t)`` with ``s, t`` from :func:`batchnorm_scale_shift`:
    the output channel ``o`` of the layer is channel ``o`` of the BatchNorm.

    Parameters
    ----------
    weight:
        The layer's weight ``(O, ...)``.
    bias:
        The layer's bias ``(O,)`` or None (then the folded bias is ``t``).
    bn:
        The BatchNorm applied to the layer's output (``num_features == O``).

    Returns
    -------
    weight, bias:
        Folded tensors, in the weight's dtype and device (``s``, ``t`` and the bias computed
        in float64).
    """
    if bn.num_features != weight.shape[0]:
        raise ValueError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) into a layer with "
            f"{weight.shape[0]} output channels"
        )
    scale, shift = batchnorm_scale_shift(bn)
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    # s and t in float64 (C values); the weight is scaled in its own dtype: one rounding per
    # element, and no float64 copy of large weights on every call.
    w = weight.detach() * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.detach().to(torch.float64) * scale + shift
    return w, b.to(weight.dtype)


def _state(tensor: Tensor | None) -> tuple[Any, ...] | None:
    """What identifies a tensor's current values: object, in-place version, storage, type."""
    if tensor is None:
        return None
    return (id(tensor), tensor._version, tensor.data_ptr(), tensor.device, tensor.dtype,
            tensor.shape)  # fmt: skip


def traced_batchnorm_pairs(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Which BatchNorm directly follows which Linear/Conv, read from the model's one graph.

    The model is traced symbolically (no data) by :class:`~patternnet.engine.graph.ModelGraph`.
    Where tracing the model fails (data-dependent control flow ...), each child holding a
    BatchNorm is traced on its own instead, recursively, so only the BatchNorms inside
    untraceable code are left unfolded.

    Returns
    -------
    pairs, untraced:
        ``{layer name: batchnorm name}``, and ``{module name: why it could not be traced}``
        for the untraceable modules that hold a BatchNorm no traced graph covers.
    """
    graph = ModelGraph.of(model)
    return graph.batchnorm_pairs(), dict(graph.untraced)


class BatchNormFolding:
    """Canonizer: fold each BatchNorm into the Linear/Conv whose output it normalises.

    In eval mode ``BN(W x + b) = (s ⊙ W) x + (s ⊙ b + t)`` (see :func:`fold_batchnorm`); the
    canonical form replaces the layer's weight and bias by the folded ones (a layer without
    bias gets one) and bypasses the BatchNorm, so the canonical network computes the same
    outputs and its Linear/Conv outputs are the BatchNorm outputs: the two-component masks
    ``[Wx + b > 0]`` are the gates of the ReLU that follows, and the patterns are those of
    the folded layer (method.md §2). The user's model is not changed.

    Which BatchNorm follows which layer is read from the model's graph: by ``torch.fx``
    tracing (:func:`traced_batchnorm_pairs`), or, when ``example`` is given, by one probe
    forward pass (:func:`probed_batchnorm_pairs`). A BatchNorm is folded only when it reads
    the layer's output directly, nothing else reads that output, and both run once per
    forward pass. Every other BatchNorm stays **standalone**: a per-channel linear unit (see
    :func:`patternnet.engine.support.standalone_batchnorm_rules`).

    Parameters
    ----------
    example:
        Optional input batch for the probe pass (for models ``torch.fx`` cannot trace).
    """

    def __init__(self, example: Any = None) -> None:
        self.example = example
        # Folded (weight, bias) per BatchNorm module, weakly keyed (never keeps a model alive).
        self._folds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _folded(self, weight: Tensor, bias: Tensor | None, bn: nn.Module) -> tuple[Tensor, Tensor]:
        """:func:`fold_batchnorm`, reused by this canonizer while its inputs are unchanged.

        A method canonizes the model at every call; folding ResNet-50's 53 BatchNorms anew
        rewrote all its conv weights each time (≈45 ms per call on one CPU thread) and gave
        new tensors that defeated the methods' own caches (PatternAttribution's ``W ⊙ A``).
        The key holds each input tensor's identity, in-place version counter, storage
        address, device and dtype: optimiser steps and other in-place updates,
        ``load_state_dict``, ``.to()`` and ``.data`` assignment all invalidate it. Writes
        *through* ``.data`` (``w.data.mul_(2)``) bypass the version counter: after those,
        call :meth:`clear` (``method.refresh()`` does) or use a new method object.
        """
        inputs = (weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = (tuple(_state(t) for t in inputs), bn.eps)
        cached = self._folds.get(bn)
        if cached is not None and cached[0] == key and cached[1] is weight:
            return cached[2]
        result = fold_batchnorm(weight, bias, bn)
        self._folds[bn] = (key, weight, result)
        return result

    def clear(self) -> None:
        """Forget the folded weights (after writes through ``.data``)."""
        self._folds = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo: dict) -> BatchNormFolding:
        return BatchNormFolding(copy.deepcopy(self.example, memo))

    def pairs(self, model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
        """``({layer: batchnorm}, {untraceable module: reason})`` for ``model``."""
        graph = ModelGraph.of(model)
        if self.example is not None:
            return graph.batchnorm_pairs(self.example), {}
        return graph.batchnorm_pairs(), dict(graph.untraced)

    def __call__(self, model: nn.Module, form: CanonicalForm) -> CanonicalForm:
        modules = dict(model.named_modules())
        pairs, untraced = self.pairs(model)
        result = CanonicalForm()
        for layer, bn_name in pairs.items():
            if bn_name in form.bypass:
                continue
            bn = modules[bn_name]
            if bn.running_mean is None:
                continue  # batch statistics: not a fixed map (support check reports it)
            weight = form.parameters.get(f"{layer}.weight", modules[layer].weight)
            bias = form.parameters.get(f"{layer}.bias", modules[layer].bias)
            w, b = self._folded(weight, bias, bn)
            result.parameters[f"{layer}.weight" if layer else "weight"] = w
            result.parameters[f"{layer}.bias" if layer else "bias"] = b
            result.bypass.add(bn_name)
            result.notes.append(f"folded {bn_name} into {layer}")
        for name, reason in untraced.items():
            result.notes.append(
                f"could not trace {name} ({reason}); its BatchNorms stay standalone"
            )
        return result

    def __repr__(self) -> str:
        return f"BatchNormFolding(example={'given' if self.example is not None else None})"


def default_canonizers() -> list[Canonizer]:
    """The canonizers applied when a caller does not choose: :class:`BatchNormFolding`."""
    return [BatchNormFolding()]
