"""The paper on ImageNet in one call: Figures 3, 4 and 7 of Kindermans et al. (ICLR 2018).

:func:`reproduce` (``patternnet reproduce --imagenet DIR --model torchvision:vgg16 --weights
IMAGENET1K_V1 --out DIR``) runs, on an ImageNet folder in torchvision's ``ImageFolder`` layout
(``DIR/train/<wnid>/*.JPEG`` and ``DIR/val/<wnid>/*.JPEG``):

1. **fit** two-component patterns (``S_a+-``) and linear patterns (``S_a``) on ``fit_images``
   training images, a seeded random draw across all classes (:func:`patternnet.fit_patterns`;
   launched with ``torchrun``, every process fits its share and rank 0 carries on alone);
2. **Figure 3**: ρ(S) per layer for ``S_w`` (filter), ``S_a``, ``S_a+-`` and a random
   direction (:func:`patternnet.evaluate.estimator_quality`), the regression on
   ``quality_images`` further training images and the evaluation on as many validation images
   (three disjoint splits, as the paper requires);
3. **Figure 4**: image degradation on ``val_images`` validation images, ``patch``×``patch``
   regions (9×9, the paper's) replaced by their mean for ``steps`` steps, for
   PatternAttribution with each estimator (``S_a+-``, ``S_a``, ``S_w``, and ``S_x`` =
   LRP-z) and a random order, each AOPC with its interval over images;
4. **Figure 7**: the explanation grid of ``grid_images`` validation images (PatternNet,
   PatternAttribution, gradient, DeConvNet, Guided BackProp, LRP);
5. ``report.html`` (:mod:`patternnet.report`) with all of it, the settings and the timings,
   and ``summary.json``.

The patterns are saved in ``out`` and reused by a later run with the same model, weights,
images and seed (the fit is the long part).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from . import evaluate, viz
from .data import load_data, preset_for
from .methods.pattern import PatternAttribution
from .models import load
from .patterns import distributed
from .patterns.fit import fit_patterns
from .patterns.store import Patterns, atomic_write
from .report import Report, curve_summary, degradation_figure, explanation_grid

__all__ = ["FIGURE4_METHODS", "FIGURE7_METHODS", "Reproduction", "reproduce"]

#: Figure 4's curves: (label, estimator of PatternAttribution; ``identity`` is LRP-z).
FIGURE4_METHODS = (
    ("PatternAttribution (S_a+-)", "two_component"),
    ("PatternAttribution (S_a)", "linear"),
    ("w² rule (S_w)", "filter"),
    ("LRP-z (S_x)", "identity"),
)

#: Figure 7's columns: (registry name, column title).
FIGURE7_METHODS = (
    ("pattern_net", "PatternNet"),
    ("pattern_attribution", "PatternAttribution"),
    ("gradient", "Gradient"),
    ("deconvnet", "DeConvNet"),
    ("guided_backprop", "Guided BackProp"),
    ("lrp_epsilon", "LRP"),
)


@dataclass
class Reproduction:
    """What :func:`reproduce` wrote and measured.

    Attributes
    ----------
    files:
        The files written, by name (``report``, ``figure3``, ``figure4``, ``figure7``,
        ``patterns``, ``summary`` ...).
    quality:
        The ρ(S) table (Figure 3).
    curves:
        Degradation curves by label (Figure 4).
    aopc:
        ``{label: (aopc, low, high)}``, the interval over images (see :mod:`patternnet.report`).
    timings:
        Seconds per stage.
    settings:
        The settings of the run.
    """

    files: dict[str, Path] = field(default_factory=dict)
    quality: Any = None
    curves: dict[str, Any] = field(default_factory=dict)
    aopc: dict[str, tuple[float, float | None, float | None]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def _split_folder(imagenet: Path, name: str) -> Path:
    folder = imagenet / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: --imagenet needs the ImageFolder layout "
            f"{imagenet}/train/<wnid>/*.JPEG and {imagenet}/val/<wnid>/*.JPEG (sort the "
            "validation images into class folders first, e.g. with the valprep.sh script of "
            "the PyTorch ImageNet example)"
        )
    return folder


def _draw(count: int, wanted: int, generator: torch.Generator, what: str) -> list[int]:
    if wanted > count:
        raise ValueError(f"{what}: {wanted} images asked for, the folder holds {count}")
    return torch.randperm(count, generator=generator)[:wanted].tolist()


def _stack(dataset: Any, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    pairs = [dataset[i] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])


def _attribute(method: Any, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    parts = [method.attribute(part.to(device)).detach().cpu() for part in images.split(batch_size)]
    return torch.cat(parts)


def _fit_key(model: str, weights: str | None, images: int, seed: int, preset: Any) -> str:
    return json.dumps({"model": model, "weights": weights, "images": images, "seed": seed,
                       "preset": repr(preset)}, sort_keys=True)  # fmt: skip


def reproduce(
    imagenet: str | os.PathLike[str],
    *,
    model: str = "torchvision:vgg16",
    weights: str | None = "IMAGENET1K_V1",
    out: str | os.PathLike[str] = "reproduce-output",
    fit_images: int = 20000,
    val_images: int = 1000,
    quality_images: int = 500,
    grid_images: int = 8,
    patch: int = 9,
    steps: int = 100,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    workers: int | None = None,
    seed: int = 0,
    preset: Any = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Reproduction | None:
    """Reproduce the paper's Figures 3, 4 and 7 on an ImageNet folder (module docstring).

    Parameters
    ----------
    imagenet:
        Folder with ``train/`` and ``val/`` in ``ImageFolder`` layout (class sub-folders).
    model, weights:
        A model specification and weights (:func:`patternnet.models.load`); the paper's is
        ``"torchvision:vgg16"`` with ``"IMAGENET1K_V1"``. ``weights=None`` keeps the random
        initialisation (seeded with ``seed``): only for testing the pipeline.
    out:
        Output folder.
    fit_images:
        Training images the patterns are fitted on (a seeded random draw over all classes).
    val_images:
        Validation images for the degradation curves (Figure 4).
    quality_images:
        Images in each of ρ(S)'s regression (training, disjoint from the fit) and evaluation
        (validation) splits.
    grid_images:
        Validation images in the explanation grid (Figure 7).
    patch, steps:
        Degradation: square regions of ``patch`` pixels, and the number of replacement steps.
    device:
        Where the model runs (``"cuda"`` under ``torchrun``: each process's local GPU).
    batch_size, workers:
        Images per batch, and data-loading processes for the fit (default: up to 4).
    seed:
        Seeds the image draws, the random baselines and a random initialisation.
    preset:
        A :class:`patternnet.data.Preset` overriding the model's preprocessing (default: the
        one :func:`patternnet.data.preset_for` gives the model).
    progress, log:
        Progress bars, and where one-line messages go.

    Returns
    -------
    Reproduction or None
        The files and results; None on the ranks other than 0 of a ``torchrun`` launch.

    Raises
    ------
    FileNotFoundError
        Without ``train/`` or ``val/`` folders.
    ValueError
        For counts larger than the folders hold or non-positive settings.
    """
    for name, value in (("fit_images", fit_images), ("val_images", val_images),
                        ("quality_images", quality_images), ("grid_images", grid_images),
                        ("patch", patch), ("steps", steps),
                        ("batch_size", batch_size)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = now - since
        return now

    root = Path(imagenet).expanduser()
    train_folder, val_folder = _split_folder(root, "train"), _split_folder(root, "val")
    out = Path(out)
    spec = model if isinstance(model, str) else type(model).__name__
    preset = preset if preset is not None else preset_for(spec, weights)
    on_gpu = str(device).startswith("cuda")
    launched = distributed.init_from_env(backend="nccl" if on_gpu else "gloo")
    try:
        if launched and str(device) == "cuda":
            device = distributed.local_device()
        device = torch.device(device)
        torch.manual_seed(seed)  # a random initialisation (weights=None) is the same each run
        net: nn.Module = load(model, weights=weights) if isinstance(model, str) else model
        net = net.to(device).eval()
        train = load_data(train_folder, preset)
        val = load_data(val_folder, preset)
        generator = torch.Generator().manual_seed(seed)
        order = _draw(len(train), fit_images + quality_images, generator, f"{train_folder}")
        fit_index, regression_index = order[:fit_images], order[fit_images:]
        val_order = _draw(len(val), max(val_images, quality_images, grid_images), generator,
                          f"{val_folder}")  # fmt: skip
        main = distributed.is_main_process()
        if main:
            out.mkdir(parents=True, exist_ok=True)
            log(f"reproduce: {spec} ({weights or 'random weights'}) on {device}; fit on "
                f"{fit_images} of {len(train)} training images, degradation on {val_images} "
                f"of {len(val)} validation images")  # fmt: skip
        now = lap("open data", started)

        # ------------------------------------------------------------ 1. fit
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        loader = DataLoader(Subset(train, fit_index), batch_size=batch_size, num_workers=workers,
                            pin_memory=on_gpu)  # fmt: skip
        fitted = {}
        key = _fit_key(spec, weights, fit_images, seed, preset)
        for estimator in ("two_component", "linear"):
            path = out / f"patterns-{estimator}.safetensors"
            cached = None
            # under torchrun every rank must take part in the fit: no cache there
            if path.is_file() and not launched:
                try:
                    cached = Patterns.load(path, model=net)
                except (OSError, ValueError, KeyError):
                    cached = None
                if cached is not None and (cached.metadata.get("reproduce") != key
                                           or evaluate.layers_without_a_minus(cached)):
                    cached = None
            if cached is None:
                # a₋ in every layer: ρ(S) of S_a+- needs it (explanations equal the default's)
                cached = fit_patterns(net, loader, estimator=estimator, negative=True,
                                      progress=progress and main)  # fmt: skip
                cached.metadata["reproduce"] = key
                if main:
                    cached.save(path)
            fitted[estimator] = cached.to(device)
        fit_seconds = time.perf_counter() - now
        now = lap("fit patterns (S_a+- and S_a)", now)
        if not main:
            return None
        log(f"  patterns (S_a+-, S_a) of {fit_images} images in {fit_seconds:.1f} s")
        files: dict[str, Path] = {
            "patterns": out / "patterns-two_component.safetensors",
            "patterns_linear": out / "patterns-linear.safetensors",
        }

        # ------------------------------------------------------------ 2. Figure 3
        regression, _ = _stack(train, regression_index)
        evaluation, _ = _stack(val, val_order[:quality_images])
        quality = evaluate.estimator_quality(
            net, None, regression, evaluation,
            estimators=("random", "filter", "linear", "two_component"),
            patterns=fitted, batch_size=batch_size, seed=seed,
        )  # fmt: skip
        files["figure3"] = out / "figure3-rho.png"
        quality.plot(files["figure3"])
        files["rho_csv"] = out / "rho.csv"
        quality.to_csv(files["rho_csv"])
        del regression, evaluation
        now = lap("Figure 3: ρ(S)", now)
        log(f"  Figure 3 (ρ(S) on {quality_images} + {quality_images} images) → {files['figure3']}")

        # ------------------------------------------------------------ 3. Figure 4
        images, _ = _stack(val, val_order[:val_images])
        curves: dict[str, Any] = {}
        for label, estimator in FIGURE4_METHODS:
            method = PatternAttribution(net, fitted.get(estimator), estimator=estimator)
            attribution = _attribute(method, images, batch_size, device)
            curves[label] = evaluate.region_perturbation(
                net, images, attribution, k=patch, steps=steps, batch_size=max(batch_size, 64),
                seed=seed, label=label,
            )  # fmt: skip
        curves["random order"] = evaluate.region_perturbation(
            net, images, "random", k=patch, steps=steps, batch_size=max(batch_size, 64),
            seed=seed, label="random order",
        )  # fmt: skip
        del images
        summaries = [curve_summary(label, c) for label, c in curves.items()]
        files["figure4"] = out / "figure4-degradation.png"
        viz.save(degradation_figure(summaries), files["figure4"])
        aopc = {s.label: (s.aopc, s.aopc_low, s.aopc_high) for s in summaries}
        rows = ["method,aopc,low,high,images"] + [
            f"{s.label},{s.aopc},{s.aopc_low},{s.aopc_high},{s.images}" for s in summaries
        ]
        files["aopc_csv"] = out / "aopc.csv"
        atomic_write(files["aopc_csv"], lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
        now = lap("Figure 4: degradation", now)
        log(f"  Figure 4 ({val_images} images, {patch}×{patch} regions) → {files['figure4']}")

        # ------------------------------------------------------------ 4. Figure 7
        shown, labels = _stack(val, val_order[:grid_images])
        classes = getattr(val, "classes", None) or []
        row_titles = [classes[int(c)] if 0 <= int(c) < len(classes) else f"#{i + 1}"
                      for i, c in enumerate(labels)]  # fmt: skip
        grid = explanation_grid(
            net, shown, dict(FIGURE7_METHODS), patterns=fitted["two_component"],
            explain=lambda method, x: _attribute(method, x, batch_size, device),
            mean=preset.mean, std=preset.std, row_titles=row_titles,
        )  # fmt: skip
        files["figure7"] = grid.save(out / "figure7-explanations.png")
        now = lap("Figure 7: explanations", now)
        log(f"  Figure 7 ({grid_images} images) → {files['figure7']}")

        # ------------------------------------------------------------ 5. report
        settings: dict[str, Any] = {
            "imagenet": str(root), "model": spec, "weights": weights or "random (seeded)",
            "fit_images": fit_images, "quality_images": quality_images,
            "val_images": val_images, "grid_images": grid_images, "patch": patch,
            "steps": steps, "device": str(device), "batch_size": batch_size, "seed": seed,
            "processes": distributed.world_size() if launched else 1, "preset": repr(preset),
        }  # fmt: skip
        report = Report(
            title=f"patternnet reproduce: {spec} on {root.name}",
            grid=grid, quality=quality, degradation=curves, settings=settings,
            timings=dict(timings),
            notes=[
                "Kindermans et al., ICLR 2018: Figure 3 (ρ(S) per layer), Figure 4 (image "
                "degradation) and Figure 7 (explanations), recomputed on this folder.",
            ],
        )  # fmt: skip
        files["report"] = report.write(out / "report.html")
        now = lap("report", now)
        timings["total"] = time.perf_counter() - started
        summary = {
            "settings": settings, "timings": timings,
            "aopc": {k: list(v) for k, v in aopc.items()},
            "rho": quality.rows(), "files": {k: str(v) for k, v in files.items()},
        }  # fmt: skip
        files["summary"] = out / "summary.json"
        text = json.dumps(summary, indent=2, default=float)
        atomic_write(files["summary"], lambda tmp: Path(tmp).write_text(text + "\n"))
        log(f"  report → {files['report']} ({timings['total']:.1f} s in all)")
        return Reproduction(files, quality, curves, aopc, timings, settings)
    finally:
        if launched:
            distributed.shutdown()
