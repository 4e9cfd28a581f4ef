"""The demos' small models: shapes, names, reachable by name, and the thread setting."""

from __future__ import annotations

import pytest
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


def test_fashion_vit_shapes_tokens_and_blocks() -> None:
    torch.manual_seed(0)
    net = zoo.fashion_vit()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert net.pos_embedding.shape == (1, 17, 64)  # 16 patches of 7×7 and the class token
    assert len(net.blocks) == 2 and isinstance(net.blocks[0], torch.nn.TransformerEncoderLayer)
    assert float(net.class_token.detach().std()) > 0  # drawn, not zero: the class token is a bias
    assert zoo.fashion_vit(depth=1, classes=3)(torch.zeros(1, 1, 28, 28)).shape == (1, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        zoo.FashionViT(image_size=28, patch=5)
