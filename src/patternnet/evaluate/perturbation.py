"""Image degradation by region perturbation, and the area over the perturbation curve.

method.md §6, after Samek, Binder, Montavon, Lapuschkin, Müller, "Evaluating the visualization
of what a deep neural network has learned", IEEE TNNLS 2017 (and Kindermans et al. 2018,
Sec. 5.2). For each image:

1. cut it into non-overlapping ``k×k`` regions, row-major from the top-left corner;
2. score every region by its attribution (summed over channels) and sort the regions by
   decreasing score — most relevant first, "MoRF" — or increasing score — least relevant first,
   "LeRF" (ties keep row-major order), or in a seeded random order for the baseline;
3. replace the regions one after the other: after step ``t`` the first ``t`` regions of the order
   hold their replacement values and the others their original pixels;
4. record the softmax probability of the class predicted on the unperturbed image (or of
   ``target``) after each of the first ``steps`` steps (step 0 = the unperturbed image).

Edges. When ``k`` does not divide the height or width (the paper's 9×9 regions on 224² images:
224 = 24·9 + 8), the border regions need a rule, chosen by ``edge``:

- ``"reflect"`` (default; what iNNvestigate's ``Perturbation`` does, the reference code of the
  paper): the image and the attribution are reflect-padded by ``(−H) mod k`` rows (half above,
  the rest below) and likewise columns, so that every region is a full ``k×k`` block of the
  padded image; a region is scored by its mean attribution over the padded block, its ``"mean"``
  replacement is the block's mean, and only its pixels inside the image are replaced;
- ``"mean"``: regions are cut from the top-left corner and those in the last row/column are
  smaller; a region is scored by its mean attribution per pixel, so small regions compete
  fairly with full ones;
- ``"sum"``: the same smaller regions scored by their summed attribution (earlier releases' rule:
  smaller edge regions rank lower, an artefact).

When ``k`` divides both sides the three rules coincide.

The replacement of a region is, per ``replacement``:

- ``"mean"``: the region's own mean per channel (the paper's choice);
- ``"zeros"``: 0;
- ``"blur"``: the same pixels of a Gaussian-blurred copy of the image (``σ = k/2`` by default);
- ``"uniform"``: uniform noise in a fixed range ``uniform_range=(low, high)`` that the caller
  sets (the valid pixel range in the model's input space, e.g. ``(0, 1)`` or the normalised
  range; per channel if given as sequences), seeded. A range taken from the data would make a
  result depend on how the batch was made up.

The curves of a whole batch are computed in few forward passes: all ``(image, step)`` pairs are
built as perturbed images and sent through the model ``batch_size`` at a time.
A steeper MoRF decay (a larger AOPC) means the explanation found the evidence the model uses;
under LeRF a good explanation keeps the probability up (a small AOPC).

Uncertainty. Every image gives one AOPC; the reported AOPC is their mean and its confidence
interval is a percentile bootstrap over images (:meth:`PerturbationCurves.aopc_interval`; the
plots shade the pointwise bootstrap band of the mean curve). Two methods measured on the same
images are compared by a *paired* bootstrap of the per-image AOPC differences
(:func:`paired_difference`): the interval of the mean difference, and whether it excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..borrow import borrowed, model_device, model_dtype
from ..groundtruth.noise import gaussian_kernel
from ..methods.base import resolve_target

__all__ = [
    "EDGES",
    "ORDERS",
    "REPLACEMENTS",
    "DegradationTable",
    "Interval",
    "PairedDifference",
    "PerturbationCurves",
    "aopc",
    "bootstrap_interval",
    "degradation_table",
    "paired_difference",
    "paired_differences",
    "perturbed_images",
    "region_grid",
    "region_order",
    "region_perturbation",
    "region_scores",
    "replacement_values",
]

REPLACEMENTS = ("mean", "zeros", "blur", "uniform")
EDGES = ("reflect", "mean", "sum")
ORDERS = ("morf", "lerf")


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


def _check_edge(edge: str) -> None:
    if edge not in EDGES:
        raise ValueError(f"unknown edge rule {edge!r}; choose from {EDGES}")


def _padding(height: int, width: int, k: int) -> tuple[int, int, int, int]:
    """Reflect padding ``(left, right, top, bottom)`` that makes both sides multiples of k."""
    if k < 1:
        raise ValueError(f"region size k must be at least 1, not {k}")
    ph, pw = (-height) % k, (-width) % k
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def _reflect(x: Tensor, pad: tuple[int, int, int, int]) -> Tensor:
    if not any(pad):
        return x
    h, w = x.shape[-2:]
    mode = "reflect" if max(pad[2:]) < h and max(pad[:2]) < w else "replicate"
    return F.pad(x, pad, mode=mode)


def region_ids(height: int, width: int, k: int, edge: str = "reflect") -> Tensor:
    """Region index of every pixel of the image, ``(H, W)`` int64, under the ``edge`` rule.

    ``"mean"``/``"sum"``: :func:`region_grid`. ``"reflect"``: the regions of the padded
    image (see the module docstring) restricted to the image, so the border regions are
    shifted by half the padding.
    """
    _check_edge(edge)
    if edge != "reflect":
        return region_grid(height, width, k)
    left, right, top, bottom = _padding(height, width, k)
    grid = region_grid(height + top + bottom, width + left + right, k)
    return grid[top : top + height, left : left + width]


def region_scores(attributions: Tensor, k: int, edge: str = "reflect") -> Tensor:
    """Score of every region (attribution summed over channels): ``(N, R)`` float64.

    ``"sum"``: summed over the region's pixels; ``"mean"``: averaged over them; ``"reflect"``:
    averaged over the region's block of the reflect-padded attribution.
    """
    _check_images("attributions", attributions)
    _check_edge(edge)
    per_pixel = attributions.detach().to(torch.float64).sum(1, keepdim=True)
    sums, counts = _region_sums(per_pixel, k, edge)
    return sums[:, 0] if edge == "sum" else sums[:, 0] / counts


def _region_sums(x: Tensor, k: int, edge: str) -> tuple[Tensor, Tensor]:
    """Per-channel sums over each region, ``(N, C, R)`` float64, and the pixels per region.

    With ``edge="reflect"`` the regions are the k×k blocks of the reflect-padded ``x``.
    """
    n, c, h, w = x.shape
    x = x.detach().to(torch.float64)
    if edge == "reflect":
        x = _reflect(x, _padding(h, w, k))
    ids = region_grid(x.shape[2], x.shape[3], k).to(x.device).flatten()
    regions = int(ids.max()) + 1
    sums = torch.zeros(n, c, regions, dtype=torch.float64, device=x.device)
    sums.index_add_(2, ids, x.reshape(n, c, -1))
    return sums, torch.bincount(ids, minlength=regions).to(sums)


def region_order(
    attributions: Tensor | str,
    k: int,
    *,
    shape: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
    edge: str = "reflect",
    order: str = "morf",
) -> Tensor:
    """Regions in the order they are replaced: ``(N, R)`` int64.

    Parameters
    ----------
    attributions:
        ``(N, C, H, W)`` attributions (ties keep row-major order), or ``"random"`` (a random
        permutation per image; needs ``shape``).
    k:
        Region size.
    shape:
        ``(N, C, H, W)`` of the images, for ``"random"``.
    generator:
        For ``"random"``.
    edge:
        How border regions are scored (module docstring).
    order:
        ``"morf"`` (most relevant first, default) or ``"lerf"`` (least relevant first).
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose from {ORDERS}")
    if isinstance(attributions, str):
        if attributions != "random":
            raise ValueError(f"attributions must be a tensor or 'random', not {attributions!r}")
        if shape is None:
            raise ValueError("a random order needs the images' shape")
        n, _, h, w = shape
        regions = math.ceil(h / k) * math.ceil(w / k)
        keys = torch.rand(n, regions, generator=generator)
        return keys.argsort(dim=1)
    scores = region_scores(attributions, k, edge)
    descending = order == "morf"
    return torch.sort(scores, dim=1, descending=descending, stable=True).indices.cpu()


def _channel_range(bound: Any, c: int, like: Tensor) -> Tensor:
    value = torch.as_tensor(bound, dtype=like.dtype, device=like.device).flatten()
    if value.numel() not in (1, c):
        raise ValueError(f"uniform_range bounds need 1 or {c} values (one per channel), "
                         f"not {value.numel()}")  # fmt: skip
    return value.expand(c).reshape(1, c, 1, 1)


def replacement_values(
    inputs: Tensor,
    k: int,
    replacement: str = "mean",
    *,
    generator: torch.Generator | None = None,
    blur_sigma: float | None = None,
    edge: str = "reflect",
    uniform_range: tuple[Any, Any] | None = None,
) -> Tensor:
    """The value every pixel takes once its region is replaced: shaped like ``inputs``.

    See the module docstring for the meaning of ``replacement`` and ``edge``;
    ``uniform_range=(low, high)`` (floats or one value per channel) is required for
    ``"uniform"``.
    """
    _check_images("inputs", inputs)
    _check_edge(edge)
    n, c, h, w = inputs.shape
    if replacement == "mean":
        sums, counts = _region_sums(inputs, k, edge)
        means = sums / counts
        inside = region_ids(h, w, k, edge).to(inputs.device).flatten()
        return means[:, :, inside].reshape(n, c, h, w).to(inputs.dtype)
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
        if uniform_range is None:
            raise ValueError(
                "replacement='uniform' needs uniform_range=(low, high): the valid pixel range "
                "in the model's input space (e.g. (0, 1), or the range after normalisation; "
                "one value per channel allowed). It is fixed so that results do not depend on "
                "the batch."
            )
        low = _channel_range(uniform_range[0], c, inputs)
        high = _channel_range(uniform_range[1], c, inputs)
        if (high < low).any():
            raise ValueError(f"uniform_range {uniform_range}: low must not exceed high")
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


#: Bootstrap resamples used by default for every interval.
RESAMPLES = 2000


@dataclass
class Interval:
    """A statistic with its percentile-bootstrap confidence interval.

    Attributes
    ----------
    estimate:
        The statistic on the full sample.
    low, high:
        The interval's bounds.
    confidence:
        Its nominal coverage (e.g. 0.95).
    resamples:
        Bootstrap resamples used.
    samples:
        Sample size (images).
    """

    estimate: float
    low: float
    high: float
    confidence: float = 0.95
    resamples: int = RESAMPLES
    samples: int = 0

    @property
    def width(self) -> float:
        """``high − low``."""
        return self.high - self.low

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def __getitem__(self, index: int) -> float:
        """``interval[0]`` is ``low``, ``interval[1]`` is ``high`` (reads as a pair)."""
        return (self.low, self.high)[index]

    def to_record(self, prefix: str = "") -> dict[str, Any]:
        """``{prefix+"estimate", prefix+"low", prefix+"high", …}`` as plain numbers."""
        return {f"{prefix}estimate": self.estimate, f"{prefix}low": self.low,
                f"{prefix}high": self.high, f"{prefix}confidence": self.confidence,
                f"{prefix}resamples": self.resamples, f"{prefix}samples": self.samples}  # fmt: skip


def _resample_means(values: Tensor, resamples: int, seed: int) -> Tensor:
    """Means of ``values`` ``(N, ...)`` over ``resamples`` bootstrap resamples of the rows."""
    n = values.shape[0]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, resamples, 256):  # bounded memory for long curves
        count = min(256, resamples - start)
        idx = torch.randint(n, (count, n), generator=generator)
        out.append(values.double()[idx].mean(1))
    return torch.cat(out)


def bootstrap_interval(
    values: Tensor, *, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` ``(N,)`` (resampling rows)."""
    values = torch.as_tensor(values).detach().double().cpu().flatten()
    if values.numel() < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 samples, not {values.numel()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    means = _resample_means(values, resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return Interval(float(values.mean()), float(low), float(high), confidence, resamples,
                    values.numel())  # fmt: skip


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
    direction:
        ``"morf"`` (most relevant first), ``"lerf"`` (least relevant first) or ``"random"``.
    edge:
        The edge rule used (module docstring).
    """

    scores: Tensor
    order: Tensor
    target: Tensor
    k: int
    replacement: str
    label: str = ""
    direction: str = "morf"
    edge: str = "reflect"

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

    def per_image_aopc(self) -> Tensor:
        """``(N,)`` float64: each image's area over its own curve (their mean is the AOPC)."""
        scores = self.scores.double()
        return (scores[:, :1] - scores).mean(1)

    def aopc_interval(
        self, *, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
    ) -> Interval:
        """The AOPC with its percentile-bootstrap interval over images."""
        return bootstrap_interval(self.per_image_aopc(), confidence=confidence,
                                  resamples=resamples, seed=seed)  # fmt: skip

    @property
    def interval_method(self) -> str:
        """How :meth:`aopc_interval` and :meth:`mean_interval` are made (for reports)."""
        return (f"95 % percentile bootstrap over the {self.scores.shape[0]} images "
                f"({RESAMPLES} resamples)")  # fmt: skip

    def mean_interval(self) -> tuple[Tensor, Tensor]:
        """The default :meth:`band` (95 %, :data:`RESAMPLES` resamples, seed 0)."""
        return self.band()

    def band(
        self, *, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Pointwise percentile-bootstrap band ``(low, high)`` of the mean curve, each
        ``(steps + 1,)``."""
        if self.scores.shape[0] < 2:
            mean = self.mean().double()
            return mean, mean
        means = _resample_means(self.scores.detach().cpu(), resamples, seed)
        alpha = (1 - confidence) / 2
        q = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), dim=0)
        return q[0], q[1]


def aopc(curves: PerturbationCurves | Tensor) -> float:
    """Area over the perturbation curve (Samek et al. 2017, Eq. 12).

    ``AOPC = 1/(L+1) · Σ_{t=0..L} ⟨f(x⁽⁰⁾) − f(x⁽ᵗ⁾)⟩`` over images, with ``L`` the number of
    steps. For MoRF curves larger is better: the explanation's most relevant regions destroy the
    evidence first; for LeRF curves smaller is better. Its bootstrap interval:
    :meth:`PerturbationCurves.aopc_interval`.

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


@dataclass
class PairedDifference:
    """``AOPC(a) − AOPC(b)`` on the same images, with its paired-bootstrap interval.

    Attributes
    ----------
    a, b:
        The two labels.
    interval:
        The mean of the per-image differences and its interval.
    p_value:
        Two-sided bootstrap p-value of "no difference" (twice the smaller share of resampled
        means on either side of 0; at least ``1 / resamples``).
    direction:
        ``"morf"`` or ``"lerf"``: which curves were compared.
    """

    a: str
    b: str
    interval: Interval
    p_value: float
    direction: str = "morf"

    @property
    def difference(self) -> float:
        """The mean per-image difference ``AOPC(a) − AOPC(b)``."""
        return self.interval.estimate

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.interval.low > 0 or self.interval.high < 0

    def to_records(self) -> list[dict[str, Any]]:
        """One flat record: ``a``, ``b``, ``direction``, ``difference``, ``low``, ``high``,
        ``confidence``, ``resamples``, ``samples``, ``p_value``, ``significant``."""
        record: dict[str, Any] = {"a": self.a, "b": self.b, "direction": self.direction,
                                  "difference": self.difference}  # fmt: skip
        record.update({k: v for k, v in self.interval.to_record().items() if k != "estimate"})
        record.update(p_value=self.p_value, significant=self.significant)
        return [record]

    def to_markdown(self, digits: int = 3) -> str:
        """One sentence: the difference, its interval, and whether it is significant."""
        i = self.interval
        verdict = "significant" if self.significant else "not significant"
        return (f"AOPC({self.a}) − AOPC({self.b}) = {i.estimate:+.{digits}f}, "
                f"{i.confidence:.0%} CI [{i.low:+.{digits}f}, {i.high:+.{digits}f}] "
                f"(paired bootstrap over {i.samples} images, {i.resamples} resamples, "
                f"p ≈ {self.p_value:.{digits}f}): {verdict}.")  # fmt: skip


def paired_difference(
    a: PerturbationCurves,
    b: PerturbationCurves,
    *,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """Paired bootstrap of ``AOPC(a) − AOPC(b)`` over the images both were measured on.

    The images are resampled together (one index set for both methods), so the image-to-image
    variation that both share cancels. The curves must come from the same images, the same
    followed classes and the same number of steps.
    """
    if a.scores.shape != b.scores.shape:
        raise ValueError(f"curves {a.label!r} {tuple(a.scores.shape)} and {b.label!r} "
                         f"{tuple(b.scores.shape)} differ in images or steps; a paired "
                         "comparison needs the same images and steps")  # fmt: skip
    if not torch.equal(a.target.cpu(), b.target.cpu()):
        raise ValueError("the curves follow different classes; pass the same target to both")
    if not torch.equal(a.scores[:, 0], b.scores[:, 0]):
        raise ValueError("the curves start from different probabilities: not the same images")
    diff = a.per_image_aopc() - b.per_image_aopc()
    interval = bootstrap_interval(diff, confidence=confidence, resamples=resamples, seed=seed)
    means = _resample_means(diff, resamples, seed)
    share = min(float((means <= 0).double().mean()), float((means >= 0).double().mean()))
    p_value = min(1.0, max(2 * share, 1.0 / resamples))
    return PairedDifference(a.label or "a", b.label or "b", interval, p_value, a.direction)


@dataclass
class DegradationTable:
    """AOPC with intervals per method and direction, plus paired differences.

    Attributes
    ----------
    rows:
        One dict per (method, direction): ``method``, ``direction``, ``aopc``, ``low``,
        ``high``, ``confidence``, ``samples``, ``k``, ``steps``, ``replacement``, ``edge``.
    differences:
        :class:`PairedDifference` results.
    """

    rows: list[dict[str, Any]]
    differences: list[PairedDifference] = field(default_factory=list)

    def to_records(self) -> list[dict[str, Any]]:
        """The rows, then one record per difference (with ``kind="difference"``)."""
        records = [{"kind": "aopc", **row} for row in self.rows]
        for difference in self.differences:
            records += [{"kind": "difference", **r} for r in difference.to_records()]
        return records

    def to_markdown(self, digits: int = 3) -> str:
        """A Markdown table (AOPC and interval per method and direction) and one line per
        paired difference."""
        lines = ["| method | order | AOPC | 95% CI |" if not self.rows else
                 f"| method | order | AOPC | {self.rows[0]['confidence']:.0%} CI |",
                 "|---|---|---|---|"]  # fmt: skip
        for row in self.rows:
            lines.append(f"| {row['method']} | {row['direction']} | {row['aopc']:.{digits}f} | "
                         f"[{row['low']:.{digits}f}, {row['high']:.{digits}f}] |")  # fmt: skip
        if self.differences:
            lines.append("")
            lines += [f"- {d.to_markdown(digits)}" for d in self.differences]
        return "\n".join(lines) + "\n"


def paired_differences(
    curves: Mapping[str, PerturbationCurves],
    pairs: Iterable[tuple[str, str]],
    *,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[PairedDifference]:
    """:func:`paired_difference` for each named pair ``(a, b)`` of ``curves``.

    Raises
    ------
    KeyError
        When a name of a pair is not among ``curves``.
    """
    differences = []
    for a, b in pairs:
        missing = [x for x in (a, b) if x not in curves]
        if missing:
            raise KeyError(f"pairs: {missing} are not among the measured curves {list(curves)}")
        differences.append(paired_difference(curves[a], curves[b], confidence=confidence,
                                             resamples=resamples, seed=seed))  # fmt: skip
    return differences


def degradation_table(
    curves: Mapping[str, PerturbationCurves],
    *,
    pairs: Sequence[tuple[str, str]] = (),
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> DegradationTable:
    """AOPC intervals for every curve and paired differences for ``pairs`` of labels.

    Parameters
    ----------
    curves:
        ``{label: PerturbationCurves}``, MoRF and LeRF curves alike (each carries its
        ``direction``).
    pairs:
        ``(label_a, label_b)`` keys of ``curves`` to compare with :func:`paired_difference`.
    confidence, resamples, seed:
        Of the bootstrap.
    """
    rows = []
    for label, curve in curves.items():
        interval = curve.aopc_interval(confidence=confidence, resamples=resamples, seed=seed)
        rows.append({"method": label, "direction": curve.direction, "aopc": interval.estimate,
                     "low": interval.low, "high": interval.high, "confidence": confidence,
                     "samples": interval.samples, "k": curve.k, "steps": curve.steps,
                     "replacement": curve.replacement, "edge": curve.edge})  # fmt: skip
    differences = paired_differences(curves, pairs, confidence=confidence, resamples=resamples,
                                     seed=seed)  # fmt: skip
    return DegradationTable(rows, differences)


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
    order: str = "morf",
    edge: str = "reflect",
    uniform_range: tuple[Any, Any] | None = None,
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
        Replacement steps recorded (default 100; at most the number of regions). The paper:
        ``k=9`` on 224×224 images (625 regions, 100 steps).
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
    order:
        ``"morf"`` (most relevant region first, default) or ``"lerf"`` (least relevant first);
        ignored for ``"random"``.
    edge:
        Border regions when ``k`` does not divide a side: ``"reflect"`` (default, as
        iNNvestigate), ``"mean"`` or ``"sum"`` (module docstring).
    uniform_range:
        ``(low, high)`` of the ``"uniform"`` replacement (required for it).

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
    _check_edge(edge)
    if k < 1:
        raise ValueError(f"region size k must be at least 1, not {k}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose from {ORDERS}")
    if replacement == "uniform" and uniform_range is None:
        replacement_values(inputs[:1], k, "uniform")  # raises the explanatory error
    generator = torch.Generator().manual_seed(seed)
    n, _, h, w = inputs.shape
    ids = region_ids(h, w, k, edge)
    sequence = region_order(attributions, k, shape=tuple(inputs.shape), generator=generator,
                            edge=edge, order=order)  # fmt: skip
    steps = min(steps, sequence.shape[1])
    device, dtype = model_device(model), model_dtype(model)
    x = inputs.detach().to(device=device, dtype=dtype)
    values = replacement_values(x, k, replacement, generator=generator, blur_sigma=blur_sigma,
                                edge=edge, uniform_range=uniform_range)  # fmt: skip
    rank_of_region = torch.empty_like(sequence)
    rank_of_region.scatter_(1, sequence, torch.arange(sequence.shape[1]).expand_as(sequence))
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
        order=sequence,
        target=chosen,
        k=k,
        replacement=replacement,
        label=label,
        direction="random" if isinstance(attributions, str) else order,
        edge=edge,
    )
