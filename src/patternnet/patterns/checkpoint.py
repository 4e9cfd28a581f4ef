"""Atomic checkpoints of a fit's statistics, so that a long fit can be killed and resumed.

A checkpoint is a safetensors file holding every float64 sum of a
:class:`~patternnet.patterns.statistics.Statistics` and, in its JSON header, the layout of the
sums and what the fit had consumed: the number of batches and images already added. Resuming
loads the sums and skips exactly those batches of the data, so that no image enters the sums
twice and the result equals that of an uninterrupted fit with the same options.

Checkpoints are written only when nothing is held back in the statistics (right after a
flush, see :meth:`Statistics.flush`): the arithmetic of a checkpointed fit is then the same,
operation for operation, whether it was interrupted or not. The file is written beside its
target and renamed over it (:func:`~patternnet.patterns.store.atomic_write`), so a kill during
the write leaves the previous checkpoint intact.

A checkpoint holds as many bytes as the statistics (1.1 GB for VGG16 with the linear
estimator, 3.3 GB with the two-component one), so both directions avoid extra copies:
the checksum (CRC-32 over the header fields and the tensors' bytes, read in place; version 1
files carry a SHA-256 and are still read) costs a fraction of the write, and loading reads
the file with plain reads straight into the tensors it returns, so that resuming needs the
statistics' memory once (no mapped file, no byte copy, no zero set to compare shapes with).
Measured on VGG16: ``perf/checkpoint.py`` and ``perf/README.md``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from .attention_statistics import new_attention_statistics
from .statistics import LayerStatistics, Statistics
from .store import CHECKSUM_FIELDS, _digest, atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpointer",
    "check_context",
    "checksum",
    "load_checkpoint",
    "rank_path",
    "remove_stale_temporaries",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "patternnet-statistics-checkpoint"
#: 2: CRC-32 checksum (``crc32`` header field); 1: SHA-256 (``sha256``), still read.
CHECKPOINT_VERSION = 2
#: The largest JSON header a checkpoint may have (its layout and context are a few kB).
MAX_HEADER_BYTES = 100 * 2**20
#: safetensors dtype names (as ``safetensors`` writes them) → torch dtypes.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
#: The fit options a resumed fit must share with the checkpoint.
MUST_MATCH = ("fingerprint", "estimator", "negative", "precision", "rank", "world_size")


def _write_file(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], path: str) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` (the temporary file of ``atomic_write``)."""
    safetensors.torch.save_file(dict(tensors), path, metadata=dict(metadata))


def checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """The CRC-32 a checkpoint carries: over ``metadata`` (but checksum fields) and tensors."""
    return _digest(tensors, metadata, "crc32")


def _expected_shapes(layer: LayerStatistics) -> dict[str, torch.Size]:
    """The shape each sum of ``layer`` must have, from its description (nothing allocated).

    A layer's or node's sums follow from ``(out_features, groups, patch_size)``; an attention
    node's (``attention#k``: ``H·L`` units in ``H`` groups over ``S`` keys) also have a
    channel dimension ``C``, read from its ``sum_v``.
    """
    if "sum_vy" in layer.sums:  # an attention node
        heads, keys = layer.groups, layer.patch_size
        sum_v = layer.tensors.get("sum_v")
        channels = sum_v.shape[-1] if sum_v is not None and sum_v.dim() == 3 else 0
        fresh = new_attention_statistics(heads, layer.out_features // max(heads, 1), keys,
                                         channels, "meta")
        return {key: tensor.shape for key, tensor in fresh.tensors.items()}
    fresh = LayerStatistics(layer.out_features, layer.groups, layer.patch_size, layer.sums,
                            "meta")  # on the meta device: nothing is allocated
    return {key: tensor.shape for key, tensor in fresh.tensors.items()}


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Read a safetensors file into freshly allocated tensors, each byte read once.

    ``safetensors.safe_open`` maps the whole file and copies each tensor out of the mapping,
    so loading a checkpoint touched twice its size; here the file is read with ``readinto``
    straight into the tensors' memory. Every field of the header is checked before anything
    is allocated (no tensor larger than the file); errors are ``ValueError``.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"header length {length} does not fit the file ({size} bytes)")
        header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(value, str) for value in metadata.values()
        ):
            raise ValueError("__metadata__ is not a map of strings")
        data_start, data_size = 8 + length, size - 8 - length
        entries = []
        for key, entry in header.items():
            entry = entry if isinstance(entry, dict) else {}
            dtype, shape = _DTYPES.get(entry.get("dtype")), entry.get("shape")
            offsets = entry.get("data_offsets")
            if (
                dtype is None
                or not isinstance(shape, list)
                or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size
                or offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize
            ):
                raise ValueError(f"tensor {key[:80]!r} is described wrongly "
                                 f"({json.dumps(entry)[:200]})")  # fmt: skip
            entries.append((offsets[0], key, dtype, shape))
        tensors = {}
        for start, key, dtype, shape in sorted(entries):  # in file order: sequential reads
            tensor = torch.empty(shape, dtype=dtype)
            handle.seek(data_start + start)
            buffer = tensor.reshape(-1).view(torch.uint8).numpy()
            if handle.readinto(buffer) != buffer.nbytes:
                raise ValueError(f"the file ends inside tensor {key!r}")
            tensors[key] = tensor
    return metadata, tensors


def _finite(tensor: Tensor) -> bool:
    """``isfinite(tensor).all()`` without a mask as large as the tensor."""
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(1 << 20))


def save_checkpoint(
    path: str | os.PathLike[str], statistics: Statistics, context: Mapping[str, Any]
) -> Path:
    """Write ``statistics`` and the fit's ``context`` to ``path`` atomically.

    Parameters
    ----------
    path:
        The checkpoint file (its folder is created).
    statistics:
        The sums so far; held-back products are flushed first.
    context:
        JSON-able description of the fit (fingerprint, estimator, precision, ...), checked
        when resuming; see :data:`MUST_MATCH`.

    Returns
    -------
    Path
        ``path``.
    """
    statistics.flush()
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in statistics.state_tensors().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in seen and tensor.numel():
            # One tensor under several names (a node's shift offsets of both sides):
            # safetensors refuses shared memory, so small copies are written.
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "version": str(CHECKPOINT_VERSION),
        "statistics": json.dumps(statistics.describe()),
        "context": json.dumps(dict(context)),
    }
    metadata["crc32"] = checksum(tensors, metadata)
    path = Path(path)
    atomic_write(path, lambda tmp: _write_file(tensors, metadata, tmp))
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[Statistics, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns
    -------
    statistics, context:
        The sums (on the CPU; move them with :meth:`Statistics.to`) and the fit's context.

    Raises
    ------
    ValueError
        If the file is not a patternnet checkpoint or was written by a newer version.
    """
    path = Path(path)
    try:
        metadata, tensors = _read_file(path)
    except Exception as error:  # noqa: BLE001 - OSError, JSON, header or allocation errors
        raise ValueError(
            f"{path} is not a readable checkpoint ({error}); delete it to start the fit afresh"
        ) from error
    algorithm = next((name for name in CHECKSUM_FIELDS[::-1] if name in metadata), None)
    if algorithm and _digest(tensors, metadata, algorithm) != metadata[algorithm]:
        raise ValueError(
            f"{path} is corrupted (its checksum does not match); delete it to start the fit "
            "afresh"
        )
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a patternnet statistics checkpoint (format "
            f"{metadata.get('format')!r}); pass another checkpoint path"
        )
    try:
        version = int(metadata.get("version", "0"))
    except ValueError:
        version = -1
    if version > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} was written by a newer patternnet (checkpoint version "
            f"{metadata['version']}); upgrade patternnet to resume it"
        )
    try:
        statistics = Statistics.from_state(json.loads(metadata["statistics"]), tensors)
        context = json.loads(metadata["context"])
        flush = context.get("flush_every", 1) if isinstance(context, dict) else None
        if (
            version < 0
            or not isinstance(flush, int)
            or isinstance(flush, bool)
            or flush < 1
            or min(statistics.images, statistics.batches) < 0
        ):
            raise ValueError("malformed header")
        for name, layer in statistics.items():
            expected = _expected_shapes(layer)
            for key, tensor in layer.tensors.items():
                if tensor.shape != expected[key] or not _finite(tensor):
                    raise ValueError(f"sum {name}::{key} has a wrong shape or NaN/Inf values")
    except Exception as error:  # noqa: BLE001 - any malformed field
        raise ValueError(
            f"{path} is a damaged checkpoint ({type(error).__name__}: {error}); delete it to "
            "start the fit afresh"
        ) from None
    return statistics, context


def check_context(path: str | os.PathLike[str], saved: Mapping[str, Any],
                  current: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if a checkpoint was written by a fit with other options."""
    for key in MUST_MATCH:
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"checkpoint {path} was written with {key}={saved.get(key)!r} but this fit has "
                f"{key}={current.get(key)!r}; resume with the same model and options, or pass "
                "another checkpoint path"
            )


def remove_stale_temporaries(path: str | os.PathLike[str]) -> None:
    """Delete temporary files left by a write of ``path`` that was killed (not the file)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


class Checkpointer:
    """Decide when a fit writes its checkpoint, and write it.

    Parameters
    ----------
    path:
        The checkpoint file.
    every:
        Write after at least this many batches since the last checkpoint.
    minutes:
        Write after at least this many minutes since the last checkpoint (or the start).
        When neither ``every`` nor ``minutes`` is given, every 10 minutes.
    context:
        What :func:`save_checkpoint` records about the fit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        every: int | None = None,
        minutes: float | None = None,
        context: Mapping[str, Any],
    ) -> None:
        if every is not None and every < 1:
            raise ValueError(f"checkpoint_every must be a positive number of batches, not {every}")
        if minutes is not None and minutes <= 0:
            raise ValueError(f"checkpoint_minutes must be positive, not {minutes}")
        if every is None and minutes is None:
            minutes = 10.0
        self.path = Path(path)
        self.every = every
        self.minutes = minutes
        self.context = dict(context)
        self._last_batches = 0
        self._last_time = time.monotonic()
        self.written = 0

    def start(self, batches: int) -> None:
        """Count from ``batches`` (a resumed fit) and from now."""
        self._last_batches = batches
        self._last_time = time.monotonic()

    def due(self, statistics: Statistics) -> bool:
        """True when a checkpoint is due and nothing is held back."""
        if statistics.pending:
            return False
        if self.every is not None and statistics.batches - self._last_batches >= self.every:
            return True
        return (
            self.minutes is not None
            and time.monotonic() - self._last_time >= 60.0 * self.minutes
        )

    def save(self, statistics: Statistics, **extra: Any) -> None:
        """Write the checkpoint now."""
        context = dict(self.context, images=statistics.images, batches=statistics.batches)
        context.update(extra)
        save_checkpoint(self.path, statistics, context)
        self._last_batches = statistics.batches
        self._last_time = time.monotonic()
        self.written += 1



def rank_path(path: str | os.PathLike[str], rank: int, world: int) -> Path:
    """The checkpoint file of one rank: ``path`` itself in a one-process fit."""
    path = Path(path)
    if world <= 1:
        return path
    return path.with_name(f"{path.name}.rank{rank}of{world}")
