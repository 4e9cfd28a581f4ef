"""The ``patternnet`` command end to end on a tiny model and tiny data in a temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patternnet.cli import main
from patternnet.patterns.store import Patterns

TINY_MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny_cnn():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
        )

    def not_a_model():
        return 3
    """
)
MODEL = "tiny_models_for_cli:tiny_cnn"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with the factory module, a .npy of 48 inputs and 4 PNG images."""
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny_models_for_cli.py").write_text(TINY_MODELS)
    rng = np.random.default_rng(0)
    np.save(root / "inputs.npy", rng.normal(size=(48, 1, 8, 8)).astype(np.float32))
    for cls in ("a", "b"):
        for i in range(2):
            folder = root / "images" / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                folder / f"{cls}{i}.png"
            )
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def patterns_file(workspace):
    path = workspace / "tiny.patterns.safetensors"
    code = main(["fit", "--model", MODEL, "--data", str(workspace / "inputs.npy"),
                 "--out", str(path), "--batch-size", "16", "--quiet"])  # fmt: skip
    assert code == 0
    return path


def tiny_model():
    import tiny_models_for_cli

    return tiny_models_for_cli.tiny_cnn()


def test_fit_writes_patterns_for_every_layer(patterns_file):
    patterns = Patterns.load(patterns_file, model=tiny_model())
    assert patterns.estimator == "two_component"
    assert set(patterns) == {"0", "4"}
    assert patterns["0"]["a_plus"].shape == (4, 1, 3, 3)
    assert patterns["4"]["a_minus"].shape == (3, 64)
    assert patterns.metadata["images"] == 48


def test_fit_image_folder_with_limit_and_linear_estimator(workspace, capsys):
    out = workspace / "linear.safetensors"
    code, _, err = run(capsys, "fit", "--model", MODEL, "--data", workspace / "images",
                       "--out", out, "--estimator", "linear", "--limit", "3", "--mode", "L",
                       "--workers", "0", "--quiet")  # fmt: skip
    assert code == 0, err
    patterns = Patterns.load(out)
    assert patterns.estimator == "linear" and patterns.metadata["images"] == 3
    assert patterns["0"]["a"].shape == (4, 1, 3, 3)


@pytest.mark.parametrize("minutes", [None, "1e-9"])
def test_fit_checkpoint_minutes_reaches_the_fit(workspace, tmp_path, capsys, monkeypatch,
                                                minutes):
    from patternnet.patterns import checkpoint as checkpoint_mod

    written = []
    real_save = checkpoint_mod.save_checkpoint

    def recording_save(path, statistics, context):
        written.append((statistics.batches, bool(context.get("complete"))))
        return real_save(path, statistics, context)

    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", recording_save)
    out, ckpt = tmp_path / "p.safetensors", tmp_path / "fit.ckpt"
    argv = ["fit", "--model", MODEL, "--data", workspace / "inputs.npy", "--out", out,
            "--batch-size", "4", "--checkpoint", ckpt, "--quiet"]  # fmt: skip
    if minutes is not None:
        argv += ["--checkpoint-minutes", minutes]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    # 12 batches; sums are flushed every 8, and a checkpoint waits for a flush. The default
    # (10 minutes) writes only the final checkpoint; a tiny interval writes at every flush too.
    assert written == ([(12, True)] if minutes is None else [(8, False), (12, True)])
    assert Patterns.load(out).metadata["images"] == 48
    # and the finished checkpoint resumes into the same patterns without reading data again
    again = tmp_path / "again.safetensors"
    code, _, err = run(capsys, *argv[:6], again, *argv[7:], "--resume")
    assert code == 0, err
    first, second = Patterns.load(out), Patterns.load(again)
    for layer in first:
        for name, tensor in first[layer].items():
            assert torch.equal(second[layer][name], tensor)


def test_explain_writes_png_and_arrays(workspace, patterns_file, capsys):
    out = workspace / "explained"
    images = sorted((workspace / "images").rglob("*.png"))[:2]
    code, _, err = run(capsys, "explain", "--model", MODEL, "--patterns", patterns_file,
                       "--method", "pattern_net,pattern_attribution,gradient,lrp_epsilon",
                       *images, "--out", out, "--mode", "L", "--target", "1")  # fmt: skip
    assert code == 0, err
    for image in images:
        assert (out / f"{image.stem}.png").stat().st_size > 1000
        for method in ("pattern_net", "pattern_attribution", "gradient", "lrp_epsilon"):
            array = np.load(out / f"{image.stem}.{method}.npy")
            assert array.shape == (1, 8, 8) and np.isfinite(array).all()
    # the saved PatternNet array is what the API computes for target 1
    from patternnet import PatternNet
    from patternnet.data import load_image

    model = tiny_model()
    x = load_image(images[0])[None]
    expected = PatternNet(model, Patterns.load(patterns_file)).attribute(x, target=1)[0]
    np.testing.assert_allclose(
        np.load(out / f"{images[0].stem}.pattern_net.npy"), expected.numpy(), rtol=1e-5
    )


@pytest.fixture(scope="module")
def full_patterns_file(workspace):
    """Patterns with a₋ in every layer, as ρ(S) of the two-component estimator needs."""
    path = workspace / "tiny.full.patterns.safetensors"
    code = main(["fit", "--model", MODEL, "--data", str(workspace / "inputs.npy"),
                 "--out", str(path), "--batch-size", "16", "--negative-everywhere",
                 "--quiet"])  # fmt: skip
    assert code == 0
    return path


def test_evaluate_says_why_default_patterns_get_no_two_component_rho(
    workspace, patterns_file, capsys
):
    out = workspace / "report-default"
    code, _, err = run(capsys, "evaluate", "--model", MODEL, "--patterns", patterns_file,
                       "--data", workspace / "inputs.npy", "--out", out, "--patch", "3",
                       "--method", "gradient", "--quiet")  # fmt: skip
    assert code == 0, err
    assert "two_component not measured" in err and "--negative-everywhere" in err
    assert "two_component" not in (out / "rho.csv").read_text().splitlines()[0]


def test_evaluate_writes_report(workspace, full_patterns_file, capsys):
    out = workspace / "report"
    code, _, err = run(capsys, "evaluate", "--model", MODEL, "--patterns", full_patterns_file,
                       "--data", workspace / "inputs.npy", "--out", out, "--patch", "3",
                       "--method", "pattern_attribution,gradient,lrp_epsilon",
                       "--quiet")  # fmt: skip
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert "ρ(S)" in report and "two_component" in report
    assert "k=3" in report and "steps=9" in report  # 8×8 images: regions of 3 + 3 + 2 px
    rho = (out / "rho.csv").read_text().splitlines()
    assert rho[0].startswith("layer,random,filter,two_component")
    assert len(rho) == 3  # header + two layers
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == [
        "pattern_attribution", "gradient", "lrp_epsilon", "random"
    ]  # fmt: skip
    for name in ("degradation.png", "rho.png", "explanations.png"):
        assert (out / name).stat().st_size > 1000, name
    page = (out / "report.html").read_text()  # opened in a browser by tests/test_report.py
    assert 'id="quality-table"' in page and 'id="degradation-table"' in page


def test_evaluate_sanity_writes_the_table_of_every_method(workspace, patterns_file, capsys):
    from patternnet.methods.registry import methods

    out = workspace / "sanity-report"
    code, _, err = run(capsys, "evaluate", "--model", MODEL, "--patterns", patterns_file,
                       "--data", workspace / "inputs.npy", "--out", out, "--patch", "4",
                       "--method", "gradient", "--sanity", "--sanity-images", "6",
                       "--quiet")  # fmt: skip
    assert code == 0, err
    table = (out / "sanity.md").read_text()
    for name in methods():
        assert f"| {name} |" in table, name
    # the tiny CNN's first layer pads: input invariance cannot be set up and says why
    assert "pads" in table
    records = json.loads((out / "sanity.json").read_text())
    assert {r["check"] for r in records} == {"cascading", "independent", "later_layers",
                                             "class_sensitivity", "input_invariance"}  # fmt: skip
    assert (out / "sanity.png").stat().st_size > 1000
    assert "## Sanity checks" in (out / "report.md").read_text()
    assert 'id="sanity-table"' in (out / "report.html").read_text()


def test_methods_lists_the_registry(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    names = {line.split()[0] for line in out.splitlines()}
    assert {"pattern_net", "pattern_attribution", "gradient", "lrp_epsilon"} <= names


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--model", MODEL, "--data", "inputs.npy"], "required: --out"),
        (["fit", "--model", MODEL, "--data", "x", "--out", "p", "--estimator", "magic"],
         "invalid choice: 'magic'"),
        (["fit", "--model", MODEL, "--data", "x", "--out", "p", "--limit", "0"],
         "must be at least 1"),
        (["fit", "--model", MODEL, "--data", "nowhere.npy", "--out", "p"], "does not exist"),
        (["fit", "--model", "no_such_module:f", "--data", "x", "--out", "p"], "--model"),
        (["fit", "--model", "tiny_models_for_cli:not_a_model", "--data", "x", "--out", "p"],
         "--model"),
        (["explain", "--model", MODEL, "--method", "pattern_net", "a.png", "--out", "o"],
         "needs --patterns"),
        (["explain", "--model", MODEL, "--method", "telepathy", "a.png", "--out", "o"],
         "unknown method 'telepathy'"),
        (["explain", "--model", MODEL, "--patterns", "missing.safetensors", "a.png",
          "--out", "o"], "no such file"),
        (["explain", "--model", MODEL, "--method", "gradient", "missing.png", "--out", "o"],
         "missing.png"),
        (["fit", "--model", MODEL, "--data", "x", "--out", "p", "--mean", "a,b"],
         "comma-separated list of numbers"),
        (["fit", "--model", MODEL, "--data", "x", "--out", "p", "--checkpoint", "c",
          "--checkpoint-minutes", "0"], "'0' must be a positive number"),
        (["fit", "--model", MODEL, "--data", "x", "--out", "p", "--checkpoint", "c",
          "--checkpoint-minutes", "nan"], "'nan' must be a positive number"),
        (["fit", "--model", MODEL, "--data", "x", "--out", "p", "--checkpoint-minutes", "ten"],
         "'ten' is not a number"),
        (["fit", "--model", MODEL, "--data", "x", "--out", "p", "--checkpoint-minutes", "5"],
         "--checkpoint-minutes needs --checkpoint FILE"),
        (["fit", "--model", MODEL, "--data", "x", "--out", "p", "--checkpoint-every", "5"],
         "--checkpoint-every needs --checkpoint FILE"),
        (["frobnicate"], "invalid choice"),
        (["evaluate", "--model", MODEL, "--patterns", "tiny.patterns.safetensors", "--data",
          "inputs.npy", "--out", "r", "--patch", "20"], "larger than the 8×8 images"),
        (["demo", "--epochs", "-1"], "must be at least 1"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    workspace, patterns_file, capsys, monkeypatch, argv, message
):
    # patterns_file: some cases read it (not left to another test having made it first)
    monkeypatch.chdir(workspace)
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("patternnet") and "error:" in lines[0]
    assert message in lines[0]


def test_demo_without_data_says_how_to_get_it(tmp_path, capsys):
    code, _, err = run(capsys, "demo", "--data", tmp_path, "--out", tmp_path / "o", "--quiet")
    assert code == 2
    assert "Fashion-MNIST was not found" in err and "apt-get install dataset-fashion-mnist" in err


def test_python_dash_m_runs_fit_in_a_fresh_process(workspace, tmp_path):
    out = tmp_path / "p.safetensors"
    env = dict(os.environ, PYTHONPATH=f"{workspace}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run(
        [sys.executable, "-m", "patternnet", "fit", "--model", MODEL, "--data",
         str(workspace / "inputs.npy"), "--out", str(out), "--limit", "20"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fitted two_component patterns for 2 layers on 20 samples" in result.stderr
    assert Patterns.load(out).metadata["images"] == 20
    bad = subprocess.run([sys.executable, "-m", "patternnet", "fit"], capture_output=True,
                         text=True, env=env)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_help_explains_every_option(capsys):
    import argparse

    from patternnet.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"fit", "explain", "evaluate", "demo", "methods"} <= set(commands.choices)
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"patternnet {name}: {action.option_strings or action.dest}"
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: patternnet {name}")


@pytest.mark.slow
def test_torchrun_fit_matches_one_process(workspace, patterns_file, tmp_path):
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists() or not torch.distributed.is_available():
        pytest.skip("torchrun / torch.distributed not available")
    out = tmp_path / "dist.safetensors"
    env = dict(os.environ, PYTHONPATH=f"{workspace}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")  # fmt: skip
    # Own process group: on a timeout the workers die with torchrun instead of lingering.
    process = subprocess.Popen(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "patternnet", "fit",
         "--model", MODEL, "--data", str(workspace / "inputs.npy"), "--out", str(out),
         "--batch-size", "16", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("torchrun fit did not finish within 240 s")
    assert process.returncode == 0, stderr[-2000:]
    distributed, single = Patterns.load(out), Patterns.load(patterns_file)
    assert distributed.metadata["images"] == single.metadata["images"] == 48
    for layer in single:
        for name, tensor in single[layer].items():
            torch.testing.assert_close(distributed[layer][name], tensor, rtol=1e-5, atol=1e-6)


def test_fit_on_the_cpu_asks_for_gloo_even_where_cuda_exists(workspace, capsys, monkeypatch,
                                                             tmp_path):
    """torchrun on a GPU machine with --device cpu: gloo (NCCL would need one GPU per rank)."""
    from patternnet.patterns import distributed

    asked = []
    monkeypatch.setattr(distributed, "init_from_env",
                        lambda backend=None, **_: asked.append(backend) or False)
    monkeypatch.chdir(workspace)
    code, _, err = run(capsys, "fit", "--model", MODEL, "--data", "inputs.npy", "--out",
                       tmp_path / "p.safetensors", "--quiet")
    assert code == 0, err
    assert asked == ["gloo"]


@pytest.mark.parametrize("bug", [KeyError("layer"), TypeError("unsupported operand"),
                                 RuntimeError("boom")])
def test_a_bug_propagates_with_its_traceback_not_exit_2(workspace, capsys, monkeypatch,
                                                        tmp_path, bug):
    """Only usage errors exit with 2; anything else is a bug and is raised as it is."""
    from patternnet.cli import fit as fit_command

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(fit_command, "fit_patterns", broken)
    with pytest.raises(type(bug), match=str(bug.args[0])):
        main(["fit", "--model", MODEL, "--data", str(workspace / "inputs.npy"), "--out",
              str(tmp_path / "p.safetensors"), "--quiet"])


def test_a_value_error_from_the_data_is_a_usage_error(workspace, capsys, tmp_path):
    """The library's verdict on bad data (ValueError) is reported in one line, exit 2."""
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3, 8, 8), np.float32))  # 3 channels, not 1
    code, _, err = run(capsys, "fit", "--model", MODEL, "--data", tmp_path / "wrong.npy",
                       "--out", tmp_path / "p.safetensors", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("patternnet fit: error: fit on --data")
