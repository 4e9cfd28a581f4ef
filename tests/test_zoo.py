"""The demos' small models: shapes, names, reachable by name, and the thread setting."""

from __future__ import annotations

import torch

from patternnet import models, zoo
from patternnet.training import set_threads


def test_fashion_cnn_shapes_and_names() -> None:
    net = zoo.fashion_cnn()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert zoo.fashion_cnn(classes=3)(torch.zeros(1, 1, 28, 28)).shape == (1, 3)
    names = [name for name, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d,
             torch.nn.Linear))]  # fmt: skip
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    assert isinstance(models.load("patternnet.zoo:fashion_cnn"), torch.nn.Sequential)


def test_set_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        assert set_threads(None) >= 1
    finally:
        torch.set_num_threads(before)
