"""The quality ρ(S) of a signal estimator, per layer (method.md §5; Kindermans et al. 2018, §5.1).

For a neuron ``y = wᵀx`` and a signal estimator ``S``, the residual ``d̂ = x − S(x)`` should be
pure distractor: no direction ``v`` should find the output in it. The quality is

``ρ(S) = 1 − max_v corr(wᵀx, vᵀ(x − S(x)))``.

The best ``v`` is the least-squares regression of ``y`` on ``d̂`` (with intercept) and the
maximal correlation is that fit's multiple ``R``. As the paper requires, the patterns, the
regression ``v`` and the correlation are computed on three disjoint data splits; the reported
correlation is ``corr(y, vᵀd̂)`` on the evaluation split, floored at 0 (``max_v`` may flip the
sign of ``v``, so the maximal correlation is never negative): ρ lies in ``[0, 1]``.

Estimators (each residual is a linear map of ``u = (x, y)``, side by side for the two-component
one, so that everything follows exactly from streaming float64 moments of ``x`` and ``y``):

============== =========================================== ====================================
name           ``S(x)``                                    residual ``d̂``
============== =========================================== ====================================
identity       ``x``                                       0: no ``v`` correlates, ρ := 1
filter         ``w wᵀx / wᵀw``                              ``x − a y``, ``a = w / wᵀw``
linear         ``a y``, ``a = cov[x, y] / σ_y²``            ``x − a y``
two_component  ``a₊ y`` if ``wᵀx + b > 0`` else ``a₋ y``   ``x − a₊ y`` / ``x − a₋ y``
random         ``r y``, ``r = g / wᵀg``, ``g ~ N(0, I)``    ``x − r y`` (seeded)
============== =========================================== ====================================

The random estimator is normalised like the learned ones (``wᵀr = 1``, so ``wᵀS(x) = y``);
without that, ``wᵀd̂ = (1 − wᵀr) y`` would give ρ = 0 trivially. In two dimensions (the toy
example) the constraint leaves it one degree of freedom and its expected ρ is about 0.57
(against 0.72 for ``S_w`` and 1 for ``S_a``); in real layers it is low. ``random_draws`` averages
several draws per neuron.

The identity estimator is a degenerate case: it calls *everything* signal, leaves a zero
residual and so scores ρ = 1 by definition. ρ only asks whether the residual is free of signal,
not whether the signal estimate is free of distractor; the paper leaves ``S_x`` out of its
Figure 3 for this reason, and so should a reader of the table.

Cost and sampling. Per layer we keep ``Σx``, ``Σxxᵀ`` over the input dimensions used, ``Σxy``
and ``Σy²`` per sampled neuron, and (for the two-component estimator) the same sums over each
neuron's active samples: ``max_neurons × max_dims² × 8`` bytes per split (67 MB per split for
32 neurons and 512 dims). The regression is exact (``v`` solved in float64 by a Cholesky solve
with a ``rcond``-relative ridge, which converges to the minimum-norm least-squares solution)
when the layer's input dimension ``D ≤ max_dims`` and uses every neuron when
``O ≤ max_neurons``. Larger layers are sub-sampled with a seeded generator: ``max_neurons``
output units, and the regression uses ``max_dims`` of the ``D`` coordinates of ``d̂`` (``y`` is
always the full ``wᵀx``). Sub-sampled dimensions lower the regression's in-sample ``R`` but also
its over-fitting, so the evaluated ρ can move either way. Measured against the exact value on
the tetromino CNN of :mod:`patternnet.groundtruth` (``small_cnn``, ``lin``/``corr`` data, seed
0, regression and evaluation 2000 images each), layers ``3`` (conv, D = 72) and ``7`` (dense,
D = 256), ρ of filter / linear / two-component / random:

=============== ==================================== ====================================
dims used       layer 3 (exact 0.050/0.989/0.989/0)  layer 7 (exact 0.002/0.961/0.960/0)
=============== ==================================== ====================================
128 of 256      exact                                +0.001 / −0.031 / −0.028 / 0
64              +0.008 / +0.001 / +0.001 / 0         +0.020 / +0.003 / +0.003 / 0
32              +0.076 / +0.005 / +0.004 / +0.001    +0.063 / +0.004 / +0.004 / 0
=============== ==================================== ====================================

Sampling 16 (4) of the 64 output positions per image changed ρ by at most 0.002 (0.006), and
averaging over 8 sampled neurons instead of all 16/32 by at most 0.002. Convolutions
contribute ``positions`` output positions per image (the same seeded sample for a chunk of
images; all positions with ``positions=None``); patches are unfolded for a chunk of images at a
time (:meth:`patternnet.layers.LayerGeometry.patches`, for Conv1d, Conv2d and Conv3d alike) and
only the sampled positions are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..borrow import borrowed, model_device, model_dtype
from ..engine.canonize import Canonical, Canonizer
from ..layers import geometry
from ..patterns.fit import fit_patterns, iter_batches, linear_layers
from ..patterns.store import Patterns
from .plots import plot_quality

__all__ = [
    "QUALITY_ESTIMATORS",
    "LayerMoments",
    "QualityTable",
    "collect_moments",
    "estimator_quality",
    "layer_quality",
]

#: The estimators ρ(S) is computed for, in the paper's order (identity first).
QUALITY_ESTIMATORS = ("identity", "filter", "linear", "two_component", "random")

#: Eigenvalues below this fraction of the largest count as zero in the regression.
RCOND = 1e-10

#: Elements of unfolded patches held at once (bounds memory for convolutions).
CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------- moments
@dataclass
class LayerMoments:
    """Float64 sums of one layer's inputs and sampled outputs over one data split.

    Attributes
    ----------
    neurons:
        ``(K,)`` indices of the sampled output units.
    dims:
        ``(D_S,)`` indices of the input coordinates used (all ``D`` when exact).
    active:
        Whether the ``*_plus`` sums (over each neuron's samples with ``wᵀx + b > 0``) are kept.
    """

    neurons: Tensor
    dims: Tensor
    active: bool
    count: float = 0.0
    sums: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sums:
            return
        K, D = len(self.neurons), len(self.dims)
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
        self.sums = {"x": z(D), "xx": z(D, D), "y": z(K), "xy": z(K, D), "yy": z(K)}
        if self.active:
            self.sums.update(
                n_plus=z(K), x_plus=z(K, D), xx_plus=z(K, D, D), y_plus=z(K),
                xy_plus=z(K, D), yy_plus=z(K),
            )  # fmt: skip

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor, mask: Tensor) -> None:
        """Add rows: ``x`` ``(M, D_S)`` inputs, ``y`` ``(M, K)`` outputs, ``mask`` ``(M, K)``."""
        x, y = x.to(torch.float64), y.to(torch.float64)
        s = self.sums
        if s["x"].device != x.device:  # accumulate where the model runs (GPU: no host copies)
            self.to(x.device)
        self.count += x.shape[0]
        s["x"] += x.sum(0)
        s["xx"] += x.T @ x
        s["y"] += y.sum(0)
        s["xy"] += y.T @ x
        s["yy"] += (y * y).sum(0)
        if not self.active:
            return
        m = mask.to(torch.float64)
        s["n_plus"] += m.sum(0)
        s["x_plus"] += m.T @ x
        s["y_plus"] += (m * y).sum(0)
        s["xy_plus"] += (m * y).T @ x
        s["yy_plus"] += (m * y * y).sum(0)
        for k in range(y.shape[1]):
            rows = x[mask[:, k]]
            if rows.shape[0]:
                s["xx_plus"][k] += rows.T @ rows

    def to(self, device: torch.device | str) -> LayerMoments:
        """Move the sums to ``device`` (in place); returns ``self``."""
        self.sums = {key: value.to(device) for key, value in self.sums.items()}
        return self

    def side(self, which: str) -> dict[str, Tensor]:
        """Sums over all (``"all"``), active (``"plus"``) or inactive (``"minus"``) samples.

        Returns ``{"n": (K,), "x": (K, D), "xx": (D, D) or (K, D, D), "y": (K,), "xy": (K, D),
        "yy": (K,)}`` (the ``"all"`` side shares ``x`` and ``xx`` between neurons).
        """
        s = self.sums
        K = len(self.neurons)
        whole = {
            "n": torch.full((K,), self.count, dtype=torch.float64),
            "x": s["x"].expand(K, -1), "xx": s["xx"], "y": s["y"], "xy": s["xy"], "yy": s["yy"],
        }  # fmt: skip
        if which == "all":
            return whole
        plus = {key: s[f"{key}_plus"] for key in ("n", "x", "xx", "y", "xy", "yy")}
        if which == "plus":
            return plus
        return {key: whole[key] - plus[key] for key in plus}


def _sample(total: int, limit: int | None, generator: torch.Generator) -> Tensor:
    if limit is None or total <= limit:
        return torch.arange(total)
    return torch.randperm(total, generator=generator)[:limit].sort().values


class _LayerCollector:
    """Hook that turns one layer's forward calls into :class:`LayerMoments` rows."""

    def __init__(
        self,
        module: nn.Module,
        moments: LayerMoments,
        positions: int | None,
        generator: torch.Generator,
    ) -> None:
        self.module = module
        self.geo = geometry(module)
        self.moments = moments
        self.positions = positions
        self.generator = generator

    def __call__(self, mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        x, out = args[0].detach(), output.detach()
        neurons, dims = self.moments.neurons.to(out.device), self.moments.dims.to(x.device)
        bias = mod.bias.detach() if mod.bias is not None else None
        if self.geo.kind == "linear":
            rows = x.reshape(-1, x.shape[-1])[:, dims]
            o = out.reshape(-1, out.shape[-1])[:, neurons]
            y = o - bias[neurons] if bias is not None else o
            self.moments.update(rows, y, o > 0)
            return
        n, groups = x.shape[0], self.geo.groups
        o_all = out.flatten(2)[:, neurons]  # (N, K, L)
        per_image = math.prod(mod.weight.shape[1:]) * o_all.shape[-1]
        chunk = max(1, CHUNK_ELEMENTS // max(1, per_image * groups))
        for start in range(0, n, chunk):
            cols = self.geo.patches(x[start : start + chunk], tuple(mod.weight.shape[2:]))
            L = cols.shape[-1]
            pos = _sample(L, self.positions, self.generator).to(cols.device)
            if groups > 1:
                # the neurons' group must be shared by all sampled neurons (checked up front)
                group = int(self.moments.neurons[0]) // (mod.weight.shape[0] // groups)
                width = mod.weight[0].numel()
                cols = cols[:, group * width : (group + 1) * width]
            rows = cols[:, dims][:, :, pos].permute(0, 2, 1).reshape(-1, len(dims))
            o = o_all[start : start + chunk][:, :, pos].permute(0, 2, 1).reshape(-1, len(neurons))
            y = o - bias[neurons] if bias is not None else o
            self.moments.update(rows, y, o > 0)


def collect_moments(
    model: nn.Module,
    data: Any,
    plan: dict[str, LayerMoments],
    *,
    positions: int | None = 16,
    seed: int = 0,
    batch_size: int | None = None,
    limit: int | None = None,
    canonizers: Sequence[Canonizer] | None = None,
) -> dict[str, LayerMoments]:
    """One pass over ``data`` filling the :class:`LayerMoments` of ``plan`` (in place).

    Parameters
    ----------
    model:
        The model (borrowed: eval mode, canonical form, restored afterwards).
    data:
        Tensor, DataLoader or iterable of batches (as for :func:`patternnet.fit_patterns`).
    plan:
        Layer name → empty :class:`LayerMoments` (which neurons and dims to keep).
    positions:
        Output positions sampled per image for conv layers (``None``: all).
    seed:
        Seed of the position sampling.
    """
    modules = linear_layers(model)
    unknown = set(plan) - set(modules)
    if unknown:
        raise KeyError(f"layers {sorted(unknown)} are not Linear/Conv layers of the model")
    generator = torch.Generator().manual_seed(seed)
    canonical = Canonical(model, canonizers)
    device, dtype = model_device(model), model_dtype(model)
    handles = []
    with borrowed(model):
        try:
            for name, moments in plan.items():
                collector = _LayerCollector(modules[name], moments, positions, generator)
                handles.append(modules[name].register_forward_hook(collector))
            with torch.no_grad(), canonical.active():
                for batch in iter_batches(data, batch_size, limit=limit):
                    canonical(batch.to(device=device, dtype=dtype))
        finally:
            for handle in handles:
                handle.remove()
    for moments in plan.values():
        moments.to("cpu")  # the regressions run on the CPU in float64
    return plan


# ---------------------------------------------------------------------------- regression
def _residual_statistics(
    moments: LayerMoments, patterns: dict[str, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Covariances of the residuals ``d̂ = x_S − a_S y`` of all sampled neurons.

    ``patterns`` maps a side (``"all"``, or ``"plus"`` and ``"minus"``) to the ``(K, D_S)``
    patterns used on it; ``None`` is the identity estimator (zero residual). With
    ``E = [I, −a]``: ``Σd̂ = Σx − a Σy``, ``Σd̂d̂ᵀ = Σxxᵀ − a Σxyᵀ − Σxy aᵀ + a aᵀ Σy²`` and
    ``Σd̂y = Σxy − a Σy²``, summed over the sides.

    Returns
    -------
    cov_dd, cov_dy, var_y:
        ``(K, D, D)``, ``(K, D)`` and ``(K,)`` float64 (population covariances).
    """
    n = moments.count
    K, D = len(moments.neurons), len(moments.dims)
    sum_d = torch.zeros(K, D, dtype=torch.float64)
    sum_dd = torch.zeros(K, D, D, dtype=torch.float64)
    sum_dy = torch.zeros(K, D, dtype=torch.float64)
    for side, a in (patterns or {}).items():
        t = moments.side(side)
        y, yy = t["y"][:, None], t["yy"][:, None]
        sum_d += t["x"] - a * y
        outer = a[:, :, None] * t["xy"][:, None, :]
        sum_dd += (
            t["xx"] - outer - outer.transpose(1, 2) + a[:, :, None] * a[:, None, :] * yy[:, :, None]
        )
        sum_dy += t["xy"] - a * yy
    mean_d = sum_d / n
    mean_y = moments.sums["y"] / n
    cov_dd = sum_dd / n - mean_d[:, :, None] * mean_d[:, None, :]
    cov_dy = sum_dy / n - mean_d * mean_y[:, None]
    var_y = moments.sums["yy"] / n - mean_y**2
    return (cov_dd + cov_dd.transpose(1, 2)) / 2, cov_dy, var_y


def _solve(cov: Tensor, rhs: Tensor, rcond: float) -> Tensor:
    """Least-squares ``v`` with ``cov v = rhs`` for a batch of symmetric PSD ``cov``.

    A Cholesky solve with a ridge of ``rcond`` times the mean eigenvalue (the minimum-norm
    solution as the ridge vanishes; directions of rounding-level variance, such as the
    direction ``w`` that every normalised residual lacks, are suppressed). Matrices whose
    factorisation still fails fall back to an eigenvalue pseudo-inverse.
    """
    K, D = rhs.shape
    scale = torch.diagonal(cov, dim1=1, dim2=2).sum(1) / max(D, 1)
    ridge = (rcond * scale).clamp(min=1e-300)
    eye = torch.eye(D, dtype=cov.dtype)
    factor, info = torch.linalg.cholesky_ex(cov + ridge[:, None, None] * eye)
    v = torch.cholesky_solve(rhs[:, :, None], factor)[:, :, 0]
    for k in torch.nonzero(info).flatten().tolist():
        values, vectors = torch.linalg.eigh(cov[k])
        keep = values > rcond * values.max().clamp(min=0)
        inverse = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)), 0)
        v[k] = vectors @ (inverse * (vectors.T @ rhs[k]))
    v[scale <= 0] = 0.0
    return v


def layer_quality(
    regression: LayerMoments,
    evaluation: LayerMoments,
    estimator: str,
    patterns: dict[str, Tensor],
    *,
    rcond: float = RCOND,
) -> Tensor:
    """ρ of one estimator for every sampled neuron of one layer.

    Parameters
    ----------
    regression, evaluation:
        Moments of the layer on the regression and evaluation splits (same neurons and dims).
    estimator:
        One of :data:`QUALITY_ESTIMATORS`.
    patterns:
        The sampled neurons' float64 patterns over the full input dimension, ``(K, D)`` each:
        ``{"a"}`` or ``{"a_plus", "a_minus"}`` (ignored for ``"identity"``).

    Returns
    -------
    Tensor
        ``(K,)`` float64 values of ρ in ``[0, 1]``; NaN for a neuron whose output is constant on
        either split.
    """
    K = len(regression.neurons)
    dims = regression.dims
    if estimator == "identity":
        sides = None
    elif estimator == "two_component":
        sides = {"plus": patterns["a_plus"][:, dims], "minus": patterns["a_minus"][:, dims]}
    else:
        sides = {"all": patterns["a"][:, dims]}
    cov_r, c_r, var_r = _residual_statistics(regression, sides)
    cov_e, c_e, var_e = _residual_statistics(evaluation, sides)
    out = torch.ones(K, dtype=torch.float64)
    if sides is not None:
        v = _solve(cov_r, c_r, rcond)
        var_z = torch.einsum("ki,kij,kj->k", v, cov_e, v)
        cov_zy = (v * c_e).sum(1)
        trace = torch.diagonal(cov_e, dim1=1, dim2=2).sum(1)
        live = var_z > 1e-12 * trace * (v * v).sum(1)
        corr = cov_zy / (var_z * var_e).clamp(min=1e-300).sqrt()
        out = torch.where(live, 1.0 - corr.clamp(0.0, 1.0), out)
    out[(var_r <= 0) | (var_e <= 0)] = math.nan
    return out


# ---------------------------------------------------------------------------- the table
@dataclass
class QualityTable:
    """ρ(S) per layer (rows) and estimator (columns), as in the paper's Figure 3.

    Attributes
    ----------
    layers:
        Layer names in forward order.
    estimators:
        Estimator names.
    rho:
        ``(len(layers), len(estimators))`` float64: the mean of ρ over the layer's sampled
        neurons (NaN-neurons, i.e. constant outputs, left out).
    per_neuron:
        ``{(layer, estimator): (K,) tensor}``.
    info:
        Per layer: ``neurons``/``out_features``, ``dims``/``in_dims``, ``exact`` (no
        sub-sampling), samples on the regression and evaluation splits.
    """

    layers: list[str]
    estimators: list[str]
    rho: Tensor
    per_neuron: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str]) -> float:
        layer, estimator = key
        return float(self.rho[self.layers.index(layer), self.estimators.index(estimator)])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer: ``layer``, one value per estimator, and the sampling info."""
        out = []
        for i, layer in enumerate(self.layers):
            row: dict[str, Any] = {"layer": layer}
            row.update({e: float(self.rho[i, j]) for j, e in enumerate(self.estimators)})
            row.update(self.info.get(layer, {}))
            out.append(row)
        return out

    def to_markdown(self, digits: int = 3) -> str:
        """A Markdown table: layers × estimators (ρ), plus neurons/dims used per layer."""
        header = ["layer", *self.estimators, "neurons", "dims", "exact"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows():
            cells = [row["layer"] or "(model)"]
            cells += [f"{row[e]:.{digits}f}" for e in self.estimators]
            cells += [
                f"{row.get('neurons', '')}/{row.get('out_features', '')}",
                f"{row.get('dims', '')}/{row.get('in_dims', '')}",
                "yes" if row.get("exact") else "no",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV text (written to ``path`` if given)."""
        keys = ["layer", *self.estimators, "neurons", "out_features", "dims", "in_dims", "exact"]
        lines = [",".join(keys)]
        for row in self.rows():
            lines.append(",".join(str(row.get(k, "")) for k in keys))
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, path: str | Path | None = None, **options: Any) -> Any:
        """The paper's Figure 3: ρ per layer, one line per estimator (see
        :func:`patternnet.evaluate.plots.plot_quality`)."""
        return plot_quality(self, path, **options)


def _patterns_for(
    model: nn.Module,
    estimators: Sequence[str],
    fit_data: Any,
    patterns: dict[str, Patterns] | None,
    batch_size: int | None,
    canonizers: Sequence[Canonizer] | None,
) -> dict[str, Patterns]:
    given = dict(patterns or {})
    for estimator in ("linear", "two_component"):
        if estimator in estimators and estimator not in given:
            if fit_data is None:
                raise ValueError(
                    f"estimator {estimator!r} needs fit_data (or patterns={{{estimator!r}: ...}})"
                )
            given[estimator] = fit_patterns(
                model, fit_data, estimator=estimator, negative=True, batch_size=batch_size,
                progress=False, canonizers=canonizers,
            )  # fmt: skip
    for estimator, fitted in given.items():
        if fitted.estimator != estimator:
            raise ValueError(f"patterns[{estimator!r}] were fitted with {fitted.estimator!r}")
    return given


def _neuron_patterns(
    estimator: str,
    name: str,
    weight: Tensor,
    neurons: Tensor,
    fitted: dict[str, Patterns],
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """The ``(K, D)`` float64 patterns of the sampled neurons for one estimator."""
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1).cpu()[neurons]
    if estimator == "identity":
        return {}
    if estimator == "filter":
        return {"a": w / (w * w).sum(1, keepdim=True).clamp(min=1e-300)}
    if estimator == "random":
        g = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        scale = (w * g).sum(1, keepdim=True)
        return {"a": g / torch.where(scale == 0, torch.ones_like(scale), scale)}
    tensors = fitted[estimator][name]
    flat = {
        key: t.detach().to(torch.float64).reshape(weight.shape[0], -1).cpu()[neurons]
        for key, t in tensors.items()
    }
    if estimator == "linear":
        return {"a": flat["a"]}
    return {"a_plus": flat["a_plus"], "a_minus": flat.get("a_minus", flat["a_plus"])}


def estimator_quality(
    model: nn.Module,
    fit_data: Any,
    regression_data: Any,
    eval_data: Any,
    *,
    estimators: Sequence[str] = QUALITY_ESTIMATORS,
    layers: Sequence[str] | None = None,
    patterns: dict[str, Patterns] | None = None,
    max_neurons: int | None = 32,
    max_dims: int | None = 512,
    random_draws: int = 1,
    positions: int | None = 16,
    batch_size: int | None = None,
    seed: int = 0,
    rcond: float = RCOND,
    canonizers: Sequence[Canonizer] | None = None,
) -> QualityTable:
    """ρ(S) of each signal estimator in each Linear/Conv layer (method.md §5, Figure 3).

    Parameters
    ----------
    model:
        The trained model (borrowed, never changed).
    fit_data, regression_data, eval_data:
        Three disjoint splits (tensors, DataLoaders or iterables of batches): the patterns are
        fitted on the first, the regression ``v`` on the second, the correlation measured on
        the third.
    estimators:
        Any of ``"identity"``, ``"filter"``, ``"linear"``, ``"two_component"``, ``"random"``.
    layers:
        Layer names to evaluate (default: every Linear/Conv layer in forward order).
    patterns:
        Already fitted patterns by estimator name (``{"two_component": ..., "linear": ...}``);
        missing ones are fitted on ``fit_data``.
    max_neurons:
        Output units per layer, sampled with the seed when a layer has more (``None``: all).
    max_dims:
        Input coordinates of the residual used in the regression, sampled when ``D`` is larger
        (``None``: all, exact).
    random_draws:
        Random directions drawn per neuron for ``"random"`` (their ρ is averaged).
    positions:
        Output positions sampled per image in conv layers (``None``: all).
    batch_size:
        Batch size for tensor data.
    seed:
        Seeds neuron, dimension and position sampling and the random estimator.
    rcond:
        Relative eigenvalue cut-off of the regression's pseudo-inverse.
    canonizers:
        As for :func:`patternnet.fit_patterns`.

    Returns
    -------
    QualityTable
        ``.rho`` (layers × estimators), ``.to_markdown()``, ``.to_csv()``, ``.plot(path)``.

    Examples
    --------
    >>> table = estimator_quality(model, fit, regression, test)   # doctest: +SKIP
    >>> print(table.to_markdown()); table.plot("rho.png")          # doctest: +SKIP
    """
    unknown = [e for e in estimators if e not in QUALITY_ESTIMATORS]
    if random_draws < 1:
        raise ValueError(f"random_draws must be at least 1, not {random_draws}")
    if unknown or not estimators:
        raise ValueError(f"unknown estimators {unknown}; choose from {QUALITY_ESTIMATORS}")
    modules = linear_layers(model)
    names = list(modules) if layers is None else list(layers)
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"{missing} are not Linear/Conv layers; choose from {list(modules)}")
    fitted = _patterns_for(model, estimators, fit_data, patterns, batch_size, canonizers)
    canonical = Canonical(model, canonizers)
    generator = torch.Generator().manual_seed(seed)
    plans: dict[str, tuple[LayerMoments, LayerMoments]] = {}
    info: dict[str, dict[str, Any]] = {}
    active = "two_component" in estimators
    for name in names:
        weight = canonical.weight(name)
        O, D = weight.shape[0], weight[0].numel()
        groups = getattr(modules[name], "groups", 1)
        if groups > 1:
            # keep the sampled neurons inside one group so that they share their input patch
            per = O // groups
            group = int(torch.randint(groups, (1,), generator=generator))
            neurons = group * per + _sample(per, max_neurons, generator)
        else:
            neurons = _sample(O, max_neurons, generator)
        dims = _sample(D, max_dims, generator)
        plans[name] = (LayerMoments(neurons, dims, active), LayerMoments(neurons, dims, active))
        info[name] = {
            "neurons": len(neurons), "out_features": O, "dims": len(dims), "in_dims": D,
            "exact": len(neurons) == O and len(dims) == D,
        }  # fmt: skip
    common = {"positions": positions, "batch_size": batch_size, "canonizers": canonizers}
    collect_moments(model, regression_data, {n: p[0] for n, p in plans.items()},
                    seed=seed + 1, **common)  # fmt: skip
    collect_moments(model, eval_data, {n: p[1] for n, p in plans.items()},
                    seed=seed + 2, **common)  # fmt: skip
    rho = torch.full((len(names), len(estimators)), math.nan, dtype=torch.float64)
    per_neuron: dict[tuple[str, str], Tensor] = {}
    for i, name in enumerate(names):
        regression, evaluation = plans[name]
        info[name]["regression_samples"] = int(regression.count)
        info[name]["eval_samples"] = int(evaluation.count)
        weight = canonical.weight(name)
        for j, estimator in enumerate(estimators):
            draws = []
            for _ in range(random_draws if estimator == "random" else 1):
                neuron_patterns = _neuron_patterns(
                    estimator, name, weight, regression.neurons, fitted, generator
                )
                draws.append(
                    layer_quality(regression, evaluation, estimator, neuron_patterns, rcond=rcond)
                )
            values = torch.stack(draws).nanmean(0) if len(draws) > 1 else draws[0]
            per_neuron[(name, estimator)] = values
            finite = values[torch.isfinite(values)]
            rho[i, j] = finite.mean() if finite.numel() else math.nan
    return QualityTable(names, list(estimators), rho, per_neuron, info)
