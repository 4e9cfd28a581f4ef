"""Loading data: IDX files, image folders, NumPy arrays and the preprocessing presets."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from patternnet.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    PRESETS,
    DataNotFoundError,
    ImageFiles,
    Preset,
    find_fashion_mnist,
    find_idx,
    image_paths,
    load_data,
    load_fashion_mnist,
    load_idx,
    load_image,
    one_per_class,
    preset_for,
    read_idx,
)


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(dtype).tobytes()
    if compress:
        raw = gzip.compress(raw)
    path.write_bytes(raw)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((5, 4, 3)) * 200).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(b"\x89PNG not idx at all")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    write_idx(path, np.zeros((3, 2, 2), np.uint8), False)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def make_mnist_folder(folder, n=6, compress=True):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if compress else ""
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


def test_load_idx_folder_and_file(tmp_path):
    images, labels = make_mnist_folder(tmp_path)
    x, y = load_idx(tmp_path, "t10k")
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255)
    assert y.tolist() == labels.tolist()
    # a single images file finds its labels beside it
    x2, y2 = load_idx(tmp_path / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(x2, x)
    assert y2.tolist() == labels.tolist()
    # normalisation by a preset
    x3, _ = load_idx(tmp_path, preset=Preset(mean=(0.5,), std=(0.25,)))
    torch.testing.assert_close(x3, (x - 0.5) / 0.25)


def test_find_idx_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        find_idx(tmp_path)
    make_mnist_folder(tmp_path, compress=False)
    images, labels = find_idx(tmp_path, "train")
    assert images.name == "train-images-idx3-ubyte" and labels is not None


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_layouts(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("cat", "dog"):
        for i in range(3):
            pixels = rng.integers(0, 256, (9, 7, 3), np.uint8)
            save_png(tmp_path / "tree" / cls / f"{i}.png", pixels)
    paths, labels, classes = image_paths(tmp_path / "tree")
    assert classes == ["cat", "dog"] and labels == [0, 0, 0, 1, 1, 1] and len(paths) == 6
    for i in range(2):
        save_png(tmp_path / "flat" / f"{i}.jpg", rng.integers(0, 256, (9, 7), np.uint8))
    paths, labels, classes = image_paths(tmp_path / "flat")
    assert len(paths) == 2 and labels == [-1, -1] and classes == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        image_paths(tmp_path / "empty")
    dataset = load_data(tmp_path / "tree")
    assert isinstance(dataset, ImageFiles) and len(dataset) == 6
    x, y = dataset[4]
    assert x.shape == (3, 9, 7) and y == 1


def test_load_image_preset_resize_crop_normalise(tmp_path):
    array = np.zeros((40, 60, 3), np.uint8)
    array[:, :, 0] = 255
    save_png(tmp_path / "red.png", array)
    x = load_image(tmp_path / "red.png", PRESETS["imagenet"].with_overrides(resize=32, crop=24))
    assert x.shape == (3, 24, 24)
    mean, std = PRESETS["imagenet"].mean, PRESETS["imagenet"].std
    expected = torch.tensor([(1 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected.float(), atol=1e-5, rtol=0)
    grey = load_image(tmp_path / "red.png", Preset(mode="L"))
    assert grey.shape == (1, 40, 60)
    with pytest.raises(ValueError, match="cannot crop"):
        load_image(tmp_path / "red.png", Preset(crop=50))


def test_preset_channel_mismatch_is_clear():
    with pytest.raises(ValueError, match="3 values but the images have 1 channels"):
        PRESETS["imagenet"].normalise(torch.zeros(1, 4, 4))


def test_preset_for_model_specs():
    assert preset_for("torchvision:vgg16") == PRESETS["imagenet"]
    assert preset_for("my.models:net") == PRESETS["none"]


def test_numpy_layouts(tmp_path):
    nhwc = np.arange(2 * 5 * 6 * 3, dtype=np.uint8).reshape(2, 5, 6, 3)
    np.save(tmp_path / "nhwc.npy", nhwc)
    x, y = load_data(tmp_path / "nhwc.npy")[1]
    assert x.shape == (3, 5, 6) and y == -1
    torch.testing.assert_close(x, torch.from_numpy(nhwc[1].transpose(2, 0, 1)).float() / 255)
    np.save(tmp_path / "nhw.npy", np.ones((4, 5, 6), np.float32))
    assert load_data(tmp_path / "nhw.npy")[0][0].shape == (1, 5, 6)
    np.savez(tmp_path / "xy.npz", x=np.zeros((3, 1, 4, 4), np.float32), y=np.array([2, 0, 1]))
    dataset = load_data(tmp_path / "xy.npz")
    assert [int(dataset[i][1]) for i in range(3)] == [2, 0, 1]
    np.savez(tmp_path / "bad.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="name the inputs 'x'"):
        load_data(tmp_path / "bad.npz")


def test_load_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read"):
        load_data(tmp_path / "notes.txt")


# ---------------------------------------------------------------- torchvision weights' own
def test_weights_bring_their_own_preprocessing(tmp_path) -> None:
    """ResNet-50 IMAGENET1K_V2 resizes to 232, EfficientNet-B1 crops 240: each gets its own
    transforms() (built without downloading the weights), bit for bit on an image file."""
    models = pytest.importorskip("torchvision.models")

    from patternnet.data import PRESETS, load_image, preset_for

    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (300, 370, 3), dtype=np.uint8)).save(path)
    cases = {
        ("resnet50", "IMAGENET1K_V2"): (232, 224, models.ResNet50_Weights.IMAGENET1K_V2),
        ("resnet50", "IMAGENET1K_V1"): (256, 224, models.ResNet50_Weights.IMAGENET1K_V1),
        ("efficientnet_b1", "DEFAULT"): (255, 240, models.EfficientNet_B1_Weights.DEFAULT),
        ("vit_b_16", "IMAGENET1K_V1"): (256, 224, models.ViT_B_16_Weights.IMAGENET1K_V1),
    }
    for (name, weights), (resize, crop, enum) in cases.items():
        preset = preset_for(f"torchvision:{name}", weights)
        assert (preset.resize, preset.crop) == (resize, crop), (name, weights)
        image = load_image(path, preset)
        with Image.open(path) as raw:
            expected = enum.transforms()(raw.convert("RGB"))
        assert image.shape == (3, crop, crop)
        assert torch.equal(image, expected)
    # no weights, a weights file: the hand-written ImageNet preset
    assert preset_for("torchvision:resnet50") == PRESETS["imagenet"]
    assert preset_for("torchvision:resnet50", tmp_path / "w.pth") == PRESETS["imagenet"]
    with pytest.raises(ValueError, match="no weights 'IMAGENET9K'"):
        preset_for("torchvision:resnet50", "IMAGENET9K")
    # an override drops the weights' transform: the hand-written steps with the new size
    smaller = preset_for("torchvision:resnet50", "IMAGENET1K_V2").with_overrides(crop=200)
    assert smaller.transform is None and load_image(path, smaller).shape == (3, 200, 200)


def test_without_torchvision_the_preset_warns(monkeypatch) -> None:
    import builtins

    from patternnet.data import PRESETS, preset_for

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("no torchvision here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.warns(UserWarning, match="resizes to 232"):
        assert preset_for("torchvision:resnet50", "IMAGENET1K_V2") == PRESETS["imagenet"]


def test_cli_preset_follows_the_weights_and_warns_on_a_different_preset(capsys) -> None:
    pytest.importorskip("torchvision")
    import argparse

    from patternnet.cli import common

    options = dict(model="torchvision:resnet50", weights="IMAGENET1K_V2", preset=None,
                   resize=None, crop=None, mean=None, std=None, mode=None)
    own = common.preset(argparse.Namespace(**options))
    assert (own.resize, own.crop, own.transform is not None) == (232, 224, True)
    assert "warning" not in capsys.readouterr().err
    forced = common.preset(argparse.Namespace(**dict(options, preset="imagenet")))
    assert (forced.resize, forced.crop, forced.transform) == (256, 224, None)
    assert "differs from the preprocessing of --weights IMAGENET1K_V2" in capsys.readouterr().err
    random = common.preset(argparse.Namespace(**dict(options, weights="none")))
    assert (random.resize, random.crop) == (256, 224)


def test_weights_preset_reads_class_folders_with_torchvision_image_folder(tmp_path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    from torchvision.models import ResNet50_Weights

    from patternnet.data import load_data, preset_for

    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.fromarray(rng.integers(0, 256, (250, 260, 3), dtype=np.uint8)).save(
            tmp_path / label / "a.png")
    data = load_data(tmp_path, preset_for("torchvision:resnet50", "IMAGENET1K_V2"))
    assert isinstance(data, datasets.ImageFolder) and data.classes == ["cat", "dog"]
    image, label = data[1]
    with Image.open(tmp_path / "dog" / "a.png") as raw:
        expected = ResNet50_Weights.IMAGENET1K_V2.transforms()(raw.convert("RGB"))
    assert label == 1 and torch.equal(image, expected)


def test_fashion_mnist_is_found_in_torchvision_layout_and_normalised(tmp_path, monkeypatch):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = make_mnist_folder(raw)
    assert find_fashion_mnist(tmp_path / "tv") == raw
    monkeypatch.setenv("PATTERNNET_DATA", str(tmp_path / "tv"))
    assert find_fashion_mnist() == raw
    (train_x, train_y), (test_x, test_y), folder = load_fashion_mnist(tmp_path / "tv")
    assert folder == raw and train_x.shape == (6, 1, 28, 28) and test_y.tolist() == labels.tolist()
    pixels = torch.from_numpy(images).double()[:, None] / 255
    expected = (pixels - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(train_x.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path / "empty")
    assert issubclass(DataNotFoundError, FileNotFoundError)


def test_one_per_class_takes_the_first_of_each_class_in_class_order():
    labels = torch.tensor([3, 1, 1, 0, 3, 2, 0])
    assert one_per_class(labels, 3).tolist() == [3, 1, 5]
    assert one_per_class(labels, 4).tolist() == [3, 1, 5, 0]
    # fewer classes than asked for: the first samples instead
    assert one_per_class(labels, 5).tolist() == [0, 1, 2, 3, 4]
    assert one_per_class(labels, 2, classes=2).tolist() == [3, 1]
