"""Window attention of torchvision's Swin (V1, V2) and MaxViT, decomposed (method.md §12).

The decomposition must compute what PyTorch computes (values and gradients, in float64, with
shifted windows and their mask, padding, Swin V2's zeroed key bias and cosine attention),
run Swin's functional ``F.linear`` on the raw weights as the modules ``qkv``/``proj`` (so
hooks and rules apply), hand the softmax and the weighted sum to the handler, and give
Swin V2's position-bias MLP (which reads no input) no layer of the explanation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import patternnet as pn
from every_method import explain_with_every_method
from patternnet.engine.attention import (
    AttentionHandler,
    UnsupportedAttentionError,
    constant_modules,
    decomposed,
    named_linear_layers,
)
from patternnet.engine.rules.lrp_attention import AttentionLRP
from patternnet.engine.support import check_supported, classify, rectifier_free
from patternnet.methods.registry import build_method

torchvision = pytest.importorskip("torchvision")
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention  # noqa: E402
from torchvision.models.swin_transformer import (  # noqa: E402
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)


def _swin(v2: bool) -> nn.Module:
    torch.manual_seed(0)
    cls = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
    module = cls(16, [4, 4], [2, 2], 2).double().eval()
    with torch.no_grad():
        module.qkv.bias.normal_()  # V2 zeroes the key rows of a copy: a non-zero one here
        module.proj.bias.normal_()
        if not v2:
            module.relative_position_bias_table.normal_()
    return module


def _maxvit() -> nn.Module:
    torch.manual_seed(0)
    module = RelativePositionalMultiHeadAttention(16, 8, 16).double().eval()
    with torch.no_grad():
        module.relative_position_bias_table.normal_()
    return module


#: (module, input): 8 × 8 maps shift their 4 × 4 windows (mask used), 6 × 6 are padded to
#: 8 × 8 first; MaxViT takes (B, G, P, D) partitions.
CASES = {
    "swin_shifted": (lambda: _swin(False), (2, 8, 8, 16)),
    "swin_padded": (lambda: _swin(False), (2, 6, 6, 16)),
    "swin_v2_shifted": (lambda: _swin(True), (2, 8, 8, 16)),
    "swin_v2_padded": (lambda: _swin(True), (2, 6, 7, 16)),
    "maxvit": (_maxvit, (2, 3, 16, 16)),
}


class Recorder(AttentionHandler):
    """The default steps, with the shapes they were called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    def softmax(self, name: str, scores: Tensor) -> Tensor:
        self.calls.append(("softmax", name, tuple(scores.shape)))
        return super().softmax(name, scores)

    def weighted_sum(self, name: str, probs: Tensor, values: Tensor) -> Tensor:
        self.calls.append(("weighted_sum", name, tuple(values.shape)))
        return super().weighted_sum(name, probs, values)

    def normalize(self, name: str, t: Tensor, eps: float = 1e-12) -> Tensor:
        self.calls.append(("normalize", name, tuple(t.shape)))
        return super().normalize(name, t, eps)


@pytest.mark.parametrize("case", list(CASES))
def test_decomposed_window_attention_equals_pytorch(case: str) -> None:
    build, shape = CASES[case]
    module = build()
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape, dtype=torch.float64)
    params = [p for p in module.parameters() if p.requires_grad]

    out = module(x)
    grads = torch.autograd.grad(out, [x, *params], upstream, allow_unused=True)

    qkv, proj = (module.to_qkv, module.merge) if case == "maxvit" else (module.qkv, module.proj)
    seen: list[str] = []
    hooks = [qkv.register_forward_hook(lambda *a: seen.append("qkv")),
             proj.register_forward_hook(lambda *a: seen.append("proj"))]  # fmt: skip
    recorder = Recorder()
    try:
        with decomposed(module, recorder) as mode:
            out2 = module(x)
            grads2 = torch.autograd.grad(out2, [x, *params], upstream, allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
    for g, g2 in zip(grads, grads2, strict=True):
        if g is None:
            assert g2 is None or not g2.any()
        else:
            torch.testing.assert_close(g2, g, rtol=1e-10, atol=1e-12)
    # the layers ran as modules (hooks and rules apply), once each
    assert seen == ["qkv", "proj"]
    assert mode.count == 1
    kinds = [kind for kind, _, _ in recorder.calls]
    if case.startswith("swin_v2"):
        assert kinds == ["normalize", "normalize", "softmax", "weighted_sum"]
    else:
        assert kinds == ["softmax", "weighted_sum"]
    # (N, H, L, S) with windows × batch as N
    batch, heads = shape[0], 2
    windows = 3 if case == "maxvit" else 4
    length = 16
    assert recorder.calls[-2][2] == (batch * windows, heads, length, length)
    assert recorder.calls[-1][2] == (batch * windows, heads, length, 8)


def test_held_probabilities_send_nothing_into_queries_and_keys() -> None:
    """A handler holding the probabilities (the pattern methods' treatment) leaves the query
    and key rows of ``qkv`` without gradient: the scores, bias and mask are off the path."""

    class Held(AttentionHandler):
        def softmax(self, name: str, scores: Tensor) -> Tensor:
            return torch.softmax(scores, -1).detach()

    for v2 in (False, True):
        module = _swin(v2)
        x = torch.randn(2, 8, 8, 16, dtype=torch.float64, requires_grad=True)
        with decomposed(module, Held()):
            (grad,) = torch.autograd.grad(module(x).sum(), module.qkv.weight)
        assert not grad[:32].any() and grad[32:].abs().sum() > 0


def test_unrecognised_window_attention_forward_is_refused() -> None:
    class Shortcut(ShiftedWindowAttention):
        def forward(self, x: Tensor) -> Tensor:  # no attention between the projections
            return F.linear(F.linear(x, self.qkv.weight)[..., :16], self.proj.weight)

    module = Shortcut(16, [4, 4], [2, 2], 2).double()
    with pytest.raises(UnsupportedAttentionError, match="output projection"), decomposed(module):
        module(torch.randn(1, 8, 8, 16, dtype=torch.float64))


def _tiny_swin(v2: bool) -> nn.Module:
    torch.manual_seed(0)
    options = dict(block=SwinTransformerBlockV2) if v2 else {}
    if v2:
        from torchvision.models.swin_transformer import PatchMergingV2

        options["downsample_layer"] = PatchMergingV2
    model = SwinTransformer([2, 2], 16, [2, 2], [2, 2], [4, 4], num_classes=3, **options)
    return model.double().eval()


def test_support_check_and_layers_of_swin_v2() -> None:
    model = _tiny_swin(True)
    check_supported(model)
    kinds = classify(model, folding=False)
    attention = [n for n, s in kinds.items() if s.type == "ShiftedWindowAttentionV2"]
    assert attention and all(kinds[n].kind == "attention" for n in attention)
    constant = constant_modules(model)
    assert f"{attention[0]}.cpb_mlp.0" in constant
    layers = dict(named_linear_layers(model))
    assert f"{attention[0]}.qkv" in layers and f"{attention[0]}.proj" in layers
    assert not set(layers) & constant  # the position-bias MLP reads no input: no layer
    assert rectifier_free(model)  # its ReLU reads no input either


def test_attnlrp_holds_swin_v2_cosine_norm() -> None:
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    handler = AttentionLRP()
    out = handler.normalize("attention#0", t)
    torch.testing.assert_close(out, F.normalize(t, dim=-1))
    relevance = torch.randn(3, 5, dtype=torch.float64)
    (back,) = torch.autograd.grad(out, t, relevance)
    torch.testing.assert_close(back, relevance)  # one-input units: R passes


def _explains_with_every_method(model: nn.Module, data: Tensor) -> pn.Patterns:
    """Fit ``model`` on ``data`` (four attention nodes at least) and explain two samples with
    every registry method: shaped like the input and finite. Returns the patterns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patterns = pn.fit_patterns(model, data, progress=False)
    assert {f"attention#{k}" for k in range(4)} <= set(patterns.nodes)
    explain_with_every_method(model, patterns, data[:2])
    return patterns


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_every_registry_method_explains_a_small_swin(v2: bool) -> None:
    model = _tiny_swin(v2)
    data = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patterns = _explains_with_every_method(model, data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the gradient method through the decomposition is the gradient
    x = data[:2].clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)
    torch.testing.assert_close(build_method("gradient", model, patterns).attribute(data[:2]),
                               grad, rtol=1e-10, atol=1e-12)  # fmt: skip


def test_every_registry_method_explains_a_small_maxvit() -> None:
    """MaxViT's blocks (MBConv with squeeze-excitation, window and grid attention with their
    partitions) at a size the tests afford: 2 × 2 partitions of 16² inputs."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit((16, 16), 8, 2, [8, 16], [1, 1], 4, 0.0, num_classes=3).double().eval()
    check_supported(model)
    data = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    _explains_with_every_method(model, data)
