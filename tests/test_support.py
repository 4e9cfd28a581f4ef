"""Module classification and the clear error for unsupported modules, before any data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patternnet as pn
from patternnet.engine.canonize import is_batchnorm
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
            "attn": nn.MultiheadAttention(4, 2, kdim=3, vdim=3),  # separate Q/K/V weights
            "norm": nn.LayerNorm(4),  # supported: a per-element unit γ/σ (test_norms)
            "up": nn.ConvTranspose2d(2, 2, 2),
            "bn": nn.BatchNorm2d(3, track_running_stats=False),
            "ok": nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
        }
    )
    with pytest.raises(UnsupportedModuleError) as info:
        check_supported(model)
    names = [name for name, _, _ in info.value.modules]
    assert names == ["embed", "attn", "up", "bn"]  # attn.out_proj not listed again
    message = str(info.value)
    for text in ("embed (Embedding)", "attn (MultiheadAttention)",
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


# --------------------------------------------------------------- end to end, module by module


def weight_patterns(model: nn.Module) -> pn.Patterns:
    from patternnet.engine.canonize import Canonical, default_canonizers
    from patternnet.patterns.fit import linear_layers

    canonical = Canonical(model, default_canonizers())
    layers = {n: {"a": canonical.weight(n).detach().clone()} for n in linear_layers(model)}
    return pn.Patterns(layers, estimator="linear", nodes="weights")


def gradient_times_logit(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    logit = model(xg)[:, target]
    (grad,) = torch.autograd.grad(logit.sum(), xg)
    return grad * logit.detach().view(-1, *([1] * (x.dim() - 1)))


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 4, 3, padding="same", padding_mode="reflect", groups=2),
        nn.LeakyReLU(0.1),
        nn.AvgPool1d(2),
        nn.Dropout(0.3),
        nn.Upsample(scale_factor=2),
        nn.Conv1d(4, 5, 3, stride=2),
        nn.PReLU(),
        nn.AdaptiveMaxPool1d(2),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(10, 3),
    ).double().eval()


def conv3d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool3d(2),
        nn.Conv3d(4, 4, 3, padding=1, groups=4),  # depthwise
        nn.ReLU(),
        nn.AvgPool3d(1),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(4, 3),
    ).double().eval()


@pytest.mark.parametrize(
    ("build", "shape"), [(conv1d_net, (2, 16)), (conv3d_net, (1, 4, 6, 6))]
)
def test_conv1d_and_conv3d_networks_end_to_end(build, shape) -> None:
    model = build()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    assert all(s.kind != "unsupported" for s in classify(model).values())
    data = torch.randn(10, *shape, dtype=torch.float64)
    x = data[:3]
    # with weight patterns PatternNet is exactly gradient × logit through every module
    signal = pn.PatternNet(model, weight_patterns(model)).attribute(x, target=1)
    torch.testing.assert_close(signal, gradient_times_logit(model, x, 1))
    patterns = pn.fit_patterns(model, data, batch_size=4, progress=False)
    assert set(patterns) == {n for n, m in model.named_modules()
                             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv3d))}
    for method in (pn.PatternNet(model, patterns), pn.PatternAttribution(model, patterns)):
        result = method.attribute(x)
        assert result.shape == x.shape and torch.isfinite(result).all()
        assert result.abs().sum() > 0


class MixedReLU(nn.Module):
    """The same network written with F.relu, torch.relu, Tensor.relu_ and nn.ReLU(inplace)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)
        self.relus = nn.ModuleList([nn.ReLU(inplace=True), nn.ReLU(), nn.ReLU()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            h = self.relus[0](self.conv1(x))          # in place module
            h = F.relu(self.conv2(h))                  # functional
            h = self.conv3(h).relu_()                  # in place method
            return self.fc(torch.flatten(F.max_pool2d(h, 2), 1))
        h = self.relus[0](self.conv1(x))
        h = self.relus[1](self.conv2(h))
        h = self.relus[2](self.conv3(h))
        return self.fc(F.max_pool2d(h, 2).view(h.shape[0], -1))


def test_functional_and_inplace_relu_mix_matches_module_twin() -> None:
    torch.manual_seed(0)
    mixed = MixedReLU(functional=True).double().eval()
    twin = MixedReLU(functional=False).double().eval()
    twin.load_state_dict(mixed.state_dict())
    data = torch.randn(12, 3, 6, 6, dtype=torch.float64)
    x = data[:3]
    torch.testing.assert_close(mixed(x), twin(x))
    signal = pn.PatternNet(mixed, weight_patterns(mixed)).attribute(x, target=0)
    torch.testing.assert_close(signal, gradient_times_logit(mixed, x, 0))
    ours = pn.fit_patterns(mixed, data, progress=False)
    theirs = pn.fit_patterns(twin, data, progress=False)
    for name in ours:
        for key in ours[name]:
            torch.testing.assert_close(ours[name][key], theirs[name][key])
    for method in (pn.PatternNet, pn.PatternAttribution):
        torch.testing.assert_close(
            method(mixed, ours).attribute(x), method(twin, theirs).attribute(x)
        )


def test_leaky_relu_passes_a_minus_on_its_negative_side() -> None:
    torch.manual_seed(0)
    l1, l2 = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
    model = nn.Sequential(l1, nn.LeakyReLU(0.2), l2).eval()
    data = torch.randn(200, 4, dtype=torch.float64)
    patterns = pn.fit_patterns(model, data, progress=False)
    assert set(patterns["0"]) == {"a_plus", "a_minus"}
    x = data[:5]
    signal = pn.PatternNet(model, patterns).attribute(x, target=2)
    # reference: backward by hand with the forward masks
    a_plus, a_minus = patterns["0"]["a_plus"], patterns["0"]["a_minus"]
    a2 = patterns["2"]["a_plus"]  # the output layer: every unit "active" side by its sign
    out1 = l1(x).detach()
    y = l2(model[1](out1)).detach()[:, 2]
    m2 = (y > 0).double()
    a2_row = m2[:, None] * a2[2] + (1 - m2[:, None]) * patterns["2"]["a_minus"][2]
    g = a2_row * y[:, None]                                  # at the LeakyReLU output
    g = g * torch.where(out1 > 0, 1.0, 0.2)                  # LeakyReLU's gradient
    m1 = (out1 > 0).double()
    expected = (g * m1) @ a_plus + (g * (1 - m1)) @ a_minus
    torch.testing.assert_close(signal, expected)


def test_smooth_activations_get_the_linear_pattern_with_one_warning() -> None:
    torch.manual_seed(0)
    model = Smooth().double().eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    data = torch.randn(64, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="linear pattern") as record:
        patterns = pn.fit_patterns(model, data, progress=False)
    assert len([w for w in record if "smooth" in str(w.message)]) == 1
    # GELU: both the linear pattern (smooth="derivative") and a₊/a₋ (smooth="gate")
    assert "b (→ tanh)" in str(record[0].message) and "GELU" not in str(record[0].message)
    assert set(patterns["a"]) == {"a", "a_plus", "a_minus"}
    # c is read only by a ReLU: the default fit (negative="auto") leaves its unread a₋ out
    assert set(patterns["b"]) == {"a"} and set(patterns["c"]) == {"a_plus"}
    linear = pn.fit_patterns(model, data, estimator="linear", progress=False)
    for name in ("a", "b", "d"):
        torch.testing.assert_close(patterns[name]["a"], linear[name]["a"])
    signal = pn.PatternNet(model, patterns).attribute(data[:4], target=0)
    assert torch.isfinite(signal).all()
    with pytest.warns(UserWarning, match="keep a₊"):
        positive = pn.fit_patterns(model, data, negative=False, progress=False)
    assert set(positive["a"]) == {"a_plus"}


# --------------------------------------------------------------- standalone BatchNorm


class BNPatternNet(pn.PatternNet):
    def rules(self, canonical):
        from patternnet.engine.support import standalone_batchnorm_rules

        module_rules, function_rules = super().rules(canonical)
        extra = standalone_batchnorm_rules(self.model, canonical, attribution=False)
        return {**module_rules, **extra}, function_rules


class BNPatternAttribution(pn.PatternAttribution):
    def rules(self, canonical):
        from patternnet.engine.support import standalone_batchnorm_rules

        module_rules, function_rules = super().rules(canonical)
        extra = standalone_batchnorm_rules(self.model, canonical, attribution=True)
        return {**module_rules, **extra}, function_rules


def preactivation_net(relu: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(2),                       # standalone: input normalisation
        nn.Conv2d(2, 3, 3),
        nn.ReLU() if relu else nn.Identity(),
        nn.BatchNorm2d(3),                       # standalone: after the activation
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    ).double()
    for bn in (model[0], model[3]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.normal_(1.0, 0.5)
        bn.bias.data.normal_()
    model[3].weight.data[1] = 0.0  # a dead channel (γ = 0)
    return model.eval()


def test_standalone_batchnorm_is_a_per_channel_linear_unit_for_patternnet() -> None:
    model = preactivation_net()
    assert {s.note for s in classify(model).values() if s.kind == "batchnorm"} == {"standalone"}
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    signal = BNPatternNet(model, weight_patterns(model)).attribute(x, target=1)
    # reference: the gradient, with each BatchNorm's backward factor s replaced by 1/s
    handles = []
    for bn in (model[0], model[3]):
        s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        ratio = torch.where(s != 0, 1 / torch.where(s != 0, s, 1.0) ** 2, 0.0).view(1, -1, 1, 1)
        handles.append(bn.register_full_backward_hook(
            lambda m, gin, gout, ratio=ratio: (gin[0] * ratio,)))
    try:
        expected = gradient_times_logit(model, x, 1)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(signal, expected)
    assert not torch.allclose(signal, gradient_times_logit(model, x, 1))


def test_standalone_batchnorm_conserves_relevance_in_patternattribution() -> None:
    model = preactivation_net(relu=False)
    model[3].weight.data[1] = 0.7  # no dead channel: every unit conserves
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    logits = model(x).detach()
    target = logits.argmax(1)
    relevance = BNPatternAttribution(model, estimator="filter").attribute(x, target)
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits.gather(1, target[:, None])[:, 0])
    # PatternAttribution installs the standalone-BatchNorm rule by default
    default = pn.PatternAttribution(model, estimator="filter").attribute(x, target)
    torch.testing.assert_close(default, relevance)

    class WithoutBatchNormRule(pn.PatternAttribution):
        def rules(self, canonical):
            module_rules, function_rules = super().rules(canonical)
            kept = {m: r for m, r in module_rules.items() if not is_batchnorm(m)}
            return kept, function_rules

    plain = WithoutBatchNormRule(model, estimator="filter").attribute(x, target)
    assert (plain.sum((1, 2, 3)) - relevance.sum((1, 2, 3))).abs().min() > 1e-3
