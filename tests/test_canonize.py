"""BatchNorm folding: same outputs, same patterns as a hand-folded copy, model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import patternnet as pn
from patternnet.engine.canonize import (
    BatchNormFolding,
    Canonical,
    default_canonizers,
    probed_batchnorm_pairs,
    traced_batchnorm_pairs,
)


def randomise_batchnorms(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.3, 3.0)
            if module.affine:
                module.weight.data.normal_(1.0, 0.5)
                module.bias.data.normal_(0.0, 0.5)
    return model


def bn_net(dims: int = 2) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[dims - 1]
    model = nn.Sequential(
        conv(2, 4, 3, padding=1, bias=False),  # no bias: the folded layer gets one
        bn(4),
        nn.ReLU(),
        conv(4, 5, 3, padding=1),
        bn(5, affine=False),
        nn.ReLU(),
        pool(2),
        nn.Flatten(),
        nn.Linear(5 * 2**dims, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).double()
    return randomise_batchnorms(model).eval()


def canonical_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    canonical = Canonical(model, default_canonizers())
    with torch.no_grad(), canonical.active():
        return canonical(x)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_folding_leaves_outputs_unchanged(dims: int) -> None:
    model = bn_net(dims)
    x = torch.randn(3, 2, *([4] * dims), dtype=torch.float64)
    canonical = Canonical(model, default_canonizers())
    assert canonical.form.bypass == {"1", "4", "9"}
    assert model[0].bias is None and canonical.bias("0") is not None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    torch.testing.assert_close(canonical_forward(model, x), expected, rtol=0, atol=1e-5)
    # float32 too (the folded weights are computed in float64 and cast)
    model32 = copy.deepcopy(model).float()
    torch.testing.assert_close(
        canonical_forward(model32, x.float()), expected.float(), rtol=0, atol=1e-5
    )
    assert model[0].bias is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def hand_folded(model: nn.Module) -> nn.Module:
    """An explicit copy with each BatchNorm folded into the layer before it (reference)."""
    folded = copy.deepcopy(model)
    layers = list(folded)
    for i, module in enumerate(layers):
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        layer = layers[i - 1]
        s = 1.0 / torch.sqrt(module.running_var + module.eps)
        if module.affine:
            s = s * module.weight
        t = -module.running_mean * s + (module.bias if module.affine else 0.0)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        with torch.no_grad():
            bias = layer.bias if layer.bias is not None else torch.zeros_like(s)
            new_bias = bias * s + t
            layer.weight.mul_(s.view(shape))
            layer.bias = nn.Parameter(new_bias.detach().clone())
        folded[i] = nn.Identity()
    return folded


@pytest.mark.parametrize("estimator", ["two_component", "linear"])
def test_patterns_of_folded_network_match_hand_folded_copy(estimator: str) -> None:
    model = bn_net(2)
    reference = hand_folded(model)
    x = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(reference(x), model(x))
    ours = pn.fit_patterns(model, x, estimator=estimator, progress=False, batch_size=5)
    theirs = pn.fit_patterns(reference, x, estimator=estimator, progress=False, batch_size=5)
    assert set(ours) == set(theirs) == {"0", "3", "8", "11"}
    for name in ours:
        for key in theirs[name]:
            torch.testing.assert_close(ours[name][key], theirs[name][key], atol=1e-9, rtol=1e-7)
    assert any("folded 1 into 0" in note for note in ours.metadata["canonical"])
    # explanations agree too
    signal = pn.PatternNet(model, ours).attribute(x[:4])
    torch.testing.assert_close(signal, pn.PatternNet(reference, theirs).attribute(x[:4]))


class SharedOutput(nn.Module):
    """The conv output is read twice: folding its BatchNorm would change the other reader."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.bn2 = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y
        z = self.bn2(self.conv2(z))
        return self.head(z.mean((2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow at the top level: fx fails here, not in the children."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Linear(3, 2)
        self.bn_head = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x).mean((2, 3))
        if h.sum() > 1e9:  # data-dependent branch
            h = -h
        return self.bn_head(self.head(h))


def test_batchnorm_reading_a_shared_output_stays_standalone() -> None:
    model = randomise_batchnorms(SharedOutput().double()).eval()
    pairs, untraced = traced_batchnorm_pairs(model)
    assert pairs == {"conv2": "bn2"} and not untraced
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert probed_batchnorm_pairs(model, x) == pairs
    torch.testing.assert_close(canonical_forward(model, x), model(x))


def test_untraceable_model_folds_inside_traceable_children_and_by_probe() -> None:
    model = randomise_batchnorms(Untraceable().double()).eval()
    pairs, untraced = traced_batchnorm_pairs(model)
    assert pairs == {"block.0": "block.1"}
    assert list(untraced) == ["<model>"]
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    probed = probed_batchnorm_pairs(model, x)
    assert probed == {"block.0": "block.1", "head": "bn_head"}
    canonical = Canonical(model, [BatchNormFolding(example=x)])
    assert canonical.form.bypass == {"block.1", "bn_head"}
    expected = model(x)
    with torch.no_grad(), canonical.active():
        torch.testing.assert_close(canonical(x), expected)
    notes = Canonical(model, default_canonizers()).form.notes
    assert any("could not trace" in note for note in notes)


def test_preactivation_batchnorm_is_standalone() -> None:
    model = randomise_batchnorms(
        nn.Sequential(
            nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3),
            nn.Flatten(), nn.Linear(3 * 4 * 4, 2),
        ).double()
    ).eval()
    assert traced_batchnorm_pairs(model) == ({}, {})
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(canonical_forward(model, x), model(x))
    # (their backward rule is tested in test_support.py)


def test_train_mode_model_is_folded_with_running_statistics_and_restored() -> None:
    model = bn_net(2).train()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="train mode"):
        patterns = pn.fit_patterns(model, x, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert set(patterns) == {"0", "3", "8", "11"}


def test_probe_runs_once_per_model() -> None:
    model = randomise_batchnorms(Untraceable().double()).eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for _ in range(3):
            assert Canonical(model, [BatchNormFolding(example=x)]).form.bypass == {
                "block.1", "bn_head"
            }
    finally:
        handle.remove()
    assert len(calls) == 1


def test_folding_is_reused_until_an_input_tensor_changes() -> None:
    """A canonizer's folded weights are the same objects across calls, new after a change."""
    model = bn_net()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    folding = BatchNormFolding()

    def folded() -> torch.Tensor:
        return Canonical(model, [folding]).weight("0")

    first = folded()
    assert folded() is first  # reused: the methods' caches keyed on it hold
    assert Canonical(model, [BatchNormFolding()]).weight("0") is not first  # per canonizer

    def in_place(tensor: torch.Tensor, value: float) -> None:
        with torch.no_grad():  # as an optimiser step does
            tensor.add_(value)

    changes = {
        "running_var in place": lambda m: m[1].running_var.mul_(2.0),
        "BatchNorm weight in place": lambda m: in_place(m[1].weight, 0.5),
        "conv weight in place": lambda m: in_place(m[0].weight, -0.1),
        "load_state_dict": lambda m: m.load_state_dict(randomise_batchnorms(copy.deepcopy(m))
                                                       .state_dict()),
        ".data assignment": lambda m: setattr(m[1].running_mean, "data",
                                              torch.randn(4, dtype=torch.float64)),
        "eps": lambda m: setattr(m[1], "eps", 0.5),
    }  # fmt: skip
    for what, change in changes.items():
        before = folded()
        change(model)
        after = folded()
        assert after is not before, what
        canonical = Canonical(model, [folding])
        with torch.no_grad():  # still exactly the model's function
            expected = model(x)
            with canonical.active():
                torch.testing.assert_close(canonical(x), expected, msg=what)
    assert Canonical(model.float(), [folding]).weight("0").dtype == torch.float32


def test_a_new_method_object_sees_writes_through_data() -> None:
    """Writes through ``.data`` bypass version counters: a new method object folds afresh."""
    model = bn_net()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    pn.Gradient(model).attribute(x, target=0)
    model[1].weight.data.mul_(-2.0)
    expected = torch.func.grad(lambda v: model(v)[:, 0].sum())(x)
    torch.testing.assert_close(pn.Gradient(model).attribute(x, target=0), expected)


def test_active_skips_bypassed_modules_and_restores_their_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).eval()
    calls = []
    own = model[1].forward  # a user's instance attribute must come back as it was
    model[1].forward = lambda x: calls.append(1) or own(x)
    canonical = Canonical(model, default_canonizers())
    assert canonical.form.bypass == {"1"}
    x = torch.randn(2, 2, 5, 5)
    with canonical.active():
        out = canonical(x)
    assert not calls  # the folded BatchNorm was not computed
    torch.testing.assert_close(out, model(x))
    assert calls and "forward" in model[1].__dict__
    del model[1].forward
    with canonical.active():
        canonical(x)
    assert "forward" not in model[1].__dict__
