"""ρ(S) of the graph's fixed-weight neurons: residual sums, average pools and means.

method.md §5 and §10. A node (:mod:`patternnet.engine.nodes`) is per unit (channel) a neuron
``y = wᵀx`` with a fixed ``w``: a sum's ``x`` holds its summands (``w = 1``), a pool's the
values of its window and a mean's the reduced values (``w = 1/D``). Its signal estimator is
its fitted pattern, and its quality is the paper's

``ρ(S) = 1 − max_v corr(y, vᵀ(x − S(x)))``

with ``S(x) = a y`` (linear) or ``a₊ y`` / ``a₋ y`` by the sign of ``y`` (two-component), the
regression ``v`` (least squares with intercept and a small ridge) on one split and the
correlation on another, floored at 0, as :func:`~patternnet.evaluate.estimator_quality`
computes it for Linear/Conv layers. The patterns must have been fitted on a third split.

Here the samples are held explicitly (nodes have few inputs per unit: 2 for a sum, ``k`` for
a pool, the positions for a mean), a sample of ``positions`` output positions per image;
every unit is evaluated and ρ is the mean over units with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..borrow import borrowed
from ..engine.canonize import Canonical, Canonizer
from ..engine.graph import ModelGraph
from ..engine.nodes import NodeCall, NodeTracker, fixed_weight, graph_recording, node_kind
from ..patterns.batches import iter_batches
from ..patterns.store import Patterns

__all__ = ["filter_node_patterns", "node_quality", "node_samples"]

#: Ridge of the regression, relative to the mean variance of the residual's coordinates.
RCOND = 1e-6


def _window_samples(call: NodeCall) -> tuple[Tensor, Tensor]:
    """A 2-D average pool's windows ``(C, k, N, L)`` and outputs ``(C, N, L)`` (float64)."""
    assert call.geometry is not None
    if call.geometry.spatial_dims != 2:
        raise ValueError("node_quality handles 2-D average pools only (unfold)")
    x, out = call.arrange()
    n, c = x.shape[:2]
    windows = F.unfold(x.double(), call.kernel, padding=call.geometry.padding,
                       stride=call.geometry.stride)  # fmt: skip
    windows = windows.view(n, c, call.width, -1).permute(1, 2, 0, 3)
    return windows, out.double().reshape(n, c, -1).transpose(0, 1)


def node_samples(
    model: nn.Module,
    data: Any,
    *,
    positions: int | None = 8,
    batch_size: int | None = None,
    seed: int = 0,
    canonizers: Sequence[Canonizer] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Every node's inputs and outputs on ``data``: ``{name: (x (U, D, M), y (U, M))}``.

    ``positions`` output positions per image are drawn (seeded; ``None``: all), so that
    ``M = images × positions``. Float64, on the CPU. The model runs in its canonical form,
    as in a fit, and is left as it was.
    """
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def handle(name: str, call: NodeCall) -> None:
        if call.layout == "window":
            x, y = _window_samples(call)
        else:
            assert call.unit_major is not None
            x, y = call.unit_major(torch.float64, None)
            n = call.result.shape[0]
            x, y = x.view(x.shape[0], x.shape[1], n, -1), y.view(y.shape[0], n, -1)
        count = y.shape[-1]
        if positions is not None and count > positions:
            index = torch.randperm(count, generator=generator)[:positions]
            x, y = x[..., index], y[..., index]
        parts.setdefault(name, []).append(
            (x.reshape(x.shape[0], x.shape[1], -1).cpu(), y.reshape(y.shape[0], -1).cpu())
        )
        return None

    canonical = Canonical(model, canonizers)
    tracker = NodeTracker(handle, records=True, plan=ModelGraph.of(model).linear_nodes())
    with borrowed(model), canonical.active(), graph_recording(), tracker:
        for batch in iter_batches(data, batch_size):
            tracker.new_pass()
            canonical(batch.detach().requires_grad_(True))
    return {name: (torch.cat([p[0] for p in ps], 2), torch.cat([p[1] for p in ps], 1))
            for name, ps in parts.items()}  # fmt: skip


def _residual(x: Tensor, y: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    """``x − S(x)`` ``(U, M, D)`` for a node's patterns (linear or two-component)."""
    if "a" in tensors:
        a = tensors["a"].double()[:, :, None]
        return (x - a * y[:, None, :]).transpose(1, 2)
    plus = tensors["a_plus"].double()[:, :, None]
    minus = tensors["a_minus"].double()[:, :, None]
    a = torch.where((y > 0)[:, None, :], plus, minus)
    return (x - a * y[:, None, :]).transpose(1, 2)


def _rho(d_reg: Tensor, y_reg: Tensor, d_eval: Tensor, y_eval: Tensor) -> Tensor:
    """Per unit ``1 − max(0, corr(y, vᵀd))`` on the evaluation split, ``v`` fitted on the
    regression split (least squares with intercept and ridge ``RCOND``)."""
    units, m, dims = d_reg.shape
    design = torch.cat([d_reg, torch.ones(units, m, 1, dtype=d_reg.dtype)], 2)
    gram = design.transpose(1, 2) @ design
    scale = gram.diagonal(dim1=1, dim2=2)[:, :dims].mean(1).clamp(min=1e-300)
    ridge = torch.zeros(dims + 1, dtype=d_reg.dtype)
    ridge[:dims] = 1.0
    gram = gram + RCOND * scale[:, None, None] * torch.diag(ridge)
    v = torch.linalg.solve(gram, design.transpose(1, 2) @ y_reg[:, :, None])[:, :dims, 0]
    fit = (d_eval * v[:, None, :]).sum(2)
    fit = fit - fit.mean(1, keepdim=True)
    target = y_eval - y_eval.mean(1, keepdim=True)
    denominator = fit.norm(dim=1) * target.norm(dim=1)
    corr = (fit * target).sum(1) / denominator.clamp(min=1e-300)
    corr = torch.where(denominator > 0, corr, torch.zeros_like(corr))  # no residual: ρ = 1
    return 1.0 - corr.clamp(min=0.0)


def node_quality(
    model: nn.Module,
    patterns: dict[str, Patterns | dict[str, dict[str, Tensor]]],
    regression_data: Any,
    eval_data: Any,
    *,
    positions: int | None = 8,
    batch_size: int | None = None,
    seed: int = 0,
    canonizers: Sequence[Canonizer] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """ρ(S) of every node (sum, pool, mean) for each estimator's patterns.

    Parameters
    ----------
    model:
        The trained model (borrowed, never changed).
    patterns:
        ``{estimator name: Patterns}`` fitted on data disjoint from the two splits below (or
        ``{estimator name: {node: {"a": (U, D)}}}``, e.g. the filter patterns
        :func:`filter_node_patterns`, which need no data).
    regression_data, eval_data:
        The splits for the regression ``v`` and for the correlation.
    positions:
        Output positions sampled per image (``None``: all).

    Returns
    -------
    dict
        ``{node: {estimator: {"rho", "stderr", "units", "inputs", "samples"}}}``: ρ is the
        mean over the node's live units (a unit whose output never varies is left out), the
        standard error is that of the mean over units.
    """
    regression = node_samples(model, regression_data, positions=positions,
                              batch_size=batch_size, seed=seed, canonizers=canonizers)
    evaluation = node_samples(model, eval_data, positions=positions, batch_size=batch_size,
                              seed=seed + 1, canonizers=canonizers)  # fmt: skip
    result: dict[str, dict[str, dict[str, float]]] = {}
    for name, (x_reg, y_reg) in regression.items():
        x_eval, y_eval = evaluation[name]
        live = (y_reg.std(1) > 0) & (y_eval.std(1) > 0)
        rows: dict[str, dict[str, float]] = {}
        for estimator, fitted in patterns.items():
            tensors = getattr(fitted, "nodes", fitted).get(name)
            if tensors is None:
                continue
            if "a" not in tensors and "a_minus" not in tensors:
                raise ValueError(
                    f"the {estimator!r} patterns have no a₋ for node {name!r}: a fit with "
                    "negative='auto' (the default) or False leaves a₋ out where no method "
                    "reads it, but ρ(S) of the two-component estimator needs both halves. "
                    "Fit them with negative=True (CLI: --negative-everywhere)"
                )
            rho = _rho(_residual(x_reg, y_reg, tensors), y_reg,
                       _residual(x_eval, y_eval, tensors), y_eval)[live]  # fmt: skip
            k = int(rho.numel())
            rows[estimator] = {
                "rho": float(rho.mean()) if k else math.nan,
                "stderr": float(rho.std() / math.sqrt(k)) if k > 1 else math.nan,
                "units": k, "inputs": int(x_reg.shape[1]), "samples": int(y_reg.shape[1]),
            }  # fmt: skip
        result[name] = rows
    return result


def filter_node_patterns(fitted: Patterns) -> dict[str, dict[str, Tensor]]:
    """The filter estimator's node patterns ``a = w/wᵀw`` for the nodes of ``fitted``
    (``(1/m, …)`` for a sum of ``m`` summands, ``1`` per input of a pool or mean)."""
    result = {}
    for name, tensors in fitted.nodes.items():
        units, inputs = next(iter(tensors.values())).shape
        w = fixed_weight(node_kind(name), units, inputs)
        result[name] = {"a": w / (w * w).sum(1, keepdim=True)}
    return result
