"""Statistics and patterns of the fixed-weight linear nodes: sums, average pools, means.

:mod:`patternnet.engine.nodes` describes every sum, average pool and mean of a forward pass as
a grouped convolution with a fixed weight (method.md §10). This module collects each node's
sums **in the same streaming pass as the layers' statistics**: a node is one more
:class:`~patternnet.patterns.statistics.LayerStatistics` in
:attr:`Statistics.layers <patternnet.patterns.statistics.Statistics>`, under its name
(``"sum#0"``), with the layout of a convolution with ``groups = U`` (``sum_x`` is ``(U, D)``),
so merging (``+``), ``all_reduce_`` and checkpoints treat it like any layer, in float64.

- sums (default float32 fit): each summand read where the model holds it, ``(N, U, P)``,
  times the columns ``[m, y'·m, y'·(1 − m)]`` in one batched product over the ``N·U`` rows,
  added over images in float64 (:func:`_update_sum`): a few scalars per channel and summand;
- means, and every channelwise node in float64: the node input unit-major ``(U, D, M)``
  (one copy) times the stacked ``[1, y, m, y·m]`` in one batched product;
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

from ..engine.graph import NodePlan
from ..engine.nodes import (
    NodeCall,
    NodeTracker,
    fixed_weight,
    graph_recording,
    is_node_name,
    node_kind,
)
from . import estimators
from .attention_statistics import attention_joint_pattern, attention_pattern
from .statistics import LayerStatistics, Statistics, _Shift, required_sums

__all__ = ["node_patterns", "recording", "update_channelwise"]


@torch.no_grad()
def update_channelwise(
    stats: LayerStatistics,
    call: NodeCall,
    precision: str = "float64",
    workspace: dict[Any, Any] | None = None,
) -> None:
    """Add one batch of a channelwise node (a sum or a mean) to its sums.

    The node input unit-major ``x (U, D, M)`` and output ``y (U, M)``: ``M`` samples (images ×
    positions) per unit. The sums are those of a convolution with ``groups = U`` whose every
    unit reads ``D`` inputs (method.md §2 with ``y = wᵀx``, no bias, mask ``y > 0``): one
    batched product of ``x`` with the stacked ``[1, y, m, y·m]`` gives them all (a single pass
    over ``x``).

    ``precision="float32"`` (the default fit) follows the layers' scheme (method.md §11): the
    product is formed in float32 of *shifted* data ``x' = x − x₀``, ``y' = y − y₀`` (``x₀`` per
    unit and input, ``y₀`` per unit: the means of the node's first batch, kept in
    ``stats._shift`` so that checkpoints and merged fits use the same ones), with the active
    and inactive sides as separate columns ``[1, m, y'·m, y'·(1 − m)]``; the batch's ``(U, D)``
    product is turned back into the sums of ``x`` and ``y`` in float64 at once::

        Σ m x y = Σ m x'y' + y₀ Σ m x' + x₀ Σ m y        Σ m x = Σ m x' + x₀ Σ m
        Σ x y   = Σ x'y'   + y₀ Σ x'   + x₀ Σ y          Σ x   = Σ x'   + x₀ M

    ``precision="float64"``: every product in float64 (the reference).

    Sums under ``"float32"`` are read in the model's own layout (:func:`_update_sum`: no
    unit-major copy); ``workspace`` keeps its buffers from one call to the next.
    """
    need = stats.tensors
    if precision == "float32" and call.native is not None and (
        "count_plus" in need or "sum_xy" in need
    ):
        _update_sum(stats, call, {} if workspace is None else workspace)
        return
    if precision == "float64":
        x, y = call.unit_major(torch.float64, None)
        shift = None
    else:
        shift = stats._shift
        if shift is None:
            x, y = call.unit_major(torch.float32, None)
            shift = stats._shift = _first_shift(x, y)
            x.sub_(shift.channel.view(x.shape[0], x.shape[1], 1))
        else:
            x, y = call.unit_major(torch.float32, shift.channel.view(_unit_shape(stats)))
    samples = y.shape[1]
    need["count"] += samples
    plus = "count_plus" in need
    names = (["x"] if "sum_x" in need else []) + ["m", "ym"] * plus + (
        ["y_minus"] if plus else ["y"]) * ("sum_xy" in need)  # fmt: skip
    # The columns written in place, unit-major (U, k, M): no stacked copy of y. The per-unit
    # sums over samples (Σ y′, Σ m, Σ m y′) are formed in the columns' dtype (float32 sums of
    # shifted values; of 0/1 exact below 2**24 samples a batch) and added in float64: a
    # float64-accumulating reduction of float32 data, and torch.heaviside, each took 20-35×
    # longer than the float32 sum / comparison on CPU.
    stacked = y.new_empty((y.shape[0], len(names) + 1, samples))
    columns = dict(zip([*names, "y_all"], stacked.unbind(1)))
    if "x" in columns:
        columns["x"].fill_(1.0)
    target = columns["ym"] if plus else columns.get("y", columns["y_all"])
    if shift is None:  # y′ = y − y₀ (y itself in float64)
        target.copy_(y)
    else:
        torch.sub(y, shift.offsets[""].view(-1, 1), out=target)
    sum_y = target.sum(1).to(torch.float64)  # Σ y′
    if shift is not None:
        sum_y += samples * shift.y0[""]
    need["sum_y"] += sum_y
    if not names:
        return
    if plus:
        m = columns["m"]
        torch.gt(y, 0, out=m)  # [y > 0] as 0/1 in y's dtype
        count_plus = m.sum(1).to(torch.float64)
        need["count_plus"] += count_plus
        if "y_minus" in columns:  # y′·(1 − m) = y′ − y′·m
            columns["y_minus"].copy_(target)
        target.mul_(m)
        if "y_minus" in columns:
            columns["y_minus"].sub_(target)
        ym = target
    stacked = stacked[:, : len(names)]
    product = torch.bmm(x, stacked.transpose(1, 2)).to(torch.float64)  # (U, D, k)
    p = {name: product[:, :, k] for k, name in enumerate(names)}  # each (U, D)
    if shift is None:
        if "sum_xy" in need:  # Σ x y over all samples: both sides, or the one column
            p["y"] = p["ym"] + p["y_minus"] if plus else p["y"]
        for name, key in (("sum_x", "x"), ("sum_x_plus", "m"), ("sum_xy_plus", "ym"),
                          ("sum_xy", "y")):  # fmt: skip
            if name in need:
                need[name] += p[key]
        return
    _add_shifted_products(need, p, shift, plus, samples, sum_y,
                          count_plus if plus else None,
                          ym.sum(1).to(torch.float64) if plus else None)  # fmt: skip


def _update_sum(stats: LayerStatistics, call: NodeCall, workspace: dict[Any, Any]) -> None:
    """One batch of a sum ``y = Σ_d u_d`` in float32, read where the model holds it.

    The same sums and shifts as :func:`update_channelwise`, formed per image and channel:
    the columns ``[m, y'·m, y'·(1 − m)]`` (or ``[y']``) are written once into ``(N, U, k, P)``
    (``P`` positions), each summand's ``x' = u_d − x₀`` (no copy where ``x₀ = 0``, e.g. a
    ReLU's output, :func:`_keep_zeros`) is multiplied with them in one batched product over
    ``N·U`` rows of ``P`` positions, and the ``N`` per-image float32 results are added in
    float64. Fewer passes over the data than the unit-major copy, no transposed reads, and
    the buffers are reused (``workspace``) instead of allocated for every sum.
    """
    need = stats.tensors
    values, y = call.native()
    n, units, positions = y.shape
    samples = n * positions
    if stats._shift is None:
        stats._shift = _first_shift_native(values, y)
    shift = stats._shift
    plus = "count_plus" in need
    names = ["m", "ym"] * plus + (["y_minus"] if plus else ["y"]) * ("sum_xy" in need)
    column = {name: j for j, name in enumerate(names)}
    k, size = len(names), n * units * positions
    buffer = workspace.get(y.device)
    if buffer is None or buffer.numel() < (k + 1) * size:
        workspace[y.device] = buffer = torch.empty((k + 1) * size, device=y.device)
    columns = buffer[: k * size].view(n, units, k, positions)
    scratch = buffer[k * size : (k + 1) * size].view(n, units, positions)
    need["count"] += samples
    offset = shift.offsets[""].view(1, -1, 1)  # y₀ in float32
    if plus:
        m, ym = columns[:, :, column["m"]], columns[:, :, column["ym"]]
        torch.gt(y, 0, out=m)  # [y > 0] as 0/1
        if "y_minus" in column:  # y′ = y − y₀, then y′·m and y′·(1 − m) = y′ − y′·m
            minus = columns[:, :, column["y_minus"]]
            torch.sub(y, offset, out=minus)
            torch.mul(minus, m, out=ym)
            minus.sub_(ym)
        else:
            torch.sub(y, offset, out=ym)
            sum_y = ym.sum(-1).to(torch.float64).sum(0)
            ym.mul_(m)
        sums = columns.sum(-1).to(torch.float64).sum(0)  # (U, k): Σ m, Σ y′m [, Σ y′(1 − m)]
        if "y_minus" in column:
            sum_y = sums[:, column["ym"]] + sums[:, column["y_minus"]]
        count_plus = sums[:, column["m"]]
        need["count_plus"] += count_plus
    else:
        target = columns[:, :, column["y"]]
        torch.sub(y, offset, out=target)
        sum_y = target.sum(-1).to(torch.float64).sum(0)
    need["sum_y"] += sum_y + samples * shift.y0[""]
    inputs = len(values)
    product = torch.empty((units, inputs, k), dtype=torch.float64, device=y.device)
    sum_x = torch.empty((units, inputs), dtype=torch.float64, device=y.device)
    x0 = shift.channel.view(units, inputs)
    key = ("unshifted", id(shift))
    if workspace.get(key, (None,))[0] is not shift:  # once per fit: no host sync per batch
        workspace[key] = (shift, [not bool(x0[:, d].any()) for d in range(inputs)])
    unshifted = workspace[key][1]
    rows = columns.view(n * units, k, positions).transpose(1, 2)
    for d, value in enumerate(values):
        if value.dtype == torch.float32 and unshifted[d]:
            x = value  # x₀ = 0: read the summand itself
        else:
            x = torch.sub(value, x0[:, d].view(1, -1, 1), out=scratch)
        part = torch.bmm(x.reshape(n * units, 1, positions), rows)  # (N·U, 1, k)
        product[:, d] = part.view(n, units, k).to(torch.float64).sum(0)
        if "sum_x" in need:
            sum_x[:, d] = x.sum(-1).to(torch.float64).sum(0)
    p = {name: product[:, :, j] for name, j in column.items()}  # each (U, D)
    p["x"] = sum_x
    _add_shifted_products(need, p, shift, plus, samples, sum_y + samples * shift.y0[""],
                          count_plus if plus else None,
                          sums[:, column["ym"]] if plus else None)  # fmt: skip


def _add_shifted_products(
    need: dict[str, Tensor], p: dict[str, Tensor], shift: _Shift, plus: bool, samples: int,
    sum_y: Tensor, count_plus: Tensor | None, sum_ym: Tensor | None,
) -> None:
    """Turn one batch's products of shifted data back into sums of ``x`` and ``y``."""
    if "sum_xy" in need:  # Σ x y over all samples: both sides, or the one column
        p["y"] = p["ym"] + p["y_minus"] if plus else p["y"]
    x0, y0 = shift.x0, shift.y0[""].view(-1, 1)  # (U, D), (U, 1) float64
    if "sum_x" in need:
        need["sum_x"] += p["x"] + samples * x0
    if plus:
        assert count_plus is not None and sum_ym is not None
        sum_y_plus = sum_ym + shift.y0[""] * count_plus  # Σ m y
        need["sum_x_plus"] += p["m"] + x0 * count_plus.view(-1, 1)
        need["sum_xy_plus"] += p["ym"] + y0 * p["m"] + x0 * sum_y_plus.view(-1, 1)
    if "sum_xy" in need:
        need["sum_xy"] += p["y"] + y0 * p["x"] + x0 * sum_y.view(-1, 1)


def _first_shift_native(values: tuple[Tensor, ...], y: Tensor) -> _Shift:
    """:func:`_first_shift` of a sum from its summands and output, each ``(N, U, P)``."""
    samples = y.shape[0] * y.shape[2]

    def mean(v: Tensor) -> Tensor:  # float32 per image and unit, the images in float64
        return v.sum(-1, dtype=torch.float32).to(torch.float64).sum(0) / samples

    x0 = torch.stack([mean(v) for v in values], 1).to(torch.float32)
    x0 = _keep_zeros(x0, torch.stack([v.amin((0, 2)) for v in values], 1).to(torch.float32))
    return _shift_of(x0, mean(y).to(torch.float32))


def _unit_shape(stats: LayerStatistics) -> tuple[int, int]:
    """``(U, D)``: a channelwise node's units and inputs per unit."""
    return stats.out_features, stats.patch_size


def _first_shift(x: Tensor, y: Tensor) -> _Shift:
    """The shifts of a channelwise node from its first batch: ``x₀ (U, D)``, ``y₀ (U,)``.

    ``x₀`` is the mean of each unit's input over the batch, except for inputs that were never
    negative (:func:`_keep_zeros`). Held as a
    :class:`~patternnet.patterns.statistics._Shift` of a convolution with ``groups = U`` and
    ``D`` inputs per unit (``channel`` = ``x₀`` flattened), so that checkpoints, copies and
    moves keep it like a layer's.
    """
    units, inputs, samples = x.shape
    x0 = (x.sum(2, dtype=torch.float64) / samples).to(torch.float32)
    x0 = _keep_zeros(x0, x.amin(2))
    y0 = (y.sum(1, dtype=torch.float64) / samples).to(torch.float32)
    return _shift_of(x0, y0)


def _shift_of(x0: Tensor, y0: Tensor) -> _Shift:
    """The :class:`_Shift` of a channelwise node with shifts ``x₀ (U, D)``, ``y₀ (U,)``."""
    units, inputs = x0.shape
    state = {"channel": x0.reshape(-1)}
    for side in _Shift.SIDES:
        state["offset" + side], state["y0" + side] = y0, y0.to(torch.float64)
    return _Shift(state, units, inputs)


def _keep_zeros(x0: Tensor, minimum: Tensor) -> Tensor:
    """``x₀`` with 0 where the first batch's input was never negative (ReLU outputs).

    A non-negative input's zeros must stay exact zeros in the float32 products: an average
    pool or mean of ReLU outputs is ≤ 0 exactly where its whole window is 0, so its inactive
    side holds nothing but zeros and its pattern a₋ is 0 (degenerate). Shifted, those zeros
    become ``−x₀`` and their float32 sums leave rounding noise that the estimator divides by
    rounding noise (measured: a₋ of 6 of 16 pool units of magnitude ~7 instead of 0). Such
    inputs have spreads comparable to their means, where an unshifted product loses little;
    ``y`` is shifted regardless.
    """
    return torch.where(minimum >= 0, torch.zeros_like(x0), x0)


def _window_shift(call: NodeCall) -> _Shift:
    """The shift of an average pool (a depthwise convolution) from its first batch: the
    layers' :meth:`_Shift.first`, with :func:`_keep_zeros` applied to the input channels."""
    x, out = call.arrange()
    state = _Shift.first(x, out, None, call.units, call.width).state()
    dims = [0, *range(2, x.dim())]
    state["channel"] = _keep_zeros(state["channel"], x.amin(dims).to(torch.float32))
    return _Shift(state, call.units, call.width)


@contextmanager
def recording(
    stats: Statistics, precision: str, plan: NodePlan | None = None,
    gated: frozenset[str] = frozenset(),
) -> Iterator[NodeTracker]:
    """Within this block, forward passes add every node's sums to ``stats`` (in place).

    ``plan`` (``ModelGraph.of(model).linear_nodes()``) says which sums, pools and means are
    nodes and names them; without one every call that looks like a node is one (the probe).
    The nodes named in ``gated`` (read only through ReLU gates,
    :func:`~patternnet.engine.gates.gated_nodes`) collect the sums of ``negative=False``:
    their a₋ is never read (the two-component fit with ``negative="auto"``).

    The block records the autograd graph without keeping tensors (so that nodes are found as
    in an explanation, :func:`~patternnet.engine.nodes.graph_recording`); the caller marks
    the batch ``requires_grad`` and calls the yielded tracker's ``new_pass()`` before each
    forward pass (nodes are named by their order within one pass).
    """
    device = next(iter(stats.layers.values())).device if stats.layers else "cpu"
    sums = required_sums(stats.estimator, stats.negative, precision)
    workspace: dict[Any, Any] = {}  # the sums' buffers, reused from node to node
    linear = required_sums("linear", precision=precision)
    layer_sums = {layer.sums for name, layer in stats.layers.items() if not is_node_name(name)}
    if layer_sums == {linear}:  # fit.collected_sums: attention models without rectifier
        sums = linear
    gated_sums = required_sums(stats.estimator, False, precision) if gated else sums

    def handle(name: str, call: NodeCall) -> None:
        layer = stats.layers.get(name)
        if layer is None:
            layer = LayerStatistics(call.units, call.units, call.width,
                                    gated_sums if name in gated else sums, device)
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
            if precision == "float32" and layer._shift is None:
                layer._shift = _window_shift(call)
            x, out = call.arrange()
            layer.update(call.geometry, x, out, None, call.weight_shape(), precision)
        else:
            assert call.unit_major is not None
            update_channelwise(layer, call, precision, workspace)
        return None

    tracker = NodeTracker(handle, records=True, plan=plan)
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
    if node_kind(name) == "attention":  # its own sums and estimator (attention_statistics)
        a, report = attention_pattern(stats)
        joint = attention_joint_pattern(stats)
        return ({"a": a} if joint is None else {"a": a, "a_joint": joint}), report
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
    return {
        name: {"kind": node_kind(name), "units": layer.out_features, "inputs": layer.patch_size}
        for name, layer in stats.layers.items()
        if is_node_name(name)
    }
