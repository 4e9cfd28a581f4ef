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

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..layers import is_linear_layer

__all__ = [
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


def _bypass(x: Any, *args: Any, **kwargs: Any) -> Any:
    """The forward of a bypassed module while :meth:`Canonical.active` (its input)."""
    return x


_NO_FORWARD = object()


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

        Their ``forward`` is replaced (an instance attribute, removed on exit) rather than
        their output after the fact: a folded BatchNorm then costs nothing (computing and
        discarding it was 3-4% of a ResNet-50 explanation).
        """
        replaced = []
        try:
            for name in self.form.bypass:
                module = self._modules[name]
                replaced.append((module, module.__dict__.get("forward", _NO_FORWARD)))
                module.forward = _bypass
            yield
        finally:
            for module, previous in reversed(replaced):
                if previous is _NO_FORWARD:
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

#: BatchNorm types that can be folded (eval mode: a per-channel affine map).
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


def is_batchnorm(module: nn.Module) -> bool:
    """True for ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (not the lazy variants)."""
    return isinstance(module, BATCHNORMS) and not isinstance(
        module, nn.modules.lazy.LazyModuleMixin
    )


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


class _LeafTracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps Linear/Conv/BatchNorm (and torch.nn's leaves) opaque."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_linear_layer(m) or is_batchnorm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _pairs_in_graph(graph: torch.fx.Graph, prefix: str, modules: dict[str, nn.Module]) -> dict:
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm(modules[_join(prefix, node.target)]):
            continue
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or not is_linear_layer(
            modules[_join(prefix, source.target)]
        ):
            continue
        # Fold only what is unambiguous: each module called once, the layer's output read by
        # nothing but this BatchNorm.
        if calls[node.target] != 1 or calls[source.target] != 1 or len(source.users) != 1:
            continue
        pairs[_join(prefix, source.target)] = _join(prefix, node.target)
    return pairs


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _contains_batchnorm(module: nn.Module) -> bool:
    return any(is_batchnorm(m) for m in module.modules())


def traced_batchnorm_pairs(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Which BatchNorm directly follows which Linear/Conv, found by ``torch.fx`` tracing.

    The model is traced symbolically (no data). Where tracing a module fails (data-dependent
    control flow ...), each of its children is traced on its own instead, recursively, so
    only the BatchNorms inside untraceable code are left unfolded.

    Returns
    -------
    pairs, untraced:
        ``{layer name: batchnorm name}``, and ``{module name: why it could not be traced}``
        for the untraceable modules that hold a BatchNorm no traced graph covers.
    """
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    untraced: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if not _contains_batchnorm(module) or is_batchnorm(module):
            return
        try:
            graph = _LeafTracer().trace(module)
        except Exception as error:  # noqa: BLE001 - any tracing failure means "look inside"
            children = list(module.named_children())
            if any(is_batchnorm(child) for _, child in children):
                untraced[prefix or "<model>"] = f"{type(error).__name__}: {error}"
            for name, child in children:
                visit(child, _join(prefix, name))
            return
        pairs.update(_pairs_in_graph(graph, prefix, modules))

    visit(model, "")
    return pairs, untraced


def probed_batchnorm_pairs(model: nn.Module, example: Any) -> dict[str, str]:
    """Which BatchNorm directly follows which Linear/Conv, found by one forward pass.

    Forward hooks record each Linear/Conv output tensor and each BatchNorm input; a pair is a
    BatchNorm whose input *is* (tensor identity) a layer's output, when both modules run once
    and no other operation reads the layer's output (seen by a
    :class:`~torch.overrides.TorchFunctionMode`; shape queries do not count).

    Parameters
    ----------
    model:
        The model (run once in eval mode without gradients; left as it was).
    example:
        An input batch (or tuple of positional inputs) the model accepts.
    """
    from ..borrow import borrowed

    named = {
        module: name
        for name, module in model.named_modules()
        if is_linear_layer(module) or is_batchnorm(module)
    }
    outputs: dict[int, str] = {}
    keep: list[Tensor] = []
    calls: dict[str, int] = {}
    readers: dict[int, int] = {}
    bn_input: dict[str, int] = {}
    depth = [0]

    class _Readers(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            if depth[0] == 0 and getattr(func, "__name__", "") not in _SHAPE_QUERIES:
                for arg in (*args, *(kwargs or {}).values()):
                    if isinstance(arg, Tensor) and id(arg) in outputs:
                        readers[id(arg)] = readers.get(id(arg), 0) + 1
            return func(*args, **(kwargs or {}))

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = named[module]
        calls[name] = calls.get(name, 0) + 1
        if is_batchnorm(module) and args and isinstance(args[0], Tensor):
            bn_input[name] = id(args[0])
            if id(args[0]) in outputs:
                readers[id(args[0])] = readers.get(id(args[0]), 0) + 1
        depth[0] += 1

    def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        depth[0] -= 1
        if is_linear_layer(module) and isinstance(output, Tensor):
            outputs[id(output)] = named[module]
            keep.append(output)

    handles = []
    inputs = example if isinstance(example, tuple) else (example,)
    with borrowed(model):
        try:
            for module in named:
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
            with torch.no_grad(), _Readers():
                model(*inputs)
        finally:
            for handle in handles:
                handle.remove()
    pairs = {}
    for bn_name, tensor_id in bn_input.items():
        layer = outputs.get(tensor_id)
        if layer is None or calls.get(layer) != 1 or calls.get(bn_name) != 1:
            continue
        if readers.get(tensor_id) == 1:
            pairs[layer] = bn_name
    return pairs


_SHAPE_QUERIES = frozenset({"size", "dim", "numel", "__get__", "__len__", "ndimension"})


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

    def pairs(self, model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
        """``({layer: batchnorm}, {untraceable module: reason})`` for ``model``."""
        key = (_structure_key(model), self.example is not None)
        cached = _PAIR_CACHE.get(model)
        if cached is not None and cached[0] == key:
            return dict(cached[1]), dict(cached[2])
        if self.example is not None:
            pairs, untraced = probed_batchnorm_pairs(model, self.example), {}
        else:
            pairs, untraced = traced_batchnorm_pairs(model)
        _PAIR_CACHE[model] = (key, pairs, untraced)
        return dict(pairs), dict(untraced)

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
            w, b = fold_batchnorm(weight, bias, bn)
            result.parameters[_join(layer, "weight")] = w
            result.parameters[_join(layer, "bias")] = b
            result.bypass.add(bn_name)
            result.notes.append(f"folded {bn_name} into {layer}")
        for name, reason in untraced.items():
            result.notes.append(
                f"could not trace {name} ({reason}); its BatchNorms stay standalone"
            )
        return result

    def __repr__(self) -> str:
        return f"BatchNormFolding(example={'given' if self.example is not None else None})"


def _structure_key(model: nn.Module) -> tuple[tuple[str, type], ...]:
    return tuple((name, type(module)) for name, module in model.named_modules())


#: Traced (or probed) pairs per model object: tracing a ResNet-50 takes a noticeable fraction
#: of a second, a probe one forward pass, and every method call canonizes again. Keyed weakly:
#: the cache never keeps a model alive.
_PAIR_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_canonizers() -> list[Canonizer]:
    """The canonizers applied when a caller does not choose: :class:`BatchNormFolding`."""
    return [BatchNormFolding()]
