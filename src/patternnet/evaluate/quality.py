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

Exact computation (the default). Every residual is a rank-one correction of the layer input,
``d̂ = x − a y`` (per side for the two-component estimator), so its covariance is the input
covariance plus a low-rank term: with ``Σ_xx`` shared by all neurons,

``Cov(d̂) = Σ_xx − Σ_s (a_s g_sᵀ + g_s a_sᵀ − q_s a_s a_sᵀ) + (mean terms)``, ``g_s = E[x y; s]``,
``q_s = E[y²; s]``,

a rank ≤ 5 update spanned by ``m = E[x]``, the patterns ``a_s`` and ``g_s`` (the sides' sums of
``x xᵀ`` add up to the shared ``Σ x xᵀ``, so no per-neuron ``D × D`` sum is ever needed), and
``cov(d̂, y) = cov(x, y) − Σ_s a_s q_s + δ E[y]`` with ``δ = Σ_s a_s E[y; s]``. Per layer and split
we keep ``Σx``, ``Σxxᵀ`` (``D²`` float64) and per neuron ``Σy``, ``Σy²``, ``Σxy`` (and the same
over its active samples): ``8 (D² + 2 K D)`` bytes, 79 MB for a dense layer with ``D = 3136``.
The regression ``(Σ_xx + U B Uᵀ) v = c`` is solved by one Cholesky factorisation of the shared
``Σ_xx`` (plus a ridge of ``rcond`` times its mean eigenvalue) and the Woodbury identity per
neuron, refined by two steps of iterative refinement; every neuron and every coordinate is used.
Convolutions use every output position of every image by default (``positions=None``; a
positive ``positions`` samples that many per image, which only thins the data).

Sampling where memory requires it. A layer whose input dimension ``D`` exceeds ``max_dims``
(default 6144: ``Σ_xx`` is then 302 MB per split) uses ``max_dims`` coordinates of ``d̂``,
sampled ``dim_seeds`` times (default 3) with independent seeds. Sampling coordinates is not
harmless: the regression then sees only part of the residual, which biases ρ upward. Measured
on the demo's fc1 (D = 3136; exact ρ(S_a) 0.906): 512 coordinates give 0.916, 128 give 0.967.
For a sampled layer the table reports the mean over seeds ± their standard deviation
(:attr:`QualityTable.spread`) and a convergence check: ρ on nested random subsets of
``max_dims / 4``, ``max_dims / 2`` and ``max_dims`` coordinates
(:attr:`QualityTable.convergence`); a curve still moving at ``max_dims`` means the value is an
upper bound of the exact one. ``max_neurons`` (default ``None``: all) samples output units; the
standard error of the mean over the sampled units is reported too (:attr:`QualityTable.stderr`).
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
from ..engine.attention import decomposed
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
    "quality_over_splits",
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
    """Float64 sums of one layer's inputs and outputs over one data split.

    The input sums (``Σx``, ``Σxxᵀ``) are shared by all neurons; per neuron only vectors are
    kept (``Σy``, ``Σy²``, ``Σxy`` and, with ``active``, the same over its active samples).

    Attributes
    ----------
    neurons:
        ``(K,)`` indices of the output units used (all ``O`` by default).
    dims:
        ``(D_S,)`` indices of the input coordinates used (all ``D`` when exact), in the order in
        which they were drawn: every prefix is itself a random subset (the convergence check).
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
            self.sums.update(n_plus=z(K), y_plus=z(K), xy_plus=z(K, D), yy_plus=z(K))

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor, mask: Tensor) -> None:
        """Add rows: ``x`` ``(M, D_S)`` inputs, ``y`` ``(M, K)`` outputs, ``mask`` ``(M, K)``."""
        x, y = x.to(torch.float64), y.to(torch.float64)
        s = self.sums
        if s["x"].device != x.device:  # accumulate where the model runs (GPU: no host copies)
            self.to(x.device)
        self.count += x.shape[0]
        s["x"] += x.sum(0)
        s["xx"].addmm_(x.T, x)
        s["y"] += y.sum(0)
        s["xy"].addmm_(y.T, x)
        s["yy"] += (y * y).sum(0)
        if not self.active:
            return
        my = mask.to(torch.float64) * y
        s["n_plus"] += mask.sum(0).to(torch.float64)
        s["y_plus"] += my.sum(0)
        s["xy_plus"].addmm_(my.T, x)
        s["yy_plus"] += (my * y).sum(0)

    def to(self, device: torch.device | str) -> LayerMoments:
        """Move the sums to ``device`` (in place); returns ``self``."""
        self.sums = {key: value.to(device) for key, value in self.sums.items()}
        return self

    def side(self, which: str) -> dict[str, Tensor]:
        """Per-neuron sums over all (``"all"``), active (``"plus"``) or inactive (``"minus"``)
        samples: ``{"n": (K,), "y": (K,), "xy": (K, D_S), "yy": (K,)}``."""
        s = self.sums
        K = len(self.neurons)
        whole = {
            "n": torch.full((K,), self.count, dtype=torch.float64),
            "y": s["y"], "xy": s["xy"], "yy": s["yy"],
        }  # fmt: skip
        if which == "all":
            return whole
        plus = {key: s[f"{key}_plus"] for key in ("n", "y", "xy", "yy")}
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
    plan: dict[str, LayerMoments | list[LayerMoments]],
    *,
    positions: int | None = None,
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
        Layer name → empty :class:`LayerMoments` (which neurons and dims to keep), or a list
        of them (several coordinate draws of one layer).
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
            for name, entry in plan.items():
                for moments in entry if isinstance(entry, list) else [entry]:
                    collector = _LayerCollector(modules[name], moments, positions, generator)
                    handles.append(modules[name].register_forward_hook(collector))
            # attention step by step, so that its projections' hooks see their inputs
            with torch.no_grad(), canonical.active(), decomposed(model):
                for batch in iter_batches(data, batch_size, limit=limit):
                    canonical(batch.to(device=device, dtype=dtype))
        finally:
            for handle in handles:
                handle.remove()
    for entry in plan.values():
        for moments in entry if isinstance(entry, list) else [entry]:
            moments.to("cpu")  # the regressions run on the CPU in float64
    return plan


# ---------------------------------------------------------------------------- regression
# The regressors vᵀd̂ = vᵀx − Σ_s (a_sᵀv) z_s, with z_s = y·[sample on side s], are exactly the
# combinations θᵀu of u = (x, z_1, …) whose coefficients satisfy the linear constraints
# Aᵀθ = 0 (A's columns: (a_s, −e_s)ᵀ negated, i.e. θ_z,s = −a_sᵀθ_x). The regression of y on d̂
# is therefore the constrained regression of y on u:
#     θ₀ = Σ_u⁻¹ cov(u, y),   θ = θ₀ − Σ_u⁻¹A (AᵀΣ_u⁻¹A)⁻¹ Aᵀθ₀,
# and Σ_u is the shared Σ_xx bordered by one row/column per side: one Cholesky factorisation
# of Σ_xx per layer and split serves every neuron and estimator. When every coordinate is used
# and the patterns are normalised (wᵀa_s = 1), y = wᵀx lies in the span of x, so the last side
# is redundant (z_last = wᵀx − Σ z_others) and θ₀ = (w, 0) exactly; dropping that side keeps
# Σ_u non-singular. Neither form ever builds the rank-deficient Cov(d̂) (w is its null
# direction), whose inversion by low-rank updates loses all accuracy.
@dataclass
class _Split:
    """Moments of one split for a block of neurons, in the bordered form ``u = (x, z_s…)``."""

    C: Tensor  # (p, p) covariance of x (shared)
    G: Tensor  # (K, p, b) cov(x, z_s)
    H: Tensor  # (K, b, b) cov(z_s, z_t)
    cov_xy: Tensor  # (K, p)
    cov_zy: Tensor  # (K, b)
    var_y: Tensor  # (K,)

    def quadratic(self, tx: Tensor, tz: Tensor) -> Tensor:
        """``θᵀ Σ_u θ`` per neuron for ``θ = (tx, tz)``."""
        out = ((tx @ self.C) * tx).sum(1)
        if tz.shape[1]:
            out = out + 2 * (torch.einsum("kpb,kp->kb", self.G, tx) * tz).sum(1)
            out = out + torch.einsum("kb,kbc,kc->k", tz, self.H, tz)
        return out


def _split(moments: LayerMoments, sides: Sequence[str], p: int, block: slice) -> _Split:
    n = moments.count
    s = moments.sums
    m = s["x"][:p] / n
    C = s["xx"][:p, :p] / n - torch.outer(m, m)
    mean_y = s["y"][block] / n
    var_y = s["yy"][block] / n - mean_y**2
    cov_xy = s["xy"][block, :p] / n - mean_y[:, None] * m
    K, b = cov_xy.shape[0], len(sides)
    G = torch.zeros(K, p, b, dtype=torch.float64)
    H = torch.zeros(K, b, b, dtype=torch.float64)
    cov_zy = torch.zeros(K, b, dtype=torch.float64)
    means = []
    for i, name in enumerate(sides):
        side = moments.side(name)
        mean_z = side["y"][block] / n
        G[:, :, i] = side["xy"][block, :p] / n - mean_z[:, None] * m
        H[:, i, i] = side["yy"][block] / n  # the sides are disjoint: E[z_s z_t] = 0 for s ≠ t
        cov_zy[:, i] = side["yy"][block] / n - mean_z * mean_y  # z_s y = z_s² on side s
        means.append(mean_z)
    for i in range(b):
        for k in range(b):
            H[:, i, k] -= means[i] * means[k]
    return _Split((C + C.T) / 2, G, H, cov_xy, cov_zy, var_y)


def _factor(C: Tensor, rcond: float) -> tuple[Tensor, float]:
    """Cholesky factor of ``C + ridge I`` with ``ridge = rcond · tr C / D`` (raised tenfold
    until the factorisation succeeds)."""
    D = C.shape[0]
    scale = float(torch.diagonal(C).sum()) / max(D, 1)
    ridge = max(rcond * scale, 1e-300)
    eye = torch.eye(D, dtype=C.dtype)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(C + ridge * eye)
        if int(info) == 0:
            return factor, ridge
        ridge *= 10.0
    raise RuntimeError("the input covariance could not be factorised (non-finite statistics?)")


class _Bordered:
    """Solves with ``Σ_u = [[C, G], [Gᵀ, H]]`` per neuron, from the shared factor of ``C``."""

    def __init__(self, factor: Tensor, split: _Split, rcond: float) -> None:
        self.factor = factor
        self.G = split.G
        b = split.G.shape[2]
        self.Y = self._c_solve(split.G)  # (K, p, b)
        schur = split.H - torch.einsum("kpb,kpc->kbc", split.G, self.Y)
        schur = (schur + schur.transpose(1, 2)) / 2
        scale = torch.diagonal(split.H, dim1=1, dim2=2).sum(1).clamp(min=1e-300) / max(b, 1)
        eye = torch.eye(b, dtype=torch.float64)
        self.schur_pinv = torch.linalg.pinv(schur + (rcond * scale)[:, None, None] * eye,
                                            hermitian=True)  # fmt: skip

    def _c_solve(self, rhs: Tensor) -> Tensor:
        """``C⁻¹ rhs`` for ``rhs`` ``(K, p, c)``."""
        K, p, c = rhs.shape
        if K * c == 0:
            return torch.zeros_like(rhs)
        flat = rhs.permute(1, 0, 2).reshape(p, K * c)
        return torch.cholesky_solve(flat, self.factor).reshape(p, K, c).permute(1, 0, 2)

    def solve(self, rx: Tensor, rz: Tensor) -> tuple[Tensor, Tensor]:
        """``Σ_u⁻¹ (rx, rz)`` with ``rx`` ``(K, p, c)``, ``rz`` ``(K, b, c)``."""
        t = self._c_solve(rx)
        if rz.shape[1] == 0:
            return t, rz
        sz = self.schur_pinv @ (rz - torch.einsum("kpb,kpc->kbc", self.G, t))
        return t - self.Y @ sz, sz


def _constrained(
    solver: _Bordered, ax: Tensor, az: Tensor, tx: Tensor, tz: Tensor
) -> tuple[Tensor, Tensor]:
    """``θ = θ₀ − Σ⁻¹A (AᵀΣ⁻¹A)⁻¹ Aᵀθ₀`` with ``A = (ax, az)`` and ``θ₀ = (tx, tz)``."""
    sx, sz = solver.solve(ax, az)
    gram = ax.transpose(1, 2) @ sx + az.transpose(1, 2) @ sz
    rhs = (ax.transpose(1, 2) @ tx[:, :, None] + az.transpose(1, 2) @ tz[:, :, None])
    lam = torch.linalg.pinv((gram + gram.transpose(1, 2)) / 2, hermitian=True) @ rhs
    return tx - (sx @ lam)[:, :, 0], tz - (sz @ lam)[:, :, 0]


#: Neurons solved at once (bounds the ``(K, D, ·)`` work arrays).
NEURON_BLOCK = 256

#: ``|wᵀa − 1|`` up to which a pattern counts as normalised (the exact reduced form applies).
NORMALISED = 1e-6


def layer_quality(
    regression: LayerMoments,
    evaluation: LayerMoments,
    estimator: str,
    patterns: dict[str, Tensor],
    *,
    weight: Tensor | None = None,
    rcond: float = RCOND,
    dims: int | None = None,
) -> Tensor:
    """ρ of one estimator for every neuron of one layer (method.md §5), from the moments.

    Parameters
    ----------
    regression, evaluation:
        Moments of the layer on the regression and evaluation splits (same neurons and dims).
    estimator:
        One of :data:`QUALITY_ESTIMATORS`.
    patterns:
        The neurons' float64 patterns over the full input dimension, ``(K, D)`` each:
        ``{"a"}`` or ``{"a_plus", "a_minus"}`` (ignored for ``"identity"``).
    weight:
        The neurons' ``(K, D)`` weights; enables the reduced form when every coordinate is
        used (without it the general bordered form is used, which is equivalent but less well
        conditioned when ``y = wᵀx`` lies in the span of the inputs).
    rcond:
        Ridge of the regression, relative to the mean eigenvalue of the input covariance.
    dims:
        Use only the first ``dims`` of the moments' coordinates (the convergence check;
        default all).

    Returns
    -------
    Tensor
        ``(K,)`` float64 values of ρ in ``[0, 1]``; NaN for a neuron whose output is constant on
        either split.
    """
    K = len(regression.neurons)
    p = len(regression.dims) if dims is None else min(dims, len(regression.dims))
    chosen = regression.dims[:p]
    out = torch.ones(K, dtype=torch.float64)
    if estimator == "identity":
        names: list[str] = []
        columns: list[Tensor] = []
    elif estimator == "two_component":
        names = ["plus", "minus"]
        columns = [patterns["a_plus"][:, chosen], patterns["a_minus"][:, chosen]]
    else:
        names, columns = ["all"], [patterns["a"][:, chosen]]
    full = weight is not None and p == weight.shape[1]
    factor = None
    if names:
        factor, _ = _factor(_split(regression, [], p, slice(0, 0)).C, rcond)
    for start in range(0, K, NEURON_BLOCK):
        block = slice(start, min(K, start + NEURON_BLOCK))
        k = block.stop - block.start
        values = torch.ones(k, dtype=torch.float64)
        ev_all = _split(evaluation, names, p, block)
        if names:
            A = torch.stack([c[block] for c in columns], 2)  # (k, p, S)
            tx = torch.zeros(k, p, dtype=torch.float64)
            tz = torch.zeros(k, len(names), dtype=torch.float64)
            reduced = torch.zeros(k, dtype=torch.bool)
            if full:
                w = weight[block][:, chosen].to(torch.float64)
                norms = torch.einsum("kp,kps->ks", w, A)
                reduced = ((norms - 1).abs() <= NORMALISED).all(1)
            general = ~reduced
            if reduced.any():  # u = (x, z_1..z_{S−1}), θ₀ = (w, 0), constraints of all sides
                idx = torch.nonzero(reduced).flatten()
                sub = slice(block.start, block.stop)
                keep = names[:-1]
                split_r = _split(regression, keep, p, sub)
                solver = _Bordered(factor, _index(split_r, idx), rcond)
                S = len(names)
                az = torch.zeros(len(idx), len(keep), S, dtype=torch.float64)
                for s_i in range(len(keep)):
                    az[:, s_i, s_i] = 1.0  # θ_z,s = −a_sᵀθ_x ⇔ a_sᵀθ_x + θ_z,s = 0
                rx, rz = _constrained(solver, A[idx], az, w[idx],
                                      torch.zeros(len(idx), len(keep), dtype=torch.float64))
                tx[idx] = rx
                tz[idx, : len(keep)] = rz
                # the dropped side's z is wᵀx − Σ others: θ in the full u = (x, z_1..z_S) basis
                # is the same predictor with zero weight on z_S
            if general.any():  # u = (x, z_1..z_S), θ₀ = Σ_u⁻¹ cov(u, y)
                idx = torch.nonzero(general).flatten()
                split_r = _index(_split(regression, names, p, block), idx)
                solver = _Bordered(factor, split_r, rcond)
                t0x, t0z = solver.solve(split_r.cov_xy[:, :, None], split_r.cov_zy[:, :, None])
                az = torch.eye(len(names), dtype=torch.float64).expand(len(idx), -1, -1)
                rx, rz = _constrained(solver, A[idx], az, t0x[:, :, 0], t0z[:, :, 0])
                tx[idx], tz[idx] = rx, rz
            var_z = ev_all.quadratic(tx, tz)
            cov_zy = (tx * ev_all.cov_xy).sum(1) + (tz * ev_all.cov_zy).sum(1)
            scale = torch.diagonal(ev_all.C).sum() + torch.diagonal(ev_all.H, dim1=1, dim2=2).sum(1)
            live = var_z > 1e-12 * scale.clamp(min=0) * ((tx * tx).sum(1) + (tz * tz).sum(1))
            corr = cov_zy / (var_z * ev_all.var_y).clamp(min=1e-300).sqrt()
            values = torch.where(live, 1.0 - corr.clamp(0.0, 1.0), values)
        var_r = _split(regression, [], p, block).var_y
        values[(var_r <= 0) | (ev_all.var_y <= 0)] = math.nan
        out[block] = values
    return out


def _index(split: _Split, idx: Tensor) -> _Split:
    return _Split(split.C, split.G[idx], split.H[idx], split.cov_xy[idx], split.cov_zy[idx],
                  split.var_y[idx])  # fmt: skip


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
        ``(len(layers), len(estimators))`` float64: the mean of ρ over the layer's neurons
        (NaN-neurons, i.e. constant outputs, left out); for a layer with sampled coordinates,
        the mean over the ``dim_seeds`` draws.
    per_neuron:
        ``{(layer, estimator): (K,) tensor}`` (the first coordinate draw of a sampled layer).
    info:
        Per layer: ``neurons``/``out_features``, ``dims``/``in_dims``, ``exact`` (every neuron
        and coordinate used), ``dim_seeds``, samples on the regression and evaluation splits.
    spread:
        Same shape as ``rho``: standard deviation of the layer's ρ over the coordinate draws
        (0 for an exact layer).
    stderr:
        Same shape: the error of the reported value, ``sqrt(spread² + se²)`` where ``se`` is
        the finite-population standard error of the mean over sampled neurons (0 when every
        neuron is used). 0 everywhere for an exact table.
    convergence:
        ``{(layer, estimator): [(dims, mean ρ, std over draws), ...]}`` for sampled layers:
        ρ on nested random subsets of ``max_dims/4``, ``max_dims/2`` and ``max_dims``
        coordinates.
    """

    layers: list[str]
    estimators: list[str]
    rho: Tensor
    per_neuron: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    spread: Tensor | None = None
    stderr: Tensor | None = None
    convergence: dict[tuple[str, str], list[tuple[int, float, float]]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        if self.spread is None:
            self.spread = torch.zeros_like(self.rho)
        if self.stderr is None:
            self.stderr = self.spread.clone()

    def __getitem__(self, key: tuple[str, str]) -> float:
        layer, estimator = key
        return float(self.rho[self.layers.index(layer), self.estimators.index(estimator)])

    @property
    def exact(self) -> bool:
        """Whether every layer used every neuron and every input coordinate."""
        return all(self.info.get(layer, {}).get("exact", False) for layer in self.layers)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer: ``layer``, one value per estimator, and the sampling info."""
        out = []
        for i, layer in enumerate(self.layers):
            row: dict[str, Any] = {"layer": layer}
            row.update({e: float(self.rho[i, j]) for j, e in enumerate(self.estimators)})
            row.update(self.info.get(layer, {}))
            out.append(row)
        return out

    def to_records(self) -> list[dict[str, Any]]:
        """One flat record per (layer, estimator): ``layer``, ``estimator``, ``rho``,
        ``stderr``, ``spread_over_dim_draws``, ``neurons``, ``out_features``, ``dims``,
        ``in_dims``, ``exact``, ``dim_seeds``, ``regression_samples``, ``eval_samples`` and,
        for sampled layers, ``convergence`` (list of ``[dims, mean, std]``)."""
        records = []
        for i, layer in enumerate(self.layers):
            info = self.info.get(layer, {})
            for j, estimator in enumerate(self.estimators):
                record: dict[str, Any] = {
                    "layer": layer, "estimator": estimator, "rho": float(self.rho[i, j]),
                    "stderr": float(self.stderr[i, j]),
                    "spread_over_dim_draws": float(self.spread[i, j]),
                }  # fmt: skip
                record.update({k: info[k] for k in sorted(info)})
                if (layer, estimator) in self.convergence:
                    record["convergence"] = [list(c) for c in self.convergence[(layer, estimator)]]
                records.append(record)
        return records

    def _cell(self, i: int, j: int, digits: int) -> str:
        value = f"{float(self.rho[i, j]):.{digits}f}"
        err = float(self.stderr[i, j])
        return value if err == 0 or math.isnan(err) else f"{value} ± {err:.{digits}f}"

    def to_markdown(self, digits: int = 3) -> str:
        """A Markdown table: layers × estimators (ρ, ``± error`` where sampled), plus the
        neurons/dims used per layer; then the convergence check of sampled layers."""
        header = ["layer", *self.estimators, "neurons", "dims", "exact"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for i, row in enumerate(self.rows()):
            cells = [row["layer"] or "(model)"]
            cells += [self._cell(i, j, digits) for j in range(len(self.estimators))]
            seeds = row.get("dim_seeds", 1)
            dims = f"{row.get('dims', '')}/{row.get('in_dims', '')}"
            cells += [
                f"{row.get('neurons', '')}/{row.get('out_features', '')}",
                dims if row.get("dims") == row.get("in_dims") else f"{dims} ×{seeds} draws",
                "yes" if row.get("exact") else "no",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        if self.convergence:
            lines += ["", "Convergence over sampled coordinates (mean ± std over draws):", "",
                      "| layer | estimator | " + " | ".join(
                          f"{d} dims" for d, _, _ in next(iter(self.convergence.values()))
                      ) + " |"]  # fmt: skip
            lines.append("|---|---|" + "---|" * len(next(iter(self.convergence.values()))))
            for (layer, estimator), points in self.convergence.items():
                cells = [f"{mean:.{digits}f} ± {std:.{digits}f}" for _, mean, std in points]
                lines.append(f"| {layer} | {estimator} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV text (written to ``path`` if given): ρ per estimator, then its error per
        estimator (``<estimator>_stderr``), then the sampling info."""
        keys = ["layer", *self.estimators, *(f"{e}_stderr" for e in self.estimators),
                "neurons", "out_features", "dims", "in_dims", "exact"]  # fmt: skip
        lines = [",".join(keys)]
        for i, row in enumerate(self.rows()):
            row.update({f"{e}_stderr": float(self.stderr[i, j])
                        for j, e in enumerate(self.estimators)})  # fmt: skip
            lines.append(",".join(str(row.get(k, "")) for k in keys))
        text = "\n".join(lines) + "\n"
        if path is not None:
            _atomic_write(Path(path), text)
        return text

    def plot(self, path: str | Path | None = None, **options: Any) -> Any:
        """The paper's Figure 3: ρ per layer, one line per estimator, error bars where
        sampled (see :func:`patternnet.evaluate.plots.plot_quality`)."""
        return plot_quality(self, path, **options)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
    if "two_component" in estimators and "two_component" in given:
        missing = layers_without_a_minus(given["two_component"])
        if missing:
            raise ValueError(
                f"the two-component patterns have no a₋ for {', '.join(missing)}: a fit with "
                "negative='auto' (the default) leaves a₋ out where no method reads it, but "
                "ρ(S) of the two-component estimator needs both halves of every layer. Fit "
                "them with negative=True (CLI: --negative-everywhere); the explanations are "
                "the same"
            )
    return given


def layers_without_a_minus(patterns: Patterns) -> list[str]:
    """The layers of two-component ``patterns`` that hold no inactive pattern a₋.

    A fit with ``negative="auto"`` leaves a₋ out of layers read only through ReLU gates
    (no method reads it there); ρ(S) of the two-component estimator cannot be measured on
    such a layer.
    """
    if patterns.estimator != "two_component":
        return []
    return [name for name in patterns if "a_minus" not in patterns[name]]


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
    return {"a_plus": flat["a_plus"], "a_minus": flat["a_minus"]}


#: Layers with more input coordinates than this are sampled by default (``Σ_xx`` of 302 MB).
MAX_DIMS = 6144


def estimator_quality(
    model: nn.Module,
    fit_data: Any,
    regression_data: Any,
    eval_data: Any,
    *,
    estimators: Sequence[str] = QUALITY_ESTIMATORS,
    layers: Sequence[str] | None = None,
    patterns: dict[str, Patterns] | None = None,
    max_neurons: int | None = None,
    max_dims: int | None = MAX_DIMS,
    dim_seeds: int = 3,
    random_draws: int = 1,
    positions: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    rcond: float = RCOND,
    canonizers: Sequence[Canonizer] | None = None,
) -> QualityTable:
    """ρ(S) of each signal estimator in each Linear/Conv layer (method.md §5, Figure 3).

    Exact by default: every neuron, every input coordinate and every output position (see the
    module docstring for how; layers with more than ``max_dims`` inputs are sampled and carry
    their error).

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
        Output units per layer, sampled with the seed when a layer has more (default ``None``:
        all; the cost per neuron is ``O(D)`` memory).
    max_dims:
        Layers with ``D ≤ max_dims`` input coordinates are exact; larger ones use ``max_dims``
        sampled coordinates, drawn ``dim_seeds`` times (``None``: always exact; memory
        ``8 D²`` bytes per split).
    dim_seeds:
        Independent coordinate draws for a sampled layer (their spread is reported).
    random_draws:
        Random directions drawn per neuron for ``"random"`` (their ρ is averaged).
    positions:
        Output positions sampled per image in conv layers (default ``None``: all).
    batch_size:
        Batch size for tensor data.
    seed:
        Seeds neuron, dimension and position sampling and the random estimator.
    rcond:
        Ridge of the regression relative to the mean eigenvalue of the input covariance.
    canonizers:
        As for :func:`patternnet.fit_patterns`.

    Returns
    -------
    QualityTable
        ``.rho`` (layers × estimators), ``.stderr``, ``.to_markdown()``, ``.to_records()``,
        ``.to_csv()``, ``.plot(path)``.

    Examples
    --------
    >>> table = estimator_quality(model, fit, regression, test)   # doctest: +SKIP
    >>> print(table.to_markdown()); table.plot("rho.png")          # doctest: +SKIP
    """
    unknown = [e for e in estimators if e not in QUALITY_ESTIMATORS]
    if random_draws < 1:
        raise ValueError(f"random_draws must be at least 1, not {random_draws}")
    if dim_seeds < 1:
        raise ValueError(f"dim_seeds must be at least 1, not {dim_seeds}")
    if max_dims is not None and max_dims < 4:
        raise ValueError(f"max_dims must be at least 4 (or None for exact), not {max_dims}")
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
    plans: dict[str, list[tuple[LayerMoments, LayerMoments]]] = {}
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
        sampled = max_dims is not None and D > max_dims
        draws = []
        for _ in range(dim_seeds if sampled else 1):
            dims = torch.randperm(D, generator=generator)[:max_dims] if sampled else torch.arange(D)
            draws.append((LayerMoments(neurons, dims, active), LayerMoments(neurons, dims, active)))
        plans[name] = draws
        info[name] = {
            "neurons": len(neurons), "out_features": O, "dims": len(draws[0][0].dims),
            "in_dims": D, "exact": len(neurons) == O and not sampled,
            "dim_seeds": len(draws), "positions": "all" if positions is None else positions,
        }  # fmt: skip
    common = {"positions": positions, "batch_size": batch_size, "canonizers": canonizers}
    collect_moments(model, regression_data, {n: [d[0] for d in p] for n, p in plans.items()},
                    seed=seed + 1, **common)  # fmt: skip
    collect_moments(model, eval_data, {n: [d[1] for d in p] for n, p in plans.items()},
                    seed=seed + 2, **common)  # fmt: skip
    shape = (len(names), len(estimators))
    rho = torch.full(shape, math.nan, dtype=torch.float64)
    spread = torch.zeros(shape, dtype=torch.float64)
    stderr = torch.zeros(shape, dtype=torch.float64)
    per_neuron: dict[tuple[str, str], Tensor] = {}
    convergence: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for i, name in enumerate(names):
        draws = plans[name]
        regression, evaluation = draws[0]
        info[name]["regression_samples"] = int(regression.count)
        info[name]["eval_samples"] = int(evaluation.count)
        weight = canonical.weight(name)
        O = weight.shape[0]
        sampled = len(draws) > 1 or len(regression.dims) < weight[0].numel()
        sizes = [max(1, len(regression.dims) // 4), max(1, len(regression.dims) // 2),
                 len(regression.dims)] if sampled else [len(regression.dims)]  # fmt: skip
        for j, estimator in enumerate(estimators):
            # by_size[s][t]: the layer means of coordinate draw t on the first sizes[s] dims
            by_size: list[list[float]] = [[] for _ in sizes]
            for t, (reg, ev) in enumerate(draws):
                for s_index, size in enumerate(sizes):
                    values = _draw_quality(estimator, name, weight, reg, ev, fitted, generator,
                                           random_draws, rcond, size)  # fmt: skip
                    finite = values[torch.isfinite(values)]
                    by_size[s_index].append(float(finite.mean()) if finite.numel() else math.nan)
                    if t == 0 and size == sizes[-1]:
                        per_neuron[(name, estimator)] = values
            final = torch.tensor(by_size[-1], dtype=torch.float64)
            rho[i, j] = final.mean()
            spread[i, j] = final.std() if len(final) > 1 else 0.0
            values = per_neuron[(name, estimator)]
            finite = values[torch.isfinite(values)]
            K = finite.numel()
            se = 0.0
            if K > 1 and K < O:  # finite-population standard error of the mean over neurons
                se = float(finite.std() / math.sqrt(K) * math.sqrt(1 - K / O))
            stderr[i, j] = math.sqrt(float(spread[i, j]) ** 2 + se**2)
            if sampled:
                convergence[(name, estimator)] = [
                    (size, float(torch.tensor(v).mean()),
                     float(torch.tensor(v).std()) if len(v) > 1 else 0.0)
                    for size, v in zip(sizes, by_size)
                ]  # fmt: skip
    return QualityTable(names, list(estimators), rho, per_neuron, info, spread, stderr, convergence)


def quality_over_splits(
    model: nn.Module,
    splits: Sequence[tuple[Any, Any]],
    **options: Any,
) -> QualityTable:
    """:func:`estimator_quality` on several disjoint (regression, evaluation) pairs of data:
    the mean ρ(S) and its error over the pairs.

    Parameters
    ----------
    model:
        The trained model.
    splits:
        ``[(regression_data, eval_data), ...]``, at least two pairs, disjoint from each other
        and from the data the patterns were fitted on.
    **options:
        Keyword arguments of :func:`estimator_quality` (``patterns`` should hold every fitted
        estimator, so that nothing is refitted per pair).

    Returns
    -------
    QualityTable
        ``rho``: the mean over the pairs; ``spread``: their standard deviation; ``stderr``: the
        standard error of the mean, ``sqrt(spread²/n + mean of each pair's stderr²)``;
        ``info[layer]["splits"]``: the number of pairs; ``per_neuron`` of the first pair.
    """
    if len(splits) < 2:
        raise ValueError(f"quality_over_splits needs at least 2 pairs of data, got {len(splits)}")
    tables = [estimator_quality(model, None, regression, evaluation, **options)
              for regression, evaluation in splits]  # fmt: skip
    rho = torch.stack([table.rho for table in tables])
    within = torch.stack([table.stderr for table in tables]).pow(2).mean(0)
    spread = rho.std(0)
    first = tables[0]
    info = {layer: {**values, "splits": len(splits)} for layer, values in first.info.items()}
    return QualityTable(first.layers, first.estimators, rho.mean(0), first.per_neuron, info,
                        spread, (spread.pow(2) / len(splits) + within).sqrt(),
                        first.convergence)  # fmt: skip


def _draw_quality(
    estimator: str,
    name: str,
    weight: Tensor,
    regression: LayerMoments,
    evaluation: LayerMoments,
    fitted: dict[str, Patterns],
    generator: torch.Generator,
    random_draws: int,
    rcond: float,
    dims: int,
) -> Tensor:
    """Per-neuron ρ of one estimator on one coordinate draw (averaged over random draws)."""
    draws = []
    for _ in range(random_draws if estimator == "random" else 1):
        patterns = _neuron_patterns(estimator, name, weight, regression.neurons, fitted, generator)
        w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1).cpu()
        draws.append(layer_quality(regression, evaluation, estimator, patterns,
                                   weight=w[regression.neurons], rcond=rcond, dims=dims))
    return torch.stack(draws).nanmean(0) if len(draws) > 1 else draws[0]
