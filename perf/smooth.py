"""GELU/SiLU: the gradient's f′(z) against a gate at z > 0 (method.md §10), by measurement.

``python -m perf.smooth`` (a few minutes of one CPU core). Two measurements:

1. ρ(S) (method.md §5, :func:`patternnet.evaluate.estimator_quality`) of the layers feeding
   the activation, linear pattern (what the derivative rule uses) against the two-component
   split at z > 0 (what the gate uses), on a Conv-act-pool-Conv-act-pool-Linear-act-Linear
   net with GELU and with SiLU trained on Fashion-MNIST.
2. Ground truth: signal recovery of PatternNet and PatternAttribution with
   ``smooth="gate"`` and ``smooth="derivative"`` on the same nets trained on XAI-TRIS-style
   tetrominoes (:func:`patternnet.groundtruth.tetromino_simple`, additive and multiplicative
   signal, correlated background) and on Wilming et al.'s suppressor data (an MLP): cosine to
   the signal, top-k precision and mass on the suppressor, mean ± standard error over images.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import patternnet as pn
from patternnet.data import read_idx
from patternnet.evaluate import estimator_quality, region_mass, signal_cosine, topk_precision
from patternnet.groundtruth import tetromino_simple, wilming_suppressor
from patternnet.training import accuracy, train_classifier

from .common import RESULTS, machine

FASHION = "/usr/share/datasets/fashion-mnist"
ACTIVATIONS = {"GELU": nn.GELU, "SiLU": nn.SiLU}


def cnn(act: type[nn.Module], channels: int = 1, size: int = 28, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    side = size // 4
    return nn.Sequential(
        nn.Conv2d(channels, 16, 5, padding=2), act(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), act(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * side * side, 64), act(), nn.Linear(64, classes),
    )  # fmt: skip


def mlp(act: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), act(), nn.Linear(32, 32), act(),
                         nn.Linear(32, 2))  # fmt: skip


def fashion(n: int, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    x = read_idx(f"{FASHION}/{prefix}-images-idx3-ubyte.gz")[:n].astype(np.float32) / 255.0
    y = read_idx(f"{FASHION}/{prefix}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    return (torch.from_numpy(x)[:, None] - 0.286) / 0.353, torch.from_numpy(y)


def mean_err(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return float(values.mean()), float(values.std() / values.numel() ** 0.5)


def rho(args: Any) -> dict[str, Any]:
    x, y = fashion(args.train)
    xt, yt = fashion(2000, train=False)
    out = {}
    for name, act in ACTIVATIONS.items():
        start = time.time()
        model = train_classifier(cnn(act), x, y, epochs=args.epochs, lr=2e-3, batch_size=128)
        acc = accuracy(model, xt, yt)
        table = estimator_quality(model, xt[:700], xt[700:1400], xt[1400:2000],
                                  estimators=("linear", "two_component"), max_neurons=32,
                                  positions=4, seed=0)  # fmt: skip
        rows = {}
        for record in table.to_records():
            rows.setdefault(record["layer"], {})[record["estimator"]] = (
                record["rho"], record["stderr"])
        out[name] = {"accuracy": acc, "rho": rows, "seconds": time.time() - start}
        print(name, f"accuracy {acc:.3f}", json.dumps(rows))
    return out


def explain_metrics(model: nn.Module, patterns: pn.Patterns, test: Any, smooth: str,
                    suppressor: bool, scale: float) -> dict[str, Any]:
    result = {}
    for method in (pn.PatternNet, pn.PatternAttribution):
        target = test.targets
        e = method(model, patterns, smooth=smooth).attribute(test.inputs * scale, target=target)
        m = {"cosine": mean_err(signal_cosine(e, test.signal)),
             "topk": mean_err(topk_precision(e, test.signal_mask))}
        if suppressor:
            m["mass_suppressor"] = mean_err(region_mass(e, test.regions["suppressor"]))
        result[method.__name__] = m
    return result


def ground_truth(args: Any) -> dict[str, Any]:
    sets = {
        "tetromino_lin": lambda: tetromino_simple(3000, mode="lin", background="corr", seed=0),
        "tetromino_mult": lambda: tetromino_simple(3000, mode="mult", background="corr", seed=0),
        "wilming": lambda: wilming_suppressor(3000, signal_weight=0.08, seed=0),
    }
    out: dict[str, Any] = {}
    for data_name, make in sets.items():
        if args.only and data_name not in args.only:
            continue
        data = make()
        train, fit, test = data.split(2000, 600, 400)
        # Wilming's images have a Frobenius norm of ~1 over the whole set: scaled to unit
        # variance, or the MLP does not learn (the metrics do not depend on the scale)
        scale = 1.0 if data_name.startswith("tetromino") else float(1 / train.inputs.std())
        for name, act in ACTIVATIONS.items():
            model = cnn(act, 1, 16, 2) if data_name.startswith("tetromino") else mlp(act)
            model = train_classifier(model, train.inputs * scale, train.targets,
                                     epochs=args.gt_epochs, lr=3e-3)  # fmt: skip
            acc = accuracy(model, test.inputs * scale, test.targets)
            patterns = pn.fit_patterns(model, fit.inputs * scale, progress=False)
            row = {"accuracy": acc}
            for smooth in ("gate", "derivative"):
                row[smooth] = explain_metrics(model, patterns, test, smooth,
                                              data_name == "wilming", scale)  # fmt: skip
            out[f"{data_name}/{name}"] = row
            print(data_name, name, json.dumps(row))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=12000, help="Fashion-MNIST images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gt-epochs", type=int, default=15)
    parser.add_argument("--skip-rho", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="ground-truth sets to run")
    parser.add_argument("--out", default="smooth")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result: dict[str, Any] = {"machine": machine(), "settings": vars(args)}
    result["ground_truth"] = ground_truth(args)
    if not args.skip_rho:
        result["rho"] = rho(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.out}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
    return result


if __name__ == "__main__":
    main()
