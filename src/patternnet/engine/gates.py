"""Which Linear/Conv layers reach the rest of the network only through ReLU gates.

The two-component rule (method.md §3) passes ``A₊ᵀ(g ⊙ m) + A₋ᵀ(g ⊙ (1 − m))`` back through
a layer, with ``m = [Wx + b > 0]``. When the layer's output is read by nothing but ReLUs
whose backward pass is the gradient's gate ``[Wx + b > 0]``, the gradient arriving at every
inactive unit is zero, so the second map is zero: such a layer needs neither the mask nor
``A₋``. In a plain ReLU network that is every layer but the last; in a ResNet the first two
convolutions of each block (the third and the shortcut feed the residual sum, and the ReLU
after the sum gates the *sum*, not their own units).

:func:`relu_gates` reads this from the model's graph (``torch.fx``, no data), before
the forward pass, so that the rule of such a layer saves no mask and makes no test on the way
back (a test would also cost a host-device synchronisation per layer on a GPU). Whatever the
graph does not show for certain — an untraceable model, a layer called inside another leaf
module, forward hooks of the user that could change outputs — gives no entry: those layers
keep the two-component rule, which decides at run time. Layers whose outputs reach a residual
sum are said so too: their rule skips the run-time test for gradient at inactive units, which
is then almost surely there.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import is_linear_layer

__all__ = ["RELU", "SUM", "OTHER", "RELU_GATES", "relu_gates"]

#: What a layer's output is read by (the values of :func:`relu_gates`).
RELU, SUM, OTHER = "relu", "sum", "other"

#: ReLU modules: their gradient is zero wherever their input is ≤ 0.
RELU_GATES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

_GATE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.relu, F.relu_, F.relu6, torch.relu, torch.relu_}
)
_GATE_METHODS = frozenset({"relu", "relu_"})

#: Operations between a layer and its ReLU that keep "an inactive unit receives nothing":
#: each output value is one input value (reshaping, eval-mode dropout, max-pooling: a unit
#: receives gradient only as the maximum of its window, and then the ReLU sees its value).
_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_KEEPING_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten, torch.reshape, F.dropout}
)
_KEEPING_METHODS = frozenset({"view", "reshape", "flatten", "contiguous"})

_SUM_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {operator.add, operator.iadd, torch.add}
)
_SUM_METHODS = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _has_forward_hooks(model: nn.Module) -> bool:
    """Whether the user hooks module calls (a hook may replace an output fx does not see)."""
    from torch.nn.modules import module as module_globals

    if getattr(module_globals, "_global_forward_hooks", None) or getattr(
        module_globals, "_global_forward_pre_hooks", None
    ):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def relu_gates(model: nn.Module, bypass: Collection[str] = ()) -> dict[str, str]:
    """For each Linear/Conv layer the graph shows: what reads its output?

    Parameters
    ----------
    model:
        The model (traced symbolically with ``torch.fx``; never run).
    bypass:
        Names of modules that return their input in the canonical form (folded BatchNorms,
        :attr:`~patternnet.engine.canonize.CanonicalForm.bypass`): the layer's output passes
        through them unchanged.

    Returns
    -------
    dict
        ``{layer name: kind}``. :data:`RELU`: every call's output (after the bypassed modules,
        reshapes, eval-mode dropout and max-pooling) is read only by ``nn.ReLU``/``nn.ReLU6``
        modules, ``F.relu``/``torch.relu``/``F.relu6`` or ``Tensor.relu`` (in place or not) —
        its inactive units never receive anything while those ReLUs pass the gradient's gate
        backward (no ReLU rule installed). :data:`SUM`: not so, and some output reaches a
        two-tensor addition (a residual sum, whose ReLU gates the sum, not the unit).
        :data:`OTHER`: anything else (another layer, a concatenation, the model's output ...).
        Layers the graph does not show for certain are left out; the dict is empty when the
        model cannot be traced or has forward hooks.
    """
    if _has_forward_hooks(model):
        return {}
    from .canonize import _LeafTracer, _structure_key

    bypass = frozenset(bypass)
    key = (_structure_key(model), bypass)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    from .support import classify

    if any(s.kind == "unsupported" for s in classify(model, folding=False).values()):
        return {}  # the method refuses the model; tracing would run its forward
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable: decide at run time
        _CACHE[model] = (key, {})
        return {}
    modules = dict(model.named_modules())

    def member(node: torch.fx.Node, types: tuple, functions: frozenset, methods: frozenset) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), types)
        if node.op == "call_function":
            return node.target in functions
        if node.op == "call_method":
            return node.target in methods
        return False

    def readers(node: torch.fx.Node) -> set[str]:
        """The kinds of the operations that finally read ``node``'s value."""
        if not node.users:
            return {OTHER}  # unused output: nothing to decide; keep the run-time rule
        kinds: set[str] = set()
        for user in node.users:
            first = bool(user.args) and user.args[0] is node
            if user.op == "call_module" and user.target in bypass:
                kinds |= readers(user)
            elif first and member(user, _KEEPING_MODULES, _KEEPING_FUNCTIONS, _KEEPING_METHODS):
                kinds |= readers(user)
            elif first and member(user, RELU_GATES, _GATE_FUNCTIONS, _GATE_METHODS):
                kinds.add(RELU)
            elif member(user, (), _SUM_FUNCTIONS, _SUM_METHODS):
                kinds.add(SUM)
            else:
                kinds.add(OTHER)
        return kinds

    calls: dict[str, set[str]] = {}
    leaves: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        leaves.add(node.target)
        if is_linear_layer(modules[node.target]):
            calls.setdefault(node.target, set()).update(readers(node))
    # A layer inside another leaf module (e.g. a torch.nn container fx does not enter) may be
    # called where the graph cannot see it.
    hidden = {
        name for name in calls
        if any(name.startswith(leaf + ".") for leaf in leaves if leaf and leaf != name)
    }
    result = {
        name: RELU if kinds == {RELU} else SUM if SUM in kinds else OTHER
        for name, kinds in calls.items()
        if name not in hidden
    }
    _CACHE[model] = (key, result)
    return dict(result)
