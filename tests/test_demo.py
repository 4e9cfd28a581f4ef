"""The built-in demo's pipeline on a reduced setting: synthetic IDX data, a short epoch."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from patternnet.demo import (
    DemoConfig,
    DemoDataError,
    demo_model,
    find_fashion_mnist,
    run_demo,
)
from patternnet.training import accuracy, train_classifier


def _write_idx(path, array):
    code = 0x08
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def synthetic_fashion(folder, n_train=400, n_test=120, seed=0):
    """Fashion-MNIST-shaped IDX files: class c is a bright bar on row band c, plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 230
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return synthetic_fashion(tmp_path_factory.mktemp("fashion"))


def small_config(data, out, **overrides):
    settings = dict(
        data=data, out=out, epochs=1, train_limit=400, fit_limit=200, test_limit=120,
        n_images=3, eval_samples=60, quality_neurons=8, quality_positions=4,
        degradation_images=8, progress=False, threads=1, log=lambda message: None,
    )  # fmt: skip
    settings.update(overrides)
    return DemoConfig(**settings)


def test_demo_pipeline_writes_figures_and_summary(fake_data, tmp_path):
    out = tmp_path / "demo-output"
    summary = run_demo(small_config(fake_data, out))
    for name in ("explanations.png", "summary.md", "model.safetensors", "patterns.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "explanations.png").stat().st_size > 10_000
    assert not summary["model_cached"]
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["fit_images"] == 200
    table = summary["quality"]
    assert table.layers == ["conv1", "conv2", "fc1", "fc2"]
    assert table.estimators == ["random", "filter", "linear", "two_component"]
    text = (out / "summary.md").read_text()
    assert "test accuracy" in text and "| conv2 |" in text
    assert summary["files"]["degradation"].is_file()
    assert len(summary["aopc"]) == 5 and "random order" in summary["aopc"]
    assert all(-1.0 <= value <= 1.0 for value in summary["aopc"].values())
    assert "AOPC" in text
    difference = summary["aopc_difference"]
    assert difference.a.startswith("PatternAttribution") and difference.b.startswith("LRP-z")
    assert difference.interval.low <= difference.difference <= difference.interval.high
    assert "paired bootstrap" in text and "95% CI" in text
    # a second run takes the model and the patterns from the cache
    again = run_demo(small_config(fake_data, out))
    assert again["model_cached"] and again["patterns_cached"]
    assert again["accuracy"] == summary["accuracy"]
    # a different training setting is not served from the stale cache
    third = run_demo(small_config(fake_data, out, train_limit=300))
    assert not third["model_cached"]


def test_training_learns_the_synthetic_classes(fake_data):
    from patternnet.data import load_idx

    torch.manual_seed(0)
    x, y = load_idx(fake_data, "train")
    xt, yt = load_idx(fake_data, "t10k")
    model = train_classifier(demo_model(), x, y, epochs=3, batch_size=32)
    assert accuracy(model, xt, yt) > 0.8
    assert demo_model()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_find_fashion_mnist_layouts_and_message(tmp_path, fake_data):
    assert find_fashion_mnist(fake_data) == fake_data
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in fake_data.iterdir():
        (raw / path.name).write_bytes(path.read_bytes())
    assert find_fashion_mnist(tmp_path / "tv") == raw
    with pytest.raises(DemoDataError) as error:
        find_fashion_mnist(tmp_path / "empty")
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data" in message


def test_quick_config_is_small():
    config = DemoConfig.quick()
    assert config.epochs == 1 and config.train_limit <= 5000 and config.fit_limit <= 2000


def test_demo_command_quick_run(fake_data, tmp_path, capsys, monkeypatch):
    """The command's wiring (the pipeline itself is tested above): --quick, --data, --out."""
    from patternnet.cli import main

    def smaller_quick(cls, **overrides):
        assert overrides["data"] == fake_data and overrides["progress"] is False
        small = small_config(None, None)
        settings = {k: getattr(small, k) for k in ("train_limit", "fit_limit", "test_limit",
                    "eval_samples", "quality_neurons", "quality_positions",
                    "degradation_images")}  # fmt: skip
        settings.update(overrides)
        return cls(epochs=1, **settings)

    monkeypatch.setattr(DemoConfig, "quick", classmethod(smaller_quick))
    out = tmp_path / "o"
    code = main(["demo", "--data", str(fake_data), "--out", str(out), "--quick", "--quiet",
                 "--threads", "1"])  # fmt: skip
    assert code == 0
    assert "demo done" in capsys.readouterr().out
    for name in ("explanations.png", "degradation.png", "summary.md"):
        assert (out / name).is_file(), name


def test_vit_variant_writes_the_same_figures_with_rho_errors(fake_data, tmp_path):
    out = tmp_path / "vit"
    summary = run_demo(small_config(fake_data, out, model="vit", quality_splits=2,
                                    eval_samples=40))  # fmt: skip
    for name in ("explanations.png", "quality.png", "degradation.png", "report.html",
                 "summary.md"):  # fmt: skip
        assert (out / name).is_file(), name
    table = summary["quality"]
    assert "blocks.0.self_attn.in_proj" in table.layers and "head" in table.layers
    assert table.layers[0] == "patch_embedding"
    assert all(info["splits"] == 2 for info in table.info.values())
    assert float(table.stderr.max()) > 0
    assert len(summary["aopc"]) == 5
    text = (out / "summary.md").read_text()
    assert "self_attn.out_proj" in text and "±" in text
    with pytest.raises(ValueError, match="model must be one of"):
        run_demo(small_config(fake_data, tmp_path / "x", model="resnet"))


def test_demo_command_vit_settings(monkeypatch, tmp_path):
    """--model vit picks the ViT variant's settings and output folder; --out still wins."""
    from patternnet import demo as demo_module
    from patternnet.cli import main

    seen = []

    def fake_run(config):
        seen.append(config)
        return {"timings": {"total": 0.0}}

    monkeypatch.setattr("patternnet.cli.demo.run_demo", fake_run)
    assert main(["demo", "--model", "vit", "--quiet"]) == 0
    vit = demo_module.DemoConfig.vit()
    assert seen[-1].model == "vit" and seen[-1].out == vit.out
    assert seen[-1].fit_limit == vit.fit_limit and seen[-1].quality_splits == vit.quality_splits
    assert main(["demo", "--model", "vit", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    assert seen[-1].out == tmp_path and seen[-1].fit_limit == DemoConfig.quick().fit_limit
    assert main(["demo", "--quiet"]) == 0
    assert seen[-1].model == "cnn" and seen[-1].out == DemoConfig().out
