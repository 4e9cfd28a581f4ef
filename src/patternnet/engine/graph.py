"""One model graph per model: what reads what, and what kind of operation each node is.

Every analysis that needs the structure of a model asks its :class:`ModelGraph`: which
BatchNorm follows which Linear/Conv (folding, :mod:`~patternnet.engine.canonize`), which layers
reach the rest of the network only through ReLU gates (:meth:`ModelGraph.relu_gates`), which
feed a smooth activation (:meth:`ModelGraph.smooth_activations`), and where the sums, pools,
norms and attention operations are (:meth:`ModelGraph.nodes`). The model is traced **once**
with ``torch.fx`` (symbolically: no data, no forward pass) and the answers are read from that
one trace.

Node kinds (:meth:`ModelGraph.kind`), whatever the spelling (module, ``torch.*`` function,
``F.*`` function or tensor method):

========================  ==================================================================
``linear``                ``nn.Linear``, ``nn.Conv1d/2d/3d``
``sum``                   an addition of two computed tensors: ``a + b``, ``torch.add``,
                          ``a.add(b)``, in place ``a += b`` / ``a.add_(b)``; an n-ary sum is
                          a chain of these (``a + b + c``). ``x + constant`` is not a sum.
``avg_pool``              average pools (``nn.AvgPool*``, ``nn.AdaptiveAvgPool*``, ``F.*``) and
                          means over dimensions (``x.mean((2, 3))``, ``torch.mean``)
``max_pool``              max pools (``nn.MaxPool*``, ``nn.AdaptiveMaxPool*``, ``F.*``)
``norm``                  BatchNorm, LayerNorm, GroupNorm, RMSNorm (modules and functions)
``attention``             ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``
``relu``                  ``nn.ReLU``/``nn.ReLU6``, ``F.relu``, ``torch.relu``, ``x.relu()`` (and
                          in-place variants): the gradient's gate is ``[x > 0]``
``smooth``                activations with no linear piece (sigmoid, tanh, GELU, SiLU ...)
``gate``                  other element-wise activations (LeakyReLU, PReLU, ELU, Hardtanh ...)
``passthrough``           each output value is one input value: reshapes, flatten, view,
                          contiguous, ``nn.Identity``, dropout (eval mode)
``other``                 anything else (concatenation, other layers, ``get_attr`` ...)
========================  ==================================================================

Caching, and why it never goes stale through ``.data``
    :meth:`ModelGraph.of` keeps one graph per model object (weakly keyed: it never keeps a
    model alive) and re-traces when the model's *structure* changes — the qualified names and
    types of its modules. The graph holds no tensor values, so in-place or ``.data`` writes to
    weights cannot make it stale; caches of *values* (folded BatchNorms, swapped weights)
    live in the method objects, which check version counters and offer ``refresh()``. A
    change the structure key cannot see — a module's ``forward`` replaced by another
    function — needs :meth:`ModelGraph.refresh` (or ``ModelGraph.of(model, refresh=True)``).
    Forward hooks of the user are read at query time, never cached.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..borrow import borrowed
from ..layers import is_linear_layer

__all__ = [
    "BATCHNORMS",
    "KINDS",
    "OTHER",
    "RELU",
    "RELU_GATES",
    "SMOOTH_ACTIVATIONS",
    "SUM",
    "ModelGraph",
    "NodePlan",
    "PlannedNode",
    "has_forward_hooks",
    "is_batchnorm",
    "probed_batchnorm_pairs",
]

#: Node kinds (see the module docstring).
KINDS = (
    "linear", "sum", "avg_pool", "max_pool", "norm", "attention", "relu", "smooth", "gate",
    "passthrough", "other",
)

#: What a layer's output is read by (the values of :meth:`ModelGraph.relu_gates`).
RELU, SUM, OTHER = "relu", "sum", "other"

# ------------------------------------------------------------------------ the vocabulary

#: BatchNorm types that can be folded (eval mode: a per-channel affine map).
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)

#: ReLU modules: their gradient is zero wherever their input is ≤ 0.
RELU_GATES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

#: Activations whose input has no meaningful active/inactive split (no linear piece).
SMOOTH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish,
    nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
)

_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_AVG_POOLS: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_MAX_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d,
)
_GATES: tuple[type[nn.Module], ...] = (
    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh, nn.Threshold,
)

_aten = torch.ops.aten

_FUNCTIONS: dict[Callable[..., Any], str] = {
    **dict.fromkeys((operator.add, operator.iadd, torch.add), "sum"),
    **dict.fromkeys(
        (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
         F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean),
        "avg_pool",
    ),
    **dict.fromkeys(
        (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
         F.adaptive_max_pool2d, F.adaptive_max_pool3d),
        "max_pool",
    ),
    **dict.fromkeys(
        (F.batch_norm, F.layer_norm, F.group_norm)
        + ((F.rms_norm,) if hasattr(F, "rms_norm") else ()),
        "norm",
    ),
    **dict.fromkeys((F.scaled_dot_product_attention, F.multi_head_attention_forward),
                    "attention"),
    **dict.fromkeys((F.relu, F.relu_, F.relu6, torch.relu, torch.relu_), "relu"),
    **dict.fromkeys(
        (torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.gelu, F.silu, F.mish, F.softplus,
         F.hardswish, F.hardsigmoid, F.logsigmoid, F.softsign, F.tanhshrink),
        "smooth",
    ),
    **dict.fromkeys(
        (F.leaky_relu, F.leaky_relu_, F.prelu, F.elu, F.selu, F.celu, F.hardtanh,
         F.threshold),
        "gate",
    ),
    **dict.fromkeys((torch.flatten, torch.reshape, F.dropout), "passthrough"),
    **dict.fromkeys((Tensor.add, Tensor.add_), "sum"),
    Tensor.mean: "avg_pool",
    # the ATen operators of exported programs (torch.export) loaded as modules
    **dict.fromkeys((_aten.add.Tensor, _aten.add_.Tensor), "sum"),
    **dict.fromkeys(
        (_aten.avg_pool1d.default, _aten.avg_pool2d.default, _aten.avg_pool3d.default,
         _aten.adaptive_avg_pool1d.default, _aten.adaptive_avg_pool2d.default,
         _aten.adaptive_avg_pool3d.default, _aten.mean.dim),
        "avg_pool",
    ),
}
_METHODS: dict[str, str] = {
    **dict.fromkeys(("add", "add_", "__add__", "__iadd__", "__radd__"), "sum"),
    "mean": "avg_pool",
    **dict.fromkeys(("relu", "relu_"), "relu"),
    **dict.fromkeys(("sigmoid", "tanh", "sigmoid_", "tanh_"), "smooth"),
    **dict.fromkeys(("view", "reshape", "flatten", "contiguous"), "passthrough"),
}


def is_batchnorm(module: nn.Module) -> bool:
    """True for ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (not the lazy variants)."""
    return isinstance(module, BATCHNORMS) and not isinstance(
        module, nn.modules.lazy.LazyModuleMixin
    )


def module_kind(module: nn.Module) -> str:
    """The node kind of a call of ``module`` (see the module docstring)."""
    if is_linear_layer(module):
        return "linear"
    if is_batchnorm(module) or isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, RELU_GATES):
        return "relu"
    if isinstance(module, SMOOTH_ACTIVATIONS):
        return "smooth"
    if isinstance(module, _GATES):
        return "gate"
    if isinstance(module, _AVG_POOLS):
        return "avg_pool"
    if isinstance(module, _MAX_POOLS):
        return "max_pool"
    if isinstance(module, _PASSTHROUGH):
        return "passthrough"
    return "other"


def has_forward_hooks(model: nn.Module) -> bool:
    """Whether the user hooks module calls (a hook may replace an output fx does not see)."""
    module_globals = nn.modules.module
    if getattr(module_globals, "_global_forward_hooks", None) or getattr(
        module_globals, "_global_forward_pre_hooks", None
    ):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@dataclass(frozen=True)
class PlannedNode:
    """One fixed-weight linear node of the graph (:meth:`ModelGraph.linear_nodes`).

    Attributes
    ----------
    name:
        ``"sum#0"``, ``"pool#1"``, ``"mean#0"``: the kind and its order in the forward pass.
    kind:
        ``"sum"``, ``"pool"`` or ``"mean"``.
    node:
        The ``torch.fx`` node's name (``"add_3"``, ``"avgpool"``).
    module:
        The qualified name of the module it calls (pools as modules), else None.
    """

    name: str
    kind: str
    node: str
    module: str | None = None


@dataclass(frozen=True)
class NodePlan:
    """The sums, average pools and means of a model, as its graph shows them.

    Attributes
    ----------
    traced:
        Whether ``torch.fx`` traced the whole model. If not, the graph shows no node and the
        forward pass finds them itself (the *probe*: every sum of two values carrying the
        input's autograd graph, every average pool and mean, named in the order they run).
    nodes:
        The planned nodes in execution order.
    opaque:
        Calls the graph cannot see into that may run nodes inside (leaf modules such as
        ``nn.TransformerEncoderLayer``, attention, ``torch.fx.wrap`` functions). Where there
        are any, a call the plan does not hold is probed too (it may come from inside one).
    error:
        Why the model could not be traced.
    """

    traced: bool
    nodes: tuple[PlannedNode, ...] = ()
    opaque: tuple[str, ...] = ()
    error: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the plan shows every node a forward pass can run (nothing to probe)."""
        return self.traced and not self.opaque

    def kinds(self) -> dict[str, str]:
        """``{name: kind}`` of the planned nodes."""
        return {node.name: node.kind for node in self.nodes}


#: Kinds of leaf modules that run no sum, average pool or mean inside (pools *are* one).
_NODE_FREE_KINDS = frozenset(
    {"linear", "relu", "smooth", "gate", "max_pool", "avg_pool", "passthrough", "norm"}
)
_MEAN_SPELLINGS = frozenset({torch.mean, Tensor.mean, _aten.mean.dim})
_ADAPTIVE_SPELLINGS = frozenset(
    {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
     _aten.adaptive_avg_pool1d.default, _aten.adaptive_avg_pool2d.default,
     _aten.adaptive_avg_pool3d.default}
)  # fmt: skip


def _adaptive_kind(size: Any) -> str:
    """An adaptive average pool to size 1 is a mean over positions; others are pools."""
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return "mean" if all(s == 1 for s in sizes) else "pool"


def _pool_kind(padding: Any, count_include_pad: Any, divisor_override: Any) -> str | None:
    """An average pool is one fixed-weight neuron unless its window weights differ."""
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    if divisor_override is not None or not (count_include_pad or not any(pads)):
        return None
    return "pool"


def _target_name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))


class _LeafTracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps Linear/Conv/BatchNorm (and torch.nn's leaves) opaque."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_linear_layer(m) or is_batchnorm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a: Any) -> Any:
        """Tensors made inside ``forward`` become a named constant, not an attribute of the
        user's model (fx would store them on it: tracing must not change the model)."""
        if isinstance(a, Tensor) and not isinstance(a, nn.Parameter):
            if not any(a is b for b in self.root.buffers()):
                return self.create_node("get_attr", "<constant>", (), {})
        return super().create_arg(a)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _structure_key(model: nn.Module) -> tuple[tuple[str, type], ...]:
    return tuple((name, type(module)) for name, module in model.named_modules())


#: One graph per model object (see "Caching" in the module docstring).
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ModelGraph:
    """The traced structure of one model: node kinds, readers, BatchNorm pairs, ReLU gates.

    Build it with :meth:`of` (cached per model); the constructor traces anew. The model is
    held weakly; the graph holds names and kinds, never tensors or modules.

    The model is traced on the first question that needs the graph (``torch.fx`` runs
    ``forward`` on proxies), at most once until :meth:`refresh`.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self._model = weakref.ref(model)
        self._build(model)

    # --------------------------------------------------------------------- construction
    @classmethod
    def of(cls, model: nn.Module, *, refresh: bool = False) -> ModelGraph:
        """The graph of ``model``, traced on first use and reused while its structure holds."""
        graph = _GRAPHS.get(model)
        if graph is None or refresh or graph._key != _structure_key(model):
            graph = cls(model)
            _GRAPHS[model] = graph
        return graph

    def refresh(self) -> ModelGraph:
        """Trace the model again (after a change the structure key cannot see)."""
        self._build(self.model)
        return self

    @property
    def model(self) -> nn.Module:
        """The model (raises if it was garbage-collected)."""
        model = self._model()
        if model is None:
            raise ReferenceError("the model of this ModelGraph no longer exists")
        return model

    def _build(self, model: nn.Module) -> None:
        """Forget everything; the trace itself is made when first needed (:meth:`_traced`)."""
        self._key = _structure_key(model)
        self._types = {name: type(m) for name, m in model.named_modules()}
        self._has_batchnorm = any(is_batchnorm(m) for m in model.modules())
        self._probed: dict[int, tuple[Any, dict[str, str]]] = {}
        self._memo: dict[Any, Any] = {}
        self._done = False

    def _traced(self) -> ModelGraph:
        """Trace the model (once), classify every node and read the answers off the graph.

        Lazy, because ``torch.fx`` runs the model's ``forward`` on proxies: a question that
        needs no graph (BatchNorm pairs of a model without BatchNorm) does not trace.
        """
        if self._done:
            return self
        model = self.model
        modules = dict(model.named_modules())
        self._kinds: dict[torch.fx.Node, str] = {}
        self._names: dict[torch.fx.Node, str] = {}
        self._error: str | None = None
        self._untraced: dict[str, str] = {}
        # (prefix, graph): the whole model, or the traceable sub-modules that hold BatchNorms
        self._parts: list[tuple[str, torch.fx.Graph]] = []
        self._graph: torch.fx.Graph | None = None
        try:
            self._graph = _LeafTracer().trace(model)
            self._parts.append(("", self._graph))
        except Exception as error:  # noqa: BLE001 - any tracing failure: look inside
            self._error = f"{type(error).__name__}: {error}"
            if self._has_batchnorm:
                self._trace_children(model, "", error)
        for prefix, graph in self._parts:
            for node in graph.nodes:
                self._kinds[node] = self._classify(node, prefix, modules)
                if node.op == "call_module":
                    self._names[node] = _join(prefix, node.target)
        self._pairs = self._find_batchnorm_pairs(modules)
        self._smooth = self._find_smooth_activations()
        self._done = True
        return self

    @property
    def graph(self) -> torch.fx.Graph | None:
        """The whole model's ``torch.fx`` graph, or None when it cannot be traced.

        Node targets of ``call_module`` nodes are qualified module names.
        """
        return self._traced()._graph

    @property
    def error(self) -> str | None:
        """Why the whole model could not be traced (None if it could)."""
        return self._traced()._error

    @property
    def untraced(self) -> dict[str, str]:
        """``{module: reason}``: untraceable modules holding a BatchNorm no graph covers."""
        if not self._has_batchnorm:
            return {}
        return dict(self._traced()._untraced)

    def _trace_children(self, module: nn.Module, prefix: str, error: Exception) -> None:
        """Where ``module`` cannot be traced, trace each child holding a BatchNorm."""
        children = list(module.named_children())
        if any(is_batchnorm(child) for _, child in children):
            self._untraced[prefix or "<model>"] = f"{type(error).__name__}: {error}"
        for name, child in children:
            if is_batchnorm(child) or not any(is_batchnorm(m) for m in child.modules()):
                continue
            path = _join(prefix, name)
            try:
                self._parts.append((path, _LeafTracer().trace(child)))
            except Exception as child_error:  # noqa: BLE001
                self._trace_children(child, path, child_error)

    @staticmethod
    def _classify(node: torch.fx.Node, prefix: str, modules: dict[str, nn.Module]) -> str:
        if node.op == "call_module":
            return module_kind(modules[_join(prefix, node.target)])
        if node.op == "call_function":
            kind = _FUNCTIONS.get(node.target, "other")
        elif node.op == "call_method":
            kind = _METHODS.get(node.target, "other")
        else:
            return "other"
        if kind == "sum":  # two computed operands; x + constant (or + parameter) is a shift
            operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if len([a for a in operands if a.op != "get_attr"]) < 2:
                return "other"
        return kind

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per trace: for answers that depend on the structure only.

        The explicit cache of everything derived from the graph; :meth:`refresh` and a change
        of structure clear it.
        """
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # --------------------------------------------------------------------- questions
    @property
    def traced(self) -> bool:
        """Whether the whole model was traced (else only BatchNorm-holding parts)."""
        return self._traced()._graph is not None

    def kind(self, node: torch.fx.Node) -> str:
        """The kind of a node (one of :data:`KINDS`)."""
        return self._traced()._kinds.get(node, "other")

    def module_name(self, node: torch.fx.Node) -> str | None:
        """The qualified name of the module a ``call_module`` node calls (else None)."""
        return self._traced()._names.get(node)

    def nodes(self, kind: str | None = None) -> Iterator[torch.fx.Node]:
        """The nodes of the traced graphs (of one kind), in execution order."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown node kind {kind!r}; choose one of {', '.join(KINDS)}")
        for _, graph in self._traced()._parts:
            for node in graph.nodes:
                if kind is None or self._kinds[node] == kind:
                    yield node

    def calls(self, name: str) -> list[torch.fx.Node]:
        """The nodes calling the module ``name`` (several for a reused module)."""
        return [node for node, target in self._traced()._names.items() if target == name]

    def readers(
        self, node: torch.fx.Node, *, through: Callable[[torch.fx.Node], bool] | None = None
    ) -> list[torch.fx.Node]:
        """The operations that read ``node``'s value.

        Parameters
        ----------
        node:
            A node of this graph.
        through:
            Look through the readers for which this returns True (e.g. reshapes, folded
            BatchNorms) to the operations that read their values in turn.
        """
        found: list[torch.fx.Node] = []
        for user in node.users:
            if through is not None and through(user):
                found.extend(self.readers(user, through=through))
            else:
                found.append(user)
        return found

    def batchnorm_pairs(self, example: Any = None) -> dict[str, str]:
        """Which BatchNorm directly follows which Linear/Conv: ``{layer: batchnorm}``.

        A pair is a BatchNorm reading the layer's output directly, nothing else reading that
        output, and both modules called once. With ``example`` (an input batch) the pairs come
        from one probe forward pass instead (:func:`probed_batchnorm_pairs`, for models fx
        cannot trace), cached per example object.
        """
        if example is None:
            return dict(self._traced()._pairs) if self._has_batchnorm else {}
        cached = self._probed.get(id(example))
        if cached is None or cached[0] is not example:
            cached = (example, probed_batchnorm_pairs(self.model, example))
            self._probed = {id(example): cached}
        return dict(cached[1])

    def _find_batchnorm_pairs(self, modules: dict[str, nn.Module]) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for _, graph in self._parts:
            calls: dict[str, int] = {}
            for node in graph.nodes:
                if node.op == "call_module":
                    calls[node.target] = calls.get(node.target, 0) + 1
            for node in graph.nodes:
                if node.op != "call_module" or not is_batchnorm(self._module(node, modules)):
                    continue
                if not node.args or not isinstance(node.args[0], torch.fx.Node):
                    continue
                source = node.args[0]
                if source.op != "call_module" or self._kinds[source] != "linear":
                    continue
                # Fold only what is unambiguous: each module called once, the layer's output
                # read by nothing but this BatchNorm.
                if calls[node.target] != 1 or calls[source.target] != 1 or len(source.users) != 1:
                    continue
                pairs[self._names[source]] = self._names[node]
        return pairs

    def _module(self, node: torch.fx.Node, modules: dict[str, nn.Module]) -> nn.Module:
        return modules[self._names[node]]

    def relu_gates(self, bypass: Collection[str] = ()) -> dict[str, str]:
        """For each Linear/Conv layer the graph shows: what reads its output?

        Parameters
        ----------
        bypass:
            Names of modules that return their input in the canonical form (folded
            BatchNorms): the layer's output passes through them unchanged.

        Returns
        -------
        dict
            ``{layer name: kind}``. :data:`RELU`: every call's output (after the bypassed
            modules, reshapes, eval-mode dropout and max-pooling) is read only by ReLUs
            (``nn.ReLU``/``nn.ReLU6``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or
            not) — its inactive units never receive anything while those ReLUs pass the
            gradient's gate backward. :data:`SUM`: not so, and some output reaches a sum of
            two branches (a residual sum, whose ReLU gates the sum, not the unit).
            :data:`OTHER`: anything else. Layers the graph does not show for certain (inside
            another leaf module) are left out; the dict is empty when the whole model cannot
            be traced. Forward hooks of the user are not the graph's business (they may
            replace outputs fx does not see): :func:`patternnet.engine.gates.relu_gates`
            checks them at every call.
        """
        bypass = frozenset(bypass)
        return dict(self.memo(("relu_gates", bypass), lambda: self._relu_gates(bypass)))

    def _kinds_reading(self, node: torch.fx.Node, bypass: frozenset[str]) -> set[str]:
        """What reads ``node``'s value (:data:`RELU`, :data:`SUM`, :data:`OTHER`), looking
        through bypassed modules, reshapes, eval-mode dropout and max-pooling."""
        if not node.users:
            return {OTHER}  # unused output: nothing to decide; keep the run-time rule
        kinds: set[str] = set()
        for user in node.users:
            kind = self._kinds[user]
            first = bool(user.args) and user.args[0] is node
            if user.op == "call_module" and self._names[user] in bypass:
                kinds |= self._kinds_reading(user, bypass)
            elif first and kind in ("passthrough", "max_pool"):
                kinds |= self._kinds_reading(user, bypass)
            elif first and kind == "relu":
                kinds.add(RELU)
            elif kind == "sum":
                kinds.add(SUM)
            else:
                kinds.add(OTHER)
        return kinds

    def _relu_gates(self, bypass: frozenset[str]) -> dict[str, str]:
        if self.graph is None:
            return {}
        graph = self.graph

        def kinds_reading(node: torch.fx.Node) -> set[str]:
            return self._kinds_reading(node, bypass)

        calls: dict[str, set[str]] = {}
        leaves: set[str] = set()
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            leaves.add(node.target)
            if self._kinds[node] == "linear":
                calls.setdefault(node.target, set()).update(kinds_reading(node))
        # A layer inside another leaf module (e.g. a torch.nn container fx does not enter) may
        # be called where the graph cannot see it.
        hidden = {
            name for name in calls
            if any(name.startswith(leaf + ".") for leaf in leaves if leaf and leaf != name)
        }
        return {
            name: RELU if kinds == {RELU} else SUM if SUM in kinds else OTHER
            for name, kinds in calls.items()
            if name not in hidden
        }

    def gated_nodes(self, bypass: Collection[str] = ()) -> frozenset[str]:
        """The planned sums, pools and means (:meth:`linear_nodes`) read only by ReLUs.

        The node analogue of :meth:`relu_gates`: every reader of the node's output (after the
        bypassed modules, reshapes, eval-mode dropout and max-pooling) is a ReLU, so where
        those ReLUs pass the gradient's gate backward, the node's inactive units
        (``y ≤ 0``) never receive anything and the two-component rule needs no ``p₋``. A
        ResNet's residual sums are such nodes (``relu(out + identity)``).

        Parameters
        ----------
        bypass:
            Names of modules that return their input in the canonical form (folded
            BatchNorms).

        Returns
        -------
        frozenset
            Node names (``"sum#3"``); empty unless the plan is complete (traced, nothing
            probed), since only then do the names of a forward pass follow the plan.
        """
        bypass = frozenset(bypass)
        return self.memo(("gated_nodes", bypass), lambda: self._gated_nodes(bypass))

    def _gated_nodes(self, bypass: frozenset[str]) -> frozenset[str]:
        plan = self.linear_nodes()
        if self.graph is None or not plan.complete:
            return frozenset()
        by_name = {node.name: node for node in self.graph.nodes}
        return frozenset(
            planned.name for planned in plan.nodes
            if planned.node in by_name
            and self._kinds_reading(by_name[planned.node], bypass) == {RELU}
        )  # fmt: skip

    def smooth_activations(self) -> dict[str, str]:
        """Linear/Conv layers whose output (after a folded BatchNorm) feeds smooth activations.

        Returns
        -------
        dict
            ``{layer name: activation name}`` for layers every reader of which is a smooth
            activation (:data:`SMOOTH_ACTIVATIONS`, ``torch.sigmoid``, ``F.gelu`` ...); empty
            when the whole model cannot be traced.
        """
        return dict(self._traced()._smooth)

    def _find_smooth_activations(self) -> dict[str, str]:
        if self._graph is None:
            return {}
        folded = set(self._pairs.values())
        result: dict[str, str] = {}
        for node in self._graph.nodes:
            if self._kinds[node] != "linear" or node.op != "call_module":
                continue
            users = list(node.users)
            if len(users) == 1 and self._names.get(users[0]) in folded:
                users = list(users[0].users)
            if users and all(self._kinds[user] == "smooth" for user in users):
                result[node.target] = self._activation_name(users[0])
        return result

    def _activation_name(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return self._types[self._names[node]].__name__
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return str(node.target)

    # --------------------------------------------------------------------- linear nodes
    def linear_nodes(self) -> NodePlan:
        """The fixed-weight linear nodes (sums, average pools, means) the graph shows.

        The one answer to *which* sums, pools and means of a forward pass are neurons with
        fixed weights and fitted patterns (method.md §10), their names and kinds; the fit
        (:mod:`patternnet.patterns.graph_statistics`) and the pattern rules
        (:class:`patternnet.engine.rules.NodePatterns`) both take it, and
        :class:`patternnet.engine.nodes.NodeTracker` only matches each call of the forward
        pass to its planned node (see :class:`NodePlan`).

        A node is (per the vocabulary of the module docstring):

        - ``sum``: an addition of two values that both depend on the model's input (not
          ``x + constant``, ``x + parameter``), ``alpha`` 1;
        - ``mean``: ``x.mean(dims)`` / ``torch.mean`` over given dimensions (no ``dtype=``), and
          adaptive average pools to size 1 (global average pooling);
        - ``pool``: other average pools (adaptive ones and those with ``count_include_pad`` or
          no padding, no ``divisor_override``).

        Names are ``"<kind>#<i>"``, ``i`` counting the nodes of that kind in execution order.
        """
        return self.memo("linear_nodes", self._linear_nodes)

    def _linear_nodes(self) -> NodePlan:
        graph = self.graph
        if graph is None:
            return NodePlan(traced=False, error=self.error)
        modules = dict(self.model.named_modules())
        carries: dict[torch.fx.Node, bool] = {}
        planned: list[PlannedNode] = []
        opaque: list[str] = []
        counts: dict[str, int] = {}
        for node in graph.nodes:
            carries[node] = node.op == "placeholder" or any(
                carries.get(a, False) for a in node.all_input_nodes
            )
            if not carries[node]:
                continue
            kind = self._linear_node_kind(node, carries, modules)
            if kind is not None:
                index = counts.get(kind, 0)
                counts[kind] = index + 1
                planned.append(PlannedNode(f"{kind}#{index}", kind, node.name,
                                           self._names.get(node)))  # fmt: skip
            elif self._hides_nodes(node):
                opaque.append(self._names.get(node) or _target_name(node.target))
        return NodePlan(traced=True, nodes=tuple(planned), opaque=tuple(opaque))

    def _linear_node_kind(
        self, node: torch.fx.Node, carries: dict[torch.fx.Node, bool],
        modules: dict[str, nn.Module],
    ) -> str | None:
        """``"sum"``, ``"pool"``, ``"mean"`` or None (see :meth:`linear_nodes`)."""
        kind = self._kinds[node]
        if kind == "sum":
            operands = [*node.args[:2], node.kwargs.get("input"), node.kwargs.get("other")]
            computed = [a for a in operands if isinstance(a, torch.fx.Node) and carries[a]]
            if len(computed) == 2 and node.kwargs.get("alpha", 1) == 1:
                return "sum"
            return None
        if kind != "avg_pool":
            return None
        if node.op == "call_module":
            module = modules[self._names[node]]
            if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                   nn.AdaptiveAvgPool3d)):  # fmt: skip
                return _adaptive_kind(module.output_size)
            return _pool_kind(module.padding, module.count_include_pad,
                              getattr(module, "divisor_override", None))  # fmt: skip
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not (isinstance(x, torch.fx.Node) and carries[x]):
            return None
        target = node.target
        if target in _MEAN_SPELLINGS or node.op == "call_method":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dims is None or node.kwargs.get("dtype") is not None:
                return None
            return "mean"
        if target in _ADAPTIVE_SPELLINGS:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return _adaptive_kind(size)
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode",
                 "count_include_pad", "divisor_override")  # fmt: skip
        values = {"padding": 0, "count_include_pad": True, "divisor_override": None}
        values.update(zip(names, node.args))
        values.update(node.kwargs)
        return _pool_kind(values["padding"], values["count_include_pad"],
                          values["divisor_override"])  # fmt: skip

    def _hides_nodes(self, node: torch.fx.Node) -> bool:
        """A call the graph cannot see into that may run sums, pools or means inside: a leaf
        module other than layers, norms, pools and activations (``nn.TransformerEncoderLayer``
        ...), attention, or a function ``torch.fx`` keeps whole (``torch.fx.wrap``)."""
        if node.op == "call_module":
            return self._kinds[node] not in _NODE_FREE_KINDS
        if node.op == "call_function":
            if self._kinds[node] == "attention":
                return True
            target = node.target
            module = getattr(target, "__module__", None) or ""
            return inspect.isfunction(target) and not module.startswith("torch")
        return False

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for node in self.nodes():
            counts[self._kinds[node]] = counts.get(self._kinds[node], 0) + 1
        shown = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "other")
        state = "traced" if self.traced else f"untraced ({self.error})"
        return f"ModelGraph({state}: {shown})"


# ----------------------------------------------------------------------- probe fallback

_SHAPE_QUERIES = frozenset({"size", "dim", "numel", "__get__", "__len__", "ndimension"})


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
