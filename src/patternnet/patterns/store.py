"""``Patterns``: fitted patterns by layer name, with metadata, saved as safetensors.

A :class:`Patterns` maps a module's qualified name (``"features.0"``) to its tensors
(``"a"``, ``"a_plus"``, ``"a_minus"``), each shaped like that module's weight. Its metadata
records the estimator, sample counts, the layers' shapes and a fingerprint of the model's
architecture, so that a file is never applied to a model it was not fitted on.

Files are safetensors: loading parses a JSON header and raw arrays and never executes code
(no pickle). Writing goes to a temporary file in the same folder, is flushed to disk and then
renamed over the target, so a crash while saving leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..engine.attention import named_linear_layers
from ..layers import geometry
from .estimators import ESTIMATORS, one_thread

__all__ = [
    "Patterns",
    "architecture",
    "atomic_write",
    "cached_patterns",
    "fingerprint",
    "weight_summary",
]

#: 2: patterns of sums, pools and means (``"sum#0/a_plus"`` ...) and the safe two-component
#: normaliser (method.md §10-11). Files of format 1 are refused with a request to refit: their
#: a₊/a₋ may hold the ill-conditioned values format 2 replaces, and they lack node patterns.
FORMAT_VERSION = 2
#: ``a_joint``: the joint pattern of an attention node (method.md §12).
PATTERN_NAMES = ("a", "a_plus", "a_minus", "a_joint")


def architecture(model: nn.Module) -> list[dict[str, Any]]:
    """Describe every Linear/Conv layer of ``model``: name, type, weight shape, geometry."""
    layers = []
    for name, module in named_linear_layers(model):
        g = geometry(module)
        layers.append(
            {
                "name": name,
                "type": type(module).__name__,
                "weight_shape": list(module.weight.shape),
                "stride": list(g.stride),
                "padding": list(g.padding),
                "pre_pad": list(g.pre_pad) if g.pre_pad else None,
                "dilation": list(g.dilation),
                "groups": g.groups,
            }
        )
    return layers


def fingerprint(model: nn.Module) -> str:
    """A short hash of :func:`architecture` (what a patterns file must match)."""
    text = json.dumps(architecture(model), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weight_summary(model: nn.Module) -> dict[str, list[float]]:
    """``{layer: [Σw, Σw²]}`` of every Linear/Conv weight, in float64.

    A cheap identity of the weights (one pass over the parameters): patterns fitted on other
    weights of the same architecture (say, a second random initialisation, or a model loaded
    without its trained weights) are then recognised by :meth:`Patterns.check`.
    """
    with one_thread():  # small memory-bound steps: 0.12 s on one thread, 1.5-2.3 s on two
        return _weight_summary(model)


def _weight_summary(model: nn.Module) -> dict[str, list[float]]:
    summary = {}
    buffer: Tensor | None = None  # one float64 megabyte, reused: no copy of w, no page faults
    for name, module in named_linear_layers(model):
        w = module.weight.detach().reshape(-1)
        if buffer is None or buffer.device != w.device:
            buffer = torch.empty(1 << 20, dtype=torch.float64, device=w.device)
        total, squares = 0.0, 0.0
        for chunk in w.split(1 << 20):
            part = buffer[: chunk.numel()].copy_(chunk)
            total += float(part.sum())
            squares += float(part.dot(part))
        summary[name] = [total, squares]
    return summary


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(tmp_path)`` and rename the result over ``path`` once it is complete.

    The temporary file lives in the target's folder (same file system), is fsynced, and is
    removed if ``write`` fails; the target is either the old file or the complete new one. The
    new file gets the old file's permissions, or the usual ``0o666 & ~umask`` for a new one
    (not the ``0o600`` of a temporary file).
    """
    path = Path(path)
    if not path.name or path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file name to write to")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if path.exists():
            mode = stat.S_IMODE(os.stat(path).st_mode)
        else:
            umask = os.umask(0o022)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CRC32:
    """``zlib.crc32`` behind hashlib's ``update``/``hexdigest``: a checksum for gigabytes.

    About 2× faster than SHA-256 (with SHA-NI) and 3× faster than SHA-256 over copied bytes;
    it detects every burst error of up to 32 bits, hence every bit flip, and misses random
    damage with probability 2⁻³². It guards against accidents, not against a forger.
    """

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


#: Header fields that hold a checksum (left out of the checksummed header fields).
CHECKSUM_FIELDS = ("sha256", "crc32")


def _digest(
    tensors: Mapping[str, Tensor], header: Mapping[str, str], algorithm: str = "sha256"
) -> str:
    """Checksum (``"sha256"`` or ``"crc32"``) of the header's fields (but the checksums) and
    the tensors' names, dtypes, shapes and bytes: a file whose digest does not match was
    corrupted or edited. The tensors' memory is read in place, never copied (on the CPU)."""
    digest = hashlib.sha256() if algorithm == "sha256" else CRC32()
    for key in sorted(k for k in header if k not in CHECKSUM_FIELDS):
        digest.update(f"{key}={header[key]}|".encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


class Patterns(Mapping[str, dict[str, Tensor]]):
    """Fitted patterns of a model, by the qualified name of each Linear/Conv module.

    Parameters
    ----------
    layers:
        ``{module name: {"a_plus": tensor, ...}}``; tensors shaped like the module's weight.
    estimator:
        ``"two_component"``, ``"linear"``, ``"filter"`` or ``"identity"``.
    metadata:
        JSON-able details: ``fingerprint``, ``architecture``, ``report`` (per-layer sample
        counts, dead and degenerate units), ``images``, ``precision``.
    nodes:
        ``{node name: {"a_plus": tensor, ...}}``: the ``(U, D)`` patterns of the model's sums,
        average pools and means (:mod:`patternnet.engine.nodes`), named by kind and order of
        the call in the forward pass (``"sum#0"``, ``"pool#0"``, ``"mean#0"``). ``"weights"``
        (for patterns made by hand, e.g. ``W`` itself to reproduce the gradient): every node
        passes its fixed weight (ones for a sum, ``1/k`` for a pool or mean) as its pattern.

    Examples
    --------
    >>> patterns = patternnet.fit_patterns(model, loader)           # doctest: +SKIP
    >>> patterns["features.0"]["a_plus"].shape == model.features[0].weight.shape  # doctest: +SKIP
    >>> patterns.save("vgg16.patterns.safetensors")                  # doctest: +SKIP
    >>> patterns = Patterns.load("vgg16.patterns.safetensors", model=model)  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: Mapping[str, Mapping[str, Tensor]],
        *,
        estimator: str,
        metadata: Mapping[str, Any] | None = None,
        nodes: Mapping[str, Mapping[str, Tensor]] | str | None = None,
    ) -> None:
        self._layers = {name: dict(tensors) for name, tensors in layers.items()}
        self.metadata: dict[str, Any] = dict(metadata or {})
        if isinstance(nodes, str):
            if nodes != "weights":
                raise ValueError(f"nodes must be a mapping or 'weights', not {nodes!r}")
            self.metadata["node_patterns"] = "weights"
            nodes = None
        self.nodes: dict[str, dict[str, Tensor]] = {
            name: dict(tensors) for name, tensors in (nodes or {}).items()
        }
        self.estimator = estimator

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> dict[str, Tensor]:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(
                f"no patterns for layer {name!r}; fitted layers: {list(self._layers)[:8]}"
                + (" ..." if len(self._layers) > 8 else "")
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        names = sorted({key for tensors in self._layers.values() for key in tensors})
        return (
            f"Patterns(estimator={self.estimator!r}, layers={len(self)}, nodes={len(self.nodes)}, "
            f"tensors={names}, images={self.metadata.get('images')})"
        )

    @property
    def node_weights(self) -> bool:
        """True when nodes without fitted patterns use their fixed weights (``nodes="weights"``)."""
        return self.metadata.get("node_patterns") == "weights"

    @property
    def fallback(self) -> dict[str, dict[str, list[int]]]:
        """Units whose two-component normaliser was ill-conditioned, by layer and pattern.

        ``{layer: {"a_plus": [unit, ...], "a_minus": [...]}}`` (only layers and sides with
        such units): their pattern on that side is the linear one (method.md §11,
        :data:`~patternnet.patterns.estimators.MIN_NORMALISER_FRACTION`). Saved with the file.
        """
        recorded = self.metadata.get("fallback") or {}
        return {layer: {k: list(v) for k, v in sides.items()} for layer, sides in recorded.items()}

    @property
    def fingerprint(self) -> str | None:
        """The architecture fingerprint of the model the patterns were fitted on."""
        return self.metadata.get("fingerprint")

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Patterns:
        """A copy with every tensor moved/cast."""
        layers, nodes = (
            {name: {key: t.to(device=device, dtype=dtype) for key, t in tensors.items()}
             for name, tensors in mapping.items()}
            for mapping in (self._layers, self.nodes)
        )  # fmt: skip
        return Patterns(layers, estimator=self.estimator, metadata=self.metadata, nodes=nodes)

    # ------------------------------------------------------------------ checks
    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless these patterns fit ``model``'s architecture.

        The message names the first layer that does not match.
        """
        expected = {layer["name"]: layer for layer in self.metadata.get("architecture", [])}
        actual = {layer["name"]: layer for layer in architecture(model)}
        if not expected:  # no architecture recorded (made by hand): check names and shapes
            expected = {n: actual[n] for n in self._layers if n in actual}
            missing = [n for n in actual if n not in self._layers]
            extra = [n for n in self._layers if n not in actual]
            if missing or extra:
                raise ValueError(
                    f"the patterns do not cover this model: layers without patterns {missing}, "
                    f"patterns without a layer {extra}"
                )
        for name in list(expected) + [n for n in actual if n not in expected]:
            if name not in actual:
                raise ValueError(
                    f"patterns were fitted on a model with layer {name!r} "
                    f"({expected[name]['type']} {expected[name]['weight_shape']}), which this "
                    "model does not have: these patterns belong to another architecture"
                )
            if name not in expected:
                raise ValueError(
                    f"this model's layer {name!r} ({actual[name]['type']} "
                    f"{actual[name]['weight_shape']}) has no patterns: they were fitted on "
                    "another architecture; fit patterns for this model"
                )
            if expected[name] != actual[name]:
                diff = {
                    k: (expected[name][k], actual[name].get(k))
                    for k in expected[name]
                    if expected[name][k] != actual[name].get(k)
                }
                raise ValueError(
                    f"layer {name!r} does not match the patterns: (patterns, model) differ in "
                    f"{diff}; these patterns were fitted on another architecture"
                )
        for name, tensors in self._layers.items():
            if name not in actual:
                raise ValueError(
                    f"the patterns hold layer {name!r}, which this model does not have: they "
                    "belong to another architecture"
                )
            shape = list(actual[name]["weight_shape"])
            for key, tensor in tensors.items():
                if list(tensor.shape) != shape:
                    raise ValueError(
                        f"pattern {name}/{key} has shape {list(tensor.shape)} but the layer's "
                        f"weight has shape {shape}"
                    )
        self._check_weights(model)

    def _check_weights(self, model: nn.Module) -> None:
        """Warn when the model's weights are not the ones the patterns were fitted on."""
        recorded = self.metadata.get("weights")
        if not isinstance(recorded, dict):
            return
        current = weight_summary(model)
        for name, values in recorded.items():
            now = current.get(name)
            if now is None or not isinstance(values, list) or len(values) != 2:
                continue
            # Σw may cancel to ~0: compare it on the scale of ‖w‖; Σw² relative to itself.
            squares = max(abs(values[1]), 1e-30)
            moved_sum = abs(now[0] - values[0]) > 1e-3 * squares**0.5
            moved_squares = abs(now[1] - values[1]) > 1e-6 * squares
            if moved_sum or moved_squares:
                warnings.warn(
                    f"the weights of layer {name!r} differ from those the patterns were "
                    "fitted on (same architecture, other weights: a new random "
                    "initialisation, or trained weights not loaded?); the explanations are "
                    "not meaningful until the patterns are fitted on these weights",
                    stacklevel=3,
                )
                return

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a safetensors file atomically (temp file + rename); return its path."""
        tensors = {
            f"{name}/{key}": t.detach().to("cpu").contiguous()
            for mapping in (self._layers, self.nodes)
            for name, layer in mapping.items()
            for key, t in layer.items()
        }
        header = {
            "format": "patternnet",
            "format_version": str(FORMAT_VERSION),
            "estimator": self.estimator,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        header["sha256"] = _digest(tensors, header)
        atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        device: torch.device | str = "cpu",
    ) -> Patterns:
        """Read a file written by :meth:`save`; never executes code from it.

        Parameters
        ----------
        path:
            The ``.safetensors`` file.
        model:
            If given, the patterns are checked against its architecture (:meth:`check`).
        device:
            Where to put the tensors.

        Raises
        ------
        FileNotFoundError
            If there is no such file.
        ValueError
            If the file is not a patternnet safetensors file, is truncated or corrupted, or
            does not fit ``model``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no patterns file at {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                header = handle.metadata() or {}
                keys = list(handle.keys())
                if header.get("format") != "patternnet":
                    raise ValueError(
                        f"{str(path)!r} is a safetensors file but not a patternnet patterns "
                        "file (its header has no 'format: patternnet')"
                    )
                tensors = {key: handle.get_tensor(key) for key in keys}
            try:
                metadata = json.loads(header["metadata"])
                version = int(header.get("format_version", "0"))
            except (KeyError, ValueError):
                raise ValueError(
                    f"{str(path)!r} is a damaged patterns file: its header's metadata or "
                    "format_version cannot be read; save or fit the patterns again"
                ) from None
            estimator = header.get("estimator")
            if not isinstance(metadata, dict) or estimator not in ESTIMATORS:
                raise ValueError(
                    f"{str(path)!r} is a damaged patterns file: unknown estimator "
                    f"{estimator!r} or metadata that is not a JSON object"
                )
            if version > FORMAT_VERSION:
                raise ValueError(
                    f"{str(path)!r} was written by a newer patternnet (format "
                    f"{header['format_version']}); upgrade patternnet to read it"
                )
            if version < FORMAT_VERSION:
                raise ValueError(
                    f"{str(path)!r} was written by an earlier patternnet (format {version}): "
                    "before sums, average pools and means had patterns and before the "
                    "two-component normaliser was made safe, so its layer patterns may differ "
                    "from what this version fits; refit them (patternnet.fit_patterns or "
                    "`patternnet fit`) and save again"
                )
            if "sha256" in header and _digest(tensors, header) != header["sha256"]:
                raise ValueError(
                    f"{str(path)!r} is corrupted: its tensors do not match the checksum "
                    "written with them; save or fit the patterns again"
                )
            layers_described = metadata.get("architecture", [])
            if not isinstance(layers_described, list) or not all(
                isinstance(layer, dict)
                and isinstance(layer.get("name"), str)
                and {"type", "weight_shape"} <= set(layer)
                for layer in layers_described
            ):
                raise ValueError(
                    f"{str(path)!r} is a damaged patterns file: its architecture record is "
                    "malformed; save or fit the patterns again"
                )
        except ValueError:
            raise
        except Exception as error:  # safetensors raises its own error types
            with open(path, "rb") as handle:
                start = handle.read(4)
            hint = (
                " It looks like a torch.save/pickle file: patternnet reads only safetensors "
                "files written by Patterns.save and never unpickles"
                if start.startswith((b"PK\x03\x04", b"\x80"))
                else ""
            )
            raise ValueError(
                f"cannot read patterns from {str(path)!r}: not a valid safetensors file "
                f"(truncated or corrupted?): {error}.{hint}"
            ) from None
        layers: dict[str, dict[str, Tensor]] = {}
        nodes: dict[str, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            name, _, kind = key.rpartition("/")
            if kind not in PATTERN_NAMES or not name:
                raise ValueError(f"{str(path)!r} holds an unexpected tensor {key!r}")
            if not tensor.is_floating_point():
                raise ValueError(f"{str(path)!r}: pattern {key!r} has dtype {tensor.dtype}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{str(path)!r}: pattern {key!r} holds NaN or Inf values")
            target = nodes if "#" in name else layers
            target.setdefault(name, {})[kind] = tensor.to(device)
        patterns = cls(layers, estimator=estimator, metadata=metadata, nodes=nodes)
        if model is not None:
            patterns.check(model)
        return patterns


def cached_patterns(
    path: str | os.PathLike[str],
    model: nn.Module,
    key: Mapping[str, Any],
    fit: Callable[[], Patterns],
) -> tuple[Patterns, bool]:
    """Patterns kept in ``path``: read when they fit ``model`` and were made under ``key``,
    else fitted with ``fit()`` and saved (atomically).

    Parameters
    ----------
    path:
        The ``.safetensors`` file.
    model:
        The model the patterns must fit: a file fitted on another architecture or other
        weights (:meth:`Patterns.check`) is fitted again.
    key:
        What the fit depended on (images, estimator, settings; JSON values), stored as
        ``metadata["cache_key"]``: a file with another key is fitted again.
    fit:
        Fits the patterns.

    Returns
    -------
    patterns, cached:
        The patterns and whether they came from the file.
    """
    key = json.loads(json.dumps(dict(key)))  # the form it has after a round trip
    if Path(path).is_file():
        try:
            with warnings.catch_warnings(record=True) as moved:  # other weights: a warning
                warnings.simplefilter("always")
                patterns = Patterns.load(path, model=model)
            if patterns.metadata.get("cache_key") == key and not moved:
                return patterns, True
        except (OSError, ValueError):
            pass  # a stale or damaged file is fitted again
    patterns = fit()
    patterns.metadata["cache_key"] = key
    patterns.save(path)
    return patterns, False
