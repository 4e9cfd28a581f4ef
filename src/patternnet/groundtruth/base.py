"""``GroundTruthData``: inputs together with the signal they really contain.

Every benchmark dataset of :mod:`patternnet.groundtruth` is generated from a seed and knows,
for every sample, the component an ideal explanation of the *signal* should show (``signal``),
where that signal lives (``signal_mask``) and where features without any relation to the target
live (``regions``, e.g. a pure suppressor region or the support of a distractor). The metrics
of :mod:`patternnet.evaluate.groundtruth` compare explanations against these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["GroundTruthData", "seeded_generator"]


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (all benchmark randomness uses one)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@dataclass
class GroundTruthData:
    """A dataset whose true signal is known.

    Attributes
    ----------
    inputs:
        ``(N, ...)`` float32 inputs (``(N, C, H, W)`` images or ``(N, D)`` vectors).
    targets:
        ``(N,)`` class labels (int64) or regression targets (float32).
    signal:
        ``(N, ...)`` shaped like ``inputs``: the signal component of each input (what
        PatternNet should recover, up to scale).
    signal_mask:
        Boolean, shaped like ``inputs``: the features that carry signal.
    regions:
        Named boolean masks shaped like ``inputs`` for features without signal, e.g.
        ``"suppressor"`` (distractor only: a good model uses it, a signal explanation must not
        show it) and ``"distractor"`` (the distractor's support).
    name:
        Short name of the benchmark (used in reports).
    params:
        The generator's parameters (seed included), for reproducibility.
    """

    inputs: Tensor
    targets: Tensor
    signal: Tensor
    signal_mask: Tensor
    regions: dict[str, Tensor] = field(default_factory=dict)
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        shapes = [self.signal.shape, self.signal_mask.shape]
        shapes += [mask.shape for mask in self.regions.values()]
        if self.targets.shape[0] != n or any(shape != self.inputs.shape for shape in shapes):
            raise ValueError(
                f"inconsistent ground truth: inputs {tuple(self.inputs.shape)}, targets "
                f"{tuple(self.targets.shape)}, signal/masks {[tuple(s) for s in shapes]}"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: slice | Tensor) -> GroundTruthData:
        """The samples selected by ``index`` (a slice or an index tensor)."""
        return GroundTruthData(
            inputs=self.inputs[index],
            targets=self.targets[index],
            signal=self.signal[index],
            signal_mask=self.signal_mask[index],
            regions={k: v[index] for k, v in self.regions.items()},
            name=self.name,
            params=dict(self.params),
        )

    def split(self, *sizes: int) -> tuple[GroundTruthData, ...]:
        """Consecutive disjoint parts of the given sizes (the data are already shuffled).

        Examples
        --------
        >>> train, fit, regression, test = data.split(2000, 1000, 1000, 1000)  # doctest: +SKIP
        """
        if sum(sizes) > len(self):
            raise ValueError(f"split sizes {sizes} add up to more than the {len(self)} samples")
        parts, start = [], 0
        for size in sizes:
            parts.append(self.subset(slice(start, start + size)))
            start += size
        return tuple(parts)

    def masks(self) -> dict[str, Tensor]:
        """``{"signal": signal_mask, **regions}``."""
        return {"signal": self.signal_mask, **self.regions}
