"""The one backward engine: swap what flows backward through chosen modules and functions.

Every method of patternnet is the ordinary autograd gradient of the selected output with
respect to the input, except that some operations pass something else backward. Which
operations and what they pass is a :class:`Rule`; this module holds the single mechanism that
installs rules on a borrowed model and removes them afterwards:

- **modules** (Linear, Conv, pooling, ...): a forward hook hands the module's input and output
  to ``rule.save`` and returns the same output values wrapped in a custom autograd function
  whose backward is ``rule.backward``. The real graph is used, so skip connections, reused
  modules, views and flattening behave exactly as in the gradient.
- **functions** (``F.relu``, ``torch.relu``, ``Tensor.relu``, ...): a
  :class:`~torch.overrides.TorchFunctionMode` catches the call wherever it happens (inside
  ``nn.ReLU`` or written as ``F.relu`` in the model's forward) and wraps its result the same
  way. In-place variants are computed out of place while rules are active, so that the rule
  sees the input before the activation.
- **additions** of two branches (``a + b``, ``a += b``, ``torch.add``, ``a.add_(b)``: the
  sums of residual networks), opt-in through :func:`addition_rules`: the same mode catches an
  addition of two same-shaped tensors that both carry the graph, and the rule splits what
  arrives at the sum between the summands: its ``save`` receives ``x = (a, b)`` and its
  ``backward`` returns ``(to_a, to_b)``. Without an addition rule the sum passes the same
  quantity to both summands, as the gradient does. An addition rule with a ``constant_rule``
  also gets ``x + c`` where only ``x`` carries the graph (a position embedding as a bias).
- **matrix products** of two tensors that both carry the graph (``torch.matmul``, ``a @ b``:
  attention's ``q kᵀ``), opt-in through :func:`matmul_rules`: the rule's ``save`` receives
  ``x = (a, b)`` and its ``backward`` returns ``(to_a, to_b)``, as for additions.

Nothing is stored on the user's modules; hooks and modes live inside :func:`rules_applied`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Rule", "rules_applied", "relu_rules", "addition_rules", "ACTIVATION_FUNCTIONS",
           "ADDITION_FUNCTIONS", "GATED_SMOOTH_FUNCTIONS", "MULTIPLICATION_FUNCTIONS",
           "product_rules", "smooth_gate_rules", "MATMUL_FUNCTIONS", "matmul_rules"]


class Rule:
    """How one operation's backward pass is replaced.

    Subclasses override :meth:`save` (what the forward pass must remember) and
    :meth:`backward` (what flows to the input, given what arrives at the output).
    """

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        """Remember what :meth:`backward` needs from the forward pass (default: nothing)."""
        return None

    def backward(self, module: nn.Module | None, state: Any, grad_output: Tensor) -> Tensor:
        """Return what flows to the input given ``grad_output`` at the output."""
        raise NotImplementedError(f"{type(self).__name__} must define backward()")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class _Swapped(torch.autograd.Function):
    """Identity on the forward values; ``rule.backward`` on the way back."""

    @staticmethod
    def forward(ctx: Any, rule: Rule, module: Any, state: Any, x: Tensor, box: list) -> Tensor:
        ctx.rule, ctx.module, ctx.state = rule, module, state
        # Returning a tensor that is not an argument avoids autograd's view bookkeeping, so
        # an in-place ReLU may follow.
        return box[0]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        grad_input = ctx.rule.backward(ctx.module, ctx.state, grad_output)
        return None, None, None, grad_input, None


def _wrap(rule: Rule, module: nn.Module | None, x: Any, output: Any) -> Any:
    if not (
        torch.is_grad_enabled()
        and isinstance(x, Tensor)
        and isinstance(output, Tensor)
        and x.requires_grad
    ):
        return output
    state = rule.save(module, x, output)
    return _Swapped.apply(rule, module, state, x, [output.detach()])


class _SwappedSum(torch.autograd.Function):
    """``a + b`` on the forward values; ``rule.backward`` splits the way back."""

    @staticmethod
    def forward(ctx: Any, rule: Rule, state: Any, a: Tensor, b: Tensor, box: list) -> Tensor:
        ctx.rule, ctx.state = rule, state
        return box[0]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        to_a, to_b = ctx.rule.backward(None, ctx.state, grad_output)
        return None, None, to_a, to_b, None


class _SwappedSumInPlace(torch.autograd.Function):
    """``a += b`` written into ``a`` (as the model asked); ``rule.backward`` on the way back.

    Marking ``a`` dirty makes autograd treat the sum as a new version of ``a``: no copy of
    the sum into ``a`` and no zero gradient for the overwritten values on the way back.
    """

    @staticmethod
    def forward(ctx: Any, rule: Rule, a_before: Tensor, a: Tensor, b: Tensor) -> Tensor:
        a.add_(b)
        ctx.mark_dirty(a)
        ctx.rule = rule
        ctx.state = rule.save(None, (a_before, b.detach()), a.detach())
        return a

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        to_a, to_b = ctx.rule.backward(None, ctx.state, grad_output)
        return None, None, to_a, to_b


def _module_hook(rule: Rule) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not args:
            return None
        return _wrap(rule, module, args[0], output)

    return hook


#: Activation functions a function rule can name, with the out-of-place function used while
#: rules are active. ``nn.ReLU`` calls ``F.relu``, so one entry covers both.
ACTIVATION_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.relu: F.relu,
    torch.relu: torch.relu,
    torch.relu_: torch.relu,
    Tensor.relu: torch.relu,
    Tensor.relu_: torch.relu,
    F.relu_: torch.relu,
}
_RELU_FAMILY = frozenset(ACTIVATION_FUNCTIONS)
#: Smooth activations that approach ReLU away from zero (``nn.GELU`` calls ``F.gelu``,
#: ``nn.SiLU`` ``F.silu``): what :func:`smooth_gate_rules` names.
GATED_SMOOTH_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.gelu: F.gelu, F.silu: F.silu,
}
ACTIVATION_FUNCTIONS.update(GATED_SMOOTH_FUNCTIONS)

#: Spellings of a tensor addition (``a + b`` calls ``Tensor.add``, ``a += b`` ``Tensor.add_``).
ADDITION_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__}
)
_IN_PLACE_ADDITIONS = frozenset({Tensor.add_, Tensor.__iadd__})

#: Spellings of a product ``s * x``. A rule for them is asked ``rule.operands(a, b)`` for each
#: product and sees only those it answers with ``(x, s)`` (e.g. a layer scale: a parameter
#: times an activation); every other product is computed as usual.
MULTIPLICATION_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
)


def _product(rule: Rule, func: Any, args: tuple[Any, ...], kwargs: dict) -> Any:
    """Apply a product rule to ``s * x`` when the rule claims the operands, else multiply."""
    out = func(*args, **kwargs)
    operands = getattr(rule, "operands", None)
    if operands is None or len(args) != 2 or kwargs or not torch.is_grad_enabled():
        return out
    pair = operands(*args)
    if pair is None:
        return out
    x, scale = pair
    if not (isinstance(out, Tensor) and x.requires_grad and out.shape == x.shape):
        return out
    state = rule.save(None, (x.detach(), scale.detach()), out.detach())
    return _Swapped.apply(rule, None, state, x, [out.detach()])


def _constant_sum(rule: Rule, func: Any, a: Any, b: Any, args: tuple, kwargs: dict) -> Any:
    """``x + c`` with a constant tensor ``c`` (no graph: a bias, a position embedding) under
    ``rule.constant_rule``; None when the sum is not of that kind."""
    inner = getattr(rule, "constant_rule", None)
    if (
        inner is None
        or func in _IN_PLACE_ADDITIONS
        or not torch.is_grad_enabled()
        or not (isinstance(a, Tensor) and isinstance(b, Tensor))
        or a.requires_grad == b.requires_grad
        or len(args) > 2
        or set(kwargs) - {"other", "input"}
    ):
        return None
    x, c = (a, b) if a.requires_grad else (b, a)
    out = func(*args, **kwargs)
    if not (isinstance(out, Tensor) and out.shape == x.shape):
        return out
    state = inner.save(None, (x.detach(), c.detach()), out.detach())
    return _Swapped.apply(inner, None, state, x, [out.detach()])


def _sum(rule: Rule, func: Any, args: tuple[Any, ...], kwargs: dict) -> Any:
    """Apply an addition rule to ``a + b`` when both summands carry the graph, else add.

    A rule with a ``constant_rule`` attribute also gets ``x + c`` where only ``x`` carries the
    graph (the constant rule's ``save`` receives ``(x, c)``, its ``backward`` returns what
    flows to ``x``).
    """
    a = args[0] if args else kwargs.get("input")
    b = args[1] if len(args) > 1 else kwargs.get("other")
    constant = _constant_sum(rule, func, a, b, args, kwargs)
    if constant is not None:
        return constant
    if not (
        torch.is_grad_enabled()
        and isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.requires_grad
        and b.requires_grad
        and a.shape == b.shape
        and len(args) <= 2
        and set(kwargs) <= {"other", "input", "alpha"}
        and kwargs.get("alpha", 1) == 1
    ):
        return func(*args, **kwargs)
    if func in _IN_PLACE_ADDITIONS:
        # An in-place sum overwrites ``a``: the rule must see its value before.
        before = a.detach().clone()
        if (
            not a.is_leaf
            and a._base is None
            and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        ):
            return _SwappedSumInPlace.apply(rule, before, a, b)
        # Views, leaves (refused by autograd as before), ``a += a`` and other overlaps: sum
        # first, then copy into ``a``.
        values = before + b.detach()
        state = rule.save(None, (before, b.detach().clone()), values)
        return a.copy_(_SwappedSum.apply(rule, state, a, b, [values.detach()]))
    values = a.detach() + b.detach()
    state = rule.save(None, (a.detach(), b.detach()), values)
    # The output is another tensor object than the one the state may keep: the returned one
    # gets the node as grad_fn, and a state holding it would make a cycle through autograd's
    # C++ graph that Python's garbage collector cannot free (the whole graph leaked).
    return _SwappedSum.apply(rule, state, a, b, [values.detach()])


#: Spellings of a matrix product (``a @ b`` calls ``Tensor.__matmul__``).
MATMUL_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {torch.matmul, Tensor.matmul, Tensor.__matmul__}
)


def _matmul(rule: Rule, func: Any, args: tuple[Any, ...], kwargs: dict) -> Any:
    """Apply a product rule to ``a @ b`` when both factors carry the graph, else multiply."""
    out = func(*args, **kwargs)
    if len(args) != 2 or kwargs or not torch.is_grad_enabled():
        return out
    a, b = args
    if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.requires_grad
            and b.requires_grad and isinstance(out, Tensor)):
        return out
    values = out.detach()
    state = rule.save(None, (a.detach(), b.detach()), values)
    return _SwappedSum.apply(rule, state, a, b, [values.detach()])  # see _sum


class _FunctionRules(TorchFunctionMode):
    """Apply rules to activation functions called anywhere during the forward pass."""

    def __init__(self, rules: Mapping[Callable[..., Any], Rule]) -> None:
        super().__init__()
        self.rules = dict(rules)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        rule = self.rules.get(func)
        if rule is None:
            return func(*args, **kwargs)
        if func in MATMUL_FUNCTIONS:
            return _matmul(rule, func, args, kwargs)
        if func in ADDITION_FUNCTIONS:
            return _sum(rule, func, args, kwargs)
        if func in MULTIPLICATION_FUNCTIONS:
            return _product(rule, func, args, kwargs)
        x = args[0]
        if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled():
            # Compute out of place: the rule needs the activation's input, and an in-place
            # result would carry the ordinary gradient gate too.
            kwargs.pop("inplace", None)
            out = ACTIVATION_FUNCTIONS[func](*args, **kwargs)
            return _wrap(rule, None, x, out)
        return func(*args, **kwargs)


def relu_rules(rule: Rule) -> dict[Callable[..., Any], Rule]:
    """The same rule for every spelling of ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu`` ...)."""
    return {func: rule for func in _RELU_FAMILY}


def smooth_gate_rules(rule: Rule) -> dict[Callable[..., Any], Rule]:
    """The same rule for GELU and SiLU (``nn.GELU``, ``F.gelu``, ``nn.SiLU``, ``F.silu``)."""
    return {func: rule for func in GATED_SMOOTH_FUNCTIONS}


def addition_rules(rule: Rule) -> dict[Callable[..., Any], Rule]:
    """The same rule for every spelling of a two-branch addition (see the module docstring)."""
    return {func: rule for func in ADDITION_FUNCTIONS}


def matmul_rules(rule: Rule) -> dict[Callable[..., Any], Rule]:
    """The same rule for every spelling of a matrix product of two graph-carrying tensors."""
    return {func: rule for func in MATMUL_FUNCTIONS}


def product_rules(rule: Rule) -> dict[Callable[..., Any], Rule]:
    """The same rule for every spelling of a product (the rule names its operands)."""
    return {func: rule for func in MULTIPLICATION_FUNCTIONS}


@contextmanager
def rules_applied(
    module_rules: Mapping[nn.Module, Rule],
    function_rules: Mapping[Callable[..., Any], Rule] | None = None,
) -> Iterator[None]:
    """Within this block, the given modules and functions pass their rules' values backward.

    Parameters
    ----------
    module_rules:
        ``{module: rule}``; each call of the module (reused modules too) is wrapped.
    function_rules:
        ``{function: rule}`` for activation functions (see :func:`relu_rules`) and additions
        (see :func:`addition_rules`).
    """
    with ExitStack() as stack:
        for module, rule in module_rules.items():
            handle = module.register_forward_hook(_module_hook(rule))
            stack.callback(handle.remove)
        if function_rules:
            stack.enter_context(_FunctionRules(function_rules))
        yield
