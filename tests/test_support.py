"""Module classification and the clear error for unsupported modules, before any data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import patternnet as pn
from patternnet.engine.support import (
    UnsupportedModuleError,
    check_supported,
    classify,
    register_passthrough,
    smooth_activation_layers,
)


class RecordingData:
    """An iterable of batches that records whether anyone asked for a batch."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.consumed = False

    def __iter__(self):
        self.consumed = True
        return iter(self.batches)


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.encoder = nn.Sequential(nn.Identity())
        self.encoder.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        h = self.conv(x).transpose(1, 2)
        out, _ = self.encoder.rnn(h)
        return self.head(out[:, -1])


def test_lstm_gives_clear_error_before_any_data_is_read() -> None:
    model = WithLSTM()
    data = RecordingData([torch.randn(2, 3, 8)])
    with pytest.raises(UnsupportedModuleError, match=r"encoder\.rnn \(LSTM\)") as info:
        pn.fit_patterns(model, data, progress=False)
    assert not data.consumed and model.forwards == 0
    assert info.value.modules[0][:2] == ("encoder.rnn", "LSTM")
    with pytest.raises(UnsupportedModuleError, match="encoder.rnn"):
        pn.collect_statistics(model, data, progress=False)
    assert not data.consumed
    with pytest.raises(UnsupportedModuleError, match="encoder.rnn"):
        pn.fit_patterns(model, estimator="filter")
    # a method that swaps rules refuses before its forward pass
    with pytest.raises(UnsupportedModuleError, match="encoder.rnn"):
        pn.PatternAttribution(model, estimator="filter").attribute(torch.randn(2, 3, 8))
    assert model.forwards == 0
    # the plain gradient needs no rule: it works on any differentiable model
    assert pn.Gradient(model).attribute(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def test_every_unsupported_module_is_named_once() -> None:
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 4),
            "attn": nn.MultiheadAttention(4, 2),
            "norm": nn.LayerNorm(4),
            "up": nn.ConvTranspose2d(2, 2, 2),
            "bn": nn.BatchNorm2d(3, track_running_stats=False),
            "ok": nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
        }
    )
    with pytest.raises(UnsupportedModuleError) as info:
        check_supported(model)
    names = [name for name, _, _ in info.value.modules]
    assert names == ["embed", "attn", "norm", "up", "bn"]  # attn.out_proj not listed again
    message = str(info.value)
    for text in ("embed (Embedding)", "attn (MultiheadAttention)", "norm (LayerNorm)",
                 "up (ConvTranspose2d)", "track_running_stats=False", "register_passthrough"):
        assert text in message


class Token(nn.Module):
    """A block holding a parameter directly (like a ViT class token)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x + self.token)


class Scale(nn.Module):
    """A fixed per-element map with a weight the user vouches for."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def test_direct_parameters_and_register_passthrough() -> None:
    with pytest.raises(UnsupportedModuleError, match=r"<model> \(Token\): holds weights token"):
        check_supported(Token())
    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match=r"1 \(Scale\)"):
        check_supported(model)
    register_passthrough(Scale)
    try:
        check_supported(model)
        assert classify(model)["1"].kind == "passthrough"
        pn.PatternNet(model, estimator="filter").attribute(torch.randn(2, 3))
    finally:
        from patternnet.engine import support

        support._PASSTHROUGH_TYPES.discard(Scale)
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        register_passthrough(int)  # type: ignore[arg-type]


def test_lazy_layer_is_reported() -> None:
    with pytest.raises(UnsupportedModuleError, match="run one forward pass first"):
        check_supported(nn.Sequential(nn.LazyLinear(3)))


def test_classify_kinds() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.PReLU(),
        nn.BatchNorm2d(4),
        nn.MaxPool2d(2),
        nn.Dropout(),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    kinds = {name: (s.kind, s.note) for name, s in classify(model).items()}
    assert kinds == {
        "": ("container", ""),
        "0": ("linear", ""),
        "1": ("batchnorm", "folded into 0"),
        "2": ("activation", ""),
        "3": ("batchnorm", "standalone"),
        "4": ("passthrough", ""),
        "5": ("passthrough", ""),
        "6": ("passthrough", ""),
        "7": ("linear", ""),
    }


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)
        self.d = nn.Linear(4, 4)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.a(x)))   # folded BN, then GELU
        h = torch.tanh(self.b(h))          # function
        h = torch.relu(self.c(h))          # piecewise linear: keeps the split
        return self.d(h).sigmoid()         # output layer fed to a method call


def test_smooth_activation_layers() -> None:
    assert smooth_activation_layers(Smooth()) == {"a": "GELU", "b": "tanh", "d": "sigmoid"}
