"""Checkpointed fits: a fit killed at any point and resumed equals the uninterrupted fit.

"KilledError" is simulated two ways: an exception raised from the data (between checkpoints) or
from inside the checkpoint write (in-process, cheap), and a real ``SIGKILL`` of a child
process (between checkpoints and in the middle of writing a checkpoint file). The sample
counts are compared exactly: an image added twice, or skipped, would change them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import patternnet as pn
from patternnet.patterns import checkpoint as checkpoint_mod
from patternnet.patterns.checkpoint import load_checkpoint
from patternnet.patterns.fit import collect_statistics

BATCH = 4
N = 40  # 10 batches


class KilledError(Exception):
    """Stands for the process being killed."""


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).double()


def make_data() -> torch.Tensor:
    return torch.randn(N, 2, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def batches_until(data: torch.Tensor, stop: int):
    """The batches of ``data``, raising :class:`KilledError` when batch ``stop`` is requested."""
    for index, batch in enumerate(data.split(BATCH)):
        if index == stop:
            raise KilledError(f"killed before batch {stop}")
        yield batch


def assert_same(a: pn.Statistics, b: pn.Statistics) -> None:
    assert (a.images, a.batches) == (b.images, b.batches)
    for name in a:
        for key, tensor in a[name].tensors.items():
            other = b[name].tensors[key]
            if "count" in key:
                assert torch.equal(tensor.cpu(), other.cpu()), (name, key)
            else:
                torch.testing.assert_close(tensor, other, rtol=1e-12, atol=1e-12)


def fit(data, path: Path, **options) -> pn.Statistics:
    options.setdefault("checkpoint_every", 2)
    return collect_statistics(
        make_model(), data, batch_size=BATCH, progress=False, checkpoint=path, **options
    )


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("stop", [1, 5, 8])
def test_killed_between_checkpoints_resumes_exactly(tmp_path: Path, precision: str,
                                                    stop: int) -> None:
    x = make_data()
    # a₋ everywhere: the counting hook below makes the default (negative="auto") keep every
    # layer's a₋ (a forward hook could change what a ReLU sees), so all fits use one layout
    reference = fit(x, tmp_path / "ref.ckpt", precision=precision, negative=True)
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KilledError):
        fit(batches_until(x, stop), path, precision=precision, negative=True)
    saved, _ = load_checkpoint(path) if path.exists() else (None, None)
    assert saved is None or saved.batches == 2 * (stop // 2)
    # Count the forward passes of the resumed fit: only the missing batches are read.
    model = make_model()
    calls = []
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    resumed = collect_statistics(
        model, x, batch_size=BATCH, progress=False, checkpoint=path, checkpoint_every=2,
        resume=True, precision=precision, negative=True,
    )
    handle.remove()
    assert sum(calls) == N - (0 if saved is None else saved.images)
    assert_same(resumed, reference)
    # The patterns equal the uninterrupted fit's, and a fit without checkpoints to rounding.
    plain = collect_statistics(make_model(), x, batch_size=BATCH, progress=False,
                               precision=precision, negative=True)
    a = pn.compute_patterns(make_model(), resumed)
    b = pn.compute_patterns(make_model(), plain)
    tolerance = 1e-10 if precision == "float64" else 1e-4
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=tolerance, atol=tolerance)


def test_killed_during_checkpoint_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = make_data()
    reference = fit(x, tmp_path / "ref.ckpt")
    path = tmp_path / "fit.ckpt"
    real_write = checkpoint_mod._write_file
    writes = []

    def write_then_die(tensors, metadata, tmp):
        writes.append(tmp)
        if len(writes) == 3:  # the third checkpoint (6 batches): half a file, then killed
            real_write(tensors, metadata, tmp)
            size = os.path.getsize(tmp)
            with open(tmp, "r+b") as handle:
                handle.truncate(size // 2)
            raise KilledError("killed while writing")
        real_write(tensors, metadata, tmp)

    monkeypatch.setattr(checkpoint_mod, "_write_file", write_then_die)
    with pytest.raises(KilledError):
        fit(x, path)
    monkeypatch.undo()
    saved, context = load_checkpoint(path)
    assert (saved.batches, context["batches"]) == (4, 4)
    assert not list(tmp_path.glob(".fit.ckpt.*.tmp"))
    resumed = fit(x, path, resume=True)
    assert_same(resumed, reference)


def test_resume_by_minutes_and_from_generic_iterable(tmp_path: Path) -> None:
    x = make_data()
    reference = collect_statistics(make_model(), x, batch_size=BATCH, progress=False)
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KilledError):
        collect_statistics(make_model(), batches_until(x, 9), progress=False, checkpoint=path,
                           checkpoint_minutes=1e-9)
    saved, _ = load_checkpoint(path)
    assert saved.batches == 8  # checkpoints wait for the flush of held-back rows (8 batches)
    resumed = collect_statistics(make_model(), list(x.split(BATCH)), progress=False,
                                 checkpoint=path, resume=True, checkpoint_minutes=1e-9)
    for name in reference:
        for key, tensor in reference[name].tensors.items():
            torch.testing.assert_close(resumed[name].tensors[key], tensor, rtol=1e-10,
                                       atol=1e-12)
    assert resumed.images == N


def test_resume_refuses_other_options_or_data(tmp_path: Path) -> None:
    x = make_data()
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KilledError):
        fit(batches_until(x, 5), path)
    with pytest.raises(ValueError, match="resume=True"):
        fit(x, path)
    with pytest.raises(ValueError, match="precision"):
        fit(x, path, resume=True, precision="float32")
    with pytest.raises(ValueError, match="negative"):
        fit(x, path, resume=True, negative=False)
    with pytest.raises(ValueError, match="same data"):
        collect_statistics(make_model(), x, batch_size=3, progress=False, checkpoint=path,
                           resume=True)
    with pytest.raises(ValueError, match="same data"):
        collect_statistics(make_model(), list(x[:6].split(BATCH)), progress=False,
                           checkpoint=path, resume=True)
    with pytest.raises(ValueError, match="checkpoint=path"):
        collect_statistics(make_model(), x, progress=False, resume=True)
    other = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(48, 2)).double()
    with pytest.raises(ValueError, match="fingerprint"):
        collect_statistics(other, x, batch_size=BATCH, progress=False, checkpoint=path,
                           resume=True)


def test_fit_patterns_resumes_a_finished_checkpoint_without_reading_data(
    tmp_path: Path,
) -> None:
    x = make_data()
    path = tmp_path / "fit.ckpt"
    first = pn.fit_patterns(make_model(), x, batch_size=BATCH, progress=False, checkpoint=path,
                            checkpoint_every=3)
    again = pn.fit_patterns(make_model(), x, batch_size=BATCH, progress=False, checkpoint=path,
                            checkpoint_every=3, resume=True)
    assert again.metadata["images"] == N
    for name in first:
        for key in first[name]:
            assert torch.equal(first[name][key], again[name][key])


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_resume import BATCH, make_data, make_model
    from patternnet.patterns import checkpoint as checkpoint_mod
    from patternnet.patterns.fit import collect_statistics

    torch.set_num_threads(1)
    mode, path = sys.argv[1], sys.argv[2]
    x = make_data()
    real_write = checkpoint_mod._write_file
    writes = []

    def write_then_die(tensors, metadata, tmp):
        writes.append(tmp)
        real_write(tensors, metadata, tmp)
        if len(writes) == 2:
            with open(tmp, "r+b") as handle:
                handle.truncate(os.path.getsize(tmp) // 3)
            os.kill(os.getpid(), signal.SIGKILL)

    def data():
        for index, batch in enumerate(x.split(BATCH)):
            if mode == "between" and index == 7:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    if mode == "write":
        checkpoint_mod._write_file = write_then_die
    collect_statistics(make_model(), data(), progress=False, checkpoint=path,
                       checkpoint_every=2)
    """
)


@pytest.mark.parametrize("mode", ["between", "write"])
def test_sigkilled_process_resumes_exactly(tmp_path: Path, mode: str) -> None:
    x = make_data()
    path = tmp_path / "fit.ckpt"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), mode, str(path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    saved, _ = load_checkpoint(path)
    assert saved.batches == (6 if mode == "between" else 2)
    if mode == "write":
        assert list(tmp_path.glob(".fit.ckpt.*.tmp"))  # the torn temporary file is left
    resumed = fit(x, path, resume=True)
    assert not list(tmp_path.glob(".fit.ckpt.*.tmp"))
    assert_same(resumed, fit(x, tmp_path / "ref.ckpt"))


# ---------------------------------------------------------------------- file format and memory
def test_reader_equals_safetensors_and_checksum_is_crc32(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = tmp_path / "fit.ckpt"
    fit(make_data(), path)
    _, tensors = checkpoint_mod._read_file(path)
    expected = load_file(str(path))
    assert set(tensors) == set(expected)
    for key, tensor in expected.items():
        assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key], tensor)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["version"] == "2" and "sha256" not in metadata
    assert metadata["crc32"] == checkpoint_mod.checksum(expected, metadata)


def test_version_1_checkpoints_with_sha256_are_still_read(tmp_path: Path) -> None:
    from patternnet.patterns.store import _digest

    x = make_data()
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KilledError):
        fit(batches_until(x, 5), path)
    statistics, context = load_checkpoint(path)
    # Rewrite it as version 1 wrote it: the same file with a SHA-256 instead of a CRC-32.
    tensors = {k: t.contiguous() for k, t in statistics.state_tensors().items()}
    metadata = {"format": checkpoint_mod.CHECKPOINT_FORMAT, "version": "1",
                "statistics": json.dumps(statistics.describe()), "context": json.dumps(context)}
    metadata["sha256"] = _digest(tensors, metadata)
    old = tmp_path / "old.ckpt"
    checkpoint_mod._write_file(tensors, metadata, str(old))
    assert_same(fit(x, old, resume=True), fit(x, tmp_path / "ref.ckpt"))  # rewritten as v2
    checkpoint_mod._write_file(tensors, metadata, str(old))
    raw = old.read_bytes()
    flipped = raw[:-9] + bytes([raw[-9] ^ 1]) + raw[-8:]
    old.write_bytes(flipped)
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(old)


@pytest.mark.parametrize(
    "damage",
    ["header longer than the file", "offsets beyond the file", "unknown dtype",
     "size does not match shape", "not json"],
)
def test_malformed_files_are_refused_before_allocating(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "fit.ckpt"
    fit(make_data(), path)
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    if damage == "header longer than the file":
        content = (len(raw)).to_bytes(8, "little") + raw[8:]
    elif damage == "not json":
        content = raw[:8] + b"{" * length + raw[8 + length :]
    else:
        entry = header[key]
        if damage == "offsets beyond the file":
            entry["data_offsets"] = [0, 10**15]
            entry["shape"] = [10**15 // 8]
        elif damage == "unknown dtype":
            entry["dtype"] = "F128"
        else:
            entry["shape"] = [10**6]
        text = json.dumps(header).encode()
        content = len(text).to_bytes(8, "little") + text + raw[8 + length :]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)


MEMORY_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_resume import big_model
    from patternnet.patterns.fit import collect_statistics

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    model, x = big_model()
    before, peak_before = rss(), peak()
    stats = collect_statistics(model, x, batch_size=4, progress=False, checkpoint=sys.argv[1],
                               resume=True)
    print(json.dumps({{"before": before, "after": rss(), "peak_before": peak_before,
                      "peak": peak(), "images": stats.images}}))
    """
)


def big_model() -> tuple[nn.Module, torch.Tensor]:
    """A layer whose two-component statistics take 96 MB (3 × 2000 × 2000 float64)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2000, 2000)), torch.randn(4, 2000)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_resume_holds_the_statistics_once(tmp_path: Path) -> None:
    # Resuming used to hold the file mapped, a byte copy for the checksum and a zero set for
    # the shape check beside the loaded sums (peak ≈ 2.8 × the statistics, measured on VGG16).
    path = tmp_path / "fit.ckpt"
    model, x = big_model()
    stats = collect_statistics(model, x, batch_size=4, progress=False, checkpoint=path)
    size = sum(t.numel() * t.element_size() for t in stats.state_tensors().values())
    assert size > 90e6
    del stats
    script = tmp_path / "child.py"
    script.write_text(MEMORY_CHILD.format(tests=str(Path(__file__).parent)))
    result = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    m = json.loads(result.stdout.strip().splitlines()[-1])
    assert m["images"] == 4  # resumed, nothing read twice
    assert m["after"] - m["before"] > 0.9 * size  # the sums are held ...
    # ... once: loading (and the final write) add at most a fifth of them at their peak.
    assert m["peak"] <= max(m["peak_before"], m["after"] + 0.2 * size), (m, size)


# ---------------------------------------------------------------------- attention models
def make_vit(activation: str = "gelu") -> nn.Module:
    """A 2-block ViT (``zoo.TokenViT``): attention nodes ``attention#k``, residual sums and a
    token Linear layer for every projection, besides the patch embedding and head."""
    from patternnet.zoo import TokenViT

    torch.manual_seed(6)
    return TokenViT(image_size=8, patch=2, channels=2, dim=8, heads=2, depth=2, mlp=12,
                    classes=3, activation=activation, embedding_std=0.5).double().eval()


def vit_data() -> torch.Tensor:
    return torch.randn(N, 2, 8, 8, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64)


def node_kinds(stats: pn.Statistics) -> set[str]:
    return {name.split("#")[0] for name in stats if "#" in name}


@pytest.mark.filterwarnings("ignore:the model has attention and no rectifier")
@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_vit_fit_killed_and_resumed_equals_the_uninterrupted_fit(
    tmp_path: Path, precision: str, activation: str
) -> None:
    """Attention nodes (sums per head, query and key), residual-sum nodes and the shifted
    token Linear layers survive a checkpoint: resumed = uninterrupted, bit for bit in the
    counts and to 1e-12 in the sums; the patterns too."""
    x = vit_data()

    def run(data, path: Path, **options) -> pn.Statistics:
        return collect_statistics(make_vit(activation), data, batch_size=BATCH, progress=False,
                                  checkpoint=path, checkpoint_every=2, precision=precision,
                                  **options)

    reference = run(x, tmp_path / "ref.ckpt")
    assert {"attention", "sum"} <= node_kinds(reference)
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KilledError):
        run(batches_until(x, 5), path)
    saved, _ = load_checkpoint(path)
    assert saved.batches == 4 and {"attention", "sum"} <= node_kinds(saved)
    resumed = run(x, path, resume=True)
    assert set(resumed) == set(reference)
    assert_same(resumed, reference)
    a = pn.compute_patterns(make_vit(activation), resumed)
    b = pn.compute_patterns(make_vit(activation), reference)
    assert set(a) == set(b) and set(a.nodes) == set(b.nodes)
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-10, atol=1e-12)
    for name in a.nodes:
        for key in a.nodes[name]:
            torch.testing.assert_close(a.nodes[name][key], b.nodes[name][key], rtol=1e-10,
                                       atol=1e-12)


@pytest.mark.filterwarnings("ignore:the model has attention and no rectifier")
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_vit_fits_of_two_halves_merge_into_one_fit(precision: str) -> None:
    """Two partial fits over disjoint halves, merged (``+``, what ``all_reduce_`` does across
    processes), equal one fit over all the data: attention nodes and residual sums included.
    In float32 each half shifts its products by its own first batch; the float64 sums agree
    to rounding."""
    x = vit_data()

    def run(data: torch.Tensor) -> pn.Statistics:
        return collect_statistics(make_vit(), data, batch_size=BATCH, progress=False,
                                  precision=precision)

    whole = run(x)
    merged = run(x[: N // 2]) + run(x[N // 2 :])
    assert {"attention", "sum"} <= node_kinds(whole)
    assert set(merged) == set(whole)
    assert (merged.images, merged.batches) == (whole.images, whole.batches)
    tolerance = 1e-12 if precision == "float64" else 1e-6
    for name in whole:
        for key, tensor in whole[name].tensors.items():
            other = merged[name].tensors[key]
            if "count" in key:
                assert torch.equal(tensor, other), (name, key)
            else:
                scale = tensor.abs().max().clamp_min(1.0)
                torch.testing.assert_close(other / scale, tensor / scale, rtol=tolerance,
                                           atol=tolerance, msg=f"{name} {key}")
    a = pn.compute_patterns(make_vit(), merged)
    b = pn.compute_patterns(make_vit(), whole)
    for name in a.nodes:
        torch.testing.assert_close(a.nodes[name]["a"], b.nodes[name]["a"],
                                   rtol=1e-4 if precision == "float32" else 1e-10,
                                   atol=1e-4 if precision == "float32" else 1e-10)
