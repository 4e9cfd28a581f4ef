"""The built-in demo: PatternNet and its baselines on a small network trained on Fashion-MNIST.

``patternnet demo`` (``make demo``) runs :func:`run_demo`, composed from the library: it
reads Fashion-MNIST (:func:`patternnet.data.load_fashion_mnist`; a clear message says how to
get it), trains :func:`patternnet.zoo.fashion_cnn` for three epochs (:mod:`patternnet.training`,
≈ 91 % test accuracy), fits two-component patterns on the first half of the training set,
and writes to the output folder ``explanations.png`` (the paper's Figures 6/7), ρ(S) per
layer (Figure 3), the image-degradation curves (Figure 4), ``report.html`` and ``summary.md``
(also printed). :meth:`DemoConfig.vit` (``--model vit``) does the same with the Vision
Transformer :func:`patternnet.zoo.fashion_vit`, and gives ρ(S) with its error over three
disjoint pairs of data. Everything is seeded; the model and the patterns are cached in the
output folder, so a second run only redraws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import evaluate, viz
from .data import FASHION_MNIST_CLASSES as CLASSES
from .data import FASHION_MNIST_MEAN as MEAN
from .data import FASHION_MNIST_STD as STD
from .data import DataNotFoundError, find_fashion_mnist, load_fashion_mnist, one_per_class
from .methods.pattern import PatternAttribution
from .patterns.fit import fit_patterns
from .patterns.store import cached_patterns
from .report import Report, Stopwatch, explanation_grid, prediction_titles
from .report import summary_markdown as summary_table
from .training import accuracy, cached_model, set_threads, train_classifier
from .zoo import fashion_cnn as demo_model
from .zoo import fashion_vit

__all__ = ["CLASSES", "DemoConfig", "DemoDataError", "demo_model", "find_fashion_mnist",
           "run_demo", "summary_table"]  # fmt: skip

#: Fashion-MNIST could not be found (:class:`patternnet.data.DataNotFoundError`).
DemoDataError = DataNotFoundError
MODEL_VERSION = 1
#: The demo's networks by ``--model`` name.
MODELS = {"cnn": demo_model, "vit": fashion_vit}
#: (registry name, column title): the paper's Figure 7 columns, each drawn as its kind says.
FIGURE_METHODS = {"pattern_net": "PatternNet", "pattern_attribution": "PatternAttr.",
                  "gradient": "Gradient", "deconvnet": "DeConvNet",
                  "guided_backprop": "Guided BP", "lrp_epsilon": "LRP"}  # fmt: skip
#: (label, estimator of PatternAttribution): the paper's Figure 4, best to worst expected.
DEGRADATION_METHODS = (("PatternAttribution (S_a+-)", "two_component"),
                       ("LRP-z (S_x)", "identity"), ("w² rule (S_w)", "filter"),
                       ("linear PatternAttr. (S_a)", "linear"))  # fmt: skip


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the defaults are the full demo).

    ``data``: folder with the Fashion-MNIST IDX files (None searches the usual places);
    ``out``: output folder (figures, summary, cached model and patterns); ``epochs``: training
    epochs; ``train_limit``, ``fit_limit``, ``test_limit``: at most this many images for
    training / fitting the patterns (default the first half of the training set) / testing;
    ``n_images``: test images in the explanation figure; ``eval_samples``: images in each of
    ρ(S)'s regression (held-out training images) and evaluation (test images) splits;
    ``quality_neurons``, ``quality_positions``: ρ(S) samples this many neurons per layer and
    positions per image (None: all, ρ(S) exact); ``linear_fit_limit``: images for the linear
    estimator's patterns (only the evaluation uses them); ``degradation_images``,
    ``degradation_patch``: test images of the degradation curves and the side of the square
    regions replaced (4 px: 49 regions); ``batch_size``: of the training; ``seed``: weights,
    shuffling, random baselines; ``threads``: CPU threads (None: every core this process may
    use); ``progress``: progress bars; ``log``: where one-line messages go; ``model``: a key of
    :data:`MODELS`; ``quality_splits``: disjoint (regression, evaluation) pairs ρ(S) is
    averaged over (≥ 2 gives its error, :func:`patternnet.evaluate.quality_over_splits`).
    """

    data: Path | None = None
    out: Path = Path("demo-output")
    epochs: int = 3
    train_limit: int | None = None
    fit_limit: int | None = None
    test_limit: int | None = None
    n_images: int = 8
    eval_samples: int = 2000
    quality_neurons: int | None = None
    quality_positions: int | None = None
    linear_fit_limit: int = 10000
    degradation_images: int = 100
    degradation_patch: int = 4
    batch_size: int = 128
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    log: Callable[[str], None] = field(default=print, repr=False)
    model: str = "cnn"
    quality_splits: int = 1

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A reduced run for smoke tests: one epoch on 3000 images, small evaluation."""
        settings: dict[str, Any] = {"epochs": 1, "train_limit": 3000, "fit_limit": 1500,
                                    "test_limit": 500, "eval_samples": 300,
                                    "quality_neurons": 16, "quality_positions": 8,
                                    "degradation_images": 50}  # fmt: skip
        return cls(**{**settings, **overrides})

    @classmethod
    def vit(cls, **overrides: Any) -> DemoConfig:
        """The Vision Transformer variant (``--model vit``): patterns (two-component and
        linear) fitted on 5000 training images (17 tokens each), ρ(S) over three disjoint
        pairs of 2000 + 2000 images, written to ``demo-output-vit``."""
        settings: dict[str, Any] = {"model": "vit", "out": Path("demo-output-vit"),
                                    "fit_limit": 5000, "linear_fit_limit": 5000,
                                    "quality_splits": 3}  # fmt: skip
        return cls(**{**settings, **overrides})


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return its summary: ``accuracy``,
    ``files`` (written paths), ``timings`` (seconds per stage), ``quality`` (ρ(S) table),
    ``aopc`` with ``aopc_interval`` and ``aopc_difference``, and the cache flags.

    Raises
    ------
    DemoDataError
        If Fashion-MNIST cannot be found (the message says how to get it).
    """
    config = config or DemoConfig()
    log, out, seed = config.log, Path(config.out), config.seed
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, not {config.model!r}")
    out.mkdir(parents=True, exist_ok=True)
    threads = set_threads(config.threads)
    stopwatch = Stopwatch()
    lap, timings = stopwatch.lap, stopwatch.timings
    (train_x, train_y), (test_x, test_y), folder = load_fashion_mnist(config.data)
    log(f"Fashion-MNIST from {folder} ({threads} threads)")
    test_x, test_y = test_x[: config.test_limit], test_y[: config.test_limit]
    fit_x = train_x[: config.fit_limit or train_x.shape[0] // 2]
    held_out = train_x[train_x.shape[0] // 2 :]
    train_x, train_y = train_x[: config.train_limit], train_y[: config.train_limit]
    lap("load data")

    key = {"version": MODEL_VERSION, "epochs": config.epochs, "train_limit": config.train_limit,
           "batch_size": config.batch_size, "seed": seed, "model": config.model}  # fmt: skip

    def build() -> torch.nn.Module:
        torch.manual_seed(seed)
        return MODELS[config.model]()

    def train(model: torch.nn.Module) -> float:
        train_classifier(model, train_x, train_y, epochs=config.epochs, lr=1e-3, max_lr=3e-3,
                         batch_size=config.batch_size, weight_decay=0.0, seed=seed,
                         progress=config.progress)  # fmt: skip
        return accuracy(model, test_x, test_y)

    model, acc, cached = cached_model(out, key, build, train)
    log(f"model: {'loaded from cache' if cached else f'trained {config.epochs} epoch(s)'}, "
        f"test accuracy {acc:.2%}")  # fmt: skip
    lap("train model")

    def fit(estimator: str, images: torch.Tensor, progress: bool) -> Any:
        # products per batch in float32, sums in float64; a₋ in every layer, as ρ(S) of the
        # two-component estimator needs it (the explanations equal the default fit's)
        return fit_patterns(model, images, estimator=estimator, batch_size=256,
                            precision="float32", negative=True, progress=progress)  # fmt: skip

    patterns, patterns_cached = cached_patterns(
        out / "patterns.safetensors", model, {**key, "images": fit_x.shape[0], "negative": True},
        lambda: fit("two_component", fit_x, config.progress))  # fmt: skip
    log("patterns loaded from cache" if patterns_cached else
        f"fitted two-component patterns on {fit_x.shape[0]} training images")  # fmt: skip
    lap("fit patterns")

    index = one_per_class(test_y, config.n_images, classes=len(CLASSES))
    images, labels = test_x[index], test_y[index]
    row_titles = prediction_titles(model, images, labels, CLASSES)
    grid = explanation_grid(model, images, FIGURE_METHODS, patterns=patterns, mean=(MEAN,),
                            std=(STD,), row_titles=[t.replace("\n", " ") for t in row_titles])
    files = {"explanations": grid.save(out / "explanations.png", row_titles=row_titles,
             title="What the network sees: signal (grey = 0) and attribution (red +, blue −)")}
    lap("explain + figure")

    # ρ(S) per layer (method.md §5, Figure 3) on held-out training and test images
    linear = fit("linear", fit_x[: config.linear_fit_limit], False)
    fitted = {"two_component": patterns, "linear": linear}
    n, n_eval = config.eval_samples, min(config.eval_samples, len(test_x) // config.quality_splits)
    splits = [(held_out[i * n : (i + 1) * n], test_x[i * n_eval : (i + 1) * n_eval])
              for i in range(config.quality_splits)]  # fmt: skip
    options = {"patterns": fitted, "batch_size": 256, "seed": seed,
               "estimators": ("random", "filter", "linear", "two_component"),
               "max_neurons": config.quality_neurons, "positions": config.quality_positions}
    quality = (evaluate.quality_over_splits(model, splits, **options) if len(splits) > 1
               else evaluate.estimator_quality(model, None, *splits[0], **options))  # fmt: skip
    files["quality"] = out / "quality.png"
    quality.plot(files["quality"])
    log(f"estimator quality ρ(S) on {len(splits[0][0])} + {len(splits[0][1])} images"
        + (f", mean ± error over {len(splits)} disjoint pairs" if len(splits) > 1 else ""))
    lap("estimator quality")

    # image degradation (method.md §6, Figure 4): PatternAttribution's estimator views
    degraded, k = test_x[: config.degradation_images], config.degradation_patch
    regions = -(-degraded.shape[-2] // k) * -(-degraded.shape[-1] // k)
    comparison = evaluate.compare(
        model, {label: PatternAttribution(model, fitted.get(estimator), estimator=estimator)
                for label, estimator in DEGRADATION_METHODS},
        degraded, k=k, steps=min(100, regions), seed=seed,
        pairs=[(DEGRADATION_METHODS[0][0], DEGRADATION_METHODS[1][0])])  # fmt: skip
    curves = {("random order" if label == "random" else label): curve
              for label, curve in comparison.curves.items()}  # fmt: skip
    files["degradation"] = out / "degradation.png"
    viz.degradation_plot(curves, path=files["degradation"])
    log(f"image degradation of {degraded.shape[0]} test images")
    lap("degradation")

    summary: dict[str, Any] = {
        "accuracy": acc, "model_cached": cached, "patterns_cached": patterns_cached,
        "threads": threads, "fit_images": int(fit_x.shape[0]), "files": files,
        "timings": timings, "quality": quality, "curves": curves,
        "aopc": {label: c.aopc() for label, c in curves.items()},
        "aopc_interval": {label: c.aopc_interval(seed=seed) for label, c in curves.items()},
        "aopc_difference": comparison.differences[0],
        "config": {k: str(v) for k, v in asdict(config).items() if k != "log"},
    }  # fmt: skip
    settings = {k: v for k, v in summary["config"].items() if k != "progress"}
    settings.update(test_accuracy=f"{acc:.2%}", threads=threads, fit_images=len(fit_x))
    files["report"] = Report(
        title="patternnet demo: Fashion-MNIST" + (" (ViT)" if config.model == "vit" else ""),
        grid=grid, quality=quality, degradation=curves,
        settings=settings, timings=dict(timings)).write(out / "report.html")  # fmt: skip
    lap("report")
    stopwatch.total()
    table = summary_table(summary)
    files["summary"] = out / "summary.md"
    files["summary"].write_text(table + "\n")
    log(table)
    return summary

