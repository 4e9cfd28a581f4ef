"""Image degradation by region perturbation, and the area over the perturbation curve.

method.md §6, after Samek, Binder, Montavon, Lapuschkin, Müller, "Evaluating the visualization
of what a deep neural network has learned", IEEE TNNLS 2017 (and Kindermans et al. 2018,
Sec. 5.2). For each image:

1. cut it into non-overlapping ``k×k`` regions, row-major from the top-left corner. When the
   height or width is not divisible by ``k`` the last row/column of regions is *smaller*
   (``H mod k`` pixels high / ``W mod k`` wide): every pixel belongs to exactly one region and
   no pixel is dropped or padded;
2. score every region by its summed attribution (over channels and pixels) and sort the regions
   by decreasing score (ties keep row-major order), or in a seeded random order for the baseline;
3. replace the regions one after the other: after step ``t`` the first ``t`` regions of the order
   hold their replacement values and the others their original pixels;
4. record the softmax probability of the class predicted on the unperturbed image (or of
   ``target``) after each of the first ``steps`` steps (step 0 = the unperturbed image).

The replacement of a region is, per ``replacement``:

- ``"mean"``: the region's own mean per channel (the paper's choice);
- ``"zeros"``: 0;
- ``"blur"``: the same pixels of a Gaussian-blurred copy of the image (``σ = k/2`` by default);
- ``"uniform"``: uniform noise between each channel's minimum and maximum over the batch
  (seeded).

The curves of a whole batch are computed in few forward passes: all ``(image, step)`` pairs are
built as perturbed images and sent through the model ``batch_size`` at a time.
A steeper decay (a larger AOPC) means the explanation found the evidence the model uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..borrow import borrowed, model_device, model_dtype
from ..groundtruth.noise import gaussian_kernel
from ..methods.base import resolve_target

__all__ = [
    "REPLACEMENTS",
    "PerturbationCurves",
    "aopc",
    "perturbed_images",
    "region_grid",
    "region_order",
    "region_perturbation",
    "region_scores",
    "replacement_values",
]

REPLACEMENTS = ("mean", "zeros", "blur", "uniform")


def region_grid(height: int, width: int, k: int) -> Tensor:
    """Region index of every pixel: ``(H, W)`` int64, regions numbered row-major.

    There are ``⌈H/k⌉ × ⌈W/k⌉`` regions; those in the last row/column are smaller when ``k``
    does not divide the side.
    """
    if k < 1:
        raise ValueError(f"region size k must be at least 1, not {k}")
    rows = torch.arange(height) // k
    cols = torch.arange(width) // k
    return rows[:, None] * math.ceil(width / k) + cols[None, :]


def _check_images(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor (N, C, H, W), not {type(tensor).__name__}")
    if tensor.dim() != 4:
        raise ValueError(
            f"{name} must be images (N, C, H, W), got shape {tuple(tensor.shape)}; region "
            "perturbation needs two spatial dimensions"
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; pass floating-point images (uint8 pixels: "
            "x.float() / 255, then the model's normalisation)"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or Inf values; clean them first")


def region_scores(attributions: Tensor, k: int) -> Tensor:
    """Summed attribution (over channels and pixels) of every region: ``(N, R)`` float64."""
    _check_images("attributions", attributions)
    n, _, h, w = attributions.shape
    ids = region_grid(h, w, k).to(attributions.device).flatten()
    per_pixel = attributions.detach().to(torch.float64).sum(1).reshape(n, -1)
    scores = torch.zeros(n, int(ids.max()) + 1, dtype=torch.float64, device=per_pixel.device)
    return scores.index_add_(1, ids, per_pixel)


def region_order(
    attributions: Tensor | str,
    k: int,
    *,
    shape: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Regions in the order they are replaced: ``(N, R)`` int64.

    Parameters
    ----------
    attributions:
        ``(N, C, H, W)`` attributions (decreasing summed attribution, ties row-major), or
        ``"random"`` (a random permutation per image; needs ``shape``).
    k:
        Region size.
    shape:
        ``(N, C, H, W)`` of the images, for ``"random"``.
    generator:
        For ``"random"``.
    """
    if isinstance(attributions, str):
        if attributions != "random":
            raise ValueError(f"attributions must be a tensor or 'random', not {attributions!r}")
        if shape is None:
            raise ValueError("a random order needs the images' shape")
        n, _, h, w = shape
        regions = math.ceil(h / k) * math.ceil(w / k)
        keys = torch.rand(n, regions, generator=generator)
        return keys.argsort(dim=1)
    scores = region_scores(attributions, k)
    return torch.sort(scores, dim=1, descending=True, stable=True).indices.cpu()


def replacement_values(
    inputs: Tensor,
    k: int,
    replacement: str = "mean",
    *,
    generator: torch.Generator | None = None,
    blur_sigma: float | None = None,
) -> Tensor:
    """The value every pixel takes once its region is replaced: shaped like ``inputs``.

    See the module docstring for the meaning of ``replacement``.
    """
    _check_images("inputs", inputs)
    n, c, h, w = inputs.shape
    if replacement == "mean":
        ids = region_grid(h, w, k).to(inputs.device).flatten()
        regions = int(ids.max()) + 1
        flat = inputs.detach().to(torch.float64).reshape(n, c, -1)
        sums = torch.zeros(n, c, regions, dtype=torch.float64, device=inputs.device)
        sums.index_add_(2, ids, flat)
        counts = torch.bincount(ids, minlength=regions).to(sums)
        means = sums / counts
        return means[:, :, ids].reshape(n, c, h, w).to(inputs.dtype)
    if replacement == "zeros":
        return torch.zeros_like(inputs)
    if replacement == "blur":
        kernel = gaussian_kernel(blur_sigma if blur_sigma is not None else k / 2).to(inputs)
        radius = kernel.numel() // 2
        x = inputs.detach().reshape(n * c, 1, h, w)
        mode = "reflect" if min(h, w) > radius else "replicate"
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
        return x.reshape(n, c, h, w)
    if replacement == "uniform":
        low = inputs.detach().amin(dim=(0, 2, 3)).view(1, c, 1, 1)
        high = inputs.detach().amax(dim=(0, 2, 3)).view(1, c, 1, 1)
        noise = torch.rand(inputs.shape, generator=generator).to(inputs)
        return low + (high - low) * noise
    raise ValueError(f"unknown replacement {replacement!r}; choose from {REPLACEMENTS}")


def perturbed_images(
    inputs: Tensor, values: Tensor, ranks: Tensor, images: Tensor, steps: Tensor
) -> Tensor:
    """Image ``images[i]`` after ``steps[i]`` replacements, for a list of pairs.

    Parameters
    ----------
    inputs, values:
        ``(N, C, H, W)`` originals and replacement values.
    ranks:
        ``(N, H, W)``: the step at which each pixel's region is replaced (0 = first).
    images, steps:
        ``(P,)`` image indices and step counts.

    Returns
    -------
    Tensor
        ``(P, C, H, W)``: pixels whose rank is below the step count take their replacement.
    """
    replaced = (ranks[images] < steps.view(-1, 1, 1).to(ranks.device)).unsqueeze(1)
    return torch.where(replaced, values[images], inputs[images])


@dataclass
class PerturbationCurves:
    """Result of :func:`region_perturbation`.

    Attributes
    ----------
    scores:
        ``(N, steps + 1)`` probability of the target class after ``0 … steps`` replacements.
    order:
        ``(N, R)`` the regions in the order they were replaced.
    target:
        ``(N,)`` the class followed (the prediction on the unperturbed image by default).
    k, replacement:
        The settings used.
    label:
        A name for plots and tables (e.g. the method).
    """

    scores: Tensor
    order: Tensor
    target: Tensor
    k: int
    replacement: str
    label: str = ""

    @property
    def steps(self) -> int:
        """Number of perturbation steps recorded."""
        return self.scores.shape[1] - 1

    def mean(self) -> Tensor:
        """``(steps + 1,)`` mean curve over images."""
        return self.scores.mean(0)

    def aopc(self) -> float:
        """Area over the perturbation curve (see :func:`aopc`)."""
        return aopc(self)


def aopc(curves: PerturbationCurves | Tensor) -> float:
    """Area over the perturbation curve (Samek et al. 2017, Eq. 12).

    ``AOPC = 1/(L+1) · Σ_{t=0..L} ⟨f(x⁽⁰⁾) − f(x⁽ᵗ⁾)⟩`` over images, with ``L`` the number of
    steps. Larger is better: the explanation's most relevant regions destroy the evidence first.

    Parameters
    ----------
    curves:
        :class:`PerturbationCurves` or an ``(N, L + 1)`` tensor of scores.
    """
    scores = curves.scores if isinstance(curves, PerturbationCurves) else curves
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (N, steps + 1), got shape {tuple(scores.shape)}")
    drop = scores[:, :1] - scores
    return float(drop.double().mean())


def region_perturbation(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor | str,
    *,
    k: int = 9,
    steps: int = 100,
    replacement: str = "mean",
    target: int | Tensor | None = None,
    batch_size: int = 256,
    seed: int = 0,
    blur_sigma: float | None = None,
    output_selector: Callable[[Any], Tensor] | None = None,
    label: str = "",
) -> PerturbationCurves:
    """Degrade images region by region in the order of an explanation (method.md §6).

    Parameters
    ----------
    model:
        A classifier returning logits ``(N, C)`` (borrowed: eval mode, restored afterwards).
    inputs:
        ``(N, C, H, W)`` images.
    attributions:
        ``(N, C, H, W)`` (or ``(N, 1, H, W)``) attributions of ``inputs``, or ``"random"`` for
        the random-order baseline.
    k:
        Region side in pixels (default 9, the paper's); see the module docstring for sides not
        divisible by ``k``.
    steps:
        Replacement steps recorded (default 100; at most the number of regions).
    replacement:
        ``"mean"`` (default), ``"zeros"``, ``"blur"`` or ``"uniform"``.
    target:
        Class to follow: None (each image's prediction), an int, or one class per image.
    batch_size:
        Perturbed images per forward pass.
    seed:
        Seeds the random order and the uniform noise.
    blur_sigma:
        Standard deviation of the blur (default ``k/2``).
    output_selector:
        For models whose output is not the logits tensor.
    label:
        Stored in the result (e.g. the method's name).

    Returns
    -------
    PerturbationCurves
        ``.scores`` ``(N, steps + 1)``, ``.mean()``, ``.aopc()``.

    Examples
    --------
    >>> attr = PatternAttribution(model, patterns).attribute(images)        # doctest: +SKIP
    >>> curves = region_perturbation(model, images, attr, k=4, steps=40)   # doctest: +SKIP
    >>> baseline = region_perturbation(model, images, "random", k=4, steps=40)  # doctest: +SKIP
    >>> aopc(curves) > aopc(baseline)                                      # doctest: +SKIP
    """
    _check_images("inputs", inputs)
    if replacement not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {replacement!r}; choose from {REPLACEMENTS}")
    if isinstance(attributions, Tensor):
        _check_images("attributions", attributions)
        n, _, h, w = attributions.shape
        if (n, h, w) != (inputs.shape[0], *inputs.shape[2:]):
            raise ValueError(
                f"attributions {tuple(attributions.shape)} do not match inputs "
                f"{tuple(inputs.shape)} (same N, H, W needed)"
            )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive (got {steps}, {batch_size})")
    generator = torch.Generator().manual_seed(seed)
    n, _, h, w = inputs.shape
    ids = region_grid(h, w, k)
    order = region_order(attributions, k, shape=tuple(inputs.shape), generator=generator)
    steps = min(steps, order.shape[1])
    device, dtype = model_device(model), model_dtype(model)
    x = inputs.detach().to(device=device, dtype=dtype)
    values = replacement_values(x, k, replacement, generator=generator, blur_sigma=blur_sigma)
    rank_of_region = torch.empty_like(order)
    rank_of_region.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    ranks = rank_of_region[:, ids.flatten()].reshape(n, h, w).to(device)

    def logits(batch: Tensor) -> Tensor:
        out = model(batch)
        return output_selector(out) if output_selector is not None else out

    pairs_image = torch.arange(n).repeat_interleave(steps + 1)
    pairs_step = torch.arange(steps + 1).repeat(n)
    scores = torch.empty(n * (steps + 1), dtype=torch.float64)
    with borrowed(model), torch.no_grad():
        if target is None:
            chosen = torch.cat([logits(b).argmax(1).cpu() for b in x.split(batch_size)])
        else:
            classes = logits(x[:1]).shape[1]
            chosen = resolve_target(target, torch.zeros(n, classes)).cpu()
        for start in range(0, len(pairs_image), batch_size):
            images = pairs_image[start : start + batch_size]
            step = pairs_step[start : start + batch_size]
            batch = perturbed_images(x, values, ranks, images.to(device), step)
            probs = torch.softmax(logits(batch).double(), dim=1).cpu()
            scores[start : start + len(images)] = probs.gather(1, chosen[images, None])[:, 0]
    return PerturbationCurves(
        scores=scores.reshape(n, steps + 1),
        order=order,
        target=chosen,
        k=k,
        replacement=replacement,
        label=label,
    )
