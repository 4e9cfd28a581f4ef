"""Fixed-weight linear nodes: residual sums, average pools and means as neurons (method.md §10).

The paper derives patterns for a linear neuron ``y = wᵀx``. Linear/Conv layers are such
neurons with learned weights; a graph has more of them with **fixed** weights:

- a sum ``z = u₀ + … + u_{m−1}`` (``a + b``, ``torch.add``, ``out += identity``, chains
  ``a + b + c`` merged into one node) is, per channel, a neuron with one input per summand
  and weights 1;
- an average pool (``count_include_pad``, or no padding) is, per channel, a neuron over its
  window with weights ``1/k``; an adaptive average pool whose windows tile the input is one;
- a mean over some dimensions (``x.mean((2, 3))``, global average pooling) is, per kept index
  (channel), a neuron over the reduced values with weights ``1/k``.

Every node is written as a **grouped convolution with a fixed weight** over a *node input*
arranged from the operation's inputs (:class:`NodeCall`): the node's patterns are exactly the
patterns that convolution would get (the rewrite-invariance tests check it), so everything the
library does for a Conv layer — statistics (method.md §2), estimators, the two-component mask
``y > 0`` — applies unchanged. Two layouts:

``channelwise`` (sums, means)
    Node input ``(N, U, D, P)``: ``U`` units (channels), ``D`` inputs per unit (summands,
    reduced values), ``P`` positions sharing the unit's pattern (a sum's spatial positions; 1
    for a mean); node output ``(N, U, P)``. Statistics and backward are element-wise.
``window`` (average pools)
    Node input = the pool's input, a :class:`~patternnet.layers.LayerGeometry` of a depthwise
    convolution (kernel, stride, padding of the pool), weight ``(C, 1, *kernel)``.

The fixed weight is ``(U, D)`` (flattened), ones for sums and ``1/D`` for pools and means;
patterns are stored ``(U, D)`` under the node's name (``"sum#0"``, ``"pool#1"``, ``"mean#0"``:
the kind and the order of the call in the forward pass).

**Which operations are nodes** is the model graph's answer
(:meth:`ModelGraph.linear_nodes <patternnet.engine.graph.ModelGraph.linear_nodes>`, one fx
trace per model): sums of two values that depend on the input, average pools and means, with
their kinds and names. :class:`NodeTracker` takes that plan and only matches each call of the
forward pass to its planned node, in order; it builds the :class:`NodeCall` (how the node's
input is arranged from the call's tensors) and checks what only the values show (summands of
one shape, pool windows that tile the input). Where the graph cannot see — a model fx cannot
trace, or calls it keeps whole (``nn.TransformerEncoderLayer``, ``torch.fx.wrap`` functions) —
the tracker *probes*: a call is a node when its inputs carry the autograd graph from the
model's input (``requires_grad``). The explanation's forward pass has that graph, and the fit's
forward pass records it too (with saved tensors discarded, :func:`graph_recording`), so that the
fit and the explanation see the same nodes in the same order. A bias or a constant added to an
activation is therefore never a node. Nodes are named by kind and order of their calls in the
forward pass (``"sum#3"``), the names the plan gives them.

**Extending** (attention's weighted sum over tokens, a norm's per-channel scale ...): a new
kind is a function that recognises the call and returns a :class:`NodeCall` with its layout,
fixed weight and the map back from the node input's gradient to the operation's inputs; the
fit (:mod:`patternnet.patterns.graph_statistics`) and the pattern rules
(:class:`patternnet.engine.rules.NodePatterns`) need nothing else.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..layers import LayerGeometry
from .graph import ModelGraph, NodePlan

__all__ = [
    "NODE_KINDS",
    "NodeCall",
    "NodeTracker",
    "fixed_weight",
    "graph_recording",
    "is_node_name",
]

#: The node kinds and the constant of their fixed weights (``None``: ``1/D``).
NODE_KINDS = {"sum": 1.0, "pool": None, "mean": None}

_aten = torch.ops.aten
# Python spellings, and the ATen operators of exported programs (torch.export).
_ADDITIONS = frozenset(
    {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__,
     _aten.add.Tensor, _aten.add_.Tensor}
)  # fmt: skip
_IN_PLACE = frozenset({Tensor.add_, Tensor.__iadd__, _aten.add_.Tensor})
_AVG_POOLS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, _aten.avg_pool1d.default: 1,
              _aten.avg_pool2d.default: 2, _aten.avg_pool3d.default: 3}  # fmt: skip
_ADAPTIVE_POOLS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
                   _aten.adaptive_avg_pool1d.default: 1, _aten.adaptive_avg_pool2d.default: 2,
                   _aten.adaptive_avg_pool3d.default: 3}  # fmt: skip
_MEANS = frozenset({torch.mean, Tensor.mean, _aten.mean.dim})


def is_node_name(name: str) -> bool:
    """Whether a patterns key names a node (``"sum#0"``) rather than a module."""
    return "#" in name


def node_kind(name: str) -> str:
    """The kind of a node name (``"sum#3"`` → ``"sum"``)."""
    return name.partition("#")[0]


def fixed_weight(kind: str, units: int, inputs: int) -> Tensor:
    """The ``(U, D)`` float64 fixed weight of a node: ones for sums, ``1/D`` otherwise."""
    value = NODE_KINDS[kind]
    return torch.full((units, inputs), 1.0 / inputs if value is None else value,
                      dtype=torch.float64)  # fmt: skip


@dataclass
class NodeCall:
    """One call of a fixed-weight linear node in a forward pass.

    Attributes
    ----------
    kind:
        ``"sum"``, ``"pool"`` or ``"mean"``.
    inputs:
        The operation's inputs that carry the graph (summands, or the pooled tensor).
    layout:
        ``"channelwise"`` or ``"window"`` (see the module docstring).
    units, width:
        ``U`` units and ``D`` inputs per unit (the fixed weight is ``(U, D)``).
    geometry, kernel:
        For ``"window"`` nodes: the depthwise convolution's geometry and kernel size.
    arrange:
        ``() -> (node input, node output)``, detached: ``(N, U, D, P)`` and ``(N, U, P)`` for
        channelwise nodes, the pool's input and output for window nodes.
    result:
        The operation's own output values (detached), as the model expects them.
    to_output:
        Maps a gradient shaped like ``result`` to the node output's layout.
    to_inputs:
        Maps a gradient shaped like the node input to one gradient per entry of ``inputs``.
    """

    kind: str
    inputs: tuple[Tensor, ...]
    layout: str
    units: int
    width: int
    arrange: Callable[[], tuple[Tensor, Tensor]]
    result: Tensor
    to_output: Callable[[Tensor], Tensor]
    to_inputs: Callable[[Tensor], tuple[Tensor, ...]]
    geometry: LayerGeometry | None = None
    kernel: tuple[int, ...] = ()
    #: Channelwise nodes: ``(dtype, shift) -> (x (U, D, M), y (U, M))``, the node input
    #: (minus ``shift (U, D)`` when given) and the node's output as the model computed it,
    #: unit-major with ``M = N·P`` samples, converted to ``dtype`` in one copy (the fit's
    #: statistics are then one batched product).
    unit_major: Callable[[torch.dtype, Tensor | None], tuple[Tensor, Tensor]] | None = None
    #: Sums: ``() -> (summands, y)``, each ``(N, U, P)`` as the model holds them (views, no
    #: copy): the fit's statistics read them in place (one product per summand).
    native: Callable[[], tuple[tuple[Tensor, ...], Tensor]] | None = None

    def weight_shape(self) -> torch.Size:
        """Shape of the fixed weight as the geometry's convolution weight (window nodes)."""
        return torch.Size((self.units, 1, *self.kernel))


def _graph_tensor(value: Any) -> bool:
    return (
        isinstance(value, Tensor)
        and value.requires_grad
        and value.is_floating_point()
        and not isinstance(value, nn.Parameter)
    )


# ------------------------------------------------------------------------------ sums


def _copy_shifted(target: Tensor, source: Tensor, shift: Tensor | None) -> None:
    """``target ← source − shift`` (``shift`` None: a plain copy), converting to ``target``'s
    dtype in the same pass where the dtypes allow it."""
    if shift is None:
        target.copy_(source)
    elif source.dtype == target.dtype:
        torch.sub(source, shift.to(target.dtype), out=target)
    else:
        target.copy_(source).sub_(shift.to(target.dtype))



def _channelwise(stacked: Tensor) -> Tensor:
    """``(N, C, m, *spatial)`` → ``(N, C, m, P)``; a 2-D ``(N, C, m)`` gets ``P = 1``."""
    return stacked.reshape(stacked.shape[0], stacked.shape[1], stacked.shape[2], -1)


def sum_call(
    summands: tuple[Tensor, ...], result: Tensor, values: tuple[Tensor, ...]
) -> NodeCall:
    """A sum of same-shaped summands ``(N, C, ...)`` (channel = dimension 1).

    ``values`` are the summands' values (detached; a copy where the sum runs in place) and
    ``result`` their sum.
    """
    shape = summands[0].shape

    def arrange() -> tuple[Tensor, Tensor]:
        x = _channelwise(torch.stack(values, 2))
        return x, x.sum(2)

    def to_output(grad: Tensor) -> Tensor:
        return grad.reshape(shape[0], shape[1], -1)

    def to_inputs(grad: Tensor) -> tuple[Tensor, ...]:  # (N, C, m, P)
        return tuple(g.reshape(shape) for g in grad.unbind(2))

    def unit_major(dtype: torch.dtype, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n, c = shape[0], shape[1]
        x = values[0].new_empty((c, len(values), n, values[0][0, 0].numel()), dtype=dtype)
        for d, value in enumerate(values):  # one copy: permute, convert (and shift) together
            _copy_shifted(x[:, d], value.reshape(n, c, -1).transpose(0, 1),
                          None if shift is None else shift[:, d].view(c, 1, 1))  # fmt: skip
        y = result.new_empty((c, n, x.shape[-1]), dtype=dtype)
        y.copy_(result.reshape(n, c, -1).transpose(0, 1))  # the sum as the model computed it
        return x.view(c, len(values), -1), y.view(c, -1)

    def native() -> tuple[tuple[Tensor, ...], Tensor]:
        n, c = shape[0], shape[1]
        return tuple(v.reshape(n, c, -1) for v in values), result.reshape(n, c, -1)

    return NodeCall("sum", tuple(summands), "channelwise", shape[1], len(summands), arrange,
                    result, to_output, to_inputs, unit_major=unit_major,
                    native=native)  # fmt: skip


# ------------------------------------------------------------------------------ means


def mean_call(x: Tensor, dims: tuple[int, ...], keepdim: bool, result: Tensor) -> NodeCall | None:
    """A mean of ``x`` over ``dims`` (not the batch dimension): a neuron per kept index."""
    rank = x.dim()
    dims = tuple(sorted({d % rank for d in dims}))
    if not dims or 0 in dims or rank < 2:
        return None
    kept = [d for d in range(1, rank) if d not in dims]
    order = [0, *kept, *dims]
    inverse = [order.index(d) for d in range(rank)]
    units = math.prod(x.shape[d] for d in kept)
    width = math.prod(x.shape[d] for d in dims)
    permuted_shape = [x.shape[d] for d in order]
    n = x.shape[0]
    value = x.detach()

    def arrange() -> tuple[Tensor, Tensor]:
        node_input = value.permute(order).reshape(n, units, width, 1)
        return node_input, result.detach().reshape(n, units, 1)

    def to_output(grad: Tensor) -> Tensor:
        return grad.reshape(n, units, 1)

    def to_inputs(grad: Tensor) -> tuple[Tensor, ...]:
        return (grad.reshape(permuted_shape).permute(inverse),)

    def unit_major(dtype: torch.dtype, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        node_input = value.permute(order).reshape(n, units, width)
        x_t = node_input.new_empty((units, width, n), dtype=dtype)
        _copy_shifted(x_t, node_input.permute(1, 2, 0),
                      None if shift is None else shift.view(units, width, 1))  # fmt: skip
        return x_t, result.detach().reshape(n, units).t().to(dtype)

    return NodeCall("mean", (x,), "channelwise", units, width, arrange, result, to_output,
                    to_inputs, unit_major=unit_major)  # fmt: skip


# ------------------------------------------------------------------------------ pools


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def pool_call(x: Tensor, spatial: int, kernel: Any, stride: Any, padding: Any,
              result: Tensor) -> NodeCall:
    """An average pool that is a depthwise convolution with weight ``1/k``."""
    kernel_t = _tuple(kernel, spatial)
    stride_t = _tuple(stride if stride not in (None, [], ()) else kernel, spatial)
    padding_t = _tuple(padding, spatial)
    geometry = LayerGeometry(
        kind="conv", spatial_dims=spatial, stride=stride_t, padding=padding_t,
        dilation=(1,) * spatial, groups=x.shape[1],
    )  # fmt: skip
    value = x.detach()

    def arrange() -> tuple[Tensor, Tensor]:
        return value, result.detach()

    return NodeCall("pool", (x,), "window", x.shape[1], math.prod(kernel_t), arrange, result,
                    lambda grad: grad, lambda grad: (grad,), geometry, kernel_t)  # fmt: skip


def _pool_arguments(func: Any, args: tuple, kwargs: dict) -> tuple[Any, ...]:
    names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override"]  # fmt: skip
    defaults = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                "divisor_override": None}  # fmt: skip
    values = dict(defaults)
    values.update(zip(names, args))
    values.update(kwargs)
    return tuple(values[name] for name in names)


def _conv_length(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ------------------------------------------------------------------------------ recognition


def recognise(func: Any, args: tuple, kwargs: dict, compute: Callable[[], Any]) -> Any:
    """``(NodeCall | None, result)`` for a call of ``func``; ``compute()`` runs the call.

    Returns ``(None, None)`` without running anything when ``func`` is not a node kind; the
    caller then calls the function itself. Sums are handled by :class:`NodeTracker` (they
    merge chains and run in place).
    """
    if func in _AVG_POOLS:
        x = args[0] if args else kwargs.get("input")
        if not _graph_tensor(x):
            return None, None
        _, kernel, stride, padding, _, include_pad, divisor = _pool_arguments(func, args, kwargs)
        result = compute()
        spatial = _AVG_POOLS[func]
        padding_t = _tuple(padding, spatial)
        kernel_t = _tuple(kernel, spatial)
        stride_t = _tuple(stride if stride not in (None, [], ()) else kernel, spatial)
        expected = tuple(
            _conv_length(x.shape[2 + i], kernel_t[i], stride_t[i], padding_t[i])
            for i in range(spatial)
        )
        if (divisor is None and (include_pad or not any(padding_t))
                and tuple(result.shape[2:]) == expected):  # fmt: skip
            return pool_call(x, spatial, kernel_t, stride_t, padding_t, result), result
        _not_a_node(func, "count_include_pad=False with padding, ceil_mode overhang or a "
                          "divisor_override make the window weights differ")  # fmt: skip
        return None, result
    if func in _ADAPTIVE_POOLS:
        x = args[0] if args else kwargs.get("input")
        if not _graph_tensor(x):
            return None, None
        result = compute()
        spatial = _ADAPTIVE_POOLS[func]
        sizes, out = tuple(x.shape[2:]), tuple(result.shape[2:])
        if all(o == 1 for o in out):  # global average pooling = a mean over positions
            call = mean_call(x, tuple(range(2, 2 + spatial)), True, result)
            return call, result
        if all(s % o == 0 for s, o in zip(sizes, out)):
            kernel = tuple(s // o for s, o in zip(sizes, out))
            return pool_call(x, spatial, kernel, kernel, 0, result), result
        _not_a_node(func, f"its windows over {sizes} → {out} overlap unevenly")
        return None, result
    if func in _MEANS:
        x = args[0] if args else kwargs.get("input")
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if not _graph_tensor(x) or dims is None or kwargs.get("dtype") is not None:
            return None, None
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        dims_t = (dims,) if isinstance(dims, int) else tuple(dims)
        result = compute()
        return mean_call(x, dims_t, bool(keepdim), result), result
    return None, None


_WARNED: set[Any] = set()


def _not_a_node(func: Any, reason: str) -> None:
    name = getattr(func, "__name__", str(func))
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"{name}: {reason}, so it is not one fixed-weight neuron; the pattern methods pass "
            "the gradient through it (no pattern)",
            stacklevel=4,
        )


def _not_planned(func: Any, kind: str) -> None:
    name = getattr(func, "__name__", str(func))
    if ("plan", name) not in _WARNED:
        _WARNED.add(("plan", name))
        warnings.warn(
            f"{name}: looks like a {kind} at run time but the model's graph "
            "(ModelGraph.linear_nodes) shows no such node here; the pattern methods pass the "
            "gradient through it (no pattern)",
            stacklevel=4,
        )


class NodeTracker(TorchFunctionMode):
    """Sees every node call of one forward pass, names it and hands it to ``handle``.

    Parameters
    ----------
    handle:
        ``handle(name, call) -> Tensor | None``: a tensor holding the call's value that
        carries what the backward pass should do (the explanation), or None to run the
        operation itself (the fit, which only records statistics).
    records:
        ``handle`` only records (always returns None) and reads the call at once: a sum then
        runs once, and the ``NodeCall`` reads the operation's own output (the fit), instead
        of a separately computed value that ``handle`` may replace (the explanation). The
        call's tensors are valid only while ``handle`` runs (an in-place sum's value is
        formed in a buffer the next one reuses).
    """

    def __init__(
        self,
        handle: Callable[[str, NodeCall], Tensor | None],
        records: bool = False,
        plan: NodePlan | None = None,
    ) -> None:
        super().__init__()
        self.handle = handle
        self.records = records
        self.plan = plan
        self.counts: dict[str, int] = {}
        #: Names of this pass's nodes the plan did not hold (found by the probe).
        self.probed: list[str] = []
        self._cursor = 0
        self._scratch: Tensor | None = None
        # Sums of this pass still alive: id → (weak result, version, summands, versions), so
        # that ``(a + b) + c`` is one node with three summands.
        self._sums: dict[int, tuple[Any, int, tuple[Tensor, ...], tuple[int, ...]]] = {}

    def new_pass(self) -> None:
        """Start naming nodes afresh (call before each forward pass)."""
        self.counts.clear()
        self._sums.clear()
        self.probed.clear()
        self._cursor = 0

    def _name(self, kind: str) -> str:
        index = self.counts.get(kind, 0)
        self.counts[kind] = index + 1
        return f"{kind}#{index}"

    def _admit(self, kind: str, func: Any) -> str | None:
        """The name of a call that looks like a ``kind`` node, or None if it is not one.

        With a plan from a traced graph, the call is matched to the next planned node of its
        kind (planned nodes a pass skips, e.g. a sum whose summands turn out to differ in
        shape, are passed over). A call the plan does not hold is a node only where the plan
        has calls it cannot see into (the probe, as for an untraced model: :attr:`probed`);
        else the graph says it is not one and the gradient passes.
        """
        plan = self.plan
        if plan is not None and plan.traced:
            for index in range(self._cursor, len(plan.nodes)):
                if plan.nodes[index].kind == kind:
                    self._cursor = index + 1
                    return self._name(kind)
            if not plan.opaque:
                _not_planned(func, kind)
                return None
        name = self._name(kind)
        if plan is not None:
            self.probed.append(name)
        return name

    def _summands(self, value: Tensor) -> tuple[Tensor, ...]:
        """The summands of ``value`` if it is an unchanged sum of this pass, else itself."""
        entry = self._sums.get(id(value))
        if entry is None:
            return (value,)
        ref, version, summands, versions = entry
        if ref() is not value or value._version != version:
            self._sums.pop(id(value), None)
            return (value,)
        if any(u._version != v for u, v in zip(summands, versions)):
            return (value,)
        return summands

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _ADDITIONS:
            return self._sum(func, args, kwargs)
        call, result = recognise(func, args, kwargs, lambda: func(*args, **kwargs))
        if call is None:
            return result if result is not None else func(*args, **kwargs)
        name = self._admit(call.kind, func)
        if name is None:
            return result
        out = self.handle(name, call)
        return result if out is None else out

    def _sum(self, func: Any, args: tuple, kwargs: dict) -> Any:
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other")
        if not (
            _graph_tensor(a)
            and _graph_tensor(b)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.dim() >= 2
            and len(args) <= 2
            and set(kwargs) <= {"other", "input", "alpha"}
            and kwargs.get("alpha", 1) == 1
        ):
            return func(*args, **kwargs)
        name = self._admit("sum", func)
        if name is None:
            return func(*args, **kwargs)
        tail = self._summands(b)
        summands = self._summands(a) + tail
        in_place = func in _IN_PLACE
        if self.records:
            # Read at once: before an in-place sum overwrites ``a``, after any other sum (its
            # output is the node's value). The operation itself runs once.
            values = tuple(u.detach() for u in summands)
            if in_place:  # the sum into a buffer of this tracker: the handle reads it at once
                total = _total(values, self._buffer(values[0]))
                self.handle(name, sum_call(summands, total, values))
                out = func(*args, **kwargs)
                if any(u is a for u in summands):
                    return out
            else:
                out = func(*args, **kwargs)
                self.handle(name, sum_call(summands, out.detach(), values))
            self._remember(out, summands)
            return out
        # An in-place sum overwrites ``a`` once ``handle`` has returned: the call's values
        # are read while it runs, so no copy of ``a`` is needed (as for the fit above). A plain
        # tensor then takes the handle's value and history as its new version (no copy of
        # its old value, no zero gradient for it on the way back); a view or leaf is copied
        # into as autograd records it.
        overwritten = in_place and any(u is a for u in summands)
        values = tuple(u.detach() for u in summands)
        # The node's value: a sum of this pass already holds its summands added in order, so
        # a chain's value is that sum plus the new summand (the same additions, the same
        # value) rather than all of them again (a ViT-B/16's 24 residual sums: 300 additions
        # of the token tensor where 24 give the same values).
        total = a.detach() + values[-1] if len(tail) == 1 else _total(values)
        out = self.handle(name, sum_call(summands, total, values))
        if out is None:
            out = func(*args, **kwargs)
        elif in_place:
            out = _Overwrite.apply(a, out) if a._base is None and not a.is_leaf else a.copy_(out)
        if overwritten:  # ``a`` now holds the sum: it cannot stand for its summand
            return out
        self._remember(out, summands)
        return out

    def _buffer(self, like: Tensor) -> Tensor:
        """A tensor shaped like ``like``, from one buffer reused by every in-place sum of the
        fit (a fresh large allocation costs a page fault per page, every time)."""
        buffer = self._scratch
        if (buffer is None or buffer.numel() < like.numel() or buffer.dtype != like.dtype
                or buffer.device != like.device):  # fmt: skip
            buffer = self._scratch = torch.empty(like.numel(), dtype=like.dtype,
                                                 device=like.device)  # fmt: skip
        return buffer[: like.numel()].view(like.shape)

    def _remember(self, out: Tensor, summands: tuple[Tensor, ...]) -> None:
        """Keep ``out`` as a sum of ``summands`` while it lives unchanged (chains merge)."""
        key = id(out)
        self._sums[key] = (
            weakref.ref(out, lambda _, key=key, sums=self._sums: sums.pop(key, None)),
            out._version,
            summands,
            tuple(u._version for u in summands),
        )


class _Overwrite(torch.autograd.Function):
    """``a ← value`` in place: the new version of ``a`` has ``value``'s history only (what
    ``value`` was computed from, ``a``'s old value included, gets the gradient through it)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, value: Tensor) -> Tensor:
        a.copy_(value)
        ctx.mark_dirty(a)
        return a

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def _total(values: tuple[Tensor, ...], out: Tensor | None = None) -> Tensor:
    """``values[0] + values[1] + …`` in the order the model adds them (into ``out``)."""
    if out is not None:
        torch.add(values[0], values[1], out=out)
        for value in values[2:]:
            out.add_(value)
        return out
    total = values[0] + values[1]
    for value in values[2:]:
        total = total + value
    return total


@contextmanager
def graph_recording() -> Iterator[None]:
    """Autograd records the graph (so that :class:`NodeTracker` sees node inputs) but keeps
    no tensor for a backward pass: the fit's forward pass costs no activation memory."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _drop):
        yield


def _drop(_: Any) -> None:
    return None


def discover(model: nn.Module, example: Tensor) -> dict[str, tuple[str, int, int]]:
    """The nodes of one forward pass of ``model`` on ``example``: ``{name: (kind, U, D)}``.

    For tools that build patterns by hand (timings with random patterns); a fit finds the
    nodes itself. The forward pass runs in the model's canonical form (BatchNorm folded),
    recording no tensors; the model is left as it was.
    """
    from ..borrow import borrowed
    from .canonize import Canonical, default_canonizers

    found: dict[str, tuple[str, int, int]] = {}

    def handle(name: str, call: NodeCall) -> None:
        found[name] = (call.kind, call.units, call.width)
        return None

    canonical = Canonical(model, default_canonizers())
    tracker = NodeTracker(handle, plan=ModelGraph.of(model).linear_nodes())
    with borrowed(model), canonical.active(), graph_recording(), tracker:
        canonical(example.detach().requires_grad_(True))
    return found
