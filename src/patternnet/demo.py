"""The built-in demo: PatternNet and its baselines on a small VGG-style Fashion-MNIST network.

``patternnet demo`` (or ``make demo``) runs :func:`run_demo`:

1. find the Fashion-MNIST IDX files (``--data DIR``, the Debian package
   ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``, or a torchvision
   download folder) — a clear message says how to get them when none is found;
2. train a small VGG-style network (conv-ReLU-maxpool ×2, two dense layers) for three epochs
   (≈ 91 % test accuracy), or load it from the cache in the output folder;
3. fit two-component patterns (:func:`patternnet.fit_patterns`) on the first half of the
   training set;
4. write to the output folder ``explanations.png`` (the paper's Figures 6/7: inputs,
   PatternNet, PatternAttribution, gradient, DeConvNet, Guided BackProp, LRP), and, where
   :mod:`patternnet.evaluate` provides them, the per-layer ρ(S) plot and the image-degradation
   curves;
5. print a summary table (also written as ``summary.md``).

Everything is seeded; the model and patterns are cached, so a second run only redraws.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import evaluate, viz
from .data import find_idx, load_idx
from .evaluate.perturbation import paired_difference
from .methods.pattern import PatternAttribution
from .methods.registry import build_method, method_info
from .patterns.fit import fit_patterns
from .patterns.store import Patterns
from .report import ExplanationGrid, Report
from .training import accuracy, cached_model, train_classifier

__all__ = [
    "CLASSES",
    "DemoConfig",
    "DemoDataError",
    "demo_model",
    "find_fashion_mnist",
    "run_demo",
]

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel mean and standard deviation
SYSTEM_DATA = Path("/usr/share/datasets/fashion-mnist")
MODEL_VERSION = 1

# (registry name, column title) — the paper's Figure 7 columns; each method says how it is
# drawn (its ``kind``: signal or attribution)
FIGURE_METHODS = (
    ("pattern_net", "PatternNet"),
    ("pattern_attribution", "PatternAttr."),
    ("gradient", "Gradient"),
    ("deconvnet", "DeConvNet"),
    ("guided_backprop", "Guided BP"),
    ("lrp_epsilon", "LRP"),
)

HOW_TO_GET_DATA = """\
Fashion-MNIST was not found (looked in: {looked}).
Get the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in one of these ways:
  - Debian/Ubuntu:  sudo apt-get install dataset-fashion-mnist   (then run the demo again)
  - download them from https://github.com/zalandoresearch/fashion-mnist (data/fashion/)
    into a folder and run:  patternnet demo --data FOLDER
  - with torchvision and internet access:
      python -c "import torchvision; torchvision.datasets.FashionMNIST('data', download=True)"
    then:  patternnet demo --data data/FashionMNIST/raw"""


class DemoDataError(FileNotFoundError):
    """Fashion-MNIST could not be found; the message says how to get it."""


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the defaults are the full demo).

    Parameters
    ----------
    data:
        Folder with the Fashion-MNIST IDX files; None searches the usual places.
    out:
        Output folder (figures, summary, cached model and patterns).
    epochs:
        Training epochs (3 gives ≈ 91 % test accuracy).
    train_limit, fit_limit, test_limit:
        Use at most this many training images for training / for fitting patterns (default:
        the first half of the training set) / test images for evaluation. Set small for a
        quick run.
    n_images:
        Test images in the explanation figure.
    eval_samples:
        Samples for each of ρ(S)'s regression and evaluation splits (held-out training
        images and test images).
    quality_neurons, quality_positions:
        ρ(S) samples this many neurons per layer and output positions per image and conv
        layer; ``None`` (the default) uses all: ρ(S) is exact (see
        :func:`patternnet.evaluate.estimator_quality`).
    linear_fit_limit:
        Images (from the start of the fitting half) for the linear estimator's patterns, which
        only the evaluation uses.
    degradation_images, degradation_patch:
        Test images for the degradation curves, and the side of the square regions replaced
        (4 px on 28×28 images: 49 regions; the paper used 9 px on 224×224).
    batch_size:
        Training and fitting batch size.
    seed:
        Seed for weights, shuffling and the random baselines.
    threads:
        ``torch.set_num_threads``; None uses every core this process may run on.
    progress:
        Show progress bars.
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

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A reduced run for smoke tests: one epoch on 3000 images, small evaluation."""
        settings: dict[str, Any] = {
            "epochs": 1,
            "train_limit": 3000,
            "fit_limit": 1500,
            "test_limit": 500,
            "eval_samples": 300,
            "quality_neurons": 16,
            "quality_positions": 8,
            "degradation_images": 50,
        }
        settings.update(overrides)
        return cls(**settings)


# ---------------------------------------------------------------------------- data
def find_fashion_mnist(data: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files.

    Looks in ``data`` (also its ``FashionMNIST/raw`` and ``raw`` sub-folders, torchvision's
    layout), else in ``$PATTERNNET_DATA``, ``/usr/share/datasets/fashion-mnist`` and
    ``~/.cache/patternnet/fashion-mnist``.

    Raises
    ------
    DemoDataError
        With instructions to get the data.
    """
    if data is not None:
        roots = [Path(data)]
    else:
        roots = [SYSTEM_DATA, Path.home() / ".cache" / "patternnet" / "fashion-mnist"]
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
    raise DemoDataError(HOW_TO_GET_DATA.format(looked=", ".join(looked[:3])))


def _normalise(images: Tensor) -> Tensor:
    return (images - MEAN) / STD


# ---------------------------------------------------------------------------- model
def demo_model() -> nn.Sequential:
    """The demo's small VGG-style network for 1×28×28 inputs and 10 classes.

    conv3×3(1→32)-ReLU-maxpool2, conv3×3(32→64)-ReLU-maxpool2, dense(3136→128)-ReLU,
    dense(128→10). Modules are named (``conv1`` … ``fc2``) so patterns are readable.
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 32, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(32, 64, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(64 * 7 * 7, 128)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(128, 10)),
            ]
        )
    )


def _train(config: DemoConfig, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
           ) -> tuple[nn.Module, float, bool]:
    """The demo's model, trained (Adam, one-cycle schedule) or taken from the cache."""
    key = {"version": MODEL_VERSION, "epochs": config.epochs, "train_limit": config.train_limit,
           "batch_size": config.batch_size, "seed": config.seed}  # fmt: skip

    def build() -> nn.Module:
        torch.manual_seed(config.seed)
        return demo_model()

    def fit(model: nn.Module) -> float:
        train_classifier(model, *train, epochs=config.epochs, batch_size=config.batch_size,
                         lr=1e-3, weight_decay=0.0, max_lr=3e-3, seed=config.seed,
                         progress=config.progress)  # fmt: skip
        return accuracy(model, *test)

    return cached_model(config.out, key, build, fit)


# ---------------------------------------------------------------------------- methods
def explanation_rows(
    model: nn.Module,
    patterns: Any,
    images: Tensor,
    methods: Sequence[tuple[str, str]] = FIGURE_METHODS,
    log: Callable[[str], None] = print,
) -> tuple[list[str], list[list[Any]], dict[str, Tensor]]:
    """Explain ``images`` with each method; (titles, picture rows, raw results).

    Each result is drawn as its method's ``kind`` says (:func:`patternnet.viz.picture`).
    """
    titles, results, built = ["Input"], {}, {}
    for name, title in methods:
        built[name] = build_method(name, model, patterns)
        results[name] = built[name].attribute(images)
        titles.append(title)
    rows = []
    for i in range(images.shape[0]):
        row = [viz.input_image(images[i], mean=(MEAN,), std=(STD,))]
        row += [viz.picture(results[name][i], built[name].kind) for name in built]
        rows.append(row)
    return titles, rows, results


def _figure_images(test: tuple[Tensor, Tensor], n_images: int) -> tuple[Tensor, Tensor]:
    """The first test image of each of the first ``n_images`` classes (or the first images)."""
    images, labels = test
    picks = []
    for cls in range(10):
        hits = (labels == cls).nonzero()
        if hits.numel():
            picks.append(int(hits[0]))
        if len(picks) == n_images:
            break
    if len(picks) < n_images:
        picks = list(range(min(n_images, images.shape[0])))
    index = torch.tensor(picks)
    return images[index], labels[index]


# ---------------------------------------------------------------------------- run
def _set_threads(threads: int | None) -> int:
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return its summary.

    Parameters
    ----------
    config:
        Settings; default :class:`DemoConfig` ``()`` (the full demo into ``demo-output/``).

    Returns
    -------
    dict
        ``accuracy``, ``files`` (written paths), ``timings`` (seconds per stage), and
        ``quality``/``aopc`` where computed.

    Raises
    ------
    DemoDataError
        If Fashion-MNIST cannot be found (the message says how to get it).
    """
    config = config or DemoConfig()
    log = config.log
    config.out = Path(config.out)
    config.out.mkdir(parents=True, exist_ok=True)
    threads = _set_threads(config.threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = now - since
        return now

    folder = find_fashion_mnist(config.data)
    log(f"Fashion-MNIST from {folder} ({threads} threads)")
    train_x, train_y = load_idx(folder, "train")
    test_x, test_y = load_idx(folder, "t10k")
    train_x, test_x = _normalise(train_x), _normalise(test_x)
    if config.test_limit is not None:
        test_x, test_y = test_x[: config.test_limit], test_y[: config.test_limit]
    fit_x = train_x[: config.fit_limit or train_x.shape[0] // 2]
    held_out = train_x[train_x.shape[0] // 2 :]
    if config.train_limit is not None:
        train_x, train_y = train_x[: config.train_limit], train_y[: config.train_limit]
    now = lap("load data", started)

    model, acc, cached = _train(config, (train_x, train_y), (test_x, test_y))
    log(
        f"model: {'loaded from cache' if cached else f'trained {config.epochs} epoch(s)'}, "
        f"test accuracy {acc:.2%}"
    )
    now = lap("train model", now)

    patterns_file = config.out / "patterns.safetensors"
    patterns = None
    if cached and patterns_file.is_file():  # patterns are only valid for the cached model
        try:
            patterns = Patterns.load(patterns_file, model=model)
            if patterns.metadata.get("images") != fit_x.shape[0]:
                patterns = None
        except (OSError, ValueError):
            patterns = None
    patterns_cached = patterns is not None
    if patterns is None:
        patterns = fit_patterns(
            model,
            fit_x,
            estimator="two_component",
            batch_size=256,
            precision="float32",  # products per batch in float32, sums in float64
            progress=config.progress,
        )
        patterns.save(patterns_file)
        log(f"fitted two-component patterns on {fit_x.shape[0]} training images")
    else:
        log("patterns loaded from cache")
    now = lap("fit patterns", now)

    images, labels = _figure_images((test_x, test_y), config.n_images)
    titles, rows, explained = explanation_rows(model, patterns, images, log=log)
    with torch.no_grad():
        predicted = model(images).argmax(1)
    row_titles = [
        f"{CLASSES[int(t)]}" + ("" if int(p) == int(t) else f"\n(pred. {CLASSES[int(p)]})")
        for t, p in zip(labels, predicted)
    ]
    files = {"explanations": config.out / "explanations.png"}
    viz.grid(
        rows,
        column_titles=titles,
        row_titles=row_titles,
        path=files["explanations"],
        title="What the network sees: signal (grey = 0) and attribution (red +, blue −)",
    )
    lap("explain + figure", now)

    summary: dict[str, Any] = {
        "accuracy": acc,
        "model_cached": cached,
        "patterns_cached": patterns_cached,
        "threads": threads,
        "fit_images": int(fit_x.shape[0]),
        "files": files,
        "timings": timings,
        "config": {k: str(v) for k, v in asdict(config).items() if k != "log"},
    }
    evaluation = _evaluate(model, patterns, fit_x, held_out, test_x, config, files, timings)
    summary.update(evaluation)
    now = time.perf_counter()
    files["report"] = _write_report(config, summary, images, explained, row_titles)
    lap("report", now)
    timings["total"] = time.perf_counter() - started
    table = summary_table(summary)
    (config.out / "summary.md").write_text(table + "\n")
    files["summary"] = config.out / "summary.md"
    log(table)
    return summary


def _evaluate(
    model: nn.Module,
    patterns: Any,
    fit_x: Tensor,
    held_out: Tensor,
    test_x: Tensor,
    config: DemoConfig,
    files: dict[str, Path],
    timings: dict[str, float],
) -> dict[str, Any]:
    """ρ(S) per layer (method.md §5) and degradation curves (§6); figures into ``files``."""
    log = config.log
    start = time.perf_counter()
    result: dict[str, Any] = {}
    n_eval = min(config.eval_samples, test_x.shape[0])
    regression = held_out[: config.eval_samples]
    linear = fit_patterns(
        model,
        fit_x[: config.linear_fit_limit],
        estimator="linear",
        batch_size=256,
        progress=False,
        precision="float32",
    )
    table = evaluate.estimator_quality(
        model,
        None,
        regression,
        test_x[:n_eval],
        estimators=("random", "filter", "linear", "two_component"),
        patterns={"two_component": patterns, "linear": linear},
        batch_size=256,
        seed=config.seed,
        max_neurons=config.quality_neurons,
        positions=config.quality_positions,
    )
    result["quality"] = table
    try:
        files["quality"] = config.out / "quality.png"
        table.plot(files["quality"])
    except ImportError:
        files.pop("quality")
        log("  (ρ(S) plot skipped: patternnet.evaluate.plots is not available)")
    log(f"estimator quality ρ(S) on {regression.shape[0]} + {n_eval} images")
    timings["estimator quality"] = time.perf_counter() - start
    start = time.perf_counter()
    images = test_x[: config.degradation_images]
    fitted = {"two_component": patterns, "linear": linear}
    k = config.degradation_patch
    comparison = evaluate.compare(
        model,
        {label: PatternAttribution(model, fitted.get(estimator), estimator=estimator)
         for label, estimator in DEGRADATION_METHODS},
        images,
        k=k,
        steps=min(100, -(-images.shape[-2] // k) * -(-images.shape[-1] // k)),
        seed=config.seed,
    )  # fmt: skip
    curves = {("random order" if label == "random" else label): curve
              for label, curve in comparison.curves.items()}  # fmt: skip
    result["aopc"] = {label: c.aopc() for label, c in curves.items()}
    result["curves"] = curves
    result["aopc_interval"] = {
        label: c.aopc_interval(seed=config.seed) for label, c in curves.items()
    }
    result["aopc_difference"] = paired_difference(
        curves[DEGRADATION_METHODS[0][0]], curves[DEGRADATION_METHODS[1][0]], seed=config.seed
    )
    files["degradation"] = config.out / "degradation.png"
    viz.degradation_plot(curves, path=files["degradation"])
    log(f"image degradation of {images.shape[0]} test images")
    timings["degradation"] = time.perf_counter() - start
    return result


def _write_report(
    config: DemoConfig,
    summary: dict[str, Any],
    images: Tensor,
    explained: dict[str, Tensor],
    row_titles: list[str],
) -> Path:
    """``report.html``: the explanation grid, ρ(S), degradation, settings and timings."""
    grid = ExplanationGrid.from_explanations(
        images,
        explained,
        kinds={name: method_info(name).kind for name, _ in FIGURE_METHODS},
        titles=dict(FIGURE_METHODS),
        mean=(MEAN,),
        std=(STD,),
        row_titles=[title.replace("\n", " ") for title in row_titles],
    )
    settings = {k: v for k, v in summary["config"].items() if k not in ("progress",)}
    settings.update(test_accuracy=f"{summary['accuracy']:.2%}", threads=summary["threads"],
                    fit_images=summary["fit_images"])  # fmt: skip
    report = Report(
        title="patternnet demo: Fashion-MNIST",
        grid=grid,
        quality=summary.get("quality"),
        degradation=summary.get("curves"),
        settings=settings,
        timings=dict(summary["timings"]),
    )
    return report.write(config.out / "report.html")


# (label, estimator of PatternAttribution) — the paper's Figure 4, best to worst expected
DEGRADATION_METHODS = (
    ("PatternAttribution (S_a+-)", "two_component"),
    ("LRP-z (S_x)", "identity"),
    ("w² rule (S_w)", "filter"),
    ("linear PatternAttr. (S_a)", "linear"),
)


def summary_table(summary: dict[str, Any]) -> str:
    """The demo's results as Markdown: a results table, ρ(S) per layer, AOPC per method."""
    lines = [
        "| result | value |",
        "|---|---|",
        f"| test accuracy | {summary['accuracy']:.2%} |",
        f"| patterns fitted on | {summary['fit_images']} training images |",
        f"| threads | {summary['threads']} |",
    ]
    for stage, seconds in summary["timings"].items():
        lines.append(f"| time: {stage} | {seconds:.1f} s |")
    for name, path in summary["files"].items():
        lines.append(f"| file: {name} | {path} |")
    if "quality" in summary:
        lines += ["", "Estimator quality ρ(S) per layer (method.md §5; higher is better):", ""]
        lines.append(summary["quality"].to_markdown().rstrip())
    if "aopc" in summary:
        lines += ["", "Image degradation, area over the perturbation curve (higher = steeper "
                  "decay = better; 95% bootstrap interval over images):", "",
                  "| method | AOPC | 95% CI |", "|---|---|---|"]  # fmt: skip
        intervals = summary.get("aopc_interval", {})
        for name, value in summary["aopc"].items():
            ci = intervals.get(name)
            cell = f"[{ci.low:.4f}, {ci.high:.4f}]" if ci is not None else "–"
            lines.append(f"| {name} | {value:.4f} | {cell} |")
        if "aopc_difference" in summary:
            lines += ["", summary["aopc_difference"].to_markdown(4)]
    return "\n".join(lines)
