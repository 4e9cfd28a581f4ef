"""Quantus's ``explain_func``: any patternnet method, evaluated by Quantus's metrics.

Quantus (Hedström et al., JMLR 2023) evaluates an explanation method through one function
it calls as ``explain_func(model=…, inputs=…, targets=…, **explain_func_kwargs)``: float32
numpy ``(N, C, H, W)`` inputs, int64 ``(N,)`` targets, a numpy array shaped like the inputs
back. :func:`quantus_explain` is that function::

    import quantus, patternnet
    metric = quantus.MaxSensitivity(nr_samples=10)
    scores = metric(model=model, x_batch=x, y_batch=y, explain_func=patternnet.quantus_explain,
                    explain_func_kwargs={"method": "pattern_attribution", "patterns": patterns})

Quantus calls it once per metric batch and again for every perturbation (MaxSensitivity's
defaults: 201 calls per batch), so nothing is rebuilt per call: the method object (with its
folded weights and ``W ⊙ A``) is built once per (model, method, options) and a patterns file
is read once; both are held in a small cache (:func:`cache_info`, :func:`clear_cache`).

Quantus itself is never imported here: the contract is numpy in, numpy out.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .borrow import model_device
from .methods.base import Attribution
from .methods.registry import get_method
from .patterns.store import Patterns

__all__ = ["cache_info", "clear_cache", "quantus_explain"]

#: How many (model, method, options) combinations and patterns files are kept.
CACHE_SIZE = 8

_methods: OrderedDict[Hashable, tuple[Any, Attribution]] = OrderedDict()
_files: OrderedDict[Hashable, Patterns] = OrderedDict()
_counts = {"calls": 0, "methods_built": 0, "patterns_loaded": 0}


def quantus_explain(
    model: nn.Module,
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor | int | None,
    *,
    method: str = "pattern_attribution",
    patterns: Patterns | str | os.PathLike[str] | None = None,
    reduce_axes: tuple[int, ...] | None = None,
    keepdims: bool = True,
    device: Any = None,
    **options: Any,
) -> np.ndarray:
    """Explain a batch the way Quantus's ``explain_func`` contract asks.

    Parameters
    ----------
    model:
        The classifier (a ``torch.nn.Module`` returning logits); borrowed, never changed.
        Quantus passes its own model or, in the randomisation metrics, a randomised copy.
    inputs:
        A float numpy array (or tensor) ``(N, C, ...)``, channel first, as Quantus passes.
    targets:
        One class per sample (int64 numpy ``(N,)``), an int for all, or None (arg-max).
    method:
        Any name of :func:`patternnet.methods` (default ``"pattern_attribution"``).
    patterns:
        For the pattern methods: a :class:`~patternnet.Patterns` object or the path of a
        patterns file (read once, then reused while the file is unchanged).
    reduce_axes, keepdims:
        As in ``quantus.explain``: sum the explanation over these axes (e.g. ``(1,)`` for one
        value per pixel); default None keeps the inputs' shape.
    device:
        Accepted because Quantus adds ``device`` to the keyword arguments when a metric is
        given one; the explanation is computed where the model's parameters are.
    **options:
        The method's own options (e.g. ``epsilon=0.1`` for ``"lrp_epsilon"``); see
        :func:`patternnet.get_method`.

    Returns
    -------
    numpy.ndarray
        Shaped like ``inputs`` (or reduced over ``reduce_axes``), in the inputs' float dtype.

    Raises
    ------
    ValueError
        Unknown method, patterns that do not fit the model, or an explanation that is the same
        value everywhere (Quantus rejects constant explanations; the message says what to do).
    TypeError
        An option the method does not take, or inputs that are not a float array.
    """
    del device  # the model's device decides; Quantus's keyword is accepted, not needed
    _counts["calls"] += 1
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, not {type(model).__name__}; Quantus passes the "
            "model given to the metric"
        )
    x = _as_tensor(inputs)
    target = _as_target(targets)
    explainer = _method(model, method, patterns, options)
    result = explainer.attribute(x, target=target).detach()
    array = result.cpu().numpy()
    if reduce_axes:
        array = array.sum(axis=tuple(reduce_axes), keepdims=keepdims)
    if array.size > 1 and np.all(array == array.reshape(-1)[0]):
        raise ValueError(
            f"{method!r} explains this batch of {x.shape[0]} samples with the same value "
            f"{float(array.reshape(-1)[0])!r} everywhere, which Quantus rejects; a model "
            "whose units are all dead for these inputs, or targets whose logits do not depend "
            "on the input? Check the model and targets, or choose another method"
        )
    return array


def cache_info() -> dict[str, int]:
    """Counts since the last :func:`clear_cache`: calls, methods built, patterns files read."""
    return dict(_counts, methods_cached=len(_methods), files_cached=len(_files))


def clear_cache() -> None:
    """Drop every cached method and patterns file (and reset the counts)."""
    _methods.clear()
    _files.clear()
    for key in _counts:
        _counts[key] = 0


# ---------------------------------------------------------------------------- helpers
def _as_tensor(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    array = np.asarray(inputs)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"inputs have dtype {array.dtype}; Quantus passes float32 (N, C, H, W) arrays "
            "(convert integer images to floats and normalise them as the model expects)"
        )
    return torch.from_numpy(np.ascontiguousarray(array))


def _as_target(targets: Any) -> Any:
    if targets is None or isinstance(targets, (int, torch.Tensor)):
        return targets
    array = np.asarray(targets)
    if array.ndim == 0:
        return int(array)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"targets have dtype {array.dtype}; give one integer class per sample (int64)"
        )
    return torch.from_numpy(array.astype(np.int64).reshape(-1))


def _token(value: Any) -> Hashable:
    """A cache key part for an option value: the value if hashable, else its identity.

    Identity is safe because the cache entry holds the value itself, so the id cannot be
    reused by another object while the entry exists.
    """
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    if isinstance(value, (str, int, float, bool, bytes, type(None), tuple, frozenset)):
        return (type(value).__name__, value)
    return ("id", id(value))


def _patterns(
    patterns: Patterns | str | os.PathLike[str] | None, model: nn.Module
) -> Patterns | None:
    """A Patterns object as given, or the file's contents (read once per file version)."""
    if patterns is None or isinstance(patterns, Patterns):
        return patterns
    if not isinstance(patterns, (str, os.PathLike)):
        raise TypeError(
            f"patterns must be a patternnet.Patterns object or the path of a patterns file, "
            f"not {type(patterns).__name__}"
        )
    path = Path(patterns).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no patterns file at {str(path)!r}")
    stat = path.stat()
    device = model_device(model)
    key = (str(path), stat.st_mtime_ns, stat.st_size, str(device))
    if key in _files:
        _files.move_to_end(key)
        return _files[key]
    loaded = Patterns.load(path, device=device)
    _counts["patterns_loaded"] += 1
    _files[key] = loaded
    while len(_files) > CACHE_SIZE:
        _files.popitem(last=False)
    return loaded


def _method(
    model: nn.Module,
    name: str,
    patterns: Patterns | str | os.PathLike[str] | None,
    options: dict[str, Any],
) -> Attribution:
    """The method object for (model, name, patterns, options), built once and then reused."""
    resolved = _patterns(patterns, model)
    key = (
        id(model),
        name,
        None if resolved is None else id(resolved),
        tuple(sorted((k, _token(v)) for k, v in options.items())),
    )
    cached = _methods.get(key)
    if cached is not None:
        _methods.move_to_end(key)
        return cached[1]
    if resolved is not None:
        options = dict(options, patterns=resolved)
    built = get_method(name, model, **options)
    _counts["methods_built"] += 1
    # The entry keeps the model, the patterns and the option values alive, so that the ids
    # in its key stay theirs; the LRU bound releases them.
    _methods[key] = ((model, resolved, options), built)
    while len(_methods) > CACHE_SIZE:
        _methods.popitem(last=False)
    return built
