"""The one small trainer: a classifier trained on tensors in memory (the demo, the
ground-truth benchmarks, the tests), its accuracy, and a cache for what it trained."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .patterns.store import atomic_write

__all__ = ["accuracy", "cached_model", "set_threads", "train_classifier"]


def train_classifier(
    model: nn.Module,
    data: Any,
    labels: Tensor | None = None,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    max_lr: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; returns it in eval mode.

    Parameters
    ----------
    model:
        A classifier returning logits.
    data, labels:
        Inputs ``(N, ...)`` and class indices ``(N,)``; or ``data`` alone with ``inputs``
        and ``targets`` attributes (a :class:`~patternnet.groundtruth.GroundTruthData`) or an
        ``(inputs, labels)`` pair.
    epochs, batch_size, lr, weight_decay:
        The optimisation (weight decay keeps separable problems' weights finite).
    max_lr:
        If given, a one-cycle learning-rate schedule peaking at ``max_lr`` after 20% of the
        steps (``lr`` is then unused); else the constant ``lr``.
    seed:
        Seed of the shuffling.
    progress:
        Show a progress bar per epoch.
    """
    if labels is None:
        if hasattr(data, "inputs") and hasattr(data, "targets"):
            data, labels = data.inputs, data.targets
        else:
            data, labels = data
    if labels.is_floating_point():
        raise TypeError("train_classifier needs integer class labels")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    generator = torch.Generator().manual_seed(seed)
    n = data.shape[0]
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = None
    if max_lr is not None:
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=max_lr, total_steps=epochs * -(-n // batch_size), pct_start=0.2
        )
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        bar = tqdm(total=n, unit="img", desc=f"training epoch {epoch + 1}/{epochs}",
                   leave=False, disable=not progress)  # fmt: skip
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(data[index]), labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
            bar.update(index.shape[0])
        bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of correctly classified samples (eval mode, mode restored)."""
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for x, y in zip(inputs.split(batch_size), labels.split(batch_size)):
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(labels))


def cached_model(
    folder: Path,
    key: Mapping[str, Any],
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], float],
) -> tuple[nn.Module, float, bool]:
    """A model trained once and kept in ``folder`` (``model.safetensors`` + ``model.json``).

    Parameters
    ----------
    folder:
        Where the weights and their key live.
    key:
        What the training depended on (settings, version): a cached model with another key
        is trained again.
    build:
        Makes the untrained model.
    train:
        Trains it in place; returns its score (e.g. test accuracy), stored beside it.

    Returns
    -------
    model, score, cached:
        The model (eval mode), its score, and whether it came from the cache.
    """
    weights, info = folder / "model.safetensors", folder / "model.json"
    key = dict(key)
    if weights.is_file() and info.is_file():
        try:
            stored = json.loads(info.read_text())
            if stored.get("key") == key:
                model = build()
                model.load_state_dict(load_file(str(weights)))
                return model.eval(), float(stored["accuracy"]), True
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # a stale or broken cache is retrained
    model = build()
    score = train(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, tmp))
    atomic_write(info, lambda tmp: Path(tmp).write_text(json.dumps({"key": key,
                                                                   "accuracy": score})))
    return model.eval(), score, False


def set_threads(threads: int | None = None) -> int:
    """``torch.set_num_threads``: ``threads``, or every core this process may run on (None).

    Returns the number of threads torch now uses.
    """
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()
