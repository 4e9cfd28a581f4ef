"""What a run reports beside its figures: stage timings, row titles, a Markdown summary.

:class:`Stopwatch` times a run's stages for :class:`~patternnet.report.Report`'s timings;
:func:`prediction_titles` labels an explanation grid's rows with the true class and, where
the model errs, its prediction; :func:`summary_markdown` writes a run's results (accuracy,
timings, files, ρ(S) per layer, AOPC per method with intervals, the paired difference) as
Markdown (``patternnet demo``'s ``summary.md``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Stopwatch", "prediction_titles", "summary_markdown"]


class Stopwatch:
    """Wall-clock seconds per stage of a run, in the order the stages end.

    ``lap(stage)`` ends a stage (it began where the previous one ended, or at creation);
    :attr:`timings` holds ``{stage: seconds}``.
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> float:
        """End ``stage`` now; returns its seconds."""
        now = time.perf_counter()
        self.timings[stage], self._last = now - self._last, now
        return self.timings[stage]

    def total(self) -> float:
        """Add ``"total"``: the sum of the stages so far (returned)."""
        self.timings["total"] = sum(v for k, v in self.timings.items() if k != "total")
        return self.timings["total"]


@torch.no_grad()
def prediction_titles(
    model: nn.Module, inputs: Tensor, labels: Tensor, classes: Sequence[str]
) -> list[str]:
    """Row titles: each input's class name, and ``"\\n(pred. X)"`` where the model predicts
    another class ``X`` (one forward pass of ``model`` on ``inputs``)."""
    predicted = model(inputs).argmax(1)
    return [classes[int(t)] + ("" if int(p) == int(t) else f"\n(pred. {classes[int(p)]})")
            for t, p in zip(labels, predicted)]  # fmt: skip


def summary_markdown(summary: dict[str, Any]) -> str:
    """A run's results as Markdown: a results table, ρ(S) per layer, AOPC per method.

    ``summary`` holds ``accuracy``, ``fit_images``, ``threads``, ``timings``, ``files``,
    ``quality`` (a :class:`~patternnet.evaluate.QualityTable`), ``aopc`` and
    ``aopc_interval`` per method, and ``aopc_difference`` (a paired difference with
    ``to_markdown``), as :func:`patternnet.demo.run_demo` returns them.
    """
    lines = ["| result | value |", "|---|---|",
             f"| test accuracy | {summary['accuracy']:.2%} |",
             f"| patterns fitted on | {summary['fit_images']} training images |",
             f"| threads | {summary['threads']} |"]  # fmt: skip
    lines += [f"| time: {stage} | {secs:.1f} s |" for stage, secs in summary["timings"].items()]
    lines += [f"| file: {name} | {path} |" for name, path in summary["files"].items()]
    lines += ["", "Estimator quality ρ(S) per layer (method.md §5; higher is better):", "",
              summary["quality"].to_markdown().rstrip(), "",
              "Image degradation, area over the perturbation curve (higher = steeper decay = "
              "better; 95% bootstrap interval over images):", "",
              "| method | AOPC | 95% CI |", "|---|---|---|"]  # fmt: skip
    for name, value in summary["aopc"].items():
        ci = summary["aopc_interval"][name]
        lines.append(f"| {name} | {value:.4f} | [{ci.low:.4f}, {ci.high:.4f}] |")
    return "\n".join([*lines, "", summary["aopc_difference"].to_markdown(4)])
