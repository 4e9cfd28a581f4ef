"""Loading data for fitting, explaining and evaluating: image folders, IDX files, ``.npy``.

Three kinds of source are read, each into a :class:`torch.utils.data.Dataset` of
``(input, label)`` pairs (label ``-1`` where none is known):

- an **image folder**: torchvision's ``ImageFolder`` layout (one sub-folder per class, the
  classes sorted by name) or a flat folder of images (all labelled ``-1``), read lazily with
  Pillow, so an ImageNet-sized folder is never held in memory;
- **IDX files** (the MNIST / Fashion-MNIST format, gzipped or not): a single
  ``*-images-idx3-ubyte[.gz]`` file, or a folder holding ``train-``/``t10k-`` image and label
  files;
- **NumPy** ``.npy`` (inputs only) or ``.npz`` (arrays ``x``/``images`` and optionally
  ``y``/``labels``), ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)``.

Every input goes through a :class:`Preset`: ``uint8`` pixels are scaled to ``[0, 1]``, images
are resized and centre-cropped, and each channel is normalised with ``(x - mean) / std``.
:data:`PRESETS` holds ``"imagenet"`` (what torchvision's classifiers expect: resize 256, crop
224, ImageNet mean/std, RGB) and ``"none"`` (scaling only); every field can be overridden.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .models import _is_file_spec

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGE_SUFFIXES",
    "PRESETS",
    "DataNotFoundError",
    "ImageFiles",
    "Preset",
    "find_fashion_mnist",
    "find_idx",
    "image_paths",
    "load_data",
    "load_fashion_mnist",
    "load_idx",
    "one_per_class",
    "load_image",
    "preset_for",
    "read_idx",
    "weights_preset",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class Preset:
    """How raw pixels become a model's input.

    Parameters
    ----------
    resize:
        Resize so that the shorter side has this many pixels (bilinear); None keeps the size.
    crop:
        Centre-crop a square of this size after resizing; None keeps the whole image.
    mean, std:
        Per-channel normalisation ``(x - mean) / std`` of ``[0, 1]`` pixels; None skips it.
        One value applies to every channel.
    mode:
        Pillow mode images are converted to (``"RGB"``, ``"L"``); None keeps the file's.
    transform:
        A torchvision weights' own ``transforms()`` (see :func:`preset_for`): image files go
        through it (resize with its interpolation and antialiasing, crop, normalise) instead of
        the hand-written steps; ``resize``/``crop``/``mean``/``std`` then describe it.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    mode: str | None = None
    transform: Any = field(default=None, compare=False)

    def normalise(self, x: Tensor) -> Tensor:
        """Apply ``(x - mean) / std`` per channel to ``(C, H, W)`` or ``(N, C, H, W)`` pixels."""
        if self.mean is None and self.std is None:
            return x
        channels = x.shape[-3]
        mean = _per_channel(self.mean or (0.0,), channels, "mean", x)
        std = _per_channel(self.std or (1.0,), channels, "std", x)
        return (x - mean) / std

    def with_overrides(self, **changes: Any) -> Preset:
        """A copy with the given fields replaced (None values leave a field as it is).

        Overriding any field of a preset made from torchvision weights drops their
        ``transform``: the hand-written steps then apply with the overridden values.
        """
        given = {k: v for k, v in changes.items() if v is not None}
        if given and "transform" not in given:
            given["transform"] = None
        return replace(self, **given) if given else self


PRESETS: dict[str, Preset] = {
    "imagenet": Preset(
        resize=256,
        crop=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        mode="RGB",
    ),
    "none": Preset(),
}


def preset_for(model_spec: str | None, weights: str | os.PathLike[str] | None = None) -> Preset:
    """The default preset for a model specification (and its weights).

    For ``torchvision:NAME`` with a torchvision weights name (``"DEFAULT"``,
    ``"IMAGENET1K_V2"``, …): the weights' own ``transforms()`` (ResNet-50 ``IMAGENET1K_V2``
    resizes to 232, EfficientNet-B1 crops 240, …); only the transforms are built, nothing is
    downloaded. Otherwise (random weights, a weights file, or no torchvision) the hand-written
    ImageNet preset (resize 256, crop 224) for ``torchvision:`` models, with a warning when
    the named weights' transforms cannot be read; ``"none"`` for other models.
    """
    if not (model_spec and model_spec.startswith("torchvision:")):
        return PRESETS["none"]
    if weights is None or _is_file_spec(weights):
        return PRESETS["imagenet"]
    name = model_spec.split(":", 1)[1].split("(", 1)[0].strip()
    try:
        from torchvision.models import get_model_weights
    except ImportError:
        warnings.warn(
            f"torchvision is not installed: --weights {weights} of {name} cannot tell its own "
            "preprocessing; using the ImageNet preset (resize 256, crop 224), which differs "
            "for many weights (ResNet-50 IMAGENET1K_V2 resizes to 232)",
            stacklevel=2,
        )
        return PRESETS["imagenet"]
    try:
        transforms = get_model_weights(name)[os.fspath(weights)].transforms()
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"torchvision has no weights {weights!r} for {name}: {error}"
        ) from None
    return weights_preset(transforms)


def weights_preset(transforms: Any) -> Preset:
    """A :class:`Preset` around a torchvision weights' ``transforms()`` object."""
    resize = getattr(transforms, "resize_size", None)
    crop = getattr(transforms, "crop_size", None)
    mean = getattr(transforms, "mean", None)
    std = getattr(transforms, "std", None)
    return Preset(
        resize=int(resize[0]) if resize else None,
        crop=int(crop[0]) if crop else None,
        mean=tuple(float(v) for v in mean) if mean is not None else None,
        std=tuple(float(v) for v in std) if std is not None else None,
        mode="RGB",
        transform=transforms,
    )



def _per_channel(values: Sequence[float], channels: int, what: str, like: Tensor) -> Tensor:
    if len(values) == 1:
        values = tuple(values) * channels
    if len(values) != channels:
        raise ValueError(
            f"the preset's {what} has {len(values)} values but the images have {channels} "
            f"channels; give one value or {channels}"
        )
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]


# ---------------------------------------------------------------------------- IDX files
def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (the MNIST format; gzipped if the name ends in ``.gz``).

    Raises
    ------
    ValueError
        If the file is not IDX (wrong magic number or size).
    """
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (MNIST format): bad magic number")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says shape {shape} but the file holds {len(raw) - offset} bytes "
            "of data; the file is truncated or corrupt"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(folder: str | os.PathLike[str], split: str = "train") -> tuple[Path, Path | None]:
    """Find the ``{split}-images-idx3-ubyte[.gz]`` file (and its labels) in ``folder``.

    Raises
    ------
    FileNotFoundError
        Naming the folder and the file names looked for.
    """
    folder = Path(folder)
    images = labels = None
    for suffix in ("", ".gz"):
        candidate = folder / f"{split}-images-idx3-ubyte{suffix}"
        if images is None and candidate.is_file():
            images = candidate
        candidate = folder / f"{split}-labels-idx1-ubyte{suffix}"
        if labels is None and candidate.is_file():
            labels = candidate
    if images is None:
        raise FileNotFoundError(
            f"no {split}-images-idx3-ubyte[.gz] in {folder}; expected the MNIST/Fashion-MNIST "
            "IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)"
        )
    return images, labels


def load_idx(
    path: str | os.PathLike[str], split: str = "train", preset: Preset | None = None
) -> tuple[Tensor, Tensor]:
    """IDX images as ``(N, 1, H, W)`` floats through ``preset`` and their labels.

    Parameters
    ----------
    path:
        An images file, or a folder holding ``{split}-images-idx3-ubyte[.gz]``.
    split:
        ``"train"`` or ``"t10k"`` (the test split), when ``path`` is a folder.
    preset:
        Scaling/normalisation (default: pixels in ``[0, 1]``).

    Returns
    -------
    (images, labels)
        Labels are ``-1`` if no labels file is found beside the images.
    """
    path = Path(path)
    if path.is_dir():
        image_file, label_file = find_idx(path, split)
    else:
        image_file = path
        name = path.name.replace("images-idx3", "labels-idx1")
        label_file = path.with_name(name) if name != path.name else None
        if label_file is not None and not label_file.is_file():
            label_file = None
    array = read_idx(image_file)
    if array.ndim == 2:
        array = array[None]
    images = _to_float(array[:, None] if array.ndim == 3 else array)
    images = (preset or PRESETS["none"]).normalise(images)
    if label_file is not None:
        labels = torch.from_numpy(read_idx(label_file).astype(np.int64))
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{label_file} holds {labels.shape[0]} labels for {images.shape[0]} images"
            )
    else:
        labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
    return images, labels


# ---------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
#: Fashion-MNIST's training-set pixel mean and standard deviation (pixels in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
_HOW_TO_GET_FASHION_MNIST = """\
Fashion-MNIST was not found (looked in: {looked}).
Get the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in one of these ways:
  - Debian/Ubuntu:  sudo apt-get install dataset-fashion-mnist   (then run the demo again)
  - download them from https://github.com/zalandoresearch/fashion-mnist (data/fashion/)
    into a folder and run:  patternnet demo --data FOLDER
  - with torchvision and internet access:
      python -c "import torchvision; torchvision.datasets.FashionMNIST('data', download=True)"
    then:  patternnet demo --data data/FashionMNIST/raw"""


class DataNotFoundError(FileNotFoundError):
    """A data set could not be found; the message says how to get it."""


def find_fashion_mnist(data: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files (train and t10k).

    Looks in ``data`` (also its ``FashionMNIST/raw`` and ``raw`` sub-folders, torchvision's
    layout), else in ``$PATTERNNET_DATA``, ``/usr/share/datasets/fashion-mnist`` (the Debian
    package ``dataset-fashion-mnist``) and ``~/.cache/patternnet/fashion-mnist``.

    Raises
    ------
    DataNotFoundError
        With instructions to get the data.
    """
    if data is not None:
        roots = [Path(data)]
    else:
        roots = [FASHION_MNIST_SYSTEM, Path.home() / ".cache" / "patternnet" / "fashion-mnist"]
        if os.environ.get("PATTERNNET_DATA"):
            roots.insert(0, Path(os.environ["PATTERNNET_DATA"]))
    looked = []
    for root in roots:
        for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
            looked.append(str(folder))
            try:
                find_idx(folder, "train")
                find_idx(folder, "t10k")
            except (FileNotFoundError, OSError):
                continue
            return folder
    raise DataNotFoundError(_HOW_TO_GET_FASHION_MNIST.format(looked=", ".join(looked[:3])))


def load_fashion_mnist(
    data: str | os.PathLike[str] | None = None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Path]:
    """Fashion-MNIST normalised with its training-set mean and standard deviation.

    Parameters
    ----------
    data:
        A folder with the IDX files, or None to search (:func:`find_fashion_mnist`).

    Returns
    -------
    (train_images, train_labels), (test_images, test_labels), folder
        Images ``(N, 1, 28, 28)`` float32, ``(x - 0.2860) / 0.3530``; the folder read.

    Raises
    ------
    DataNotFoundError
        If the files cannot be found (the message says how to get them).
    """
    folder = find_fashion_mnist(data)
    train_x, train_y = load_idx(folder, "train")
    test_x, test_y = load_idx(folder, "t10k")
    train_x = (train_x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    test_x = (test_x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return (train_x, train_y), (test_x, test_y), folder


def one_per_class(labels: Tensor, count: int, classes: int | None = None) -> Tensor:
    """Indices of the first sample of each class, classes in order, ``count`` of them.

    Falls back to the first ``count`` samples when fewer than ``count`` classes occur.
    ``classes`` bounds the class indices looked at (default: ``labels.max() + 1``).
    """
    classes = int(labels.max()) + 1 if classes is None and labels.numel() else classes or 0
    picks: list[int] = []
    for cls in range(classes):
        hits = (labels == cls).nonzero()
        if hits.numel():
            picks.append(int(hits[0]))
        if len(picks) == count:
            break
    if len(picks) < count:
        picks = list(range(min(count, labels.shape[0])))
    return torch.tensor(picks, dtype=torch.long)


def _to_float(array: np.ndarray) -> Tensor:
    """uint8 pixels → float32 in [0, 1]; other numbers → float32 (always a fresh copy)."""
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32)) / 255.0
    return torch.from_numpy(np.array(array, dtype=np.float32))


# ---------------------------------------------------------------------------- images
def load_image(path: str | os.PathLike[str], preset: Preset | None = None) -> Tensor:
    """Read one image with Pillow into a ``(C, H, W)`` float tensor through ``preset``."""
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - pillow is in the viz extra
        raise ImportError(
            "reading images needs Pillow: pip install 'patternnet[viz]'"
        ) from error
    preset = preset or PRESETS["none"]
    with Image.open(path) as image:
        image.load()
        if preset.transform is not None:  # the weights' own preprocessing, exactly
            return preset.transform(image.convert(preset.mode or "RGB"))
        if preset.mode is not None and image.mode != preset.mode:
            image = image.convert(preset.mode)
        elif image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        if preset.resize is not None:
            width, height = image.size
            scale = preset.resize / min(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
        if preset.crop is not None:
            width, height = image.size
            crop = preset.crop
            if crop > width or crop > height:
                raise ValueError(
                    f"{path}: cannot crop {crop}×{crop} from a {width}×{height} image; set a "
                    "resize of at least the crop size"
                )
            left = (width - crop) // 2
            top = (height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = _to_float(array.transpose(2, 0, 1))
    return preset.normalise(tensor)


def image_paths(folder: str | os.PathLike[str]) -> tuple[list[Path], list[int], list[str]]:
    """The images of a folder: ImageFolder layout (class sub-folders) or flat.

    Returns
    -------
    (paths, labels, classes)
        Sorted paths; labels index ``classes`` (sub-folder names, sorted) or are ``-1`` for a
        flat folder.

    Raises
    ------
    FileNotFoundError
        If the folder holds no image files.
    """
    folder = Path(folder)
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    if subfolders:
        for sub in subfolders:
            files = _images_in(sub, recursive=True)
            if files:
                labels += [len(classes)] * len(files)
                classes.append(sub.name)
                paths += files
    flat = _images_in(folder, recursive=False)
    if flat and not paths:
        paths, labels = flat, [-1] * len(flat)
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} or its class sub-folders"
        )
    return paths, labels, classes


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFiles(Dataset):
    """Images read lazily with Pillow, as ``(tensor, label)`` pairs (see :func:`load_image`).

    Parameters
    ----------
    paths:
        Image files.
    labels:
        One integer per path (``-1`` = unknown); default all ``-1``.
    preset:
        Resizing/normalisation; images of different sizes need ``crop`` to be batched.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | None = None,
        preset: Preset | None = None,
        classes: Sequence[str] = (),
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} images")
        self.preset = preset or PRESETS["none"]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return load_image(self.paths[index], self.preset), self.labels[index]


# ---------------------------------------------------------------------------- numpy
def _load_numpy(path: Path, preset: Preset) -> TensorDataset:
    labels = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            key = next((k for k in ("x", "images", "inputs") if k in archive), None)
            if key is None:
                raise ValueError(
                    f"{path} holds arrays {sorted(archive.files)}; name the inputs 'x' or "
                    "'images' (and the labels 'y' or 'labels')"
                )
            array = archive[key]
            label_key = next((k for k in ("y", "labels") if k in archive), None)
            if label_key is not None:
                labels = torch.from_numpy(archive[label_key].astype(np.int64))
    else:
        array = np.load(path, allow_pickle=False)
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if array.ndim < 2:
        raise ValueError(f"{path} has shape {array.shape}; expected (N, ...) inputs")
    inputs = _to_float(array)
    if inputs.dim() == 4:
        inputs = preset.normalise(inputs)
    if labels is None:
        labels = torch.full((inputs.shape[0],), -1, dtype=torch.int64)
    return TensorDataset(inputs, labels)


# ---------------------------------------------------------------------------- any source
def load_data(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    preset: Preset | None = None,
    *,
    split: str = "train",
) -> Dataset:
    """Open any supported source as a dataset of ``(input, label)`` pairs.

    Parameters
    ----------
    source:
        An image folder (ImageFolder layout or flat), an IDX images file or a folder of IDX
        files, a ``.npy``/``.npz`` file, a single image file, or a list of image files.
    preset:
        Resizing and normalisation (default :data:`PRESETS` ``"none"``: pixels in ``[0, 1]``).
    split:
        Which IDX split a folder of IDX files gives (``"train"`` or ``"t10k"``).

    Returns
    -------
    Dataset
        :class:`ImageFiles` for images (read lazily; torchvision's ``ImageFolder`` for a
        class-folder layout with a preset from torchvision weights) or a ``TensorDataset``.

    Raises
    ------
    FileNotFoundError
        If ``source`` does not exist or holds nothing readable.
    ValueError
        For unreadable files, naming the problem.
    """
    preset = preset or PRESETS["none"]
    if not isinstance(source, (str, os.PathLike)):
        return ImageFiles(list(source), preset=preset)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data {str(path)!r} does not exist")
    name = path.name
    if path.is_file():
        if path.suffix in (".npy", ".npz"):
            return _load_numpy(path, preset)
        if "idx" in name and ("ubyte" in name or name.endswith(".gz")):
            return TensorDataset(*load_idx(path, preset=preset))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageFiles([path], preset=preset)
        raise ValueError(
            f"cannot read {path}: expected an image folder, IDX file, .npy/.npz or image"
        )
    if any(path.glob("*-images-idx3-ubyte*")):
        return TensorDataset(*load_idx(path, split, preset))
    paths, labels, classes = image_paths(path)
    if preset.transform is not None and classes:
        # a torchvision weights' preset: torchvision's own ImageFolder with its transforms()
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(path), transform=preset.transform, allow_empty=True)
    return ImageFiles(paths, labels, preset, classes)
