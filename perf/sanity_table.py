"""The README's sanity table: every registered method against every check of
:mod:`patternnet.evaluate.sanity`, on a small CNN trained on Fashion-MNIST.

Setting (printed with the table): conv(1→8, 5×5, no padding) – ReLU – maxpool 2 –
conv(8→16, 3×3) – ReLU – maxpool 2 – dense 400→64 – ReLU – dense 64→10, trained for 2 epochs on
the first 12 000 training images (seed 0); patterns fitted on 4 000 other training images;
64 test images explained; shift +1.0 for input invariance. The first layer does not pad, so
its bias can compensate the shift exactly (Kindermans et al. 2019).

Usage::

    PYTHONPATH=src python perf/sanity_table.py [--data DIR] [--out DIR]

Writes ``sanity.md``, ``sanity.json`` and ``sanity.png`` to ``--out`` (default
``sanity-output``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from patternnet.data import load_idx
from patternnet.demo import accuracy, find_fashion_mnist, train_classifier
from patternnet.evaluate.sanity import sanity_checks


def small_cnn() -> nn.Module:
    """The network of the table (first layer unpadded, see the module docstring)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--out", default="sanity-output", help="output folder")
    parser.add_argument("--images", type=int, default=64, help="test images explained (64)")
    args = parser.parse_args()
    started = time.perf_counter()
    folder = find_fashion_mnist(args.data)
    x, y = load_idx(folder, "train")
    xt, yt = load_idx(folder, "t10k")
    torch.manual_seed(0)
    model = train_classifier(small_cnn(), x[:12000], y[:12000], epochs=2, seed=0)
    model.eval()
    acc = accuracy(model, xt, yt)
    setting = (f"small CNN (conv5-pool-conv3-pool-64-10, unpadded first layer) trained 2 epochs "
               f"on 12 000 Fashion-MNIST images, test accuracy {acc:.1%}; patterns fitted on "
               f"4 000 other training images; {args.images} test images")  # fmt: skip
    result = sanity_checks(model, xt[: args.images], fit_data=x[12000:16000], shift=1.0,
                           seed=0, setting=setting)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = result.to_markdown()
    (out / "sanity.md").write_text(text)
    (out / "sanity.json").write_text(json.dumps(result.to_records(), indent=1, default=str))
    try:
        result.plot(out / "sanity.png")
    except ImportError:
        pass
    print(text)
    print(f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
