"""A small Swin Transformer for the ground-truth data (window attention, method.md §12).

:func:`small_swin` builds torchvision's ``SwinTransformer`` the size of a unit test for
one-channel ``8×8`` images: a 2×2 patch embedding (16 channels; torchvision's three-channel
convolution replaced by a one-channel one), one stage of two blocks (2 heads, 2×2 token
windows, the second block's windows shifted by one token, so the signal token and the
suppressor token of the aligned suppressor data share a window there only), LayerNorm,
the average over tokens and a linear head. No class token: the head reads the mean of all
tokens. :func:`swin_table` measures PatternNet on eight trained nets, with its spread.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

from ..engine.rules.attention import AttentionPatterns
from ..evaluate.groundtruth import ground_truth_metrics
from ..methods.gradient import Gradient
from ..methods.pattern import PatternAttribution, PatternNet
from ..patterns.fit import fit_patterns
from ..patterns.store import Patterns
from .base import seeded_generator
from .suppressor import suppressor_simple
from .train import accuracy, train_classifier

__all__ = ["SWIN_VARIANTS", "small_swin", "swin_table", "swin_variant", "trained_swin"]


def small_swin(seed: int = 0) -> nn.Module:
    """A torchvision ``SwinTransformer`` for ``(1, 8, 8)`` images and two classes (module
    docstring), initialised from ``seed``."""
    try:  # optional dependency (the extra "torchvision")
        from torchvision.models.swin_transformer import SwinTransformer
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError(
            "small_swin needs torchvision: pip install 'patternnet[torchvision]'"
        ) from error
    generator = seeded_generator(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = SwinTransformer([2, 2], 16, [2], [2], [2, 2], num_classes=2)
        model.features[0][0] = nn.Conv2d(1, 16, kernel_size=2, stride=2)
    return model


def swin_variant(model: nn.Module, patterns: Patterns, *, joint: bool = True,
                 rescale: bool = True) -> PatternNet:  # fmt: skip
    """PatternNet with the joint (default) or per-query attention pattern, with or without
    the consistency scale (default on for models with attention)."""

    class Variant(PatternNet):
        def attention_handler(self, canonical: Any) -> Any:
            return AttentionPatterns(self.patterns, self.estimator, attribution=False,
                                     joint=joint)  # fmt: skip

    return Variant(model, patterns, rescale=rescale)


#: The PatternNet columns of :func:`swin_table`: ``{label: swin_variant options}``.
SWIN_VARIANTS: dict[str, dict[str, bool]] = {
    "joint + scale (default)": {"joint": True, "rescale": True},
    "query + scale": {"joint": False, "rescale": True},
    "joint, no scale": {"joint": True, "rescale": False},
    "query, no scale": {"joint": False, "rescale": False},
}


def trained_swin(seed: int, *, n: int = 1500, epochs: int = 40) -> tuple[nn.Module, Any, Any]:
    """(trained :func:`small_swin`, fit data, test data) on the patch-aligned suppressor data
    (``size=8, block=2, offset=2``, ``n`` images to train and fit on, 500 to test)."""
    torch.manual_seed(0)
    data = suppressor_simple(n + 500, size=8, block=2, offset=2, seed=seed)
    fit, test = data.subset(slice(0, n)), data.subset(slice(n, n + 500))
    model = small_swin(seed)
    train_classifier(model, fit, epochs=epochs, lr=3e-3, seed=seed)
    return model.eval(), fit, test


def swin_table(seeds: tuple[int, ...] = tuple(range(8)), *, n: int = 1500,
               epochs: int = 40) -> list[dict[str, Any]]:  # fmt: skip
    """Signal cosines on trained :func:`small_swin` nets (method.md §12), float32.

    Per seed: test accuracy, the gradient, PatternAttribution and each PatternNet variant of
    :data:`SWIN_VARIANTS` (the default fit: linear patterns), and the default's mass on the
    suppressor block. Run ``python -m patternnet.groundtruth.swin``.
    """
    rows = []
    for seed in seeds:
        model, fit, test = trained_swin(seed, n=n, epochs=epochs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the linear-patterns notice
            patterns = fit_patterns(model, fit.inputs, progress=False)
        row: dict[str, Any] = {"seed": seed,
                               "accuracy": accuracy(model, test.inputs, test.targets)}  # fmt: skip
        target = test.targets
        gradient = Gradient(model).attribute(test.inputs, target=target)
        row["gradient"] = ground_truth_metrics(gradient, test)["signal_cosine"]
        attribution = PatternAttribution(model, patterns).attribute(test.inputs, target=target)
        row["pattern_attribution"] = ground_truth_metrics(attribution, test)["signal_cosine"]
        for label, options in SWIN_VARIANTS.items():
            signal = swin_variant(model, patterns, **options).attribute(test.inputs, target=target)
            metrics = ground_truth_metrics(signal, test)
            row[label] = metrics["signal_cosine"]
            if label.endswith("(default)"):
                row["default: suppressor mass"] = metrics["mass_suppressor"]
        rows.append(row)
    return rows


if __name__ == "__main__":  # pragma: no cover - a measurement, printed
    chosen = tuple(int(s) for s in sys.argv[1:]) or tuple(range(8))
    table = swin_table(chosen)
    keys = [k for k in table[0] if k != "seed"]
    print("| seed | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for line in table:
        print(f"| {line['seed']} | " + " | ".join(f"{line[k]:.3f}" for k in keys) + " |")
    values = torch.tensor([[line[k] for k in keys] for line in table], dtype=torch.float64)
    spread = values.std(0) if len(table) > 1 else torch.zeros(len(keys), dtype=torch.float64)
    means = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(values.mean(0), spread))
    print(f"| mean ± sd | {means} |")
    print("| min | " + " | ".join(f"{v:.3f}" for v in values.min(0).values) + " |")
