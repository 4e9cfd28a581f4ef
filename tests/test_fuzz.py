"""Fuzzing the patterns-file loader and the command line (issue 8, hypothesis).

Seeds live in ``tests/fuzz_corpus/``: valid patterns files of the tiny model
``fuzz_model:make`` and command lines (``cli_argv.json``). Each run mutates them:

- **loader**: bit flips, byte writes, truncation, insertions, deletions, a forged header
  length, and structured edits of the JSON header (any field replaced by any JSON value).
  ``Patterns.load`` must return usable patterns (float, finite, shaped like the model's
  weights when a model is given) or raise ``ValueError``; nothing else, ever.
- **command line**: arguments drawn from the parser's own options with hostile values;
  ``build_parser().parse_args`` must return or exit with status 0/2, and ``main`` (on the
  tiny model, small files in a temporary folder) must return 0 or 2 — a traceback is a crash.

The CI run is short (``PATTERNNET_FUZZ_EXAMPLES``, default 60 per target). For a long run
set the variable (e.g. 20000) or use the atheris harnesses in ``fuzz/`` (see
docs/reliability.md for the times and results of the long runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from patternnet import PatternNet, Patterns

CORPUS = Path(__file__).parent / "fuzz_corpus"
sys.path.insert(0, str(CORPUS))
from fuzz_model import make  # noqa: E402

EXAMPLES = int(os.environ.get("PATTERNNET_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
SEED_FILES = sorted(CORPUS.glob("*.safetensors"))
INPUTS = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- the loader
def check_load_bytes(raw: bytes, folder: Path) -> str:
    """The loader's contract on arbitrary bytes; returns "accepted" or "refused"."""
    path = folder / "fuzzed.safetensors"
    path.write_bytes(raw)
    outcome = "refused"
    for model in (None, make()):
        try:
            patterns = Patterns.load(path, model=model)
        except ValueError as error:
            assert str(error), "an empty error message"
            continue
        outcome = "accepted"
        for name, tensors in patterns.items():
            for key, tensor in tensors.items():
                assert tensor.is_floating_point(), (name, key, tensor.dtype)
                assert torch.isfinite(tensor).all(), (name, key)
        if model is not None and patterns.estimator in ("two_component", "linear"):
            try:
                result = PatternNet(model, patterns).attribute(INPUTS)
            except ValueError:
                continue  # e.g. patterns whose products overflow: refused clearly
            assert torch.isfinite(result).all()
    return outcome


def split_file(raw: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, data) of a well-formed safetensors file, or None."""
    if len(raw) < 8:
        return None
    (length,) = struct.unpack("<Q", raw[:8])
    try:
        return json.loads(raw[8 : 8 + length]), raw[8 + length :]
    except (ValueError, UnicodeDecodeError):
        return None


def join_file(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def mutate_bytes(raw: bytes, operations: list[tuple[str, int, int, bytes]]) -> bytes:
    buffer = bytearray(raw)
    for kind, position, value, chunk in operations:
        at = position % (len(buffer) + 1)
        if kind == "flip" and buffer:
            buffer[at % len(buffer)] ^= 1 << (value % 8)
        elif kind == "set" and buffer:
            buffer[at % len(buffer)] = value % 256
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = chunk
        elif kind == "delete":
            del buffer[at : at + 1 + value % 64]
        elif kind == "length" and len(buffer) >= 8:
            buffer[:8] = struct.pack("<Q", value)
    return bytes(buffer)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "linear"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)

OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "truncate", "insert", "delete", "length"]),
        st.integers(0, 2**16),
        st.integers(0, 2**64 - 1),
        st.binary(max_size=16),
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("seed", SEED_FILES, ids=lambda p: p.stem)
def test_corpus_files_load(seed: Path, tmp_path: Path) -> None:
    assert check_load_bytes(seed.read_bytes(), tmp_path) == "accepted"


@pytest.mark.parametrize(
    "crash", sorted((CORPUS / "crashes").glob("*")), ids=lambda p: p.name
)
def test_former_crashes_are_handled(crash: Path, tmp_path: Path) -> None:
    """Inputs that once crashed the loader (found by the fuzzers) now load or are refused."""
    check_load_bytes(crash.read_bytes(), tmp_path)
    with pytest.raises(ValueError, match="layer|damaged|corrupted"):
        Patterns.load(tmp_path / "fuzzed.safetensors", model=make())


@FUZZ
@given(st.sampled_from(SEED_FILES), OPERATIONS)
@example(SEED_FILES[0], [("length", 0, 2**64 - 1, b"")])
@example(SEED_FILES[0], [("length", 0, 2**40, b"")])
@example(SEED_FILES[0], [("truncate", 9, 0, b"")])
def test_fuzz_load_mutated_bytes(seed: Path, operations: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        check_load_bytes(mutate_bytes(seed.read_bytes(), operations), Path(folder))


def _paths(header: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every (key, ...) path into the header's JSON (tensor entries and their fields)."""
    found: list[tuple[Any, ...]] = []
    for key, value in header.items():
        found.append((key,))
        if isinstance(value, dict):
            found += [(key, inner) for inner in value]
    return found


@FUZZ
@given(st.sampled_from(SEED_FILES), st.data())
def test_fuzz_load_mutated_header(seed: Path, data: st.DataObject) -> None:
    parts = split_file(seed.read_bytes())
    assert parts is not None
    header, payload = parts
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(header)))
        value = data.draw(JSON_VALUES)
        target = header
        for key in path[:-1]:
            target = target[key]
        if data.draw(st.booleans()):
            target[path[-1]] = value
        else:
            target.pop(path[-1], None)
    if "__metadata__" in header and isinstance(header["__metadata__"], dict):
        meta = header["__metadata__"]
        if data.draw(st.booleans()) and isinstance(meta.get("metadata"), str):
            inner = json.loads(meta["metadata"]) if meta["metadata"].startswith("{") else {}
            inner[data.draw(st.sampled_from(["architecture", "fingerprint", "report", "x"]))] = (
                data.draw(JSON_VALUES)
            )
            meta["metadata"] = json.dumps(inner)
    with tempfile.TemporaryDirectory() as folder:
        check_load_bytes(join_file(header, payload), Path(folder))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_load_random_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        assert check_load_bytes(raw, Path(folder)) == "refused"


# ---------------------------------------------------------------------- statistics checkpoints
CHECKPOINT = CORPUS / "checkpoint.ckpt"
FIT_DATA = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def check_checkpoint_bytes(raw: bytes, folder: Path) -> str:
    """A resumed fit from damaged checkpoint bytes: patterns or a ``ValueError``, nothing else."""
    from patternnet import fit_patterns
    from patternnet.patterns.checkpoint import load_checkpoint

    path = folder / "fit.ckpt"
    path.write_bytes(raw)
    try:
        statistics, context = load_checkpoint(path)
    except ValueError as error:
        assert str(error)
        return "refused"
    assert isinstance(context, dict)
    try:
        patterns = fit_patterns(
            make(), FIT_DATA, batch_size=4, progress=False, checkpoint=path, resume=True,
            precision="float64",  # the corpus checkpoint was written by a float64 fit
        )
    except ValueError:
        return "refused"
    for tensors in patterns.values():
        for tensor in tensors.values():
            assert torch.isfinite(tensor).all()
    return "accepted"


def test_corpus_checkpoint_resumes(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check_checkpoint_bytes(CHECKPOINT.read_bytes(), tmp_path) == "accepted"


@FUZZ
@given(OPERATIONS)
def test_fuzz_checkpoint_mutated_bytes(operations: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_checkpoint_bytes(mutate_bytes(CHECKPOINT.read_bytes(), operations), Path(folder))


@FUZZ
@given(st.data())
def test_fuzz_checkpoint_mutated_header(data: st.DataObject) -> None:
    parts = split_file(CHECKPOINT.read_bytes())
    assert parts is not None
    header, payload = parts
    meta = header["__metadata__"]
    if data.draw(st.booleans()):
        meta.pop("sha256")  # as if written by hand: the parser alone must cope
    key = data.draw(st.sampled_from(sorted(meta)))
    if key in ("statistics", "context") and data.draw(st.booleans()):
        inner = json.loads(meta[key])
        field = data.draw(st.sampled_from(sorted(inner) or ["x"]))
        inner[field] = data.draw(JSON_VALUES)
        meta[key] = json.dumps(inner)
    else:
        meta[key] = json.dumps(data.draw(JSON_VALUES)).strip('"')
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_checkpoint_bytes(join_file(header, payload), Path(folder))


# ---------------------------------------------------------------------- the command line
def _options() -> dict[str, list[str]]:
    """Every sub-command's option strings, read from the parser itself."""
    from patternnet.cli import build_parser

    parser = build_parser()
    found: dict[str, list[str]] = {"": ["--version", "--help"]}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = [s for a in sub._actions for s in a.option_strings]
    return found


OPTIONS = _options()
HOSTILE_VALUES = [
    "", "-1", "0", "1", "2", "3", "9" * 30, "1e400", "nan", "-inf", "0.5,0.5", "a,b", ",",
    "两", "\x00", "--", "-", "cpu", "cuda", "meta", "cuda:99", "RGB", "L", "none",
    "imagenet", "linear", "pattern_net", "gradient,nope", "torch.nn:Identity",
    "fuzz_model:make", "nope_module:f", "torchvision:nope", "fuzz_model:nothing",
    "fuzz_model", ":", "/", ".", "/dev/null", "~", "%s", "{tmp}/data.npy", "{tmp}/image.png",
    "{tmp}/junk.bin", "{tmp}/absent", "{tmp}", "{tmp}/out", "{tmp}/p.safetensors",
    "{tmp}/bad.safetensors", "{tmp}/weights.pt",
]  # fmt: skip
HOSTILE = st.sampled_from(HOSTILE_VALUES) | st.text(max_size=12)


@st.composite
def command_lines(draw: st.DrawFn, commands: tuple[str, ...]) -> list[str]:
    command = draw(st.sampled_from(commands))
    argv = [command] if command else []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 4)) == 0:
            argv.append(draw(HOSTILE))
        else:
            argv.append(draw(st.sampled_from(OPTIONS[command] or ["--help"])))
            if draw(st.integers(0, 5)):
                argv.append(draw(HOSTILE))
    return argv


def run_quietly(call: Callable[[], Any]) -> Any:
    """Call with stdout/stderr captured; SystemExit becomes its code."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            return call()
        except SystemExit as stop:
            return stop.code


@FUZZ
@given(command_lines(tuple(OPTIONS)))
def test_fuzz_cli_argument_parsing(argv: list[str]) -> None:
    from patternnet.cli import build_parser

    result = run_quietly(lambda: build_parser().parse_args(argv))
    assert isinstance(result, argparse.Namespace) or result in (0, 2, None), (argv, result)


def cli_workspace(folder: Path) -> None:
    """Small real inputs for ``main``: data, an image, patterns, weights and junk files."""
    from PIL import Image

    torch.manual_seed(0)
    model = make()
    np.save(folder / "data.npy", np.random.default_rng(0).random((6, 1, 6, 6), np.float32))
    Image.fromarray((np.arange(36, dtype=np.uint8) * 7).reshape(6, 6)).save(folder / "image.png")
    (folder / "p.safetensors").write_bytes((CORPUS / "two_component.safetensors").read_bytes())
    (folder / "bad.safetensors").write_bytes(b"\x10" + bytes(40))
    (folder / "junk.bin").write_bytes(bytes(range(256)))
    torch.save(model.state_dict(), folder / "weights.pt")


def check_cli_main(argv: list[str], folder: Path) -> Any:
    from patternnet.cli import main

    argv = [a.replace("{tmp}", str(folder)) for a in argv]
    here = os.getcwd()
    os.chdir(folder)  # relative --out paths ("cpu", "~", "") land in the scratch folder
    try:
        code = run_quietly(lambda: main(argv))
    finally:
        os.chdir(here)
    assert code in (0, 2, None), (argv, code)
    return code


MAIN_COMMANDS = ("fit", "explain", "evaluate", "methods")


@st.composite
def main_command_lines(draw: st.DrawFn) -> list[str]:
    """Command lines that get past parsing often: the required options first, then noise."""
    command = draw(st.sampled_from(MAIN_COMMANDS))
    argv = [command]
    if command != "methods":
        argv += ["--model", draw(st.sampled_from(["fuzz_model:make", "fuzz_model:make",
                                                  "torch.nn:Identity", "nope_module:f"])),
                 "--out", "{tmp}/out", "--quiet"]
    if command in ("fit", "evaluate"):
        argv += ["--data", draw(st.sampled_from(["{tmp}/data.npy", "{tmp}/data.npy",
                                                 "{tmp}/junk.bin", "{tmp}/absent", "{tmp}"]))]
    if command == "evaluate":
        argv += ["--patterns", draw(st.sampled_from(["{tmp}/p.safetensors",
                                                     "{tmp}/bad.safetensors"]))]
    if command == "explain":
        argv.append(draw(st.sampled_from(["{tmp}/image.png", "{tmp}/junk.bin", "{tmp}"])))
        argv += ["--patterns", "{tmp}/p.safetensors", "--method",
                 draw(st.sampled_from(["gradient", "pattern_net", "pattern_attribution",
                                       "nope", "gradient,lrp"]))]
    safe = [o for o in OPTIONS[command] if o not in ("--help", "-h", "--workers")]
    for _ in range(draw(st.integers(0, 3))):
        argv.append(draw(st.sampled_from(safe or ["--quiet"])))
        argv.append(draw(HOSTILE.filter(lambda v: not v.startswith("-h"))))
    return argv


@FUZZ
@given(main_command_lines())
@example(["explain", "--model", "fuzz_model:make", "--out", "{tmp}/out", "{tmp}/image.png",
          "--method", "gradient", "--mode", "RGB", "--quiet"])
@example(["fit", "--model", "fuzz_model:make", "--out", "{tmp}/out", "--data", "{tmp}/data.npy",
          "--crop", "9", "--quiet"])
@example(["fit", "--model", "fuzz_model:make", "--data", "{tmp}/data.npy", "--out", "",
          "--quiet"])
@example(["explain", "--model", "fuzz_model:make", "--out", "{tmp}/data.npy", "{tmp}/image.png",
          "--method", "gradient", "--quiet"])
@example(["explain", "--model", "fuzz_model:make", "--out", "{tmp}/out", "{tmp}/image.png",
          "--method", "gradient", "--resize", "9" * 30, "--quiet"])
@example(["explain", "--model", "fuzz_model:make", "--out", "{tmp}/out", "{tmp}/image.png",
          "--weights", "{tmp}/bad.safetensors", "--quiet"])
@example(["explain", "--model", "fuzz_model:make", "--out", "{tmp}/out", "{tmp}/image.png",
          "--method", "gradient", "--resize", "5555555", "--quiet"])
def test_fuzz_cli_main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        cli_workspace(Path(folder))
        check_cli_main(argv, Path(folder))


def test_cli_seed_command_lines_succeed(tmp_path: Path) -> None:
    """The corpus command lines are valid and work end to end (status 0)."""
    cli_workspace(tmp_path)
    for argv in json.loads((CORPUS / "cli_argv.json").read_text()):
        assert check_cli_main(argv, tmp_path) == 0, argv
