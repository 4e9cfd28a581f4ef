"""PatternNet / PatternAttribution through the engine, against the gradient and references."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from torch import nn

import patternnet as pn
from patternnet.patterns.fit import linear_layers


def vgg_style(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, stride=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).double()


def weight_patterns(model: nn.Module) -> pn.Patterns:
    """Patterns whose 'a' is each layer's own weight: PatternNet must equal the gradient."""
    layers = {name: {"a": m.weight.detach().clone()} for name, m in linear_layers(model).items()}
    return pn.Patterns(layers, estimator="linear", nodes="weights")


def _hooks(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    ]


def test_patternnet_with_weight_patterns_is_gradient_times_logit() -> None:
    model = vgg_style().eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    before = _hooks(model)
    signal = pn.PatternNet(model, weight_patterns(model)).attribute(x)
    assert _hooks(model) == before
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    target = logits.argmax(1)
    selected = logits.gather(1, target[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(selected.sum(), xg)
    torch.testing.assert_close(signal, grad * selected.detach()[:, None, None, None])
    torch.testing.assert_close(pn.Gradient(model).attribute(x), grad)


def test_targets_int_sequence_and_none() -> None:
    model = vgg_style().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    patterns = weight_patterns(model)
    method = pn.PatternNet(model, patterns)
    per_sample = method.attribute(x, target=[0, 1, 2])
    for i, t in enumerate([0, 1, 2]):
        torch.testing.assert_close(per_sample[i : i + 1], method.attribute(x[i : i + 1], target=t))
    torch.testing.assert_close(method.attribute(x, target=torch.tensor([0, 1, 2])), per_sample)


def _reference_two_component(model: nn.Module, patterns: pn.Patterns, x: torch.Tensor, t: int):
    """Explicit backward: at each layer, A₊ᵀ(g·m) + A₋ᵀ(g·(1−m)), ReLU gates from forward."""
    lin1, lin2 = model[0], model[2]
    z1 = lin1(x)
    h = torch.relu(z1)
    z2 = lin2(h)
    g2 = torch.zeros_like(z2)
    g2[:, t] = z2[:, t]
    m2 = (z2 > 0).double()
    P2p, P2m = patterns["2"]["a_plus"], patterns["2"]["a_minus"]
    g1 = (g2 * m2) @ P2p + (g2 * (1 - m2)) @ P2m
    g1 = g1 * (z1 > 0).double()  # the ReLU gate of the forward pass
    m1 = (z1 > 0).double()
    P1p, P1m = patterns["0"]["a_plus"], patterns["0"]["a_minus"]
    return (g1 * m1) @ P1p + (g1 * (1 - m1)) @ P1m


def test_two_component_rule_uses_a_minus_where_inactive() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    data = torch.randn(300, 5, dtype=torch.float64)
    patterns = pn.fit_patterns(model, data, progress=False, negative=True)
    # the default fits a₋ only where an inactive unit can receive a signal: not before a ReLU
    auto = pn.fit_patterns(model, data, progress=False)
    assert set(auto["0"]) == {"a_plus"} and set(auto["2"]) == {"a_plus", "a_minus"}
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        # Shift the logit so that some samples have a negative one (the a₋ branch).
        model[2].bias[1] -= model(x)[:, 1].median()
        ref = torch.stack(
            [_reference_two_component(model, patterns, x[i : i + 1], 1)[0] for i in range(6)]
        )
    got = pn.PatternNet(model, patterns).attribute(x, target=1)
    torch.testing.assert_close(got, ref)
    assert torch.equal(pn.PatternNet(model, auto).attribute(x, target=1), got)
    # At least one sample has a negative logit, so the a₋ branch was exercised.
    assert (model(x)[:, 1] <= 0).any() and (model(x)[:, 1] > 0).any()


def test_pattern_attribution_conserves_through_a_relu_layer_without_bias() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    model = model.double().eval()
    data = torch.randn(400, 5, dtype=torch.float64)
    patterns = pn.fit_patterns(model, data, negative=False, progress=False)
    x = data[:5]
    attribution = pn.PatternAttribution(model, patterns).attribute(x, target=0)
    # Per-neuron conservation (Σᵢ wᵢ aᵢ = 1): hidden unit j receives r_j = w_cj a_cj y_c; the
    # ReLU gate keeps the r_j of active units, and each passes to the input intact.
    logits = model(x)[:, 0].detach()
    hidden = model[0](x).detach()
    r = (model[2].weight[0] * patterns["2"]["a_plus"][0]).detach()[None] * logits[:, None]
    torch.testing.assert_close(r.sum(1), logits)
    torch.testing.assert_close(attribution.sum(1), (r * (hidden > 0)).sum(1))


def test_patterns_shaped_like_weights_and_model_unchanged() -> None:
    model = vgg_style()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    patterns = pn.fit_patterns(model, x, progress=False)
    pn.PatternAttribution(model, patterns).attribute(x[:2])
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    for name, module in linear_layers(model).items():
        assert patterns[name]["a_plus"].shape == module.weight.shape


def test_saved_patterns_give_bit_identical_explanations_in_a_fresh_process(tmp_path) -> None:
    model = vgg_style(seed=5).float().eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    data = torch.randn(12, 3, 16, 16)
    x = torch.randn(3, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    patterns = pn.fit_patterns(model, data, progress=False)
    path = patterns.save(tmp_path / "p.safetensors")
    here = pn.PatternAttribution(model, patterns).attribute(x)
    here_net = pn.PatternNet(model, patterns).attribute(x)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path.parent)!r})
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_pattern_methods import vgg_style
        import patternnet as pn
        model = vgg_style(seed=5).float().eval()
        model.load_state_dict(torch.load({str(tmp_path / 'weights.pt')!r}))
        patterns = pn.Patterns.load({str(path)!r}, model=model)
        x = torch.load({str(tmp_path / 'x.pt')!r})
        torch.save({{"pa": pn.PatternAttribution(model, patterns).attribute(x),
                    "pn": pn.PatternNet(model, patterns).attribute(x)}},
                   {str(tmp_path / 'out.pt')!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    there = torch.load(tmp_path / "out.pt")
    assert torch.equal(there["pa"], here)
    assert torch.equal(there["pn"], here_net)


def test_swapped_weights_are_reused_but_follow_weight_updates() -> None:
    model = vgg_style().eval()
    data = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    patterns = pn.fit_patterns(model, data, progress=False)
    method = pn.PatternAttribution(model, patterns)
    x = data[:2]
    first = method.attribute(x, target=0)
    layer_cache = dict(method._swap_cache)
    torch.testing.assert_close(method.attribute(x, target=0), first)
    assert all(method._swap_cache[k][3] is layer_cache[k][3] for k in layer_cache)  # reused
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # an in-place update (as an optimiser step does)
    changed = method.attribute(x, target=0)
    fresh = pn.PatternAttribution(model, patterns).attribute(x, target=0)
    torch.testing.assert_close(changed, fresh)
    assert not torch.allclose(changed, first)


def test_swapped_folded_weights_are_reused_but_follow_batchnorm_updates() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    data = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    patterns = pn.fit_patterns(model, data, progress=False)
    method = pn.PatternAttribution(model, patterns)
    x = data[:2]
    first = method.attribute(x, target=0)
    conv = method._swap_cache[("0", "plus")][3]  # W ⊙ A of the BatchNorm-folded conv
    torch.testing.assert_close(method.attribute(x, target=0), first)
    assert method._swap_cache[("0", "plus")][3] is conv  # reused, although folded anew
    with torch.no_grad():
        model[1].running_var.mul_(3.0)  # the folded weight changes, the conv's does not
    changed = method.attribute(x, target=0)
    assert method._swap_cache[("0", "plus")][3] is not conv
    torch.testing.assert_close(changed, pn.PatternAttribution(model, patterns).attribute(x, 0))
    assert not torch.allclose(changed, first)
