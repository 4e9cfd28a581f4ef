"""A small Vision Transformer for the ground-truth data (method.md §12).

:func:`small_vit` builds a ViT the size of a unit test: a patch embedding (a strided
convolution), a class token and a position embedding (parameters added to the activations:
biases), ``depth`` pre-norm ``nn.TransformerEncoderLayer`` blocks (GELU MLP), a final
LayerNorm and a linear head on the class token. Everything patternnet must support in a ViT
is in it: Q/K/V inside ``in_proj_weight``, ``out_proj`` never called by PyTorch, the fused
eval path, LayerNorm, residual sums.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.attention import AttentionHandler, decomposed
from ..engine.rules.attention import AttentionPatterns, _HeldWeightedSum
from ..engine.rules.norms import NormScale, norm_scale
from ..evaluate.groundtruth import ground_truth_metrics
from ..methods.gradient import Gradient
from ..methods.pattern import PatternNet
from ..patterns.fit import fit_patterns
from ..patterns.store import Patterns
from ..zoo import TokenViT
from .base import seeded_generator
from .suppressor import suppressor_simple
from .train import accuracy, train_classifier

__all__ = [
    "TREATMENTS",
    "SmallViT",
    "attention_signal_paths",
    "path_table",
    "small_vit",
    "treatment",
    "treatment_table",
]


class SmallViT(TokenViT):
    """The ground-truth :class:`~patternnet.zoo.TokenViT`: a GELU MLP, the class token and
    position embedding left at zero for :func:`small_vit` to draw.

    Parameters
    ----------
    image_size, patch, channels:
        Square images ``(channels, image_size, image_size)`` cut into ``patch × patch`` patches.
    dim, heads, depth, mlp:
        Token width, attention heads, blocks, hidden units of each block's MLP.
    classes:
        Outputs of the head.
    """

    def __init__(
        self, image_size: int = 8, patch: int = 2, channels: int = 1, dim: int = 16,
        heads: int = 2, depth: int = 2, mlp: int = 32, classes: int = 2,
    ) -> None:  # fmt: skip
        super().__init__(image_size, patch, channels, dim, heads, depth, mlp, classes,
                         activation="gelu", embedding_std=None)  # fmt: skip


def small_vit(seed: int = 0, **options: int) -> SmallViT:
    """A :class:`SmallViT` initialised from ``seed`` (class token and position embedding
    drawn with standard deviation 0.02, as in ViT)."""
    generator = seeded_generator(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = SmallViT(**options)
        with torch.no_grad():
            model.class_token.normal_(0.0, 0.02)
            model.pos_embedding.normal_(0.0, 0.02)
    return model


# ------------------------------------------------------------------ the treatment table


class _GateAttention(AttentionPatterns):
    """§10's first hypothesis: the probabilities held as a gate, ``Pᵀ s`` to the values."""

    def weighted_sum(self, name: str, probs: Tensor, values: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not values.requires_grad:
            return torch.matmul(probs, values)
        held = probs.detach()
        return _HeldWeightedSum.apply(held, values, held)


class _WeightNormScale(NormScale):
    """LayerNorm passed as its weight ``γ/σ`` (σ held) instead of the pattern ``σ/γ``."""

    def save(self, module: nn.Module | None, x: Tensor, output: Tensor) -> Any:
        assert module is not None
        with torch.no_grad():
            return norm_scale(module, x.detach())


def treatment(model: nn.Module, patterns: Patterns, *, attention: str = "joint",
              norm: str = "sigma/gamma", rescale: bool | None = None) -> PatternNet:  # fmt: skip
    """PatternNet with another treatment of attention or of LayerNorm, for the comparison of
    method.md §12; the defaults are PatternNet's.

    Parameters
    ----------
    attention:
        ``"joint"`` (PatternNet: the joint pattern of the weighted sum), ``"query"`` (the
        per-query pattern ``a``) or ``"gate"`` (the probabilities held, ``Pᵀ s``).
    norm:
        ``"sigma/gamma"`` (PatternNet: LayerNorm as the pattern of a one-input unit) or
        ``"gamma/sigma"`` (as its weight).
    rescale:
        PatternNet's ``rescale`` option (None: on for models with attention).
    """
    if attention not in ("joint", "query", "gate"):
        raise ValueError(f"attention must be 'joint', 'query' or 'gate', not {attention!r}")
    if norm not in ("sigma/gamma", "gamma/sigma"):
        raise ValueError(f"norm must be 'sigma/gamma' or 'gamma/sigma', not {norm!r}")

    class Variant(PatternNet):
        def attention_handler(self, canonical: Any) -> Any:
            if attention == "gate":
                return _GateAttention(self.patterns, self.estimator, attribution=False)
            return AttentionPatterns(self.patterns, self.estimator, attribution=False,
                                     joint=attention == "joint")  # fmt: skip

        def rules(self, canonical: Any) -> Any:
            module_rules, function_rules = super().rules(canonical)
            if norm == "gamma/sigma":
                for module, rule in module_rules.items():
                    if isinstance(rule, NormScale):
                        module_rules[module] = _WeightNormScale(attribution=False)
            return module_rules, function_rules

    return Variant(model, patterns, rescale=rescale)


#: The columns of :func:`treatment_table`: ``{label: treatment options}``.
TREATMENTS: dict[str, dict[str, Any]] = {
    "query, no scale": {"attention": "query", "rescale": False},
    "query + scale": {"attention": "query", "rescale": True},
    "joint, no scale": {"attention": "joint", "rescale": False},
    "gate + scale": {"attention": "gate", "rescale": True},
    "joint + scale": {"attention": "joint", "rescale": True},
    "joint + scale, gamma/sigma": {"attention": "joint", "rescale": True, "norm": "gamma/sigma"},
}


def _trained(seed: int, n: int, epochs: int) -> tuple[SmallViT, Any, Any]:
    """The ground-truth setting of :func:`treatment_table`: (trained model, fit, test)."""
    torch.manual_seed(0)
    data = suppressor_simple(n + 500, size=8, block=2, offset=2, seed=seed)
    fit, test = data.subset(slice(0, n)), data.subset(slice(n, n + 500))
    model = small_vit(seed)
    train_classifier(model, fit, epochs=epochs, lr=3e-3, seed=seed)
    return model, fit, test


def treatment_table(seeds: tuple[int, ...] = tuple(range(8)), *, n: int = 1500,
                    epochs: int = 10) -> list[dict[str, Any]]:  # fmt: skip
    """Signal cosines of PatternNet's treatments on the ground-truth ViT (method.md §12).

    For each seed: suppressor data with patch-aligned blocks (``size=8, block=2,
    offset=2``, ``n`` images to train and fit on, 500 to test), a :func:`small_vit` trained
    ``epochs`` epochs, the default fit (linear patterns: no rectifier); then, in float64, the
    mean signal cosine (:func:`~patternnet.evaluate.groundtruth.ground_truth_metrics`) of the
    gradient and of PatternNet with each treatment of :data:`TREATMENTS`, and the signed median
    cosine with the signal (``"<label> signed"``). Run ``python -m patternnet.groundtruth.vit``.
    """
    rows = []
    for seed in seeds:
        model, fit, test = _trained(seed, n, epochs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the linear-patterns notice
            patterns = fit_patterns(model, fit.inputs, progress=False)
        row: dict[str, Any] = {"seed": seed,
                               "accuracy": accuracy(model, test.inputs, test.targets)}  # fmt: skip
        model = model.double()
        patterns = patterns.to(dtype=torch.float64)
        inputs = test.inputs.double()
        gradient = Gradient(model).attribute(inputs, target=test.targets)
        row["gradient"] = ground_truth_metrics(gradient.float(), test)["signal_cosine"]
        for label, options in TREATMENTS.items():
            signal = treatment(model, patterns, **options).attribute(inputs, target=test.targets)
            row[label] = ground_truth_metrics(signal.float(), test)["signal_cosine"]
            signed = F.cosine_similarity(signal.flatten(1), test.signal.flatten(1).double())
            row[f"{label} signed"] = float(signed.median())
        rows.append(row)
    return rows


# ------------------------------------------------------------------ diagnosis: signal paths


class _Recorder(AttentionHandler):
    """Keeps each call's probabilities and values (the forward pass is the plain one)."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple[Tensor, Tensor]] = {}

    def weighted_sum(self, name: str, probs: Tensor, values: Tensor) -> Tensor:
        self.calls[name] = (probs.detach(), values.detach())
        return torch.matmul(probs, values)


def _attention_calls(model: nn.Module, inputs: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    recorder = _Recorder()
    with torch.no_grad(), decomposed(model, recorder):
        model(inputs)
    return recorder.calls


@torch.no_grad()
def attention_signal_paths(model: nn.Module, inputs: Tensor, signal: Tensor,
                           query: int | None = 0) -> dict[str, dict[str, float]]:  # fmt: skip
    """Through which factor of each attention's weighted sum the true signal passes.

    With ``y = P v`` at the inputs ``x`` and at ``x − signal`` (the images without their
    signal), the signal's effect on the output splits exactly into a **value path** (the
    probabilities held, what PatternNet's attention rule can express) and a **probability
    path** (where the query attends changes with the signal; nothing flows there in the
    pattern methods)::

        Δy = P(x) (v(x) − v(x − s))  +  (P(x) − P(x − s)) v(x − s)

    Parameters
    ----------
    model:
        A model with attention (borrowed, never changed); eval mode is the caller's.
    inputs, signal:
        ``(N, ...)`` inputs and their true signal (``GroundTruthData.inputs`` / ``.signal``).
    query:
        The query row to measure (0: the class token, the one a ViT's head reads); None: all.

    Returns
    -------
    dict
        Per call ``"attention#k"``: ``value_share`` ``‖P Δv‖² / ‖Δy‖²``,
        ``probability_share`` ``‖ΔP v‖² / ‖Δy‖²`` (sums over the batch; the two need not add
        to 1: the paths may cancel or reinforce) and ``value_cosine``, the median over samples
        of ``cos(P Δv, Δy)`` (1: the value path alone reproduces the signal's effect).
    """
    dtype = torch.float64
    with_signal = _attention_calls(model, inputs)
    without = _attention_calls(model, inputs - signal)
    rows = slice(None) if query is None else slice(query, query + 1)
    out = {}
    for name, (p1, v1) in with_signal.items():
        p0, v0 = without[name]
        p1, v1, p0, v0 = (t.to(dtype) for t in (p1, v1, p0, v0))
        value = (p1 @ (v1 - v0))[:, :, rows]
        probability = ((p1 - p0) @ v0)[:, :, rows]
        total = value + probability
        norm = total.pow(2).sum().clamp_min(1e-300)
        cosine = F.cosine_similarity(value.flatten(1), total.flatten(1), dim=1)
        out[name] = {
            "value_share": float(value.pow(2).sum() / norm),
            "probability_share": float(probability.pow(2).sum() / norm),
            "value_cosine": float(cosine.median()),
        }
    return out


def path_table(seeds: tuple[int, ...] = tuple(range(8)), *, n: int = 1500,
               epochs: int = 10) -> list[dict[str, Any]]:  # fmt: skip
    """The diagnosis of method.md §12: PatternNet's signal cosine (the default, float32) and
    :func:`attention_signal_paths` of the class-token query in every block, per trained net
    of :func:`treatment_table`'s setting. Run ``python -m patternnet.groundtruth.vit paths``.
    """
    rows = []
    for seed in seeds:
        model, fit, test = _trained(seed, n, epochs)
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the linear-patterns notice
            patterns = fit_patterns(model, fit.inputs, progress=False)
        signal = PatternNet(model, patterns).attribute(test.inputs, target=test.targets)
        row: dict[str, Any] = {
            "seed": seed,
            "accuracy": accuracy(model, test.inputs, test.targets),
            "pattern_net": ground_truth_metrics(signal, test)["signal_cosine"],
        }
        paths = attention_signal_paths(model, test.inputs, test.signal, query=0)
        for k, values in enumerate(paths.values()):
            row[f"block {k} probability share"] = values["probability_share"]
            row[f"block {k} value cosine"] = values["value_cosine"]
        rows.append(row)
    return rows


if __name__ == "__main__":  # pragma: no cover - a measurement, printed
    arguments = sys.argv[1:]
    diagnose = bool(arguments) and arguments[0] == "paths"
    chosen = tuple(int(s) for s in arguments[diagnose:]) or tuple(range(8))
    table = path_table(chosen) if diagnose else treatment_table(chosen)
    keys = [k for k in table[0] if k != "seed"]
    print("| seed | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for line in table:
        values = " | ".join(f"{line[k]:.3f}" for k in keys)
        print(f"| {line['seed']} | {values} |")
