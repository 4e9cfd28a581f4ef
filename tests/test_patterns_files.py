"""Patterns files: refused when they do not fit, never unpickled, written atomically (issue 8)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from patternnet import PatternAttribution, PatternNet, Patterns, fit_patterns
from patternnet.patterns import store


def model(padding: int = 1, hidden: int = 3) -> nn.Module:
    torch.manual_seed(0)
    size = 8 + 2 * padding - 2
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * (size // 2) ** 2, hidden),
    )


X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Patterns, Path]:
    patterns = fit_patterns(model(), X, progress=False)
    return patterns, patterns.save(tmp_path / "model.patterns.safetensors")


def header(**fields: str) -> dict[str, str]:
    base = {"format": "patternnet", "format_version": "2", "estimator": "linear", "metadata": "{}"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


# ---------------------------------------------------------------------- round trip
def test_round_trip_is_exact_and_checked(saved: tuple[Patterns, Path]) -> None:
    patterns, path = saved
    loaded = Patterns.load(path, model=model())
    assert loaded.estimator == patterns.estimator
    assert loaded.metadata == json.loads(json.dumps(patterns.metadata))
    for name in patterns:
        for key, tensor in patterns[name].items():
            assert torch.equal(loaded[name][key], tensor)
    x = X[:3]
    torch.testing.assert_close(
        PatternNet(model(), loaded).attribute(x), PatternNet(model(), patterns).attribute(x)
    )


# ---------------------------------------------------------------------- other architectures
@pytest.mark.parametrize(
    ("other", "match"),
    [
        (model(padding=2), r"layer '0' does not match.*padding"),
        (model(hidden=5), r"layer '4' does not match.*weight_shape"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), r"layer '0'"),
        (
            nn.Sequential(*model(), nn.ReLU(), nn.Linear(3, 2)),
            r"this model's layer '6' \(Linear \[2, 3\]\) has no patterns",
        ),
    ],
    ids=["padding", "width", "other layers", "extra layer"],
)
def test_load_refuses_another_architecture_naming_the_layer(
    saved: tuple[Patterns, Path], other: nn.Module, match: str
) -> None:
    _, path = saved
    with pytest.raises(ValueError, match=match):
        Patterns.load(path, model=other)
    with pytest.raises(ValueError, match=match):
        PatternAttribution(other, Patterns.load(path))


def test_fingerprint_differs_for_another_architecture() -> None:
    assert store.fingerprint(model()) == store.fingerprint(model())
    assert store.fingerprint(model()) != store.fingerprint(model(padding=2))


def test_patterns_without_architecture_are_checked_by_shape(tmp_path: Path) -> None:
    """A hand-made file (no architecture recorded) is still checked layer by layer."""
    right = {"0/a": torch.ones(4, 1, 3, 3), "4/a": torch.ones(3, 64)}
    wrong = {"0/a": torch.ones(4, 1, 3, 3), "4/a": torch.ones(3, 63)}
    save_file(right, tmp_path / "right.safetensors", metadata=header())
    save_file(wrong, tmp_path / "wrong.safetensors", metadata=header())
    Patterns.load(tmp_path / "right.safetensors", model=model())
    with pytest.raises(ValueError, match=r"pattern 4/a has shape \[3, 63\].*\[3, 64\]"):
        Patterns.load(tmp_path / "wrong.safetensors", model=model())
    with pytest.raises(ValueError, match=r"pattern 4/a has shape"):  # before any forward pass
        PatternNet(model(), Patterns.load(tmp_path / "wrong.safetensors"))
    partial = Patterns({"0": {"a": torch.ones(4, 1, 3, 3)}}, estimator="linear")
    with pytest.raises(ValueError, match=r"layers without patterns \['4'\]"):
        PatternNet(model(), partial)


# ---------------------------------------------------------------------- damaged files
def test_truncated_files_are_refused(saved: tuple[Patterns, Path], tmp_path: Path) -> None:
    _, path = saved
    raw = path.read_bytes()
    for cut in sorted({0, 1, 7, 8, 9, 100, len(raw) // 2, len(raw) - 1}):
        damaged = tmp_path / f"cut{cut}.safetensors"
        damaged.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated or corrupted"):
            Patterns.load(damaged)


def test_corrupted_tensor_bytes_are_refused(saved: tuple[Patterns, Path], tmp_path: Path) -> None:
    _, path = saved
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")  # the tensor data after the JSON header
    for offset in (start, (start + len(raw)) // 2, len(raw) - 1):
        damaged = bytearray(raw)
        damaged[offset] ^= 0x01  # one bit: a finite, plausible, wrong value
        target = tmp_path / "flipped.safetensors"
        target.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match="corrupted.*checksum"):
            Patterns.load(target)


def test_edited_metadata_is_refused(saved: tuple[Patterns, Path], tmp_path: Path) -> None:
    """The checksum covers the header's metadata too: a hand-edited record is refused."""
    _, path = saved
    raw = path.read_bytes()
    edited = raw.replace(b'"Conv2d', b'"Conv3d', 1)
    assert edited != raw and len(edited) == len(raw)
    target = tmp_path / "edited.safetensors"
    target.write_bytes(edited)
    with pytest.raises(ValueError, match="corrupted.*checksum"):
        Patterns.load(target)


def test_corrupted_header_is_refused(saved: tuple[Patterns, Path], tmp_path: Path) -> None:
    _, path = saved
    raw = path.read_bytes()
    for offset in (8, 9, 20, 8 + int.from_bytes(raw[:8], "little") - 1):
        damaged = bytearray(raw)
        damaged[offset] = ord("#")
        target = tmp_path / "header.safetensors"
        target.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match="corrupted|damaged"):
            Patterns.load(target)


@pytest.mark.parametrize(
    ("fields", "tensors", "match"),
    [
        ({"metadata": "{oops"}, None, "damaged"),
        ({"metadata": "[1, 2]"}, None, "not a JSON object"),
        ({"metadata": None}, None, "damaged"),
        ({"format_version": "one"}, None, "damaged"),
        ({"format_version": "99"}, None, "newer patternnet"),
        ({"format_version": "1"}, None, r"earlier patternnet \(format 1\).*refit"),
        ({"estimator": "zzz"}, None, "unknown estimator 'zzz'"),
        ({"format": None}, None, "not a patternnet patterns file"),
        ({"metadata": '{"architecture": null}'}, None, "architecture record"),
        ({"metadata": '{"architecture": [{"nme": "0"}]}'}, None, "architecture record"),
        ({"metadata": '{"architecture": [{"name": "0", "type": "Conv2d"}]}'}, None, "record"),
        ({}, {"0/a": torch.full((2,), float("nan"))}, "NaN or Inf"),
        ({}, {"0/a": torch.ones(2, dtype=torch.int64)}, "int64"),
        ({}, {"a": torch.ones(2)}, "unexpected tensor 'a'"),
        ({}, {"0/weight": torch.ones(2)}, "unexpected tensor '0/weight'"),
    ],
    ids=[
        "bad json",
        "json list",
        "no metadata",
        "bad version",
        "newer version",
        "format 1: refit",
        "unknown estimator",
        "architecture null",
        "architecture without name",
        "architecture without shape",
        "foreign safetensors",
        "nan pattern",
        "integer pattern",
        "no layer name",
        "unknown kind",
    ],
)
def test_malformed_patternnet_files_are_refused(
    tmp_path: Path, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None, match: str
) -> None:
    path = tmp_path / "made.safetensors"
    save_file(tensors or {"0/a": torch.ones(4, 1, 3, 3)}, path, metadata=header(**fields))
    with pytest.raises(ValueError, match=match):
        Patterns.load(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\n" * 40, bytes(range(256)) * 4, b"\xff" * 16, b"{}"],
    ids=["empty", "text", "bytes", "huge header length", "json"],
)
def test_files_that_are_not_safetensors_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        Patterns.load(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no patterns file"):
        Patterns.load(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="no patterns file"):
        Patterns.load(tmp_path)


# ---------------------------------------------------------------------- never unpickle
class Payload:
    """Unpickling this object creates a marker file: proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle"])
def test_pickles_are_never_unpickled(
    tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.safetensors"
    payload = {"0/a": torch.ones(4, 1, 3, 3), "trap": Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(Payload(armed)))
    assert armed.exists()  # the payload is live: unpickling it would run code
    calls: list[str] = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append("pickle.load"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("pickle.loads"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    with pytest.raises(ValueError, match="never unpickles"):
        Patterns.load(path, model=model())
    assert not marker.exists()
    assert calls == []


# ---------------------------------------------------------------------- atomic writing
def _fail_midway(error: BaseException) -> Any:
    real = store.atomic_write

    def write(path: Any, write_fn: Any) -> None:
        def partial(tmp: str) -> None:
            write_fn(tmp)  # the whole new file, then chop it: a crash mid-write
            with open(tmp, "r+b") as handle:
                handle.truncate(os.path.getsize(tmp) // 2)
            raise error

        real(path, partial)

    return write


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_while_saving_keeps_the_previous_file(
    saved: tuple[Patterns, Path], monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    patterns, path = saved
    before = path.read_bytes()
    other = fit_patterns(model(), X.flip(0)[:5], estimator="linear", progress=False)
    monkeypatch.setattr(store, "atomic_write", _fail_midway(error))
    with pytest.raises(type(error)):
        other.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    Patterns.load(path, model=model())


def test_crash_inside_the_safetensors_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    patterns = fit_patterns(model(), X, progress=False)
    path = patterns.save(tmp_path / "p.safetensors")
    before = path.read_bytes()

    def broken(tensors: Any, filename: str, metadata: Any = None) -> None:
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("writer crashed")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="writer crashed"):
        patterns.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_save_creates_folders_and_overwrites(tmp_path: Path) -> None:
    patterns = fit_patterns(model(), X, estimator="linear", progress=False)
    path = patterns.save(tmp_path / "a" / "b" / "p.safetensors")
    assert Patterns.load(path).estimator == "linear"
    again = fit_patterns(model(), X, progress=False)
    again.save(path)
    assert Patterns.load(path).estimator == "two_component"
    assert [p.name for p in path.parent.iterdir()] == ["p.safetensors"]


def test_saved_files_get_normal_permissions(tmp_path: Path) -> None:
    """Not the 0o600 of the temporary file: a new file gets 0o666 & ~umask, an old one keeps its."""
    umask = os.umask(0o022)
    try:
        patterns = fit_patterns(model(), X, estimator="linear", progress=False)
        path = patterns.save(tmp_path / "new.safetensors")
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        patterns.save(path)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


@pytest.mark.parametrize("target", ["", ".", "folder"])
def test_saving_onto_a_folder_is_refused(
    tmp_path: Path, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    patterns = fit_patterns(model(), X, estimator="linear", progress=False)
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        patterns.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


# ---------------------------------------------------------------------- statistics checkpoints
@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "fit.ckpt"
    fit_patterns(model(), X, batch_size=4, progress=False, checkpoint=path, checkpoint_every=1)
    return path


def test_damaged_checkpoints_are_refused_not_resumed(checkpoint: Path, tmp_path: Path) -> None:
    from patternnet.patterns.checkpoint import load_checkpoint

    raw = checkpoint.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    cases = {
        "truncated": (raw[: len(raw) // 2], "not a readable checkpoint"),
        "bit flip in the sums": (
            raw[:start + 5] + bytes([raw[start + 5] ^ 4]) + raw[start + 6 :],
            "corrupted",
        ),
        "edited header": (raw.replace(b'\\"batches\\": 4', b'\\"batches\\": 3', 1), "corrupted"),
        "pickle": (pickle.dumps({"a": 1}), "not a readable checkpoint"),
    }
    assert cases["edited header"][0] != raw
    for name, (content, match) in cases.items():
        damaged = tmp_path / f"{name}.ckpt"
        damaged.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            load_checkpoint(damaged)
        with pytest.raises(ValueError, match=match):
            fit_patterns(model(), X, batch_size=4, progress=False, checkpoint=damaged, resume=True)


def test_checkpoint_of_another_model_is_refused(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        fit_patterns(model(padding=2), X, progress=False, checkpoint=checkpoint, resume=True)


def test_patterns_fitted_on_other_weights_warn_on_check() -> None:
    import warnings

    from torch import nn

    import patternnet as pn

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))

    model, other = net(0), net(1)
    x = torch.randn(8, 1, 6, 6)
    patterns = pn.fit_patterns(model, x, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pn.PatternNet(model, patterns)  # the same weights: no warning
    with pytest.warns(UserWarning, match="differ from those the patterns were fitted on"):
        pn.PatternNet(other, patterns)


def test_node_patterns_round_trip(tmp_path: Path) -> None:
    """Sums, pools and means (``"sum#0"`` ...) are saved beside the layers and read back."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(2, 3))  # fmt: skip
    patterns = fit_patterns(net, X, progress=False)
    assert list(patterns.nodes) == ["mean#0"]
    assert patterns.nodes["mean#0"]["a_plus"].shape == (2, 64)
    loaded = Patterns.load(patterns.save(tmp_path / "p.safetensors"), model=net)
    assert set(loaded) == set(patterns) and set(loaded.nodes) == {"mean#0"}
    for key, tensor in patterns.nodes["mean#0"].items():
        assert torch.equal(loaded.nodes["mean#0"][key], tensor)
    assert loaded.metadata["nodes"] == {"mean#0": {"kind": "mean", "units": 2, "inputs": 64}}


def test_cached_patterns_fit_once_and_refit_for_another_key_or_other_weights(tmp_path) -> None:
    path, fits = tmp_path / "cache.safetensors", []

    def fit(net: nn.Module) -> Patterns:
        fits.append(1)
        return fit_patterns(net, X, progress=False)

    net = model()
    first, cached = store.cached_patterns(path, net, {"images": 16}, lambda: fit(net))
    assert not cached and path.is_file() and first.metadata["cache_key"] == {"images": 16}
    again, cached = store.cached_patterns(path, net, {"images": 16}, lambda: fit(net))
    assert cached and len(fits) == 1
    for name in first:
        assert torch.equal(again[name]["a_plus"], first[name]["a_plus"])
    _, cached = store.cached_patterns(path, net, {"images": 8}, lambda: fit(net))
    assert not cached and len(fits) == 2
    other = model()
    with torch.no_grad():
        other[0].weight.mul_(2)
    _, cached = store.cached_patterns(path, other, {"images": 8}, lambda: fit(other))
    assert not cached and len(fits) == 3
    path.write_bytes(b"damaged")
    _, cached = store.cached_patterns(path, other, {"images": 8}, lambda: fit(other))
    assert not cached and len(fits) == 4
