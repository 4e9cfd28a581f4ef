"""``patternnet.reproduce`` end to end on a generated ImageNet-format folder (random weights)."""

from __future__ import annotations

import csv
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from browser import probe
from patternnet import reproduce
from patternnet.data import Preset
from patternnet.patterns.store import Patterns

WNIDS = ("n01440764", "n01443537", "n01484850")
PRESET = Preset(resize=36, crop=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                mode="RGB")  # fmt: skip


def imagenet_folder(root, train_per_class=12, val_per_class=6, seed=0):
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: JPEGs of varied sizes, a
    bright square whose place depends on the class, over noise."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(40, 56)), int(rng.integers(40, 64))
                pixels = rng.integers(0, 120, (h, w, 3))
                pixels[4 + 10 * c : 16 + 10 * c, 8:24] = 240
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c}{i}.JPEG"
                Image.fromarray(pixels.astype(np.uint8)).save(folder / name, quality=90)
    return root


def tiny_net() -> nn.Module:
    """A VGG-shaped net for 3×32×32 inputs: conv-ReLU-pool ×2, pool, two dense layers."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(4, 4, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("pool3", nn.MaxPool2d(2)), ("flatten", nn.Flatten()), ("fc1", nn.Linear(4 * 4 * 4, 16)),
        ("relu3", nn.ReLU()), ("fc2", nn.Linear(16, len(WNIDS))),
    ])).eval()  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return imagenet_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    messages = []
    result = reproduce(folder, model="test_reproduce:tiny_net", weights=None, out=out,
                       fit_images=24, val_images=12, quality_images=8, grid_images=3, patch=9,
                       steps=10, batch_size=8, workers=0, preset=PRESET, progress=False,
                       log=messages.append)  # fmt: skip
    return result, out, messages


def test_writes_the_three_figures_and_the_report(run):
    result, out, messages = run
    for name in ("figure3-rho.png", "figure4-degradation.png", "figure7-explanations.png",
                 "report.html", "rho.csv", "aopc.csv", "summary.json",
                 "patterns-two_component.safetensors", "patterns-linear.safetensors"):  # fmt: skip
        assert (out / name).stat().st_size > 100, name
    assert set(result.files.values()) <= set(out.iterdir())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert messages[0].startswith("reproduce: test_reproduce:tiny_net (random weights)")


def test_figure3_has_every_layer_and_estimator(run):
    result, out, _ = run
    rows = list(csv.DictReader((out / "rho.csv").read_text().splitlines()))
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    for row in rows:
        for estimator in ("random", "filter", "linear", "two_component"):
            assert 0.0 <= float(row[estimator]) <= 1.0


def test_figure4_follows_the_paper_settings(run):
    result, out, _ = run
    labels = ["PatternAttribution (S_a+-)", "PatternAttribution (S_a)", "w² rule (S_w)",
              "LRP-z (S_x)", "random order"]  # fmt: skip
    assert list(result.curves) == labels
    for curve in result.curves.values():
        assert curve.k == 9 and curve.scores.shape == (12, 11)  # 32 px: 4×4 regions of ≤ 9 px
        assert curve.replacement == "mean"
    rows = list(csv.DictReader((out / "aopc.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == labels
    for row in rows:  # the interval holds the AOPC, and is the curve's own bootstrap over 12 images
        low, value, high = float(row["low"]), float(row["aopc"]), float(row["high"])
        assert low <= value <= high and int(row["images"]) == 12
        curve = result.curves[row["method"]]
        per_image = (curve.scores[:, :1] - curve.scores).double().mean(1)
        own = curve.aopc_interval()  # patternnet.evaluate: percentile bootstrap over images
        assert value == pytest.approx(float(per_image.mean()), abs=1e-9)
        assert (low, high) == pytest.approx((own.low, own.high), abs=1e-9)


def test_patterns_are_fitted_on_the_drawn_training_images(run):
    _, out, _ = run
    patterns = Patterns.load(out / "patterns-two_component.safetensors")
    assert patterns.estimator == "two_component"
    assert patterns.metadata["images"] == 24
    assert json.loads(patterns.metadata["reproduce"])["images"] == 24


def test_summary_and_timings(run):
    result, out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["fit_images"] == 24 and summary["settings"]["patch"] == 9
    stages = ["open data", "fit patterns (S_a+- and S_a)", "Figure 3: ρ(S)",
              "Figure 4: degradation", "Figure 7: explanations", "report", "total"]  # fmt: skip
    assert list(summary["timings"]) == stages
    assert summary["timings"]["total"] >= sum(v for k, v in summary["timings"].items()
                                              if k != "total") * 0.999  # fmt: skip
    assert set(summary["aopc"]) == set(result.curves)


def test_report_opens_in_chromium(run):
    _, out, _ = run
    seen = probe(out / "report.html")
    assert seen["decoded"] == seen["images"] == str(3 * 7 + 2)  # grid 3 × (input + 6); ρ, curves
    assert {"explanation-grid", "quality-table", "degradation-table", "timings-table"} <= set(
        seen["tables"].split(",")
    )


def test_a_second_run_reuses_the_patterns_and_repeats_the_results(folder, run):
    result, out, _ = run
    before = (out / "patterns-two_component.safetensors").stat().st_mtime_ns
    torch.manual_seed(123)  # whatever the global state, the run draws the same random model
    again = reproduce(folder, model="test_reproduce:tiny_net", weights=None, out=out,
                      fit_images=24, val_images=12, quality_images=8, grid_images=1, steps=10,
                      batch_size=8, workers=0, preset=PRESET, progress=False,
                      log=lambda m: None)  # fmt: skip
    assert (out / "patterns-two_component.safetensors").stat().st_mtime_ns == before
    assert again.timings["fit patterns (S_a+- and S_a)"] < 5.0
    for label, curve in result.curves.items():
        torch.testing.assert_close(again.curves[label].scores, curve.scores)
    torch.testing.assert_close(again.quality.rho, result.quality.rho)


def test_bad_folders_and_counts_say_what_to_do(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        reproduce(tmp_path, model="test_reproduce:tiny_net", weights=None, out=tmp_path / "o")
    with pytest.raises(ValueError, match="40 images asked for, the folder holds 36"):
        reproduce(folder, model="test_reproduce:tiny_net", weights=None, out=tmp_path / "o",
                  fit_images=32, quality_images=8, preset=PRESET, progress=False,
                  log=lambda m: None)  # fmt: skip
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        reproduce(folder, model="test_reproduce:tiny_net", patch=0, out=tmp_path / "o")


# ---------------------------------------------------------------------------- command line
CLI_ARGS = ("--model", "test_reproduce:tiny_net", "--weights", "none", "--fit-images", "24",
            "--val-images", "6", "--quality-images", "8", "--grid-images", "2", "--steps", "4",
            "--batch-size", "8", "--workers", "0", "--preset", "imagenet", "--resize", "36",
            "--crop", "32", "--quiet")  # fmt: skip


def _same_patterns(path, reference):
    got, want = Patterns.load(path), Patterns.load(reference)
    assert got.metadata["images"] == want.metadata["images"] == 24
    for layer in want:
        for name, tensor in want[layer].items():
            # float32 fits: each rank shifts its products by its own first batch
            torch.testing.assert_close(got[layer][name], tensor, rtol=1e-4, atol=1e-5)


def test_command_line_runs_the_same_pipeline(folder, run, tmp_path, capsys):
    from patternnet.cli import main

    _, library_out, _ = run
    code = main(["reproduce", "--imagenet", str(folder), "--out", str(tmp_path), *CLI_ARGS])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["val_images"] == 6
    _same_patterns(tmp_path / "patterns-two_component.safetensors",
                   library_out / "patterns-two_component.safetensors")  # fmt: skip


def test_command_line_errors_are_one_line(tmp_path, capsys):
    from patternnet.cli import main

    code = main(["reproduce", "--imagenet", str(tmp_path), "--out", str(tmp_path / "o"),
                 *CLI_ARGS])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("patternnet reproduce: error:") and "ImageFolder layout" in err


def test_torchrun_shares_the_fit_and_rank_0_writes_the_rest(folder, run, tmp_path):
    import os
    import shutil
    import signal
    import subprocess
    import sys
    from pathlib import Path

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists() or not torch.distributed.is_available():
        pytest.skip("torchrun / torch.distributed not available")
    _, library_out, _ = run
    tests = str(Path(__file__).parent)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([tests, *sys.path]))  # fmt: skip
    process = subprocess.Popen(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "patternnet", "reproduce",
         "--imagenet", str(folder), "--out", str(tmp_path / "out"), *CLI_ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("torchrun reproduce did not finish within 240 s")
    assert process.returncode == 0, stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["processes"] == 2
    _same_patterns(tmp_path / "out" / "patterns-two_component.safetensors",
                   library_out / "patterns-two_component.safetensors")  # fmt: skip
    _same_patterns(tmp_path / "out" / "patterns-linear.safetensors",
                   library_out / "patterns-linear.safetensors")  # fmt: skip
