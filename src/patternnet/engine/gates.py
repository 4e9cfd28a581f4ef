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
keep the two-component rule, which decides at run time. Layers the graph shows to be read by
something else (a residual sum) are said so too: their rule skips the run-time test for
gradient at inactive units, which is then almost surely there.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import is_linear_layer

__all__ = ["RELU_GATES", "relu_gates"]

#: ReLU modules: their gradient is zero wherever their input is ≤ 0.
RELU_GATES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

_GATE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.relu, F.relu_, F.relu6, torch.relu, torch.relu_}
)
_GATE_METHODS = frozenset({"relu", "relu_"})

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _has_forward_hooks(model: nn.Module) -> bool:
    """Whether the user hooks module calls (a hook may replace an output fx does not see)."""
    from torch.nn.modules import module as module_globals

    if getattr(module_globals, "_global_forward_hooks", None) or getattr(
        module_globals, "_global_forward_pre_hooks", None
    ):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def relu_gates(model: nn.Module, bypass: Collection[str] = ()) -> dict[str, bool]:
    """For each Linear/Conv layer the graph shows: is its output read only by ReLUs?

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
        ``{layer name: gated}``. ``True``: every call's output (after the bypassed modules) is
        read only by ``nn.ReLU``/``nn.ReLU6`` modules, ``F.relu``/``torch.relu``/``F.relu6``
        or ``Tensor.relu`` (in place or not) — valid while those ReLUs pass the gradient's gate
        backward (no ReLU rule installed). ``False``: some call's output is read by anything
        else (a residual sum, another layer, the model's output ...). Layers the graph does not
        show for certain are left out; the dict is empty when the model cannot be traced or
        has forward hooks.
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

    def gate(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), RELU_GATES)
        if node.op == "call_function":
            return node.target in _GATE_FUNCTIONS
        if node.op == "call_method":
            return node.target in _GATE_METHODS
        return False

    def gated(node: torch.fx.Node) -> bool:
        if not node.users:
            return False  # unused output: nothing to decide; keep the run-time rule
        for user in node.users:
            if user.op == "call_module" and user.target in bypass:
                if not gated(user):
                    return False
            elif not (gate(user) and user.args and user.args[0] is node):
                return False
        return True

    calls: dict[str, list[bool]] = {}
    leaves: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        leaves.add(node.target)
        if is_linear_layer(modules[node.target]):
            calls.setdefault(node.target, []).append(gated(node))
    # A layer inside another leaf module (e.g. a torch.nn container fx does not enter) may be
    # called where the graph cannot see it.
    hidden = {
        name for name in calls
        if any(name.startswith(leaf + ".") for leaf in leaves if leaf and leaf != name)
    }
    result = {name: all(flags) for name, flags in calls.items() if name not in hidden}
    _CACHE[model] = (key, result)
    return dict(result)
