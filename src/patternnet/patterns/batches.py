"""Batches from any form of data the fit accepts, checked on the way.

Shared by :mod:`patternnet.patterns.fit` and :mod:`patternnet.patterns.distributed` (which
used to import each other for it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_BATCH_SIZE", "iter_batches"]

#: Batch size for tensor data when none is given.
DEFAULT_BATCH_SIZE = 32


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
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, not {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of samples or None, not {limit!r}")
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
    finite: Tensor | None = None
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
        if batch.dim() == 1:
            raise ValueError(
                f"batch {index} has shape {tuple(batch.shape)}, without a batch dimension; "
                "data must be (N, ...): for one feature per sample use x.unsqueeze(1)"
            )
        if batch.is_meta:
            raise ValueError(f"batch {index} is on the meta device (no values); pass real data")
        if batch.device.type == "cpu":
            if not torch.isfinite(batch).all():
                raise ValueError(
                    f"batch {index} holds NaN or Inf values; clean the data before fitting"
                )
        else:  # on an accelerator: checked once at the end, no synchronisation per batch
            ok = torch.isfinite(batch).all()
            finite = ok if finite is None else finite & ok
        if limit is not None and seen + batch.shape[0] > limit:
            batch = batch[: limit - seen]
        seen += batch.shape[0]
        yield batch
        if limit is not None and seen >= limit:
            break
    if finite is not None and not bool(finite):
        raise ValueError("the data holds NaN or Inf values; clean the data before fitting")
    if seen == 0:
        raise ValueError("data yielded no samples; patterns need at least one batch")
