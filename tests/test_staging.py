"""The fast paths of the statistics (method.md §9) add up to the explicit float64 sums.

A convolution's product is formed per batch, per chunk of images, or held back and formed at
the flush (late layers); Linear layers are always held back; float32 products are staged, of
shifted data (padded first, shifted after), and the shift is undone at the flush.
Each path, forced here, must give the sums of the explicit unfolding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from patternnet.patterns import statistics as statistics_mod
from patternnet.patterns.fit import collect_statistics
from reference import layer_samples

CASES = {
    # (layer, input shape): with 3×3 inputs the patches outweigh the products -> held back
    "held_conv": (lambda: nn.Conv2d(8, 16, 3, padding=0), (40, 8, 3, 3)),
    "held_conv_groups": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2), (30, 8, 3, 3)),
    "per_batch_conv": (lambda: nn.Conv2d(2, 3, 3, padding=1), (30, 2, 9, 9)),
    "linear": (lambda: nn.Linear(7, 5), (50, 7)),
}


def expected_sums(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    X, y, out = layer_samples(layer, x)
    m = (out > 0).double()
    return {
        "sum_y": y.sum(0),
        "count_plus": m.sum(0),
        "sum_xy": (X * y[..., None]).sum(0),
        "sum_xy_plus": (X * (y * m)[..., None]).sum(0),
        "sum_x_plus": (X * m[..., None]).sum(0),
        "sum_xy_minus": (X * (y * (1 - m))[..., None]).sum(0),
        "sum_x_minus": (X * (1 - m)[..., None]).sum(0),
    }


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("squeeze", ["none", "chunk_per_image", "tiny_hold"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_path_adds_up(case: str, squeeze: str, precision: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    if squeeze == "chunk_per_image":
        monkeypatch.setattr(statistics_mod, "_CHUNK_ELEMENTS", 1)
    if squeeze == "tiny_hold":
        monkeypatch.setattr(statistics_mod, "HOLD_ELEMENTS", 500)
    torch.manual_seed(2)
    factory, shape = CASES[case]
    layer = factory().double()
    with torch.no_grad():
        layer.bias.normal_(0, 0.3)
    x = torch.randn(*shape, dtype=torch.float64) + 0.3
    # 3 samples a batch: flushes every 8 batches and at the end, holds across batches.
    stats = collect_statistics(nn.Sequential(layer), x, batch_size=3, precision=precision,
                               progress=False)
    s = stats["0"]
    assert not s.pending
    tolerance = 1e-12 if precision == "float64" else 2e-5
    # both precisions keep a₋'s sums as all − plus in float64 (a float32 fit forms the
    # inactive product directly, of shifted data, and adds it into sum_xy)
    layout = {"sum_xy"}
    expected = expected_sums(layer, x)
    assert layout <= set(s.tensors) and len(set(s.tensors) & set(expected)) == 4 + len(layout)
    for key in set(s.tensors) & set(expected):
        torch.testing.assert_close(s[key], expected[key], rtol=tolerance, atol=tolerance, msg=key)
    assert s.count == layer_samples(layer, x)[0].shape[0]


def test_held_products_wait_for_the_flush() -> None:
    from patternnet.layers import geometry

    torch.manual_seed(3)
    layer = nn.Conv2d(8, 16, 3).double()
    stats = collect_statistics(nn.Sequential(layer), torch.randn(6, 8, 3, 3).double(),
                               batch_size=3, progress=False)
    x = torch.randn(2, 8, 3, 3).double()
    before = stats["0"].tensors["sum_xy"].clone()
    stats["0"].update(geometry(layer), x, layer(x).detach(), layer.bias, layer.weight.shape)
    assert stats.pending
    assert torch.equal(stats["0"].tensors["sum_xy"], before)  # held, not yet added
    after = stats["0"]["sum_xy"]  # reading flushes
    assert not stats.pending and not torch.equal(after, before)


def test_fitting_turns_tf32_off_and_restores_the_users_setting() -> None:
    import torch
    from torch import nn

    import patternnet as pn

    seen = []
    model = nn.Sequential(nn.Linear(3, 2))
    model.register_forward_hook(
        lambda *_: seen.append((torch.backends.cudnn.allow_tf32,
                                torch.backends.cuda.matmul.allow_tf32))
    )  # fmt: skip
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        pn.fit_patterns(model, torch.randn(8, 3), progress=False, precision="float32")
        assert seen and all(flags == (False, False) for flags in seen)
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 == before[0]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_float32_a_minus_is_accurate_where_most_units_are_active() -> None:
    """a₋ from directly collected inactive sums: no cancellation of all − plus in float32.

    With positive inputs and biases most positions are active, so a₋'s sums are a small
    difference of two large float32-rounded sums in the all − plus layout (relative error
    ~2e-4 here); collected directly they keep float32's accuracy (~5e-6).
    """
    import patternnet as pn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[0].bias.fill_(0.5)
        model[2].bias.fill_(0.3)
    x = torch.nn.functional.interpolate(torch.randn(64, 3, 8, 8), size=(64, 64), mode="bicubic")
    x = x + 2.0
    exact = pn.fit_patterns(model.double(), x.double(), batch_size=16, progress=False,
                            negative=True)
    fast = pn.fit_patterns(model.float(), x.float(), batch_size=16, progress=False,
                           precision="float32", negative=True)
    for name in ("0", "2"):
        a32, a64 = fast[name]["a_minus"].double(), exact[name]["a_minus"]
        assert (a32 - a64).norm() / a64.norm() < 3e-5, name
