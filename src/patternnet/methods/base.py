"""``Attribution``: the shape every method shares (Captum's API, one engine underneath).

A method is a choice of rules plus a start value:

- :meth:`Attribution.rules` says which rule goes on which module/function of the canonical
  model (nothing = the gradient);
- :meth:`Attribution.start` says what the backward pass starts from at the selected output
  (1 for the gradient, the logit ``y_c`` for PatternNet and the relevance methods);
- :meth:`Attribution.finish` turns what arrives at the input into the explanation (the
  gradient itself, or ``× input`` for gradient × input).

:meth:`Attribution.attribute` does the rest once for all methods: input checks, eval mode,
canonical form (BatchNorm folded), the forward pass with rules installed, target selection,
one ``torch.autograd.grad`` call, and restoring the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..borrow import borrowed, forward_checked, model_device, model_dtype
from ..engine.attention import AttentionHandler, decomposed
from ..engine.backward import Rule, rules_applied
from ..engine.canonize import Canonical, Canonizer, default_canonizers
from ..engine.graph import ModelGraph
from ..engine.support import check_supported

__all__ = ["Attribution", "TargetType", "resolve_target", "check_inputs"]

TargetType = int | Sequence[int] | Tensor | None


def check_inputs(inputs: Any, name: str = "inputs") -> Tensor:
    """Validate an input batch; return it unchanged.

    Raises
    ------
    TypeError
        Not a tensor, or not floating point (integer images: convert and normalise first).
    ValueError
        No batch dimension, an empty batch, or NaN/Inf values.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, ...), not {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(
            f"{name} has dtype {inputs.dtype}; explanations need floating-point inputs (for "
            "uint8 images: x.float() / 255, then the model's normalisation)"
        )
    if inputs.dim() < 2:
        raise ValueError(
            f"{name} has shape {tuple(inputs.shape)}; pass a batch (N, ...) — for one sample "
            "use x.unsqueeze(0)"
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(inputs.shape)})")
    if inputs.is_meta:
        raise ValueError(f"{name} is on the meta device (no values); pass real inputs")
    if not torch.isfinite(inputs).all():
        raise ValueError(
            f"{name} holds NaN or Inf values (samples {_bad_rows(inputs)}); clean or drop them"
        )
    return inputs


def resolve_target(target: TargetType, logits: Tensor, *, check: bool = True) -> Tensor:
    """Turn ``target`` into one class index per sample.

    Parameters
    ----------
    target:
        None (each sample's arg-max), an int (the same class for all), or a sequence/tensor
        with one class per sample.
    logits:
        ``(N, C)`` model output.
    check:
        Refuse classes out of range. ``False`` leaves the range check of a target tensor on
        a GPU to the caller (:func:`check_target_range`, e.g. after the backward pass:
        reading it is a host-device synchronisation); the index is then clamped into range
        so that nothing in between indexes out of bounds.
    """
    n, classes = logits.shape
    if target is None:
        return logits.detach().argmax(1)  # in range: no check (and no GPU synchronisation)
    if isinstance(target, bool):
        raise TypeError("target must be None, an int or one int per sample, not a bool")
    if isinstance(target, int):
        if not 0 <= target < classes:
            raise ValueError(
                f"target {target} is out of range: the model has {classes} outputs "
                f"(0 … {classes - 1})"
            )
        return torch.full((n,), target, dtype=torch.long, device=logits.device)
    try:
        # checked where the user's target lives (usually the CPU), then moved
        index = torch.as_tensor(target)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"target must be None, an int or one int per sample; got {type(target).__name__}"
        ) from error
    if index.dim() == 0:
        index = index.expand(n)
    if index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(f"target must hold integers, not {index.dtype}")
    index = index.reshape(-1).long()
    if index.numel() != n:
        raise ValueError(
            f"target has {index.numel()} entries but the batch has {n} samples; give one "
            "class per sample, a single int, or None"
        )
    if check or index.device.type == "cpu":
        _check_class_range(index, classes)
        return index.to(logits.device)
    return index.to(logits.device).clamp(0, classes - 1)


def check_target_range(target: TargetType, classes: int) -> None:
    """The range check :func:`resolve_target` skipped with ``check=False``."""
    if isinstance(target, Tensor) and target.device.type != "cpu":
        _check_class_range(target.reshape(-1).long(), classes)


def _check_class_range(index: Tensor, classes: int) -> None:
    bad = (index < 0) | (index >= classes)
    if bool(bad.any()):
        raise ValueError(
            f"target {index[bad][0].item()} is out of range: the model has {classes} outputs "
            f"(0 … {classes - 1})"
        )


def _bad_rows(values: Tensor) -> list[int]:
    """Indices (at most 8) of the samples holding NaN or Inf."""
    bad = ~torch.isfinite(values.detach().reshape(values.shape[0], -1)).all(1)
    return bad.nonzero().flatten()[:8].tolist()


def _check_finite_logits(finite: Tensor, logits: Tensor) -> None:
    """Refuse NaN/Inf logits (``finite``: ``isfinite(logits).all()``, read only now).

    Checked after the backward pass, not between the passes: reading a GPU value waits for
    the forward pass to finish, and the backward pass would then be queued only afterwards.
    """
    if not bool(finite):
        raise ValueError(
            f"the model's output holds NaN or Inf for samples {_bad_rows(logits)}; an "
            "explanation of it would be meaningless (check the model's weights and inputs)"
        )


def _check_logits(logits: Tensor, x: Tensor) -> None:
    """Refuse logits that cannot be explained: wrong batch size, no gradient path."""
    if logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"the model's output has {logits.shape[0]} rows but the batch has {x.shape[0]} "
            "samples; patternnet explains (N, C) logits, one row per sample (pass "
            "output_selector= to reshape the output)"
        )
    if not logits.requires_grad:
        raise ValueError(
            "the model's output does not depend differentiably on its input (a detach(), "
            "torch.no_grad(), argmax or numpy round trip inside forward?); patternnet needs "
            "the autograd graph from the input to the logits"
        )


class Attribution:
    """Base of every method: ``Method(model, ...).attribute(inputs, target=None)``.

    Parameters
    ----------
    model:
        A classifier ``nn.Module`` returning logits ``(N, C)``; borrowed, never changed.
    canonizers:
        Graph rewrites applied for the explanation (default: fold BatchNorm into the preceding
        Linear/Conv). ``[]`` for none. A method object reuses what it prepared (the model's
        graph, folded weights, ``W ⊙ A``) across calls while the tensors are unchanged;
        in-place updates (optimiser steps, ``load_state_dict``) are detected, writes through
        ``.data`` are not: call :meth:`refresh` after those.
    output_selector:
        For models returning tuples/dicts/objects: a function from the model's output to the
        ``(N, C)`` logits to explain, e.g. ``lambda out: out["logits"]``.
    """

    # ---------------------------------------------------------------- self-description
    #: Registry name (set by :func:`~patternnet.methods.registry.register`).
    name: ClassVar[str] = ""
    #: ``"signal"`` (what the network detects in the input, drawn grey-centred:
    #: :func:`patternnet.viz.signal_image`) or ``"attribution"`` (each input's contribution to
    #: the logit, drawn as a red/blue heatmap: :func:`patternnet.viz.heatmap`).
    kind: ClassVar[str] = "attribution"
    #: Whether the method explains with patterns fitted by :func:`patternnet.fit_patterns`.
    needs_patterns: ClassVar[bool] = False
    #: One line saying what the method does (listed by ``patternnet methods``).
    description: ClassVar[str] = ""
    #: The papers the method comes from.
    references: ClassVar[tuple[str, ...]] = ()
    #: Whether the method wraps another method (SmoothGrad, Integrated Gradients): built
    #: from a method rather than a model, with option ``inner`` in the registry.
    wraps: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        canonizers: Sequence[Canonizer] | None = None,
        output_selector: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        # Resolved once: the canonizers' own caches (folded BatchNorms) live as long as the
        # method object, so repeated calls reuse them.
        self.canonizers = default_canonizers() if canonizers is None else list(canonizers)
        self.output_selector = output_selector

    def refresh(self) -> Attribution:
        """Forget everything prepared for the model and prepare it again on the next call.

        Needed only after changes that leave no trace in the tensors' version counters
        (writes through ``.data``) or in the model's structure (a ``forward`` replaced at
        run time): the model graph is traced again, folded BatchNorms and swapped weights are
        recomputed. Returns the method itself.
        """
        ModelGraph.of(self.model, refresh=True)
        for canonizer in self.canonizers:
            clear = getattr(canonizer, "clear", None)
            if callable(clear):
                clear()
        return self

    # ------------------------------------------------------------------ a method's choices
    def rules(
        self, canonical: Canonical
    ) -> tuple[dict[nn.Module, Rule], dict[Callable[..., Any], Rule]]:
        """Rules by module and by function (default: none, i.e. the gradient)."""
        return {}, {}

    def start(self, logits: Tensor, target: Tensor) -> Tensor:
        """What the backward pass starts from at the output (default: one-hot 1)."""
        start = torch.zeros_like(logits)
        start.scatter_(1, target[:, None], 1.0)
        return start

    def graph_context(self, canonical: Canonical) -> AbstractContextManager[Any]:
        """A context around the forward pass for rules on graph operations (default: none).

        The pattern methods return the tracker of sums, pools and means
        (:class:`~patternnet.engine.rules.NodePatterns`).
        """
        return nullcontext()

    def check_model(self, module_rules: dict[nn.Module, Rule]) -> None:
        """Refuse models with modules no rule covers, before the forward pass (default:
        :func:`~patternnet.engine.support.check_supported`)."""
        check_supported(self.model)

    def attention_handler(self, canonical: Canonical) -> AttentionHandler:
        """What this method does at attention's softmax and weighted sum (default: the plain
        operations, i.e. the gradient's full Jacobian).

        Attention always runs decomposed (:mod:`patternnet.engine.attention`), so that its
        input and output projections are Linear layers with rules; a method with its own
        rule for attention returns its :class:`~patternnet.engine.attention.AttentionHandler`.
        """
        return AttentionHandler()

    def finish(self, inputs: Tensor, grad: Tensor) -> Tensor:
        """Turn what arrived at the input into the explanation (default: unchanged)."""
        return grad

    # ------------------------------------------------------------------ shared work
    def _canonical(self) -> Canonical:
        return Canonical(self.model, self.canonizers)

    def _logits(self, output: Any) -> Tensor:
        if self.output_selector is not None:
            output = self.output_selector(output)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the model returned a {type(output).__name__}, not a tensor of logits; pass "
                "output_selector=, e.g. output_selector=lambda out: out[0]"
            )
        if not output.is_floating_point():
            raise TypeError(
                f"the model's output has dtype {output.dtype}; patternnet explains floating-point "
                "logits (is there an argmax or a cast to int inside forward?)"
            )
        if output.dim() == 1:
            output = output[:, None]
        if output.dim() != 2:
            raise ValueError(
                f"the model's output has shape {tuple(output.shape)}; patternnet explains "
                "(N, C) logits: pass output_selector= to pick or flatten them"
            )
        return output

    def _gradient(self, inputs: Tensor, target: TargetType) -> tuple[Tensor, Tensor]:
        """One forward pass with the rules installed and one backward pass; (x, grad)."""
        device, dtype = model_device(self.model), model_dtype(self.model)
        with borrowed(self.model):
            canonical = self._canonical()
            module_rules, function_rules = self.rules(canonical)
            if module_rules or function_rules:  # methods that swap rules need known modules
                self.check_model(module_rules)
            x = inputs.detach().to(device=device, dtype=dtype).requires_grad_(True)
            # Built before rules_applied installs its hooks: what it reads from the graph
            # (engine.gates) is withheld from models with forward hooks.
            graph_context = self.graph_context(canonical)
            with torch.enable_grad(), canonical.active(), rules_applied(
                module_rules, function_rules
            ), graph_context, decomposed(
                self.model, self.attention_handler(canonical)
            ):
                output = forward_checked(canonical, x)
                logits = self._logits(output)
                _check_logits(logits, x)
                finite = torch.isfinite(logits.detach()).all()
                index = resolve_target(target, logits, check=False)
                start = self.start(logits.detach(), index)
                (grad,) = torch.autograd.grad(logits, x, start)
            _check_finite_logits(finite, logits.detach())
            check_target_range(target, logits.shape[1])
        return x.detach(), grad

    def attribute(self, inputs: Tensor, target: TargetType = None) -> Tensor:
        """Explain ``inputs`` for the ``target`` class.

        Parameters
        ----------
        inputs:
            A batch ``(N, ...)`` of floating-point inputs (moved to the model's device).
        target:
            None (each sample's arg-max logit), an int, or one class per sample.

        Returns
        -------
        Tensor
            Shaped like ``inputs``, on the inputs' device and dtype.
        """
        check_inputs(inputs)
        x, grad = self._gradient(inputs, target)
        result = self.finish(x, grad)
        if not torch.isfinite(result).all():
            raise ValueError(
                f"{type(self).__name__} produced NaN or Inf values (samples "
                f"{_bad_rows(result)}): an overflow in the backward pass (a float16/bfloat16 "
                "model: explain a float32 copy) or non-finite patterns/weights"
            )
        return result.to(device=inputs.device, dtype=inputs.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"
