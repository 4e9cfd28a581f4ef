"""Which Linear/Conv layers reach the rest of the network only through ReLU gates.

The two-component rule (method.md §3) passes ``A₊ᵀ(g ⊙ m) + A₋ᵀ(g ⊙ (1 − m))`` back through
a layer, with ``m = [Wx + b > 0]``. When the layer's output is read by nothing but ReLUs
whose backward pass is the gradient's gate ``[Wx + b > 0]``, the gradient arriving at every
inactive unit is zero, so the second map is zero: such a layer needs neither the mask nor
``A₋``. In a plain ReLU network that is every layer but the last; in a ResNet the first two
convolutions of each block (the third and the shortcut feed the residual sum, and the ReLU
after the sum gates the *sum*, not their own units).

:func:`relu_gates` reads this from the model's one graph (:mod:`~patternnet.engine.graph`,
``torch.fx``, no data), before
the forward pass, so that the rule of such a layer saves no mask and makes no test on the way
back (a test would also cost a host-device synchronisation per layer on a GPU). Whatever the
graph does not show for certain — an untraceable model, a layer called inside another leaf
module, forward hooks of the user that could change outputs — gives no entry: those layers
keep the two-component rule, which decides at run time. Layers whose outputs reach a residual
sum are said so too: their rule skips the run-time test for gradient at inactive units, which
is then almost surely there.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from .graph import OTHER, RELU, RELU_GATES, SUM, ModelGraph, has_forward_hooks
from .support import classify

__all__ = ["RELU", "SUM", "OTHER", "RELU_GATES", "gated_nodes", "relu_gates"]


def relu_gates(model: nn.Module, bypass: Collection[str] = ()) -> dict[str, str]:
    """For each Linear/Conv layer the graph shows: what reads its output?

    :meth:`ModelGraph.relu_gates <patternnet.engine.graph.ModelGraph.relu_gates>` of the
    model's one graph, or ``{}`` (decide at run time) when the model has forward hooks or
    holds modules PatternNet does not support (the method refuses those anyway).

    Parameters
    ----------
    model:
        The model (its graph is traced once, symbolically; the model is never run).
    bypass:
        Names of modules that return their input in the canonical form (folded BatchNorms,
        :attr:`~patternnet.engine.canonize.CanonicalForm.bypass`).

    Returns
    -------
    dict
        ``{layer name: kind}`` with kinds :data:`RELU`, :data:`SUM`, :data:`OTHER`.
    """
    if has_forward_hooks(model):  # hooks are checked at every call: never cached
        return {}
    graph = ModelGraph.of(model)
    supported = graph.memo(
        "supported",
        lambda: all(s.kind != "unsupported" for s in classify(model, folding=False).values()),
    )
    return graph.relu_gates(bypass) if supported else {}


def gated_nodes(model: nn.Module, bypass: Collection[str] = ()) -> frozenset[str]:
    """The sums, average pools and means whose output only ReLUs read (node names).

    :meth:`ModelGraph.gated_nodes <patternnet.engine.graph.ModelGraph.gated_nodes>`, with
    the guards of :func:`relu_gates`: empty (decide at run time) when the model has forward
    hooks or holds modules PatternNet does not support. A ResNet's residual sums are such
    nodes: the ReLU after the sum gates exactly the sum's inactive units, so the node's
    two-component rule needs neither the mask nor ``p₋`` there.
    """
    if has_forward_hooks(model):
        return frozenset()
    graph = ModelGraph.of(model)
    supported = graph.memo(
        "supported",
        lambda: all(s.kind != "unsupported" for s in classify(model, folding=False).values()),
    )
    return graph.gated_nodes(bypass) if supported else frozenset()
