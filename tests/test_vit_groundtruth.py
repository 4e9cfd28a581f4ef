"""Ground truth for attention: a small ViT trained on signal + distractor images (§12).

The images are the suppressor data (:func:`~patternnet.groundtruth.suppressor_simple`) with
their blocks aligned to the ViT's 2×2 patches: ``x = a·z + (a + b)·ζ + ε``, the class in the
signal ``z`` of block ``a``, the distractor ``ζ`` in ``a`` and in the suppressor block ``b``.
A ViT (patch embedding, class token, position embedding, two pre-norm blocks) trained on
them must give back the signal ``a·z``: PatternNet's cosine with it ≥ 0.9, where the
gradient's is clearly lower. Fixed seed (seed 0; the spread over seeds is in method.md §12);
about 30 s on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import patternnet as pn
from patternnet.evaluate.groundtruth import ground_truth_metrics
from patternnet.groundtruth import accuracy, suppressor_simple, train_classifier
from patternnet.groundtruth.vit import small_vit, treatment


@pytest.fixture(scope="module")
def trained_vit():
    torch.manual_seed(0)
    data = suppressor_simple(2000, size=8, block=2, offset=2, seed=0)
    fit, test = data.subset(slice(0, 1500)), data.subset(slice(1500, 2000))
    model = small_vit(0, depth=2)
    train_classifier(model, fit, epochs=10, lr=3e-3, seed=0)
    assert accuracy(model, test.inputs, test.targets) > 0.9
    with pytest.warns(UserWarning, match="attention and no rectifier"):
        patterns = pn.fit_patterns(model, fit.inputs, progress=False)  # the default fit
    assert "a" in patterns["head"]  # no rectifier: linear patterns everywhere
    return model, patterns, test


def test_patternnet_recovers_the_signal_through_attention(trained_vit) -> None:
    model, patterns, test = trained_vit
    assert sum(name.startswith("attention#") for name in patterns.nodes) == 2
    signal = pn.PatternNet(model, patterns).attribute(test.inputs, target=test.targets)
    metrics = ground_truth_metrics(signal, test)
    gradient = pn.Gradient(model).attribute(test.inputs, target=test.targets)
    baseline = ground_truth_metrics(gradient, test)["signal_cosine"]
    assert metrics["signal_cosine"] >= 0.9, metrics
    assert baseline <= metrics["signal_cosine"] - 0.2, (baseline, metrics)
    # the sign on this net: along a·z (on seeds 1 and 2 it is flipped, method.md §12)
    signed = F.cosine_similarity(signal.flatten(1).double(), test.signal.flatten(1).double())
    assert float(signed.median()) > 0.8


def test_attention_patterns_beat_attention_held_as_a_gate(trained_vit) -> None:
    model, patterns, test = trained_vit
    cosine = {
        attention: ground_truth_metrics(
            treatment(model, patterns, attention=attention).attribute(
                test.inputs, target=test.targets
            ),
            test,
        )["signal_cosine"]
        for attention in ("gate", "pattern")
    }
    assert cosine["pattern"] > cosine["gate"] + 0.02, cosine
