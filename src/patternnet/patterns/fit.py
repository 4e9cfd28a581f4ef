"""One pass over the data fits the patterns of every Linear/Conv layer at once.

Forward hooks on each layer hand its input and output to that layer's
:class:`~patternnet.patterns.statistics.LayerStatistics`; the model runs in eval mode without
gradients, in its canonical form (BatchNorm folded), and is left exactly as it was found.
The sums are then turned into :class:`~patternnet.patterns.store.Patterns` by the estimators.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..borrow import borrowed, forward_checked, model_device, model_dtype
from ..engine.attention import decomposed, named_linear_layers
from ..engine.canonize import Canonical, Canonizer
from ..engine.gates import RELU, gated_nodes, relu_gates
from ..engine.graph import ModelGraph
from ..engine.nodes import is_node_name
from ..engine.support import (
    attention_linear_patterns,
    check_supported,
    gated_smooth_layers,
    linear_pattern_layers,
    rectifier_free,
)
from ..layers import geometry
from . import distributed as distributed_mod
from . import estimators, graph_statistics
from .attention_statistics import AttentionRecorder
from .batches import DEFAULT_BATCH_SIZE, iter_batches
from .checkpoint import (
    Checkpointer,
    check_context,
    load_checkpoint,
    rank_path,
    remove_stale_temporaries,
)
from .statistics import (
    DEFAULT_FLUSH_EVERY,
    LayerStatistics,
    Statistics,
    full_float32,
    layer_sums,
    release_scratch,
    required_sums,
)
from .store import Patterns, architecture, fingerprint, weight_summary

__all__ = ["FitOptions", "collect_statistics", "compute_patterns", "fit_patterns", "iter_batches"]

TRAIN_MODE_WARNING = (
    "the model is in train mode; patterns are fitted in eval mode (BatchNorm running "
    "statistics, no dropout) and the model's mode is restored afterwards"
)


@dataclass(frozen=True)
class FitOptions:
    """How :func:`fit_patterns` and :func:`collect_statistics` fit (every option in one place).

    ``fit_patterns(model, data, estimator="linear")`` and
    ``fit_patterns(model, data, FitOptions(estimator="linear"))`` are the same call; keywords
    given beside ``options`` replace its fields.

    Attributes
    ----------
    estimator:
        ``"two_component"`` (a₊, a₋; default), ``"linear"`` (a), ``"filter"`` or
        ``"identity"``.
    negative:
        With ``"two_component"``: where to fit the inactive pattern a₋. ``"auto"`` (default):
        in every layer except those whose output is read only through ReLU gates (possibly
        after a folded BatchNorm, reshapes, max-pooling; :meth:`ModelGraph.relu_gates
        <patternnet.engine.graph.ModelGraph.relu_gates>`), whose inactive units never receive
        a signal: the gate zeroes them on the way back, so no method reads their a₋ (in a
        plain ReLU network every layer but the last; in a ResNet the first two convolutions
        of each block). Those layers store two ``(O, D)`` sums instead of three and their
        products stack ``2·O`` instead of ``3·O + 1`` output gradients; PatternNet and
        PatternAttribution give the same explanations as with ``True``. One difference: a
        unit of such a layer whose a₊ normaliser is ill-conditioned falls back to the filter
        pattern ``w/wᵀw`` instead of its linear pattern (which needs the sums left out; the
        fit report names such units, ``patterns.fallback``). Sums, pools and means keep a₋.
        ``True``: a₋ in every layer (and the linear sums every layer's fallback needs).
        ``False``: a₊ only, everywhere; PatternNet then uses a₊ everywhere, as the Keras
        reference implementation did.
    batch_size:
        Batch size when ``data`` is a tensor (default 32).
    device:
        Must be the model's device if given (the model is not moved).
    progress:
        Show a tqdm progress bar.
    precision:
        ``None`` (default): ``"float32"``, or ``"float64"`` for a float64 model.
        ``"float32"``: convolution products in float32 of *shifted* data (each input channel
        minus its mean over the first batch, each ``y`` minus its first-batch mean), summed
        into float64 sums, the shift undone in float64 (method.md §11); Linear products in
        float64. Measured against ``"float64"`` on VGG-, ResNet- and ViT-shaped nets with
        inputs of large mean: within 1e-5 relative per pattern tensor (``perf/README.md``,
        ``tests/test_precision.py``). ``"float64"``: every product in float64, the reference
        (several times slower; 4.7× on an H100). The sums are float64 either way.
    limit:
        Use at most this many samples.
    canonizers:
        Graph rewrites applied first (default: fold BatchNorm into the preceding layer).
    checkpoint:
        A file to save the statistics to while fitting (atomically: a kill never leaves a
        broken file). With ``resume=True`` an existing checkpoint is continued: the batches it
        holds are skipped (never added twice) and the result equals that of an uninterrupted
        fit with the same options. The data must come in the same order with the same batch
        size (a shuffling ``DataLoader`` needs a seeded generator); a ``DataLoader`` still
        loads the skipped batches, a tensor does not. In a distributed fit each rank writes
        ``<checkpoint>.rank<r>of<n>``. The file is kept after the fit (delete it yourself).
    checkpoint_every:
        Save after this many batches (at the next flush of the float32 buffers, every
        ``min(8, checkpoint_every)`` batches).
    checkpoint_minutes:
        Save after this many minutes (default 10 when neither option is given).
    resume:
        Continue from ``checkpoint`` if it exists (else start afresh). Without it an existing
        checkpoint is an error, so that a finished fit is never overwritten by mistake.
    distributed:
        Fit with ``torch.distributed``: each rank adds its share of ``data`` (pass the whole
        data on every rank; see :mod:`patternnet.patterns.distributed` for how it is sharded)
        and one all-reduce sums the ranks; every rank returns the same patterns (save them on
        rank 0 only). ``None`` (default): when a process group is initialised with more than
        one process.
    """

    estimator: str = "two_component"
    negative: bool | str = "auto"
    batch_size: int | None = None
    device: torch.device | str | None = None
    progress: bool = True
    precision: str | None = None
    limit: int | None = None
    canonizers: Sequence[Canonizer] | None = None
    checkpoint: str | os.PathLike[str] | None = None
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = None
    resume: bool = False
    distributed: bool | None = None

    @classmethod
    def build(cls, options: FitOptions | None = None, **changes: Any) -> FitOptions:
        """``options`` (default: the defaults) with the fields named in ``changes`` replaced.

        Raises
        ------
        TypeError
            For a name that is not an option, listing the options.
        """
        if options is not None and not isinstance(options, FitOptions):
            raise TypeError(
                f"options must be a FitOptions, not {type(options).__name__}; pass keywords "
                "(fit_patterns(model, data, estimator=...)) or FitOptions(...)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise TypeError(
                f"unknown fit option(s) {', '.join(unknown)}; the options are "
                f"{', '.join(sorted(fields))}"
            )
        return dataclasses.replace(options or cls(), **changes)

    def resolved_precision(self, model: nn.Module) -> str:
        """The precision a fit of ``model`` uses (``None``: float32 unless the model is float64)."""
        if self.precision is None:
            return "float64" if model_dtype(model) == torch.float64 else "float32"
        required_sums("linear", precision=self.precision)  # validates
        return self.precision



def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear/Conv modules by qualified name (each once, even if reused).

    Includes the virtual Q/K/V input projection ``"<attention>.in_proj"`` of every
    ``nn.MultiheadAttention`` (:func:`patternnet.engine.attention.named_linear_layers`).
    """
    return dict(named_linear_layers(model))


def collected_sums(
    model: nn.Module, estimator: str, negative: bool | str, precision: str = "float64"
) -> frozenset[str] | None:
    """The linear pattern's sums where a fit of ``model`` collects only those, else None.

    None: each layer collects its estimator's sums
    (:func:`~patternnet.patterns.statistics.layer_sums`). A two-component fit (``negative``
    True or ``"auto"``) of a model with attention and no rectifier collects less: its
    patterns are all linear (:func:`~patternnet.engine.support.attention_linear_patterns`,
    method.md §12), so only the linear pattern's sums are collected (``count``, ``sum_y``,
    ``sum_x``, ``sum_xy``; on ViT-B/16 a third of the products and of the memory).
    Attention is known before the pass from ``nn.MultiheadAttention`` modules and
    ``scaled_dot_product_attention`` calls in the traced graph; where it is not (an
    untraceable model), all sums are collected and the solve still gives linear patterns.
    """
    if estimator == "two_component" and negative and _has_attention(model) and \
            rectifier_free(model):  # fmt: skip
        return required_sums("linear", precision=precision)
    return None


def _has_attention(model: nn.Module) -> bool:
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return True
    graph = ModelGraph.of(model)
    return graph.traced and next(iter(graph.nodes("attention")), None) is not None


def _new_statistics(
    model: nn.Module,
    canonical: Canonical,
    estimator: str,
    negative: bool | str,
    device: torch.device,
    precision: str,
) -> Statistics:
    required_sums(estimator, negative, precision)  # validates
    linear = collected_sums(model, estimator, negative, precision)
    # negative="auto": layers read only through ReLU gates need no a₋ (statistics.layer_sums)
    gates = (
        relu_gates(model, canonical.form.bypass)
        if estimator == "two_component" and negative == "auto" and linear is None
        else {}
    )
    layers = {}
    for name, module in linear_layers(model).items():
        weight = canonical.weight(name)
        groups = getattr(module, "groups", 1)
        sums = linear or layer_sums(estimator, negative, precision, gates.get(name) == RELU)
        layers[name] = LayerStatistics(
            weight.shape[0], groups, weight[0].numel(), sums, device
        )
    return Statistics(layers, estimator=estimator, negative=negative)


def _gated_nodes(
    model: nn.Module, canonical: Canonical, stats: Statistics, plan: Any, precision: str
) -> frozenset[str]:
    """The sums, pools and means read only through ReLU gates, which collect no a₋ under
    ``negative="auto"`` like such layers (:func:`_new_statistics`): every residual sum of a
    ResNet, whose block's ReLU gates the sum (:func:`~patternnet.engine.gates.gated_nodes`, the
    nodes whose explanation rule reads no a₋). Only with a complete plan (no probed names)."""
    if stats.estimator != "two_component" or stats.negative != "auto" or not plan.complete:
        return frozenset()
    if collected_sums(model, stats.estimator, stats.negative, precision) is not None:
        return frozenset()
    return gated_nodes(model, canonical.form.bypass)


def _has_negative(stats: LayerStatistics, negative: bool | str) -> bool:
    """Whether a layer's (or node's) a₋ is solved: asked for, and its sums collected."""
    return bool(negative) and ("sum_xy" in stats.tensors or "sum_xy_minus" in stats.tensors)


def collect_statistics(
    model: nn.Module,
    data: Any,
    options: FitOptions | None = None,
    *,
    statistics: Statistics | None = None,
    **changes: Any,
) -> Statistics:
    """Accumulate the sums every estimator needs, in one pass over ``data``.

    Parameters
    ----------
    model, data:
        As for :func:`fit_patterns`.
    options:
        A :class:`FitOptions`; keywords named like its fields (``estimator=...``) replace
        them.
    statistics:
        Continue an earlier partial fit (its sums are added to, in place; not with
        ``resume``).

    In a distributed fit every rank returns the all-reduced statistics of the whole data.

    Returns
    -------
    Statistics
        Float64 sums per layer (on the model's device), mergeable with other partial fits.

    Notes
    -----
    The pass is one loop: forward hooks (:func:`_register_hooks`) hand every layer's input and
    output to its statistics; every ``DEFAULT_FLUSH_EVERY`` batches, at checkpoints and at
    the end, ``stats.flush()`` adds the held-back products into the float64 sums. Statistics
    of other nodes (sums, pools, attention) plug in at those two points: their hooks are
    registered in :func:`_register_hooks`, and anything they hold back is flushed with
    ``stats``.
    """
    o = FitOptions.build(options, **changes)
    estimator, negative, device, limit = o.estimator, o.negative, o.device, o.limit
    batch_size, checkpoint, resume = o.batch_size, o.checkpoint, o.resume
    precision = o.resolved_precision(model)
    check_supported(model)  # before any data is read
    target_device = model_device(model)
    if device is not None and torch.device(device) != target_device:
        dev = torch.device(device)
        if not (dev.type == target_device.type and dev.index is None):
            raise ValueError(
                f"the model is on {target_device} but device={str(device)!r}; move the model "
                f"first (model.to({str(device)!r})): patternnet does not move a borrowed model"
            )
    canonical = Canonical(model, o.canonizers)
    use_distributed = distributed_mod.resolve(o.distributed)
    rank = distributed_mod.rank() if use_distributed else 0
    world = distributed_mod.world_size() if use_distributed else 1
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=path (the file to resume from)")
    if checkpoint is not None and statistics is not None:
        raise ValueError("pass either statistics= (continue in memory) or checkpoint=, not both")
    flush_every = DEFAULT_FLUSH_EVERY
    if o.checkpoint_every is not None:
        flush_every = max(1, min(DEFAULT_FLUSH_EVERY, int(o.checkpoint_every)))
    context: dict[str, Any] = {
        "fingerprint": fingerprint(model),
        "estimator": estimator,
        "negative": negative,
        "precision": precision,
        "rank": rank,
        "world_size": world,
    }
    checkpoint_path = None
    resumed = False
    if checkpoint is not None:
        checkpoint_path = rank_path(checkpoint, rank, world)
        remove_stale_temporaries(checkpoint_path)
        if checkpoint_path.exists():
            if not resume:
                raise ValueError(
                    f"checkpoint {checkpoint_path} exists; pass resume=True to continue that "
                    "fit, or delete the file (or choose another path) to start afresh"
                )
            statistics, saved = load_checkpoint(checkpoint_path)
            if negative == "auto" and saved.get("negative") is True:
                # a checkpoint with a₋ everywhere (the default before "auto"): continue it as
                # it is; its sums hold everything "auto" needs and more
                negative = context["negative"] = True
            check_context(checkpoint_path, saved, context)
            statistics.to(target_device)
            flush_every = int(saved.get("flush_every", flush_every))
            resumed = True
    context["flush_every"] = flush_every
    stats = statistics or _new_statistics(
        model, canonical, estimator, negative, target_device, precision
    )
    if stats.estimator != estimator:
        raise ValueError(
            f"cannot continue {stats.estimator!r} statistics with estimator {estimator!r}"
        )
    if not stats.layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear or Conv1d/2d/3d layer: nothing to fit"
        )
    if not next(iter(stats.layers.values())).sums:
        return stats  # identity/filter estimators need no data
    if use_distributed:
        data, limit = distributed_mod.shard(data, batch_size, limit, rank, world)
    dtype = model_dtype(model)
    checkpointer = None
    if checkpoint_path is not None:
        checkpointer = Checkpointer(
            checkpoint_path, every=o.checkpoint_every, minutes=o.checkpoint_minutes,
            context=context,
        )
        checkpointer.start(stats.batches)
    skip = (stats.batches, stats.images) if resumed else (0, 0)
    bar = _progress(
        o.progress and rank == 0, _total_samples(data, batch_size, limit), initial=skip[1]
    )
    handles = []
    attention_recorder = AttentionRecorder(stats)
    with borrowed(model, warn_train=TRAIN_MODE_WARNING):
        try:
            plan = ModelGraph.of(model).linear_nodes()
            gated = _gated_nodes(model, canonical, stats, plan, precision)  # before our hooks
            handles += _register_hooks(model, stats, precision)
            # Sums, pools and means are found and recorded in the same pass (graph_statistics)
            with canonical.active(), full_float32(), graph_statistics.recording(
                stats, precision, plan, gated
            ) as nodes:
                for batch in _remaining_batches(data, batch_size, limit, *skip):
                    batch = batch.to(
                        device=target_device, dtype=dtype,
                        non_blocking=target_device.type == "cuda" and batch.is_pinned(),
                    ).requires_grad_(True)
                    nodes.new_pass()
                    # attention runs step by step: its projections, weighted sums recorded
                    with decomposed(model, attention_recorder):
                        forward_checked(canonical, batch)
                    stats.images += batch.shape[0]
                    stats.batches += 1
                    if stats.batches % flush_every == 0:
                        stats.flush()
                    if checkpointer is not None and checkpointer.due(stats):
                        checkpointer.save(stats)
                    if bar is not None:
                        bar.update(batch.shape[0])
            stats.flush()
            if checkpointer is not None:
                checkpointer.save(stats, complete=True)
        finally:
            for handle in handles:
                handle.remove()
            if bar is not None:
                bar.close()
            release_scratch()  # the buffers the per-batch products reused
    if use_distributed:
        stats.all_reduce_()
    return stats


def _register_hooks(model: nn.Module, stats: Statistics, precision: str) -> list[Any]:
    """Forward hooks that feed one batch of every fitted node to its statistics.

    Called inside the borrowed, canonical, no-grad block of :func:`collect_statistics`; the
    returned handles are removed when the pass ends (also on errors). A hook reads the
    module's ``weight``/``bias`` when it runs: inside the canonical form those are the folded
    ones. Statistics of further node kinds add their hooks here.
    """
    handles = []
    for name, module in linear_layers(model).items():
        handles.append(module.register_forward_hook(
            _layer_hook(stats.layers[name], geometry(module), precision)
        ))
    return handles


def _layer_hook(
    layer_stats: LayerStatistics, geo: Any, precision: str
) -> Callable[[nn.Module, tuple[Any, ...], Tensor], None]:
    def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        # Read weight and bias now: inside functional_call they are the canonical ones.
        layer_stats.update(geo, args[0], output, mod.bias, mod.weight.shape, precision)

    return hook


def _remaining_batches(
    data: Any, batch_size: int | None, limit: int | None, batches: int, images: int
) -> Iterator[Tensor]:
    """The batches of ``data`` after the first ``batches`` (which held ``images`` samples).

    A resumed fit skips what its checkpoint already holds; the count of skipped samples must
    match, or the data (or the batch size) changed since the checkpoint was written.
    """
    if batches == 0:
        yield from iter_batches(data, batch_size, limit=limit)
        return

    def mismatch(seen: int, count: int) -> ValueError:
        return ValueError(
            f"the checkpoint holds {batches} batches of {images} samples, but the first "
            f"{count} batches of this data hold {seen} samples: resume with the same data, "
            "order, batch size and limit as the interrupted fit"
        )

    if isinstance(data, Tensor):
        size = batch_size or DEFAULT_BATCH_SIZE
        start = min(batches * size, data.shape[0])
        consumed = start if limit is None else min(start, limit)
        if consumed != images:
            raise mismatch(consumed, batches)
        rest = None if limit is None else limit - images
        if start < data.shape[0] and rest != 0:
            yield from iter_batches(data[start:], size, limit=rest)
        return
    seen = 0
    count = 0
    for batch in iter_batches(data, batch_size, limit=limit):
        if count < batches:
            seen += batch.shape[0]
            count += 1
            continue
        if seen != images:
            raise mismatch(seen, count)
        yield batch
    if count != batches or seen != images:
        raise mismatch(seen, count)


def _total_samples(data: Any, batch_size: int | None, limit: int | None) -> int | None:
    """The number of samples ``data`` will yield, when known (for the progress bar's ETA)."""
    total: int | None = None
    if isinstance(data, Tensor):
        total = data.shape[0] if data.dim() else None
    else:
        dataset = getattr(data, "dataset", None)
        sampler = getattr(data, "sampler", None)
        try:
            if sampler is not None and getattr(data, "batch_size", None) is not None:
                total = len(sampler)
            elif dataset is not None:
                total = len(dataset)
        except TypeError:
            total = None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return total


def _progress(enabled: bool, total: int | None, initial: int = 0) -> Any:
    """A tqdm bar in images (it shows images/s, and the ETA when the total is known)."""
    if not enabled:
        return None
    return tqdm(
        total=total, initial=initial, unit="img", desc="fitting patterns", leave=False,
        smoothing=0.1,
    )


def compute_patterns(
    model: nn.Module,
    statistics: Statistics,
    *,
    canonizers: Sequence[Canonizer] | None = None,
    dtype: torch.dtype | None = None,
) -> Patterns:
    """Turn accumulated statistics into :class:`Patterns` with the statistics' estimator.

    Parameters
    ----------
    model:
        The model the statistics were collected on (its canonical weights are used).
    statistics:
        From :func:`collect_statistics` (possibly merged or all-reduced).
    canonizers:
        The same canonizers as for the fit (default: BatchNorm folding).
    dtype:
        dtype of the pattern tensors; default: the model's (at least float32).
    """
    canonical = Canonical(model, canonizers)
    if dtype is None:
        dtype = model_dtype(model)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
    estimator = statistics.estimator
    layers: dict[str, dict[str, Tensor]] = {}
    report: dict[str, Any] = {}
    fallback: dict[str, dict[str, list[int]]] = {}
    statistics.flush()
    smooth, gated = set(), set()
    all_linear = False
    if estimator == "two_component":
        smooth = linear_pattern_layers(model, statistics.negative)
        # Statistics with the linear pattern's sums only (collected_sums) are all linear.
        only_linear = all("count_plus" not in layer.sums
                          for name, layer in statistics.items() if not is_node_name(name))
        all_linear = attention_linear_patterns(
            model, statistics.negative,
            only_linear or any(n.startswith("attention#") for n in statistics),
        )
        # GELU/SiLU: a₊/a₋ for smooth="gate" and a for smooth="derivative" (method.md §10)
        if statistics.negative and not all_linear:
            gated = gated_smooth_layers(model)
    nodes: dict[str, dict[str, Tensor]] = {}
    workspace = estimators.Workspace()  # float64 buffers of one block, reused by every layer
    for name, layer_stats in statistics.items():
        if is_node_name(name):  # a sum, pool or mean (graph_statistics)
            broken = sorted(k for k, t in layer_stats.tensors.items()
                            if not torch.isfinite(t).all())  # fmt: skip
            if broken:
                raise ValueError(
                    f"the statistics of node {name!r} hold NaN or Inf ({', '.join(broken)}): "
                    "the model produced non-finite values there (NaN/Inf weights, or overflow "
                    "in low precision: fit a float32 copy of the model)"
                )
            tensors, rep = graph_statistics.node_patterns(
                name, layer_stats, "linear" if all_linear else estimator,
                _has_negative(layer_stats, statistics.negative),
            )
            nodes[name] = {key: t.to(dtype=dtype) for key, t in tensors.items()}
        else:
            weight = canonical.weight(name).detach()
            if estimator == "identity":
                layers[name] = {}
                continue
            kind = estimator
            if estimator == "two_component" and (name in smooth or all_linear):
                kind = "linear"
            with estimators.one_thread():
                tensors, rep = _solve(
                    name, kind, layer_stats, weight,
                    _has_negative(layer_stats, statistics.negative), dtype, workspace,
                )
                if estimator == "two_component" and name in gated:  # GELU/SiLU: a too
                    tensors = {key: t.clone() for key, t in tensors.items()}
                    tensors["a"] = _solve(
                        name, "linear", layer_stats, weight, True, dtype, workspace
                    )[0]["a"]
            layers[name] = {
                key: t.reshape(weight.shape).to(weight.device) for key, t in tensors.items()
            }
        report[name] = {
            "samples": rep.samples,
            "units": rep.units,
            "dead": rep.dead,
            "degenerate": rep.degenerate,
            "active_fraction": None
            if rep.active_fraction is None or math.isnan(rep.active_fraction)
            else rep.active_fraction,
        }
        if rep.fallback is not None:  # ill-conditioned two-component units (estimators.py)
            report[name]["fallback"] = {k: len(v) for k, v in rep.fallback.items()}
            report[name]["fallback_to"] = rep.fallback_to
            if any(rep.fallback.values()):
                fallback[name] = {k: v for k, v in rep.fallback.items() if v}
    metadata = {
        "fingerprint": fingerprint(model),
        "architecture": architecture(model),
        "weights": weight_summary(model),
        "images": statistics.images,
        "negative": statistics.negative,
        "canonical": list(canonical.form.notes),
        "report": report,
        "fallback": fallback,
        "nodes": graph_statistics.describe(statistics),
    }
    return Patterns(layers, estimator=estimator, metadata=metadata, nodes=nodes)


def _solve(
    name: str, kind: str, stats: LayerStatistics, weight: Tensor, negative: bool,
    dtype: torch.dtype, workspace: estimators.Workspace,
) -> tuple[dict[str, Tensor], estimators.LayerReport]:
    """The patterns of one layer by ``kind`` (``dtype``, ``(O, D)``) and their report.

    The estimators solve a block of rows at a time in float64 in ``workspace``'s buffers and
    round each block once into ``dtype``.
    """
    stats.flush()
    try:
        if kind == "filter":
            a, rep = estimators.filter_pattern(weight.reshape(stats.out_features, -1))
            return {"a": a.to(dtype)}, rep
        if kind == "linear":
            a, rep = estimators.linear_pattern(stats, weight, dtype=dtype, workspace=workspace)
            return {"a": a}, rep
        if kind == "two_component":
            return estimators.two_component_patterns(
                stats, weight, negative, dtype=dtype, workspace=workspace
            )
    except estimators.NonFiniteStatisticsError as error:
        raise ValueError(
            f"the statistics of layer {name!r} hold NaN or Inf ({', '.join(error.names)}): the "
            "model produced non-finite values there (NaN/Inf weights, or overflow in low "
            "precision: fit a float32 copy of the model)"
        ) from None
    raise ValueError(f"unknown estimator {kind!r}")  # pragma: no cover - see required_sums


def fit_patterns(
    model: nn.Module,
    data: Any = None,
    options: FitOptions | None = None,
    *,
    estimator: str = "two_component",
    negative: bool | str = "auto",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    precision: str | None = None,
    limit: int | None = None,
    canonizers: Sequence[Canonizer] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = None,
    resume: bool = False,
    distributed: bool | None = None,
) -> Patterns:
    """Learn the signal estimator of every Linear/Conv layer of ``model`` from ``data``.

    One pass over the data, model in eval mode, no gradients; the model is left exactly as it
    was (training flags, parameters, hooks). See method.md §2 for the estimators.

    Parameters
    ----------
    model:
        Any ``nn.Module``; every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` gets patterns, keyed by
        its qualified name. BatchNorm after a layer is folded into it first.
    data:
        A ``DataLoader``, a tensor ``(N, ...)`` or any iterable of tensors or
        ``(inputs, labels, ...)`` tuples. Not needed for ``"filter"``/``"identity"``.
    options:
        A :class:`FitOptions` (every option, documented there). The keywords below are the
        same options; a keyword given beside ``options`` (not at its default) replaces the
        field.
    estimator, negative, batch_size, device, progress, precision, limit, canonizers, \
checkpoint, checkpoint_every, checkpoint_minutes, resume, distributed:
        See :class:`FitOptions`. The default fit is two-component (a₊, and a₋ wherever an
        inactive unit can receive a signal, ``negative="auto"``), with float32 products of
        shifted data summed in float64: within 1e-5 of a float64 fit.

    Returns
    -------
    Patterns
        ``patterns[name]["a_plus"]`` etc., shaped like each layer's weight, with a fit report
        in ``patterns.metadata["report"]``.

    Examples
    --------
    >>> patterns = fit_patterns(model, loader)                          # doctest: +SKIP
    >>> PatternAttribution(model, patterns).attribute(images)           # doctest: +SKIP

    A long fit that can be killed and restarted with the same call:

    >>> patterns = fit_patterns(model, loader, checkpoint="fit.ckpt",  # doctest: +SKIP
    ...                         checkpoint_minutes=5, resume=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    given = dict(
        estimator=estimator, negative=negative, batch_size=batch_size, device=device,
        progress=progress, precision=precision, limit=limit, canonizers=canonizers,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every,
        checkpoint_minutes=checkpoint_minutes, resume=resume, distributed=distributed,
    )  # fmt: skip
    defaults = FitOptions()
    if options is None:
        o = FitOptions.build(None, **given)
    else:
        changed = {k: v for k, v in given.items() if v is not getattr(defaults, k)}
        o = FitOptions.build(options, **changed)
    check_supported(model)
    needs_data = bool(required_sums(o.estimator, o.negative))
    if data is None and needs_data:
        raise ValueError(f"estimator {o.estimator!r} needs data to fit patterns on")
    if needs_data:
        stats = collect_statistics(model, data, o)
    else:
        canonical = Canonical(model, o.canonizers)
        stats = _new_statistics(
            model, canonical, o.estimator, o.negative, model_device(model),
            o.resolved_precision(model),
        )
    patterns = compute_patterns(model, stats, canonizers=o.canonizers)
    if needs_data:
        patterns.metadata["precision"] = o.resolved_precision(model)
    return patterns
