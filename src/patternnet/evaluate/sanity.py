"""Sanity checks of explanation methods: do the explanations depend on what they should?

Every registered method (:func:`patternnet.methods.registry.methods`) can be run against every
check; :func:`sanity_checks` returns a :class:`SanityResult` (``to_records()``,
``to_markdown()``, ``table()``, ``plot()``). The checks, with the published tests they follow:

``cascading`` — cascading model-parameter randomisation (Adebayo et al., "Sanity checks for
    saliency maps", NeurIPS 2018). The Linear/Conv layers are re-initialised from the top
    (logits) down, cumulatively; after each step the explanation of the *same* images for the
    *same* classes is compared with the original one. Reported: the similarity once every
    layer above the first is random (and the whole curve, in the figure).
``independent`` — independent randomisation (Adebayo et al. 2018): one layer at a time;
    reported: the mean similarity over the layers.
``later_layers`` — cosine-similarity convergence (Sixt, Granz, Landgraf, "When explanations
    lie: why many modified BP attributions fail", ICML 2020): the signed cosine similarity
    between the explanation of the trained model and that of the model whose layers above the
    first are random. Sixt et al. found that for several modified backward passes (among them
    PatternAttribution) it stays high: the explanation does not depend on the later layers.
``class_sensitivity`` — (Sixt et al. 2020) the cosine similarity between the explanation of
    the predicted class and that of the second most probable class of the same image; close
    to 1 means the explanation does not say *which* class it explains.
``input_invariance`` — (Kindermans, Hooker, Adebayo, Alber, Schütt, Dähne, Erhan, Kim, "The
    (un)reliability of saliency methods", 2019). The input is shifted by a constant
    (``x + shift``) and a second model whose first layer's bias compensates it
    (``b' = b − W·shift``) computes exactly the same function. A method that explains the
    *function* gives the same explanation for both; methods with fitted patterns have them
    REFITTED on the shifted data (the patterns are part of the explanation, and a user of the
    shifted model would fit them there). Reported: ``max|E − E'| / max|E|``.

Similarities are computed per image on the flattened explanation and averaged over images:
Spearman rank correlation of ``|E|`` (Adebayo et al.'s main measure), Spearman of the signed
``E``, and the cosine similarity (no SSIM: it needs image-sized windows and is not defined for
1-d inputs). The randomised layers get weights ``N(0, σ²)`` with σ the standard deviation of
the layer's trained weights (biases likewise), seeded. The model is never changed: every
variant is a deep copy.

Verdicts. A method *passes* a randomisation check when the reported similarity is below
:data:`PASS_SIMILARITY` (0.5; the explanation changed substantially once the parameters it
should depend on were destroyed), the class check when the cosine is below the same value, and
input invariance when the relative change is below :data:`PASS_INVARIANCE` (1e-3: float32
rounding). The thresholds are conventions stated here, not tuned to any method; the table
always shows the number beside the verdict.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..methods.registry import build_method, method_info, methods
from ..patterns.fit import fit_patterns, linear_layers
from .plots import _figure, _save

__all__ = [
    "CHECKS",
    "PASS_INVARIANCE",
    "PASS_SIMILARITY",
    "SanityResult",
    "cosine_similarity",
    "randomise_layers",
    "sanity_checks",
    "shift_compensated_model",
    "spearman",
]

#: The checks, in the order of the table.
CHECKS = ("cascading", "independent", "later_layers", "class_sensitivity", "input_invariance")

#: A randomisation / class check passes below this similarity.
PASS_SIMILARITY = 0.5

#: Input invariance passes below this relative change ``max|E − E'| / max|E|``.
PASS_INVARIANCE = 1e-3


# ---------------------------------------------------------------------------- similarities
def _rows(x: Tensor) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks within each row (1-based), ties sharing their average rank."""
    ordered = x.sort(1).values.contiguous()
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    at_most = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + at_most + 1).to(torch.float64) / 2


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denominator = (a.norm(dim=1) * b.norm(dim=1))
    out = (a * b).sum(1) / denominator.clamp(min=1e-300)
    return torch.where(denominator > 0, out, torch.full_like(out, math.nan))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per sample of two ``(N, ...)`` tensors (ties: average ranks);
    NaN where either is constant."""
    ra, rb = _average_ranks(_rows(a)), _average_ranks(_rows(b))
    return _pearson(ra, rb)


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity per sample of two ``(N, ...)`` tensors; NaN where either is 0."""
    a, b = _rows(a), _rows(b)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    out = (a * b).sum(1) / denominator.clamp(min=1e-300)
    return torch.where(denominator > 0, out, torch.full_like(out, math.nan))


def _similarities(a: Tensor, b: Tensor) -> dict[str, float]:
    def mean(t: Tensor) -> float:
        finite = t[torch.isfinite(t)]
        return float(finite.mean()) if finite.numel() else math.nan

    return {
        "spearman_abs": mean(spearman(a.abs(), b.abs())),
        "spearman": mean(spearman(a, b)),
        "cosine": mean(cosine_similarity(a, b)),
    }


# ---------------------------------------------------------------------------- model variants
def randomise_layers(model: nn.Module, names: Sequence[str], *, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose Linear/Conv layers ``names`` have random parameters.

    Weights are drawn from ``N(0, σ²)`` with σ the standard deviation of the trained weights
    of that layer (biases likewise; a constant bias becomes 0). The original is not touched.
    """
    clone = copy.deepcopy(model)
    layers = linear_layers(clone)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            if name not in layers:
                raise KeyError(f"{name!r} is not a Linear/Conv layer; choose from {list(layers)}")
            for parameter in (layers[name].weight, layers[name].bias):
                if parameter is None:
                    continue
                scale = float(parameter.float().std()) if parameter.numel() > 1 else 0.0
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.copy_((noise * scale).to(parameter))
    return clone


def shift_compensated_model(model: nn.Module, shift: float) -> nn.Module:
    """A deep copy of ``model`` that computes on ``x + shift`` what ``model`` computes on ``x``.

    The first Linear/Conv layer (in module order) must be the first operation on the input,
    and a convolution must not pad (padding would add zeros, not the shift, at the border):
    its bias becomes ``b − W·shift`` (summed over the kernel).

    Raises
    ------
    ValueError
        The first layer pads, or has no room for a bias and none can be added.
    """
    clone = copy.deepcopy(model)
    name, layer = next(iter(linear_layers(clone).items()))
    padding = getattr(layer, "padding", 0)
    if isinstance(padding, str) or any(p != 0 for p in torch.as_tensor(padding).flatten()):
        raise ValueError(
            f"the first layer {name!r} pads its input ({padding}): zero padding does not move "
            "with the shift, so no bias can compensate it; input invariance needs an unpadded "
            "first layer (as in Kindermans et al. 2019)"
        )
    weight = layer.weight.detach()
    compensation = weight.reshape(weight.shape[0], -1).sum(1) * shift
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                  device=weight.device))  # fmt: skip
        layer.bias.sub_(compensation.to(layer.bias))
    return clone


# ---------------------------------------------------------------------------- the result
@dataclass
class SanityResult:
    """Every method against every check.

    Attributes
    ----------
    records:
        One dict per (method, check): ``method``, ``kind``, ``needs_patterns``, ``check``,
        ``score`` (the reported number, see the module docstring), ``measure`` (what the score
        is), ``passed`` (bool, or None when the check could not run), ``spearman_abs``,
        ``spearman``, ``cosine`` (similarities where they apply), ``note``.
    curves:
        ``{method: [(layers randomised, spearman_abs, spearman, cosine), ...]}`` of the
        cascading randomisation (0 = the trained model).
    layers:
        The Linear/Conv layers from the top down, in the order they were randomised.
    settings:
        Images, shift, seed, thresholds.
    """

    records: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float, float, float]]] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_records(self) -> list[dict[str, Any]]:
        """The records (plain Python values)."""
        return [dict(r) for r in self.records]

    def table(self, digits: int = 2) -> str:
        """Markdown: methods (rows) × checks (columns), each cell ``✓ 0.12`` / ``✗ 0.93``."""
        checks = [c for c in CHECKS if any(r["check"] == c for r in self.records)]
        names = list(dict.fromkeys(r["method"] for r in self.records))
        lines = ["| method | " + " | ".join(checks) + " |", "|---|" + "---|" * len(checks)]
        for name in names:
            cells = []
            for check in checks:
                found = [r for r in self.records if r["method"] == name and r["check"] == check]
                cells.append(_cell(found[0], digits) if found else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_markdown(self, digits: int = 2) -> str:
        """The table, with a line that names the setting and the thresholds."""
        s = self.settings
        head = (f"Sanity checks on {s.get('images')} images ({s.get('setting', 'model')}); "
                f"✓ = passed: similarity < {PASS_SIMILARITY} for the randomisation and class "
                f"checks, relative change < {PASS_INVARIANCE:g} for input invariance "
                f"(shift {s.get('shift')}). Scores: cascading = Spearman |E| with every layer "
                "above the first random; independent = its mean over single layers; "
                "later_layers = cosine with every layer above the first random; "
                "class_sensitivity = cosine between the two most probable classes' "
                "explanations; input_invariance = max|E − E'| / max|E|.\n\n")  # fmt: skip
        return head + self.table(digits)

    def plot(self, path: str | Path | None = None) -> Any:
        """Cascading randomisation curves (Spearman |E| and cosine against the number of
        randomised layers, top down), one line per method."""
        figure = _figure(10.0, 3.6)
        axes = [figure.add_subplot(1, 2, i + 1) for i in range(2)]
        for name, points in self.curves.items():
            steps = [p[0] for p in points]
            axes[0].plot(steps, [p[1] for p in points], marker=".", label=name)
            axes[1].plot(steps, [p[3] for p in points], marker=".", label=name)
        labels = ["trained"] + [f"{n or '(model)'}" for n in self.layers]
        for ax, measure in zip(axes, ("Spearman rank correlation of |E|", "cosine similarity")):
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
            ax.set_xlabel("randomised down to layer (cascading)")
            ax.set_ylabel(measure)
            ax.axhline(PASS_SIMILARITY, color="grey", linewidth=0.8, linestyle=":")
            ax.set_ylim(-1.05, 1.05)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        _save(figure, path)
        return figure


def _cell(record: dict[str, Any], digits: int) -> str:
    score = record.get("score")
    if record.get("passed") is None or score is None or math.isnan(score):
        return f"n/a ({record.get('note', '')})" if record.get("note") else "n/a"
    mark = "✓" if record["passed"] else "✗"
    if record["check"] == "input_invariance":
        return f"{mark} {score:.1e}"
    return f"{mark} {score:.{digits}f}"


# ---------------------------------------------------------------------------- the checks
def sanity_checks(
    model: nn.Module,
    inputs: Tensor,
    *,
    methods_: Sequence[str] | None = None,
    fit_data: Tensor | None = None,
    patterns: Any = None,
    checks: Sequence[str] = CHECKS,
    shift: float = 1.0,
    seed: int = 0,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    setting: str = "",
    estimator: str = "two_component",
) -> SanityResult:
    """Run ``checks`` for every method in ``methods_`` (default: every registered method).

    Parameters
    ----------
    model:
        A trained classifier returning logits (borrowed, never changed).
    inputs:
        ``(N, ...)`` inputs to explain (the same ones for every variant of the model).
    methods_:
        Registry names (default: all of :func:`patternnet.methods.registry.methods`).
    fit_data:
        Data to fit patterns on, for the methods that need them: once for the trained model
        (unless ``patterns`` is given), again for every randomised model, and on
        ``fit_data + shift`` for input invariance. Required when a pattern method is checked.
    patterns:
        Patterns already fitted on the trained model (two-component), to save one fit.
    checks:
        A subset of :data:`CHECKS`.
    shift:
        The constant added to the input for ``input_invariance``.
    seed:
        Seeds the randomised parameters.
    method_options:
        Extra options per registry name.
    batch_size:
        For the pattern fits.
    setting:
        A phrase naming the model and data, kept in ``settings`` and printed by
        :meth:`SanityResult.to_markdown`.
    estimator:
        Signal estimator of the patterns fitted here (default ``"two_component"``, as
        :func:`patternnet.fit_patterns`).

    Returns
    -------
    SanityResult
    """
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {CHECKS}")
    names = list(methods() if methods_ is None else methods_)
    for name in names:
        method_info(name)  # raises with the known names
    needs = {name: method_info(name).needs_patterns for name in names}
    if any(needs.values()) and fit_data is None and (
        patterns is None or any(c in checks for c in CHECKS[:3] + ("input_invariance",))
    ):
        raise ValueError(
            f"methods {[n for n in names if needs[n]]} explain with fitted patterns: pass "
            "fit_data (the patterns are refitted for every randomised and shifted model)"
        )
    options = method_options or {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(inputs)
    finally:
        model.train(was_training)
    top2 = logits.topk(2, dim=1).indices
    target, second = top2[:, 0], top2[:, 1]
    layers_top_down = list(linear_layers(model))[::-1]
    fitted: dict[int, Any] = {}

    def patterns_for(variant: nn.Module, data: Tensor | None = None) -> Any:
        key = id(variant)
        if key not in fitted:
            if variant is model and patterns is not None and data is None:
                fitted[key] = patterns
            else:
                fitted[key] = fit_patterns(variant, fit_data if data is None else data,
                                           estimator=estimator, progress=False,
                                           batch_size=batch_size)  # fmt: skip
        return fitted[key]

    def explain(name: str, variant: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
        p = patterns_for(variant) if needs[name] else None
        method = build_method(name, variant, p, **dict(options.get(name, {})))
        return method.attribute(x, target=classes).detach()

    cascade = [randomise_layers(model, layers_top_down[: i + 1], seed=seed)
               for i in range(len(layers_top_down))]  # fmt: skip
    singles = {}
    if "independent" in checks:
        singles = {layer: randomise_layers(model, [layer], seed=seed) for layer in layers_top_down}
    shifted_model = None
    invariance_note = ""
    if "input_invariance" in checks:
        try:
            shifted_model = shift_compensated_model(model, shift)
        except ValueError as error:
            invariance_note = str(error)

    records: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[int, float, float, float]]] = {}
    for name in names:
        base = {"method": name, "kind": method_info(name).kind,
                "needs_patterns": needs[name]}  # fmt: skip
        original = explain(name, model, inputs, target)
        if "cascading" in checks or "later_layers" in checks:
            points = [(0, 1.0, 1.0, 1.0)]
            for i, variant in enumerate(cascade):
                sim = _similarities(original, explain(name, variant, inputs, target))
                points.append((i + 1, sim["spearman_abs"], sim["spearman"], sim["cosine"]))
            curves[name] = points
            at = points[-2] if len(points) > 2 else points[-1]
            sim = {"spearman_abs": at[1], "spearman": at[2], "cosine": at[3]}
            if "cascading" in checks:
                records.append({**base, "check": "cascading", "score": at[1],
                                "measure": "Spearman |E|, every layer above the first random",
                                "passed": _below(at[1], PASS_SIMILARITY), **sim,
                                "note": ""})  # fmt: skip
            if "later_layers" in checks:
                records.append({**base, "check": "later_layers", "score": at[3],
                                "measure": "cosine, every layer above the first random",
                                "passed": _below(at[3], PASS_SIMILARITY), **sim,
                                "note": ""})  # fmt: skip
        if "independent" in checks:
            sims = [_similarities(original, explain(name, v, inputs, target))
                    for v in singles.values()]  # fmt: skip
            mean = {k: _nanmean([s[k] for s in sims]) for k in ("spearman_abs", "spearman",
                                                                "cosine")}  # fmt: skip
            records.append({**base, "check": "independent", "score": mean["spearman_abs"],
                            "measure": "Spearman |E|, mean over single randomised layers",
                            "passed": _below(mean["spearman_abs"], PASS_SIMILARITY), **mean,
                            "note": ""})  # fmt: skip
        if "class_sensitivity" in checks:
            other = explain(name, model, inputs, second)
            sim = _similarities(original, other)
            records.append({**base, "check": "class_sensitivity", "score": sim["cosine"],
                            "measure": "cosine, predicted vs second most probable class",
                            "passed": _below(sim["cosine"], PASS_SIMILARITY), **sim,
                            "note": ""})  # fmt: skip
        if "input_invariance" in checks:
            if shifted_model is None:
                records.append({**base, "check": "input_invariance", "score": math.nan,
                                "measure": "max|E − E'| / max|E|", "passed": None,
                                "note": invariance_note})  # fmt: skip
            else:
                if needs[name]:
                    patterns_for(shifted_model, fit_data + shift)
                moved = explain(name, shifted_model, inputs + shift, target)
                scale = float(original.abs().max())
                change = float((moved - original).abs().max()) / scale if scale > 0 else math.nan
                sim = _similarities(original, moved)
                records.append({**base, "check": "input_invariance", "score": change,
                                "measure": "max|E − E'| / max|E|",
                                "passed": _below(change, PASS_INVARIANCE), **sim,
                                "note": "patterns refitted on the shifted data"
                                if needs[name] else ""})  # fmt: skip
    settings = {"images": int(inputs.shape[0]), "shift": shift, "seed": seed,
                "pass_similarity": PASS_SIMILARITY, "pass_invariance": PASS_INVARIANCE,
                "setting": setting or type(model).__name__, "estimator": estimator}  # fmt: skip
    return SanityResult(records, curves, layers_top_down, settings)


def _below(value: float, threshold: float) -> bool | None:
    if value is None or math.isnan(value):
        return None
    return bool(value < threshold)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
