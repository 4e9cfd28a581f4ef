"""The gradient family: saliency, gradient × input, SmoothGrad and Integrated Gradients.

:class:`Gradient` and :class:`GradientXInput` are the engine with no rules. :class:`SmoothGrad`
and :class:`IntegratedGradients` wrap any method (``SmoothGrad(GuidedBackprop(model))`` works
too) and evaluate it on many points in batches of at most ``internal_batch_size`` rows, so
that memory stays bounded, as Captum's ``NoiseTunnel`` and ``IntegratedGradients`` do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..borrow import borrowed, forward_checked, model_device, model_dtype
from .base import Attribution, TargetType, check_inputs, resolve_target
from .registry import register

__all__ = ["Gradient", "GradientXInput", "SmoothGrad", "IntegratedGradients", "INTEGRATION_RULES"]


@register("gradient")
class Gradient(Attribution):
    """The gradient of the selected logit with respect to the input (Simonyan et al. 2014).

    Signed (Captum's ``Saliency`` with ``abs=False``). It shows the filter ``w``, not the
    signal (method.md §1).
    """

    kind = "signal"
    description = "gradient of the logit (saliency, signed)"
    references = (
        "Simonyan, Vedaldi, Zisserman, Deep inside convolutional networks, ICLR workshop 2014",
    )


@register("gradient_x_input")
class GradientXInput(Attribution):
    """Gradient ⊙ input (Shrikumar et al. 2016); equals LRP-z for bias-free ReLU networks."""

    description = "gradient × input"
    references = ("Shrikumar et al., Not just a black box, arXiv:1605.01713, 2016",)

    def finish(self, inputs: Tensor, grad: Tensor) -> Tensor:
        return grad * inputs


# ---------------------------------------------------------------------------- wrappers


def _as_method(method: Attribution | nn.Module) -> Attribution:
    if isinstance(method, Attribution):
        return method
    if isinstance(method, nn.Module):
        return Gradient(method)
    raise TypeError(
        f"method must be an attribution method (e.g. Gradient(model)) or a model, not "
        f"{type(method).__name__}"
    )


def _positive_int(name: str, value: int | None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class _Wrapper(Attribution):
    """A method evaluated at many points derived from the inputs, in bounded batches."""

    wraps = True

    def __init__(
        self, method: Attribution | nn.Module, internal_batch_size: int | None = None
    ) -> None:
        inner = _as_method(method)
        super().__init__(
            inner.model, canonizers=inner.canonizers, output_selector=inner.output_selector
        )
        self.method = inner
        self.internal_batch_size = _positive_int(
            "internal_batch_size", internal_batch_size, allow_none=True
        )

    def _targets(self, inputs: Tensor, target: TargetType) -> Tensor:
        """One class per sample, resolved on the clean inputs (arg-max for None)."""
        device, dtype = model_device(self.model), model_dtype(self.model)
        with borrowed(self.model), torch.no_grad():
            output = forward_checked(self.model, inputs.detach().to(device=device, dtype=dtype))
            logits = self.method._logits(output)
        return resolve_target(target, logits)

    def _evaluate(self, rows: Tensor, targets: Tensor) -> Tensor:
        """The wrapped method on ``rows``, at most ``internal_batch_size`` rows at a time."""
        size = self.internal_batch_size or rows.shape[0]
        parts = [
            self.method.attribute(rows[i : i + size], targets[i : i + size])
            for i in range(0, rows.shape[0], size)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method!r})"


@register("smoothgrad")
class SmoothGrad(_Wrapper):
    """SmoothGrad (Smilkov et al. 2017): the method averaged over noisy copies of the input.

    ``(1/n) Σ_k M(x + ε_k)``, ``ε_k ~ N(0, σ²)`` with ``σ = noise_level · (max x − min x)``
    per sample, as in the paper.

    Parameters
    ----------
    method:
        The method to smooth (``Gradient(model)``, ``GuidedBackprop(model)``, ...); a model
        means its gradient.
    n_samples:
        Number of noisy copies per input.
    noise_level:
        Noise standard deviation as a fraction of each sample's value range (paper: 10-20%).
    internal_batch_size:
        Most rows (copies × inputs) per backward pass; None for all at once. The noise is
        drawn per batch of copies, ``max(1, internal_batch_size // N)`` copies of every input
        at a time, in the same order as Captum's ``NoiseTunnel`` with
        ``nt_samples_batch_size`` set to that number.
    seed:
        Seed of a private random generator (reproducible), or None for torch's global one.

    Examples
    --------
    >>> SmoothGrad(Gradient(model), n_samples=50, seed=0).attribute(x, target=3)  # doctest: +SKIP
    """

    #: A smoothed signal is a signal, a smoothed attribution an attribution: an instance has
    #: its inner method's kind (the class: that of the default, the gradient).
    kind = "signal"
    description = (
        "SmoothGrad: a method (option inner, default gradient) averaged over noisy inputs"
    )
    references = ("Smilkov et al., SmoothGrad: removing noise by adding noise, 2017",)

    def __init__(
        self,
        method: Attribution | nn.Module,
        n_samples: int = 50,
        noise_level: float = 0.15,
        internal_batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(method, internal_batch_size)
        self.kind = self.method.kind  # type: ignore[misc]
        self.n_samples = _positive_int("n_samples", n_samples)
        noise_level = float(noise_level)
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be ≥ 0, got {noise_level!r}")
        self.noise_level = noise_level
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, not {type(seed).__name__}")
        self.seed = seed

    def attribute(self, inputs: Tensor, target: TargetType = None) -> Tensor:
        """Average of the method over ``n_samples`` noisy copies of each input.

        Returns
        -------
        Tensor
            Shaped like ``inputs``, on their device and dtype.
        """
        check_inputs(inputs)
        index = self._targets(inputs, target).to(inputs.device)
        n = inputs.shape[0]
        flat = inputs.detach().reshape(n, -1)
        spread = (flat.amax(1) - flat.amin(1)) * self.noise_level
        sigma = spread.reshape((n,) + (1,) * (inputs.dim() - 1))
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=inputs.device).manual_seed(self.seed)
        per_batch = self.n_samples
        if self.internal_batch_size is not None:
            per_batch = max(1, min(self.n_samples, self.internal_batch_size // n))
        total = torch.zeros_like(inputs)
        done = 0
        while done < self.n_samples:
            k = min(per_batch, self.n_samples - done)
            rows = inputs.detach().repeat_interleave(k, dim=0)
            noise = torch.randn(
                rows.shape, generator=generator, dtype=rows.dtype, device=rows.device
            )
            rows = rows + noise * sigma.repeat_interleave(k, dim=0)
            result = self._evaluate(rows, index.repeat_interleave(k))
            total += result.reshape((n, k) + tuple(inputs.shape[1:])).sum(1)
            done += k
        return total / self.n_samples


def _integration(rule: str, n_steps: int) -> tuple[list[float], list[float]]:
    """Points ``α_k`` in [0, 1] and weights ``w_k`` of a quadrature rule with ``n_steps``."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return list(0.5 * (nodes + 1)), list(0.5 * weights)
    if rule == "riemann_trapezoid":
        if n_steps < 2:
            raise ValueError("riemann_trapezoid needs n_steps ≥ 2")
        step = 1.0 / (n_steps - 1)
        weights = [step] * n_steps
        weights[0] = weights[-1] = step / 2
        return list(np.linspace(0, 1, n_steps)), weights
    offsets = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}
    if rule in offsets:
        return [(k + offsets[rule]) / n_steps for k in range(n_steps)], [1.0 / n_steps] * n_steps
    raise ValueError(
        f"unknown integration rule {rule!r}; choose one of {', '.join(INTEGRATION_RULES)}"
    )


#: Quadrature rules of :class:`IntegratedGradients` (Captum's names and formulas).
INTEGRATION_RULES = (
    "gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_middle", "riemann_right"
)


@register("integrated_gradients")
class IntegratedGradients(_Wrapper):
    """Integrated Gradients (Sundararajan et al. 2017) of any method.

    ``(x − x̄) ⊙ ∫₀¹ M(x̄ + α(x − x̄)) dα`` by a quadrature rule with ``n_steps`` points, where
    ``M`` is the wrapped method (the gradient for the paper's method).

    Parameters
    ----------
    method:
        The method to integrate, usually ``Gradient(model)``; a model means its gradient.
    baseline:
        ``x̄``: None (zeros), a number, or a tensor broadcasting to the inputs.
    n_steps:
        Number of points on the path.
    internal_batch_size:
        Most path points evaluated per backward pass (None: all ``n_steps · N`` at once).
    integration:
        ``"gausslegendre"`` (default, as Captum), ``"riemann_trapezoid"``,
        ``"riemann_left"``, ``"riemann_middle"`` or ``"riemann_right"``.
    """

    description = "Integrated Gradients from a baseline (option inner, default gradient)"
    references = ("Sundararajan, Taly, Yan, Axiomatic attribution for deep networks, ICML 2017",)

    def __init__(
        self,
        method: Attribution | nn.Module,
        baseline: float | Tensor | None = None,
        n_steps: int = 50,
        internal_batch_size: int | None = None,
        integration: str = "gausslegendre",
    ) -> None:
        super().__init__(method, internal_batch_size)
        self.n_steps = _positive_int("n_steps", n_steps)
        self.alphas, self.weights = _integration(integration, self.n_steps)
        self.integration = integration
        self.baseline = baseline

    def _baseline(self, inputs: Tensor) -> Tensor:
        if self.baseline is None:
            return torch.zeros_like(inputs)
        baseline = torch.as_tensor(self.baseline, dtype=inputs.dtype, device=inputs.device)
        if not torch.isfinite(baseline).all():
            raise ValueError("the baseline holds NaN or Inf values")
        try:
            return baseline.expand_as(inputs)
        except RuntimeError as error:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs "
                f"{tuple(inputs.shape)}"
            ) from error

    def _chunks(self, total: int) -> Iterator[tuple[int, int]]:
        size = self.internal_batch_size or total
        for start in range(0, total, size):
            yield start, min(start + size, total)

    def attribute(self, inputs: Tensor, target: TargetType = None) -> Tensor:
        """Integrated attribution along the straight path from the baseline to the inputs.

        Returns
        -------
        Tensor
            Shaped like ``inputs``, on their device and dtype.
        """
        check_inputs(inputs)
        index = self._targets(inputs, target).to(inputs.device)
        x = inputs.detach()
        baseline = self._baseline(x)
        delta = x - baseline
        n = x.shape[0]
        alphas = torch.as_tensor(self.alphas, dtype=x.dtype, device=x.device)
        weights = torch.as_tensor(self.weights, dtype=x.dtype, device=x.device)
        view = (-1,) + (1,) * (x.dim() - 1)
        total = torch.zeros_like(x)
        # Rows are ordered step-major (all samples at α₀, then at α₁ ...), built per batch.
        for start, stop in self._chunks(self.n_steps * n):
            rows = torch.arange(start, stop, device=x.device)
            step, sample = rows // n, rows % n
            points = baseline[sample] + alphas[step].reshape(view) * delta[sample]
            result = self.method.attribute(points, index[sample])
            total.index_add_(0, sample, result * weights[step].reshape(view))
        return delta * total
