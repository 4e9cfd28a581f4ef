"""The published ground-truth experiments, reduced to minutes on a CPU: one comparison table.

``python -m patternnet.groundtruth.reproduce [--quick] [--out FILE.md]``

- **Wilming et al. 2022** (:func:`~patternnet.groundtruth.wilming_suppressor`): for each λ₁ of
  the published sweep, ``--datasets`` data sets of 1 000 samples (80/20 split, as published),
  a linear model without bias (``Flatten → Linear(64, 2)``) trained by Adam (lr 0.1, batch 64,
  200 epochs, as published, without their early stopping), explained on the 200 test samples.
- **XAI-TRIS 8×8** (:func:`~patternnet.groundtruth.xai_tris`): every scenario × background,
  ``--samples`` images (80/10/10), their architectures (LLR for LIN only, MLP 64-32-16-8-2 and
  the 4-stage CNN with 2×2 kernels of ``training/models.py``), trained for far fewer steps than
  published (Adam lr 3·10⁻³, batch 64, ``--epochs`` epochs instead of lr 5·10⁻⁴, batch 512,
  500 epochs), explained on correctly classified test images.

Methods: the gradient, PatternNet and PatternAttribution (patterns fitted on the training
images with the library's default estimator), a uniform-random map as the chance level.
Metrics with 95 % intervals (mean ± 1.96 standard errors over test images; over data sets for
Wilming): Wilming's per-sample ROC-AUC of ``|e|`` against the signal mask, top-k precision and
the mass on the suppressor; XAI-TRIS's top-k precision and EMD score.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..evaluate.groundtruth import emd_score, mask_auroc, region_mass, topk_precision
from ..methods.gradient import Gradient
from ..methods.pattern import PatternAttribution, PatternNet
from ..patterns.fit import fit_patterns
from .base import seeded_generator
from .train import accuracy, train_classifier
from .wilming import WILMING_SIGNAL_WEIGHTS, wilming_suppressor
from .xaitris import XAI_TRIS_BACKGROUNDS, XAI_TRIS_SCENARIOS, xai_tris

__all__ = ["cnn8", "main", "mlp8", "run_wilming", "run_xai_tris"]

Row = dict[str, object]


def _interval(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95 % interval (1.96 standard errors)."""
    v = values[~values.isnan()].double()
    if v.numel() == 0:
        return float("nan"), float("nan")
    half = 1.96 * float(v.std()) / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return float(v.mean()), half


def _fmt(values: Tensor) -> str:
    mean, half = _interval(values)
    return f"{mean:.3f} ± {half:.3f}"


def mlp8(seed: int = 0) -> nn.Module:
    """XAI-TRIS's ``MLP8by8``: 64 → 32 → 16 → 8 → 2 with ReLUs (softmax left out)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 2),
    )


def cnn8(seed: int = 0) -> nn.Module:
    """XAI-TRIS's ``CNN8by8``: four Conv(2×2, pad 1)–ReLU–MaxPool(2) stages of 4 channels."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, 4, 2, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2)]
        channels = 4
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4, 2))


def llr(seed: int = 0, features: int = 64) -> nn.Module:
    """Linear logistic regression without bias (XAI-TRIS ``LLR``, Wilming's Keras model)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 2, bias=False))


def _explain(model: nn.Module, train: Tensor, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    patterns = fit_patterns(model, train, progress=False)
    generator = seeded_generator(0)
    return {
        "gradient": Gradient(model).attribute(inputs, targets),
        "PatternNet": PatternNet(model, patterns).attribute(inputs, targets),
        "PatternAttribution": PatternAttribution(model, patterns).attribute(inputs, targets),
        "random": torch.rand(inputs.shape, generator=generator),
    }


def run_wilming(datasets: int = 10, n: int = 1000, epochs: int = 200) -> list[Row]:
    """Wilming et al. 2022's sweep; one row per (λ₁, method), intervals over data sets."""
    rows: list[Row] = []
    for lam in WILMING_SIGNAL_WEIGHTS:
        per: dict[str, dict[str, list[float]]] = {}
        accs = []
        for k in range(datasets):
            data = wilming_suppressor(n, signal_weight=lam, seed=1000 * k + 7)
            train, test = data.split(int(0.8 * n), n - int(0.8 * n))
            model = train_classifier(
                llr(k), train, epochs=epochs, batch_size=64, lr=0.1, weight_decay=0.0, seed=k
            )
            accs.append(accuracy(model, test.inputs, test.targets))
            for name, e in _explain(model, train.inputs, test.inputs, test.targets).items():
                m = per.setdefault(name, {"auroc": [], "topk": [], "suppressor": []})
                m["auroc"].append(float(mask_auroc(e, test.signal_mask).mean()))
                m["topk"].append(float(topk_precision(e, test.signal_mask).mean()))
                m["suppressor"].append(float(region_mass(e, test.regions["suppressor"]).mean()))
        for name, m in per.items():
            rows.append(
                {
                    "lambda1": lam,
                    "method": name,
                    "accuracy": _fmt(torch.tensor(accs)),
                    "auroc": _fmt(torch.tensor(m["auroc"])),
                    "topk": _fmt(torch.tensor(m["topk"])),
                    "suppressor_mass": _fmt(torch.tensor(m["suppressor"])),
                }
            )
    return rows


def run_xai_tris(
    samples: int = 3000,
    epochs: int = 30,
    scenarios: Sequence[str] = XAI_TRIS_SCENARIOS,
    backgrounds: Sequence[str] = XAI_TRIS_BACKGROUNDS,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """XAI-TRIS 8×8; one row per (scenario, background, model, method)."""
    rows: list[Row] = []
    for scenario in scenarios:
        for background in backgrounds:
            start = time.perf_counter()
            data = xai_tris(samples, scenario=scenario, background=background, size=8, seed=0)
            n_train = int(0.8 * samples)
            n_val = (samples - n_train) // 2
            train, _, test = data.split(n_train, n_val, samples - n_train - n_val)
            makers: dict[str, Callable[[], nn.Module]] = {"MLP": mlp8, "CNN": cnn8}
            if scenario == "lin":
                makers = {"LLR": llr, **makers}
            for model_name, make in makers.items():
                model = train_classifier(make(), train, epochs=epochs, batch_size=64, lr=3e-3)
                with torch.no_grad():
                    correct = model(test.inputs).argmax(1) == test.targets
                acc = float(correct.double().mean())
                good = test.subset(torch.where(correct)[0])
                if len(good) == 0:
                    continue
                maps = _explain(model, train.inputs, good.inputs, good.targets)
                for name, e in maps.items():
                    rows.append(
                        {
                            "scenario": scenario,
                            "background": background,
                            "model": model_name,
                            "accuracy": f"{acc:.3f}",
                            "method": name,
                            "topk": _fmt(topk_precision(e, good.signal_mask)),
                            "emd": _fmt(emd_score(e, good.signal_mask)),
                        }
                    )
            log(f"xai-tris {scenario}/{background}: {time.perf_counter() - start:.0f} s")
    return rows


def _markdown(rows: list[Row]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both experiments and print (or write) the Markdown tables with their settings."""
    parser = argparse.ArgumentParser(prog="python -m patternnet.groundtruth.reproduce")
    parser.add_argument("--datasets", type=int, default=10, help="Wilming data sets per λ₁")
    parser.add_argument("--samples", type=int, default=3000, help="XAI-TRIS images per set")
    parser.add_argument("--epochs", type=int, default=30, help="XAI-TRIS training epochs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument(
        "--only", choices=("wilming", "xai-tris"), help="run one of the two experiments"
    )
    parser.add_argument("--out", help="write the Markdown here (atomically) instead of stdout")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.samples, args.epochs = 2, 400, 2
    start = time.perf_counter()
    wilming, tris = [], []
    if args.only in (None, "wilming"):
        wilming = run_wilming(args.datasets, epochs=20 if args.quick else 200)
    if args.only in (None, "xai-tris"):
        tris = run_xai_tris(args.samples, args.epochs, log=lambda s: print(s, file=sys.stderr))
    seconds = time.perf_counter() - start
    parts = [
        f"Settings: Wilming {args.datasets} data sets × 1000 samples per λ₁; XAI-TRIS 8×8 "
        f"{args.samples} images, {args.epochs} epochs; torch threads "
        f"{torch.get_num_threads()}; {seconds:.0f} s in all."
    ]
    if wilming:
        parts += ["### Wilming et al. 2022 (mean ± 95 % interval over data sets)"]
        parts += [_markdown(wilming)]
    if tris:
        parts += ["### XAI-TRIS 8×8 (mean ± 95 % interval over correctly classified test images)"]
        parts += [_markdown(tris)]
    text = "\n\n".join(parts)
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        os.replace(tmp, args.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

