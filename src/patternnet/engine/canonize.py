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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["CanonicalForm", "Canonizer", "Canonical"]


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


def _bypass_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return args[0]


class Canonical:
    """Run a model in canonical form without changing it.

    Parameters
    ----------
    model:
        The user's model (borrowed).
    canonizers:
        Canonizers applied in order; empty means the model as it is.
    """

    def __init__(self, model: nn.Module, canonizers: Sequence[Canonizer] = ()) -> None:
        self.model = model
        self.form = CanonicalForm()
        for canonizer in canonizers:
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
        """Within this block, bypassed modules return their input (hooks removed on exit)."""
        handles = [
            self._modules[name].register_forward_hook(_bypass_hook) for name in self.form.bypass
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One forward pass in canonical form (use inside :meth:`active`)."""
        if not self.form.parameters:
            return self.model(*args, **kwargs)
        return torch.func.functional_call(
            self.model, self.form.parameters, args, kwargs, tie_weights=False, strict=False
        )


def default_canonizers() -> list[Canonizer]:
    """The canonizers applied when a caller does not choose: none yet."""
    return []
