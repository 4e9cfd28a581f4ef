"""Statistics and patterns of the fixed-weight linear nodes: sums, average pools, means.

:mod:`patternnet.engine.nodes` describes every sum, average pool and mean of a forward pass as
a grouped convolution with a fixed weight (method.md §10). This module collects each node's
sums **in the same streaming pass as the layers' statistics**: a node is one more
:class:`~patternnet.patterns.statistics.LayerStatistics` in
:attr:`Statistics.layers <patternnet.patterns.statistics.Statistics>`, under its name
(``"sum#0"``), with the layout of a convolution with ``groups = U`` (``sum_x`` is ``(U, D)``),
so merging (``+``), ``all_reduce_`` and checkpoints treat it like any layer, in float64.

- channelwise nodes (sums, means): the node input unit-major ``(U, D, M)`` (one copy) times
  the stacked ``[1, y, m, y·m]`` in one batched product: a few scalars per channel and
  summand;
- window nodes (average pools): :meth:`LayerStatistics.update` with the pool's depthwise
  geometry, exactly as for a convolution.

:func:`node_patterns` turns a node's sums into patterns with the estimators of
:mod:`~patternnet.patterns.estimators` and the node's fixed weight (ones for sums, ``1/D`` for
pools and means), so a node gets what the equivalent convolution would get, the normaliser
fallback of method.md §11 included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..engine.nodes import NodeCall, NodeTracker, fixed_weight, graph_recording, node_kind
from . import estimators
from .statistics import LayerStatistics, Statistics, required_sums

__all__ = ["node_patterns", "recording", "update_channelwise"]


@torch.no_grad()
def update_channelwise(
    stats: LayerStatistics, x: Tensor, y: Tensor, precision: str = "float64"
) -> None:
    """Add one batch of a channelwise node: input ``x (U, D, M)``, output ``y (U, M)``.

    ``M`` samples (images × positions) per unit, unit-major. The sums are those of a
    convolution with ``groups = U`` whose every unit reads ``D`` inputs (method.md §2 with
    ``y = wᵀx``, no bias, mask ``y > 0``): one batched product of ``x`` with the stacked
    ``[1, y, m, y·m(, 1 − m, y − y·m)]`` gives them all (a single pass over ``x``).
    """
    dtype = torch.float64 if precision == "float64" else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    need = stats.tensors
    need["count"] += y.shape[1]
    need["sum_y"] += y.sum(1).to(torch.float64)
    columns: dict[str, Tensor] = {}
    if "sum_x" in need:
        columns["sum_x"] = torch.ones_like(y)
    if "sum_xy" in need:
        columns["sum_xy"] = y
    if "count_plus" in need:
        m = (y > 0).to(dtype)
        need["count_plus"] += m.sum(1).to(torch.float64)
        ym = y * m
        columns["sum_x_plus"], columns["sum_xy_plus"] = m, ym
        if "sum_x_minus" in need:
            columns["sum_x_minus"], columns["sum_xy_minus"] = 1 - m, y - ym
    if not columns:
        return
    product = torch.bmm(x, torch.stack(list(columns.values()), 2))  # (U, D, k)
    for k, name in enumerate(columns):
        need[name] += product[:, :, k].to(torch.float64)


@contextmanager
def recording(stats: Statistics, precision: str) -> Iterator[NodeTracker]:
    """Within this block, forward passes add every node's sums to ``stats`` (in place).

    The block records the autograd graph without keeping tensors (so that nodes are found as
    in an explanation, :func:`~patternnet.engine.nodes.graph_recording`); the caller marks
    the batch ``requires_grad`` and calls the yielded tracker's ``new_pass()`` before each
    forward pass (nodes are named by their order within one pass).
    """
    device = next(iter(stats.layers.values())).device if stats.layers else "cpu"
    sums = required_sums(stats.estimator, stats.negative, precision)

    def handle(name: str, call: NodeCall) -> None:
        layer = stats.layers.get(name)
        if layer is None:
            layer = LayerStatistics(call.units, call.units, call.width, sums, device)
            stats.layers[name] = layer
        elif (layer.out_features, layer.patch_size) != (call.units, call.width):
            raise ValueError(
                f"{name} ({call.kind}) has {call.units} units with {call.width} inputs each in "
                f"this batch but {layer.out_features} with {layer.patch_size} before: the "
                "graph changed between batches (inputs of another size reaching a pool or "
                "mean?); fit with inputs of one size"
            )
        if call.layout == "window":
            assert call.geometry is not None
            x, out = call.arrange()
            layer.update(call.geometry, x, out, None, call.weight_shape(), precision)
        else:
            assert call.unit_major is not None
            dtype = torch.float64 if precision == "float64" else torch.float32
            update_channelwise(layer, *call.unit_major(dtype), precision)
        return None

    tracker = NodeTracker(handle)
    with graph_recording(), tracker:
        yield tracker


def node_patterns(
    name: str, stats: LayerStatistics, estimator: str, negative: bool
) -> tuple[dict[str, Tensor], estimators.LayerReport]:
    """A node's ``(U, D)`` float64 patterns from its sums, with the fit report.

    Parameters
    ----------
    name:
        The node's name (its kind before ``#``).
    stats:
        Its sums.
    estimator, negative:
        As for the layers: ``"linear"`` gives ``{"a"}``, ``"two_component"`` gives
        ``{"a_plus"[, "a_minus"]}`` (split by the node's output ``y > 0``), ``"filter"``
        ``{"a"} = w / wᵀw``.
    """
    weight = fixed_weight(node_kind(name), stats.out_features, stats.patch_size)
    weight = weight.to(stats.tensors["count"].device) if stats.tensors else weight
    if estimator == "filter":
        a, report = estimators.filter_pattern(weight)
        return {"a": a}, report
    if estimator == "linear":
        a, report = estimators.linear_pattern(stats, weight)
        return {"a": a}, report
    if estimator == "two_component":
        return estimators.two_component_patterns(stats, weight, negative)
    raise ValueError(f"estimator {estimator!r} has no patterns for {name}")


def describe(stats: Statistics) -> dict[str, Any]:
    """``{node: {"kind", "units", "inputs"}}`` of the nodes in ``stats`` (for the metadata)."""
    from ..engine.nodes import is_node_name

    return {
        name: {"kind": node_kind(name), "units": layer.out_features, "inputs": layer.patch_size}
        for name, layer in stats.layers.items()
        if is_node_name(name)
    }
