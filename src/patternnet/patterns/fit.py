"""One pass over the data fits the patterns of every Linear/Conv layer at once.

Forward hooks on each layer hand its input and output to that layer's
:class:`~patternnet.patterns.statistics.LayerStatistics`; the model runs in eval mode without
gradients, in its canonical form (BatchNorm folded), and is left exactly as it was found.
The sums are then turned into :class:`~patternnet.patterns.store.Patterns` by the estimators.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..borrow import borrowed, model_device, model_dtype
from ..engine.canonize import Canonical, Canonizer
from ..layers import geometry, is_linear_layer
from . import estimators
from .statistics import LayerStatistics, Statistics, required_sums
from .store import Patterns, architecture, fingerprint

__all__ = ["collect_statistics", "compute_patterns", "fit_patterns", "iter_batches"]

DEFAULT_BATCH_SIZE = 32
TRAIN_MODE_WARNING = (
    "the model is in train mode; patterns are fitted in eval mode (BatchNorm running "
    "statistics, no dropout) and the model's mode is restored afterwards"
)


def iter_batches(
    data: Any, batch_size: int | None = None, *, limit: int | None = None
) -> Iterator[Tensor]:
    """Yield input batches from the forms of data ``fit_patterns`` accepts.

    Parameters
    ----------
    data:
        A tensor ``(N, ...)`` (split into batches of ``batch_size``), a ``DataLoader`` or any
        iterable yielding tensors or ``(inputs, labels, ...)`` tuples/lists.
    batch_size:
        Only for tensor data; default 32.
    limit:
        Stop after this many samples (the last batch is cut).

    Raises
    ------
    TypeError
        For dict batches, non-tensor batches or integer tensors, with what to do instead.
    ValueError
        For empty data, empty batches, or NaN/Inf values.
    """
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(
                f"data is an empty tensor (shape {tuple(data.shape)}); pass (N, ...) inputs"
            )
        size = batch_size or DEFAULT_BATCH_SIZE
        source: Iterable[Any] = data.split(size)
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a tensor (N, ...), a DataLoader or an iterable of batches, not "
            f"{type(data).__name__}"
        )
    else:
        source = data
    seen = 0
    for index, batch in enumerate(source):
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"batch {index} is an empty tuple; yield (inputs, labels)")
            batch = batch[0]
        if isinstance(batch, dict):
            raise TypeError(
                f"batch {index} is a dict (keys {list(batch)[:5]}); patternnet needs the input "
                "tensor: wrap the loader, e.g. (b['image'] for b in loader)"
            )
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"batch {index} is a {type(batch).__name__}, not a tensor; yield tensors or "
                "(inputs, labels) tuples"
            )
        if not batch.is_floating_point():
            raise TypeError(
                f"batch {index} has dtype {batch.dtype}; patternnet needs floating-point "
                "inputs (for uint8 images: batch.float() / 255, then the model's normalisation)"
            )
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise ValueError(f"batch {index} is empty (shape {tuple(batch.shape)})")
        if not torch.isfinite(batch).all():
            raise ValueError(
                f"batch {index} holds NaN or Inf values; clean the data before fitting"
            )
        if limit is not None and seen + batch.shape[0] > limit:
            batch = batch[: limit - seen]
        seen += batch.shape[0]
        yield batch
        if limit is not None and seen >= limit:
            return
    if seen == 0:
        raise ValueError("data yielded no samples; patterns need at least one batch")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear/Conv modules by qualified name (each once, even if reused)."""
    return {name: module for name, module in model.named_modules() if is_linear_layer(module)}


def _new_statistics(
    model: nn.Module, canonical: Canonical, estimator: str, negative: bool, device: torch.device
) -> Statistics:
    sums = required_sums(estimator, negative)
    layers = {}
    for name, module in linear_layers(model).items():
        weight = canonical.weight(name)
        groups = getattr(module, "groups", 1)
        layers[name] = LayerStatistics(
            weight.shape[0], groups, weight[0].numel(), sums, device
        )
    return Statistics(layers, estimator=estimator, negative=negative)


def _default_canonizers(canonizers: Sequence[Canonizer] | None) -> Sequence[Canonizer]:
    if canonizers is not None:
        return canonizers
    from ..engine.canonize import default_canonizers

    return default_canonizers()


def collect_statistics(
    model: nn.Module,
    data: Any,
    *,
    estimator: str = "two_component",
    negative: bool = True,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    precision: str = "float64",
    limit: int | None = None,
    canonizers: Sequence[Canonizer] | None = None,
    statistics: Statistics | None = None,
) -> Statistics:
    """Accumulate the sums every estimator needs, in one pass over ``data``.

    Parameters are those of :func:`fit_patterns`; ``statistics`` continues an earlier partial
    fit (its sums are added to, in place).

    Returns
    -------
    Statistics
        Float64 sums per layer (on ``device``), mergeable with other partial fits.
    """
    target_device = model_device(model)
    if device is not None and torch.device(device) != target_device:
        dev = torch.device(device)
        if not (dev.type == target_device.type and dev.index is None):
            raise ValueError(
                f"the model is on {target_device} but device={str(device)!r}; move the model "
                f"first (model.to({str(device)!r})): patternnet does not move a borrowed model"
            )
    canonical = Canonical(model, _default_canonizers(canonizers))
    stats = statistics or _new_statistics(model, canonical, estimator, negative, target_device)
    if stats.estimator != estimator:
        raise ValueError(
            f"cannot continue {stats.estimator!r} statistics with estimator {estimator!r}"
        )
    if not stats.layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear or Conv1d/2d/3d layer: nothing to fit"
        )
    if not next(iter(stats.layers.values())).sums:
        return stats  # identity/filter estimators need no data
    dtype = model_dtype(model)
    modules = linear_layers(model)
    handles = []

    def make_hook(name: str, module: nn.Module):
        layer_stats = stats.layers[name]
        geo = geometry(module)

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            # Read weight and bias now: inside functional_call they are the canonical ones.
            layer_stats.update(geo, args[0], output, mod.bias, mod.weight.shape, precision)

        return hook

    bar = _progress(progress, limit)
    with borrowed(model, warn_train=TRAIN_MODE_WARNING):
        try:
            for name, module in modules.items():
                handles.append(module.register_forward_hook(make_hook(name, module)))
            with torch.no_grad(), canonical.active():
                for batch in iter_batches(data, batch_size, limit=limit):
                    batch = batch.to(device=target_device, dtype=dtype)
                    canonical(batch)
                    stats.images += batch.shape[0]
                    stats.batches += 1
                    if bar is not None:
                        bar.update(batch.shape[0])
        finally:
            for handle in handles:
                handle.remove()
            if bar is not None:
                bar.close()
    return stats


def _progress(enabled: bool, total: int | None) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="img", desc="fitting patterns", leave=False)


def compute_patterns(
    model: nn.Module,
    statistics: Statistics,
    *,
    canonizers: Sequence[Canonizer] | None = None,
    dtype: torch.dtype | None = None,
) -> Patterns:
    """Turn accumulated statistics into :class:`Patterns` with the statistics' estimator.

    Parameters
    ----------
    model:
        The model the statistics were collected on (its canonical weights are used).
    statistics:
        From :func:`collect_statistics` (possibly merged or all-reduced).
    canonizers:
        The same canonizers as for the fit (default: BatchNorm folding).
    dtype:
        dtype of the pattern tensors; default: the model's (at least float32).
    """
    canonical = Canonical(model, _default_canonizers(canonizers))
    if dtype is None:
        dtype = model_dtype(model)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
    estimator = statistics.estimator
    layers: dict[str, dict[str, Tensor]] = {}
    report: dict[str, Any] = {}
    for name, layer_stats in statistics.items():
        weight = canonical.weight(name).detach()
        shape = weight.shape
        if estimator == "identity":
            layers[name] = {}
            continue
        if estimator == "filter":
            a, rep = estimators.filter_pattern(weight)
            tensors = {"a": a}
        elif estimator == "linear":
            a, rep = estimators.linear_pattern(layer_stats, weight)
            tensors = {"a": a}
        elif estimator == "two_component":
            tensors, rep = estimators.two_component_patterns(
                layer_stats, weight, statistics.negative
            )
        else:  # pragma: no cover - validated by required_sums
            raise ValueError(f"unknown estimator {estimator!r}")
        layers[name] = {
            key: t.reshape(shape).to(device=weight.device, dtype=dtype)
            for key, t in tensors.items()
        }
        report[name] = {
            "samples": rep.samples,
            "units": rep.units,
            "dead": rep.dead,
            "degenerate": rep.degenerate,
            "active_fraction": None
            if rep.active_fraction is None or math.isnan(rep.active_fraction)
            else rep.active_fraction,
        }
    metadata = {
        "fingerprint": fingerprint(model),
        "architecture": architecture(model),
        "images": statistics.images,
        "negative": statistics.negative,
        "canonical": list(canonical.form.notes),
        "report": report,
    }
    return Patterns(layers, estimator=estimator, metadata=metadata)


def fit_patterns(
    model: nn.Module,
    data: Any = None,
    *,
    estimator: str = "two_component",
    negative: bool = True,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    precision: str = "float64",
    limit: int | None = None,
    canonizers: Sequence[Canonizer] | None = None,
) -> Patterns:
    """Learn the signal estimator of every Linear/Conv layer of ``model`` from ``data``.

    One pass over the data, model in eval mode, no gradients; the model is left exactly as it
    was (training flags, parameters, hooks). See method.md §2 for the estimators.

    Parameters
    ----------
    model:
        Any ``nn.Module``; every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` gets patterns, keyed by
        its qualified name. BatchNorm after a layer is folded into it first.
    data:
        A ``DataLoader``, a tensor ``(N, ...)`` or any iterable of tensors or
        ``(inputs, labels, ...)`` tuples. Not needed for ``"filter"``/``"identity"``.
    estimator:
        ``"two_component"`` (a₊, a₋; default), ``"linear"`` (a), ``"filter"`` or
        ``"identity"``.
    negative:
        With ``"two_component"``: also fit a₋ (``False`` halves the statistics; PatternNet then
        uses a₊ everywhere, as the Keras reference implementation did).
    batch_size:
        Batch size when ``data`` is a tensor (default 32).
    device:
        Must be the model's device if given (the model is not moved).
    progress:
        Show a tqdm progress bar.
    precision:
        ``"float64"`` (default): products and sums in float64, any batch split agrees to
        rounding. ``"float32"``: per-batch products in float32, sums in float64 (faster).
    limit:
        Use at most this many samples.
    canonizers:
        Graph rewrites applied first (default: fold BatchNorm into the preceding layer).

    Returns
    -------
    Patterns
        ``patterns[name]["a_plus"]`` etc., shaped like each layer's weight, with a fit report
        in ``patterns.metadata["report"]``.

    Examples
    --------
    >>> patterns = fit_patterns(model, loader)                          # doctest: +SKIP
    >>> PatternAttribution(model, patterns).attribute(images)           # doctest: +SKIP
    """
    needs_data = bool(required_sums(estimator, negative))
    if data is None and needs_data:
        raise ValueError(f"estimator {estimator!r} needs data to fit patterns on")
    if needs_data:
        stats = collect_statistics(
            model,
            data,
            estimator=estimator,
            negative=negative,
            batch_size=batch_size,
            device=device,
            progress=progress,
            precision=precision,
            limit=limit,
            canonizers=canonizers,
        )
    else:
        canonical = Canonical(model, _default_canonizers(canonizers))
        stats = _new_statistics(model, canonical, estimator, negative, model_device(model))
    return compute_patterns(model, stats, canonizers=canonizers)
