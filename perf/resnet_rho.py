"""ρ(S) for every neuron kind of a small ResNet trained on Fashion-MNIST, sums and pools included.

``python -m perf.resnet_rho`` (about half an hour of one CPU core, most of it training; the
trained weights are cached, by default in ``~/.cache/patternnet/resnet_rho``, ``--cache``
elsewhere, and a second run only measures). The network: a 3×3 stem conv
(BatchNorm, ReLU), a basic block, a downsampling basic block whose shortcut is ResNet-D's
(a 2×2 average pool, then a 1×1 conv), global average pooling and a Linear classifier. Its
neurons: convolutions (stem, in blocks, shortcut), the Linear output layer, two residual
sums, one average pool and the global mean. ρ(S) (method.md §5) per layer
(:func:`patternnet.evaluate.estimator_quality`) and per node
(:func:`patternnet.evaluate.node_quality.node_quality`), filter / linear / two-component
estimators, patterns, regression and evaluation on three disjoint test-set splits; mean over
units ± standard error. Trained on all 60 000 Fashion-MNIST training images with Adam and a
one-cycle learning-rate schedule; accuracy on the full 10 000-image test set (the ρ splits
are three disjoint slices of it). Writes ``perf/results/resnet_rho.json`` and prints the
Markdown table of the README and docs/method.md §10.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import patternnet as pn
from patternnet.data import read_idx
from patternnet.evaluate import estimator_quality
from patternnet.evaluate.node_quality import filter_node_patterns, node_quality
from patternnet.training import accuracy, cached_model, train_classifier

from .common import RESULTS, machine

FASHION = "/usr/share/datasets/fashion-mnist"
ESTIMATORS = ("filter", "linear", "two_component")
#: Bumped whenever the network or its training changes, so that a cached model is retrained.
MODEL_VERSION = 2
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "patternnet" / "resnet_rho"


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(cin, cout, 1, bias=False),
                                      nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16), Block(16, 32, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )  # fmt: skip


def fashion(n: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    x = read_idx(f"{FASHION}/{prefix}-images-idx3-ubyte.gz")[:n].astype(np.float32) / 255.0
    y = read_idx(f"{FASHION}/{prefix}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    return (torch.from_numpy(x)[:, None] - 0.286) / 0.353, torch.from_numpy(y)


def kind_of(name: str, model: nn.Module) -> str:
    if "#" in name:
        return {"sum": "residual sum", "pool": "average pool", "mean": "global mean"}[
            name.partition("#")[0]]
    module = model.get_submodule(name)
    if isinstance(module, nn.Linear):
        return "Linear"
    return "Conv {}×{}".format(*module.kernel_size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60000, help="training images")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-lr", type=float, default=4e-3,
                        help="peak of the one-cycle learning-rate schedule (Adam)")  # fmt: skip
    parser.add_argument("--split", type=int, default=1000, help="images per ρ split")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the trained model is kept")
    args = parser.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    start = time.time()
    x, y = fashion(args.train, True)
    xt, yt = fashion(10000, False)
    key = {"version": MODEL_VERSION, "train": args.train, "epochs": args.epochs,
           "batch_size": args.batch_size, "max_lr": args.max_lr}  # fmt: skip

    def train(model: nn.Module) -> float:
        train_classifier(model, x, y, epochs=args.epochs, max_lr=args.max_lr,
                         batch_size=args.batch_size, seed=0)  # fmt: skip
        return accuracy(model, xt, yt)

    model, acc, cached = cached_model(args.cache, key, small_resnet, train)
    trained = time.time() - start
    print(f"model {'loaded from ' + str(args.cache) if cached else 'trained'} ({trained:.0f} s): "
          f"test accuracy {acc:.4f} on 10 000 images")  # fmt: skip
    fit, reg, ev = (xt[i * args.split:(i + 1) * args.split] for i in range(3))
    # negative=True: the two-component estimator with both halves (the default fit leaves a₋
    # out where a ReLU gate reads the layer; estimator_quality would score a₊ on both sides)
    patterns = {e: pn.fit_patterns(model, fit, estimator=e, negative=True, progress=False)
                for e in ("linear", "two_component")}  # fmt: skip
    layers = estimator_quality(model, fit, reg, ev, estimators=ESTIMATORS, patterns=patterns,
                               positions=8, seed=0)  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for record in layers.to_records():
        rows.setdefault(record["layer"], {})[record["estimator"]] = [record["rho"],
                                                                     record["stderr"]]
    nodes = node_quality(model, {"filter": filter_node_patterns(patterns["linear"]), **patterns},
                         reg, ev, positions=8, seed=0)  # fmt: skip
    for name, by_estimator in nodes.items():
        rows[name] = {e: [v["rho"], v["stderr"]] for e, v in by_estimator.items()}
    table = ["| neuron | kind | filter | linear | two-component |", "|---|---|---|---|---|"]
    for name, by_estimator in rows.items():
        cells = [f"{by_estimator[e][0]:.3f} ± {by_estimator[e][1]:.3f}" for e in ESTIMATORS]
        table.append(f"| `{name}` | {kind_of(name, model)} | " + " | ".join(cells) + " |")
    seconds = time.time() - start
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"accuracy": acc, "rho": rows, "table": table, "settings": settings,
              "threads": threads, "cached_model": cached, "train_seconds": trained,
              "seconds": seconds, "machine": machine()}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "resnet_rho.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
    print(f"settings: {args.train} training images, {args.epochs} epochs, batch {args.batch_size}, "
          f"one-cycle Adam to {args.max_lr:g}; ρ splits of {args.split} test images "
          f"(fit / regression / evaluation), 8 positions per image; {threads} thread(s)")
    print(f"test accuracy {acc:.4f}; {seconds:.0f} s in all ({trained:.0f} s "
          f"{'loading' if cached else 'training'})")  # fmt: skip
    print("\n".join(table))
    return result


if __name__ == "__main__":
    main()
