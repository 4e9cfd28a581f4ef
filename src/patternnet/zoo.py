"""Small models the demos train: named, seeded by the caller, for 1×28×28 inputs.

:func:`fashion_cnn` is the built-in demo's VGG-style network (``patternnet demo``). Each
builder is also reachable by name through :func:`patternnet.models.load`
(``"patternnet.zoo:fashion_cnn"``).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["fashion_cnn"]


def fashion_cnn(classes: int = 10) -> nn.Sequential:
    """The demo's small VGG-style network for 1×28×28 inputs.

    conv3×3(1→32)-ReLU-maxpool2, conv3×3(32→64)-ReLU-maxpool2, dense(3136→128)-ReLU,
    dense(128→``classes``). Modules are named (``conv1`` … ``fc2``) so patterns are readable.
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 32, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(32, 64, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(64 * 7 * 7, 128)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(128, classes)),
            ]
        )
    )
