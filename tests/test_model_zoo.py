"""``patternnet.models.load`` and torchvision architectures: build, fit, explain."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import patternnet as pn
from patternnet import models
from patternnet.engine.canonize import Canonical, default_canonizers, is_batchnorm
from patternnet.engine.support import classify
from patternnet.patterns.fit import linear_layers
from test_canonize import randomise_batchnorms
from test_resnet import small_resnet


def gradient_times_logit(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    logit = model(xg)[:, target]
    (grad,) = torch.autograd.grad(logit.sum(), xg)
    return grad * logit.detach().view(-1, *([1] * (x.dim() - 1)))


def weight_patterns(model: nn.Module) -> pn.Patterns:
    canonical = Canonical(model, default_canonizers())
    layers = {n: {"a": canonical.weight(n).detach().clone()} for n in linear_layers(model)}
    return pn.Patterns(layers, estimator="linear", nodes="weights")


# ------------------------------------------------------------------ factories and weights


def test_factory_spec_with_weights_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "zoo_net.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build(num_classes=4):
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(4, num_classes))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = models.load("zoo_net:build", num_classes=3)
    randomise_batchnorms(trained)
    assert not trained.training and trained[-1].out_features == 3
    # weights on disk, as a user has them: plain, wrapped in a checkpoint, DataParallel keys
    x = torch.randn(2, 3, 8, 8)
    files = {
        "plain.pth": trained.state_dict(),
        "checkpoint.pt": {"epoch": 3, "state_dict": trained.state_dict()},
        "parallel.pth": {f"module.{k}": v for k, v in trained.state_dict().items()},
    }
    for name, state in files.items():
        torch.save(state, tmp_path / name)
        loaded = models.load("zoo_net:build", weights=tmp_path / name, num_classes=3)
        torch.testing.assert_close(loaded(x), trained(x), msg=name)
    from safetensors.torch import save_file

    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = models.load("zoo_net:build", weights=str(tmp_path / "w.safetensors"), num_classes=3)
    torch.testing.assert_close(loaded(x), trained(x))
    with pytest.raises(ValueError, match=r"shape mismatch.*5\.weight"):
        models.load("zoo_net:build", weights=tmp_path / "plain.pth", num_classes=5)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        models.load("zoo_net:build", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="has no 'nothing'"):
        models.load("zoo_net:nothing")
    with pytest.raises(ImportError):
        models.load("no_such_module_xyz:build")
    with pytest.raises(ValueError, match="cannot tell what model"):
        models.load("resnet")
    (tmp_path / "notmodel.py").write_text("def build():\n    return 3\n")
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        models.load("notmodel:build")


def test_torchvision_missing_gives_install_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"pip install 'patternnet\[torchvision\]'"):
        models.load("torchvision:resnet18")


# ------------------------------------------------------------------ saved files


def test_exported_program_becomes_modules_and_explains_like_the_original(tmp_path) -> None:
    original = small_resnet().float()
    x = torch.randn(3, 3, 12, 12)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(original, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "net.pt2"))
    loaded = models.load(tmp_path / "net.pt2")
    kinds = {s.name: (s.type, s.kind, s.note) for s in classify(loaded).values()}
    assert kinds["0"] == ("Conv2d", "linear", "")
    assert kinds["1"] == ("BatchNorm2d", "batchnorm", "folded into 0")
    assert kinds["5.downsample.1"][2] == "folded into 5.downsample.0"
    assert set(linear_layers(loaded)) == set(linear_layers(original))
    torch.testing.assert_close(loaded(x), original(x))
    data = torch.randn(8, 3, 12, 12)
    ours = pn.fit_patterns(loaded, data, progress=False)
    theirs = pn.fit_patterns(original, data, progress=False)
    for name in theirs:
        for key in theirs[name]:
            torch.testing.assert_close(ours[name][key], theirs[name][key], rtol=1e-4, atol=1e-5)
    for method in (pn.PatternNet, pn.PatternAttribution):
        # The loaded program's graph shows no ReLU gates, so its fit keeps a₋ of the residual
        # sums, which the original's default fit leaves out (unread): the same explanation up
        # to the float32 rounding of differently formed sums, relative to its scale.
        expected = method(original, theirs).attribute(x[:2])
        torch.testing.assert_close(
            method(loaded, ours).attribute(x[:2]), expected,
            rtol=1e-4, atol=1e-5 * max(1.0, float(expected.abs().max())),
        )


def test_torchscript_file_is_refused_with_advice(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 2)))
        torch.jit.save(scripted, str(tmp_path / "net.ts"))
    with pytest.raises(ValueError, match=r"TorchScript.*torch\.export"):
        models.load(tmp_path / "net.ts")
    torch.save({"w": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="weights="):
        models.load(tmp_path / "state.pt")


# ------------------------------------------------------------------ torchvision


def _small_head(model: nn.Module, features: int) -> nn.Module:
    """Replace VGG/AlexNet's 25088×4096 / 9216×4096 head by a small one of the same form.

    The full fc6 alone needs 2.4 GB (VGG) of float64 statistics: too much for a unit test
    (the benchmarks fit the full networks). The features, pooling and forward are
    torchvision's own.
    """
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Dropout(), nn.Linear(features, 32), nn.ReLU(inplace=True),
        nn.Dropout(), nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, 10),
    )
    return model.eval()


def lively(model: nn.Module) -> nn.Module:
    """Random weights whose signals neither vanish nor explode, and non-trivial BatchNorms.

    torchvision's own initialisation makes a random MobileNetV2's logits constant to 1e-9
    (no signal to explain); fan-in scaling keeps every architecture alive.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model


ARCHITECTURES = {
    "resnet18": (dict(num_classes=10), None, 64),
    "mobilenet_v2": (dict(num_classes=10, width_mult=0.5), None, 32),
    "vgg11_bn": (dict(num_classes=10), 512, 32),
    "alexnet": (dict(num_classes=10), 256, 64),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_torchvision_models_build_fit_and_explain(name: str, tmp_path) -> None:
    pytest.importorskip("torchvision")
    options, head, size = ARCHITECTURES[name]
    model = models.load(f"torchvision:{name}", **options)
    if head:
        _small_head(model, head)
    lively(model)
    assert all(s.kind != "unsupported" for s in classify(model).values())
    x = torch.randn(2, 3, size, size)
    # BatchNorm folding leaves the outputs unchanged (float64 copy: no rounding noise)
    double = model.double()
    canonical = Canonical(double, default_canonizers())
    with torch.no_grad(), canonical.active():
        folded = canonical(x.double())
    torch.testing.assert_close(folded, double(x.double()), rtol=0, atol=1e-5)
    # weight patterns: PatternNet is gradient × logit through the whole architecture
    signal = pn.PatternNet(double, weight_patterns(double)).attribute(x.double(), target=3)
    torch.testing.assert_close(signal, gradient_times_logit(double, x.double(), 3))
    model = model.float()
    # the same weights from disk (what a user does with ImageNet weights)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    model = models.load(f"torchvision:{name}", weights=tmp_path / "weights.pth", **options) \
        if not head else model
    data = torch.randn(4, 3, size, size)
    patterns = pn.fit_patterns(model, data, batch_size=2, progress=False)
    assert set(patterns) == set(linear_layers(model))
    # Four random images leave the deep layers' patterns badly conditioned (16 samples for
    # 4608 inputs in ResNet's layer4): their product over 20 layers can exceed float32's
    # range, so the explanations of this test run in float64. They explain fitting images:
    # a unit of the output layer that never fired on the fit has a zero a₊ (dead unit).
    model = model.double()
    x = data[:2].double()
    for method in (pn.PatternNet(model, patterns), pn.PatternAttribution(model, patterns)):
        result = method.attribute(x)
        assert result.shape == x.shape and torch.isfinite(result).all()
        assert result.abs().sum() > 0


def test_torchvision_weights_file_round_trip(tmp_path) -> None:
    pytest.importorskip("torchvision")
    model = models.load("torchvision:resnet18", num_classes=7)
    randomise_batchnorms(model)
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    loaded = models.load("torchvision:resnet18", weights=tmp_path / "resnet18.pth",
                         num_classes=7)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="did you mean"):
        models.load("torchvision:resnet19")
    with pytest.raises(ValueError, match="do not fit ResNet"):
        models.load("torchvision:resnet18", weights=tmp_path / "resnet18.pth")  # 1000 classes


class GradientLikePatternNet(pn.PatternNet):
    """PatternNet without the standalone-BatchNorm rule (1/s): the gradient's BN backward."""

    def rules(self, canonical):
        module_rules, function_rules = super().rules(canonical)
        kept = {m: r for m, r in module_rules.items() if not is_batchnorm(m)}
        return kept, function_rules


@pytest.mark.parametrize(
    ("name", "size", "options"),
    [
        ("googlenet", 64, dict(aux_logits=False, init_weights=True)),  # concatenated branches
        ("efficientnet_b0", 32, {}),     # SiLU (linear patterns), squeeze-excitation products
        ("densenet121", 32, {}),         # concatenation, pre-activation (standalone) BatchNorm
    ],
)
def test_more_torchvision_architectures(name: str, size: int, options: dict) -> None:
    pytest.importorskip("torchvision")
    model = lively(models.load(f"torchvision:{name}", num_classes=10, **options)).double()
    assert all(s.kind != "unsupported" for s in classify(model).values())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    # Weight patterns give the gradient once standalone BatchNorms (DenseNet) pass it too.
    signal = GradientLikePatternNet(model, weight_patterns(model)).attribute(x, target=1)
    torch.testing.assert_close(signal, gradient_times_logit(model, x, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patterns = pn.fit_patterns(model, x, progress=False)
    smooth = [w for w in caught if "smooth activation" in str(w.message)]
    assert len(smooth) == (1 if name == "efficientnet_b0" else 0)
    assert set(patterns) == set(linear_layers(model))
    result = pn.PatternAttribution(model, patterns).attribute(x)
    assert torch.isfinite(result).all()


def test_vision_transformer_fits_and_explains() -> None:
    """Attention is decomposed, the class token and position embedding are biases (§12)."""
    torchvision = pytest.importorskip("torchvision")
    from patternnet.engine.support import classify

    torch.manual_seed(0)
    model = lively(torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16
    )).eval()  # fmt: skip
    kinds = classify(model)
    assert kinds["encoder.layers.encoder_layer_1.self_attention"].kind == "attention"
    assert "class_token" in kinds[""].note and "pos_embedding" in kinds["encoder"].note
    patterns = pn.fit_patterns(model, torch.randn(8, 3, 32, 32), progress=False)
    assert "encoder.layers.encoder_layer_1.self_attention.in_proj" in set(patterns)
    assert {"attention#0", "attention#1"} <= set(patterns.nodes)
    result = pn.PatternNet(model, patterns).attribute(torch.randn(2, 3, 32, 32))
    assert result.shape == (2, 3, 32, 32) and torch.isfinite(result).all()
