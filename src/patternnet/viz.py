"""Pictures of explanations: heatmaps, signal images, overlays and grids (method.md §8).

- :func:`signal_image` shows a signal (PatternNet, gradient, DeConvNet, Guided BackProp) as an
  image: ``x / (2·max|x|) + ½`` per image, keeping the colour channels, so zero is mid-grey.
- :func:`heatmap` shows an attribution (PatternAttribution, LRP, gradient × input): summed over
  channels, divided by ``max|·|`` and mapped through a diverging colour map, red positive and
  blue negative, white zero. The default map, ColorBrewer's ``RdBu`` reversed
  (:data:`DEFAULT_CMAP`), was designed to stay readable with colour-vision deficiency.
- :func:`overlay` lays a heatmap over a greyscale copy of the input.
- :func:`grid` arranges such pictures, one row per input and one column per method, like the
  paper's Figures 6 and 7.
- :func:`degradation_plot` draws image-degradation curves (the paper's Figure 4).

The array functions return ``(H, W, 3)`` (or ``(H, W)`` for one-channel signals) float arrays
in ``[0, 1]`` and need only numpy; :func:`grid` imports matplotlib when called and builds a
``matplotlib.figure.Figure`` without pyplot, so it works in scripts (Agg canvas, no display)
and shows inline in notebooks, and never changes the global backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "DEFAULT_CMAP",
    "degradation_plot",
    "grid",
    "heatmap",
    "input_image",
    "overlay",
    "picture",
    "save",
    "signal_image",
]

DEFAULT_CMAP = "RdBu_r"

ArrayLike = Any  # Tensor or numpy array


def _as_chw(x: ArrayLike, what: str) -> np.ndarray:
    """One sample as a float64 ``(C, H, W)`` array (accepts (H, W), (C, H, W), (1, C, H, W))."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(
            f"{what} must be one sample (H, W) or (C, H, W), got shape {array.shape}; "
            "index the batch first, e.g. explanation[0]"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN or Inf values")
    return array


def _hwc(array: np.ndarray) -> np.ndarray:
    """(C, H, W) → (H, W) for one channel, (H, W, 3) for three."""
    if array.shape[0] == 1:
        return array[0]
    return array.transpose(1, 2, 0)


def signal_image(signal: ArrayLike) -> np.ndarray:
    """A signal as a displayable image: ``x / (2·max|x|) + ½`` (method.md §8).

    Parameters
    ----------
    signal:
        One sample ``(C, H, W)`` or ``(H, W)`` (e.g. ``PatternNet(...).attribute(x)[0]``).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` for one channel, ``(H, W, C)`` otherwise, values in ``[0, 1]``; zero signal
        is 0.5 (grey). An all-zero signal gives a uniform grey image.
    """
    array = _as_chw(signal, "signal")
    scale = np.abs(array).max()
    out = array / (2.0 * scale) + 0.5 if scale > 0 else np.full_like(array, 0.5)
    return _hwc(np.clip(out, 0.0, 1.0))


def _normalised_attribution(attribution: ArrayLike) -> np.ndarray:
    """Summed over channels and divided by max|·|: an (H, W) array in [-1, 1]."""
    array = _as_chw(attribution, "attribution").sum(axis=0)
    scale = np.abs(array).max()
    return array / scale if scale > 0 else array


def _colormap(cmap: Any) -> Any:
    import matplotlib

    return matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap


def heatmap(attribution: ArrayLike, *, cmap: Any = DEFAULT_CMAP) -> np.ndarray:
    """An attribution as an RGB heatmap (method.md §8).

    Parameters
    ----------
    attribution:
        One sample ``(C, H, W)`` or ``(H, W)``.
    cmap:
        A matplotlib colour map or its name; the default :data:`DEFAULT_CMAP` is a
        colour-blind-safe diverging map, red positive, blue negative, white zero.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` RGB values in ``[0, 1]``.
    """
    values = _normalised_attribution(attribution)
    rgba = _colormap(cmap)((values + 1.0) / 2.0)
    return np.asarray(rgba[..., :3], dtype=np.float64)


def input_image(
    x: ArrayLike,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """An input as a displayable image, undoing ``(x - mean) / std`` if given.

    Without ``mean``/``std`` the sample is scaled to ``[0, 1]`` by its own minimum and
    maximum. Returns ``(H, W)`` or ``(H, W, C)`` in ``[0, 1]``.
    """
    array = _as_chw(x, "input")
    if mean is not None or std is not None:
        channels = array.shape[0]
        m = np.asarray(mean if mean is not None else (0.0,), dtype=np.float64)
        s = np.asarray(std if std is not None else (1.0,), dtype=np.float64)
        m = np.broadcast_to(m, (channels,))[:, None, None]
        s = np.broadcast_to(s, (channels,))[:, None, None]
        array = array * s + m
    else:
        low, high = array.min(), array.max()
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return _hwc(np.clip(array, 0.0, 1.0))


def picture(result: ArrayLike, kind: str) -> np.ndarray:
    """An explanation drawn as its method's ``kind`` says (the one place that decides).

    Parameters
    ----------
    result:
        One explanation ``(C, H, W)`` or ``(H, W)``.
    kind:
        ``"signal"`` (:func:`signal_image`, grey = 0) or ``"attribution"`` (:func:`heatmap`,
        red + / blue −): the ``kind`` attribute of the method that made it.
    """
    if kind == "signal":
        return signal_image(result)
    if kind == "attribution":
        return heatmap(result)
    raise ValueError(f"kind must be 'signal' or 'attribution', not {kind!r}")


def overlay(
    image: ArrayLike,
    attribution: ArrayLike,
    *,
    cmap: Any = DEFAULT_CMAP,
    alpha: float = 0.7,
) -> np.ndarray:
    """A heatmap laid over a greyscale copy of ``image``.

    Each pixel's heatmap opacity is ``alpha · |attribution| / max|attribution|``, so
    unimportant pixels show the input and important ones the heatmap colour.

    Parameters
    ----------
    image:
        A displayable image (from :func:`input_image`) ``(H, W)`` or ``(H, W, 3)`` in
        ``[0, 1]``, or a ``(C, H, W)`` tensor/array (scaled by its own range).
    attribution:
        One sample ``(C, H, W)`` or ``(H, W)`` of the same height and width.
    alpha:
        Opacity of the strongest attribution, in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` RGB values in ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.asarray(
        image.detach().cpu().numpy() if isinstance(image, Tensor) else image, dtype=np.float64
    )
    if base.ndim == 3 and base.shape[0] in (1, 3) and base.shape[-1] not in (1, 3):
        base = input_image(base)  # (C, H, W) input
    grey = base.mean(axis=-1) if base.ndim == 3 else base
    values = _normalised_attribution(attribution)
    if grey.shape != values.shape:
        raise ValueError(
            f"image is {grey.shape[0]}×{grey.shape[1]} but the attribution is "
            f"{values.shape[0]}×{values.shape[1]}"
        )
    colour = heatmap(values, cmap=cmap)
    weight = alpha * np.abs(values)[..., None]
    return (1.0 - weight) * np.repeat(grey[..., None], 3, axis=-1) + weight * colour


def grid(
    rows: Sequence[Sequence[np.ndarray]],
    *,
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    cell_size: float = 1.25,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
    dpi: int = 150,
) -> Any:
    """Arrange pictures in a grid: one row per input, one column per method.

    Parameters
    ----------
    rows:
        ``rows[i][j]`` is an image array ``(H, W)`` (shown in grey) or ``(H, W, 3)``, values
        in ``[0, 1]`` (from :func:`input_image`, :func:`signal_image`, :func:`heatmap`).
    column_titles, row_titles:
        Labels above the columns and left of the rows.
    cell_size:
        Inches per picture.
    title:
        A title above the grid.
    path:
        If given, save the figure there (PNG, PDF, SVG by the suffix).
    dpi:
        Resolution of a saved raster image.

    Returns
    -------
    matplotlib.figure.Figure
        Shown inline by notebooks; never registered with pyplot.
    """
    from matplotlib.figure import Figure

    if not rows or not rows[0]:
        raise ValueError("grid needs at least one row with one picture")
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    if column_titles is not None and len(column_titles) != n_cols:
        raise ValueError(f"{len(column_titles)} column titles for {n_cols} columns")
    if row_titles is not None and len(row_titles) != n_rows:
        raise ValueError(f"{len(row_titles)} row titles for {n_rows} rows")
    top = 0.35 if column_titles else 0.05
    top += 0.25 if title else 0.0
    left = 0.7 if row_titles else 0.05
    width = left + n_cols * cell_size + 0.05
    height = top + n_rows * cell_size + 0.05
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(
        left=left / width,
        right=1 - 0.05 / width,
        top=1 - top / height,
        bottom=0.05 / height,
        wspace=0.04,
        hspace=0.04,
    )
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.set_axis_off()
                continue
            picture = np.asarray(row[j])
            if picture.ndim == 2:
                ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(np.clip(picture, 0.0, 1.0), interpolation="nearest")
            for spine in ax.spines.values():
                spine.set_linewidth(0.4)
            if i == 0 and column_titles is not None:
                ax.set_title(column_titles[j], fontsize=8)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        figure.suptitle(title, fontsize=10, y=1 - 0.02 / height, va="top")
    if path is not None:
        save(figure, path, dpi=dpi)
    return figure


def save(figure: Any, path: str | os.PathLike[str], *, dpi: int = 150) -> None:
    """Save a matplotlib figure, creating the folder (Agg canvas; no display needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")


# Okabe & Ito's palette: distinguishable with every common colour-vision deficiency
LINE_COLOURS = ("#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#777777")
LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)))


def degradation_plot(
    curves: Mapping[str, Any],
    *,
    title: str = "Image degradation (steeper = better)",
    path: str | os.PathLike[str] | None = None,
    confidence: float | None = 0.95,
    resamples: int = 1000,
) -> Any:
    """Mean perturbation curves of several explanations in one plot (the paper's Figure 4),
    each with its shaded pointwise bootstrap band over images and its AOPC interval in the
    legend (curves with a ``band`` method, i.e. :class:`PerturbationCurves`).

    Parameters
    ----------
    curves:
        ``{label: PerturbationCurves}`` from
        :func:`patternnet.evaluate.perturbation.region_perturbation` (anything with
        ``.mean()``, ``.aopc()`` and ``.k``). A label containing ``"random"`` is drawn grey.
    title:
        Plot title.
    path:
        If given, save the figure there.
    confidence:
        Coverage of the shaded bands and legend intervals (``None``: no bands).
    resamples:
        Bootstrap resamples.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("degradation_plot needs at least one curve")
    figure = Figure(figsize=(5.4, 3.7))
    ax = figure.subplots()
    k, replacement = None, "mean"
    for i, (label, curve) in enumerate(curves.items()):
        mean = curve.mean().detach().cpu().numpy()
        k, replacement = curve.k, getattr(curve, "replacement", "mean")
        colour = "#777777" if "random" in label else LINE_COLOURS[i % len(LINE_COLOURS)]
        text = f"{label}  (AOPC {curve.aopc():.3f})"
        banded = confidence is not None and hasattr(curve, "band") and curve.scores.shape[0] > 1
        if banded:
            low, high = curve.band(confidence=confidence, resamples=resamples)
            ax.fill_between(range(len(mean)), low.numpy(), high.numpy(), color=colour,
                            alpha=0.15, linewidth=0)  # fmt: skip
            interval = curve.aopc_interval(confidence=confidence, resamples=resamples)
            text = f"{label}  (AOPC {interval})"
        ax.plot(
            range(len(mean)),
            mean,
            linestyle=LINE_STYLES[i % len(LINE_STYLES)],
            linewidth=1.6,
            color=colour,
            label=text,
        )
    band_note = f"; bands: {confidence:.0%} bootstrap over images" if confidence else ""
    ax.set_xlabel(f"regions replaced ({replacement}; {k}×{k} px{band_note})")
    ax.set_ylabel("probability of the predicted class")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    if path is not None:
        save(figure, path)
    return figure
