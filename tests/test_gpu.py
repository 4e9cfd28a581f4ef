"""CUDA: fitting and explaining on the GPU agree with the CPU, without per-batch syncs.

Skipped without CUDA; run with ``python -m pytest -m gpu tests/test_gpu.py`` on a GPU machine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import patternnet as pn
from patternnet.patterns.fit import collect_statistics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def make_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    ).eval()


def make_data(n: int = 48) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(6))


def assert_patterns_close(a: pn.Patterns, b: pn.Patterns, tolerance: float) -> None:
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key].cpu(), b[name][key].cpu(), rtol=tolerance,
                                       atol=tolerance)


@pytest.mark.parametrize("estimator", ["two_component", "linear"])
def test_cuda_fit_equals_cpu_fit(estimator: str) -> None:
    cpu_model = make_model().double()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x = make_data().double()
    on_cpu = pn.fit_patterns(cpu_model, x, estimator=estimator, batch_size=8, progress=False)
    on_gpu = pn.fit_patterns(gpu_model, x, estimator=estimator, batch_size=8, progress=False,
                             device="cuda")
    assert next(iter(on_gpu.values()))[next(iter(next(iter(on_gpu.values()))))].is_cuda
    assert_patterns_close(on_gpu, on_cpu, 1e-10)


def test_cuda_float32_staging_is_close_to_float64() -> None:
    model = make_model().cuda()
    x = make_data(96).cuda()
    exact = pn.fit_patterns(model, x, batch_size=8, progress=False, precision="float64")
    fast = pn.fit_patterns(model, x, batch_size=8, progress=False, precision="float32")
    assert_patterns_close(fast, exact, 1e-3)


def test_cuda_fit_does_not_synchronise_per_batch() -> None:
    model = make_model().cuda()
    batches = list(make_data(64).cuda().split(8))

    def watched():
        # From the second batch on, any host-device synchronisation raises.
        for index, batch in enumerate(batches):
            if index == 1:
                torch.cuda.set_sync_debug_mode("error")
            yield batch
        torch.cuda.set_sync_debug_mode("default")

    try:
        stats = collect_statistics(model, watched(), precision="float32", progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.images == 64
    assert stats["0"]["count"].is_cuda


def test_cuda_explain_matches_cpu() -> None:
    cpu_model = make_model().double()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x = make_data(8).double()
    patterns = pn.fit_patterns(cpu_model, make_data().double(), progress=False)
    for method in (pn.PatternNet, pn.PatternAttribution):
        expected = method(cpu_model, patterns).attribute(x, target=1)
        got = method(gpu_model, patterns).attribute(x.cuda(), target=1)
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-10)


def test_cuda_checkpoint_resume(tmp_path: Path) -> None:
    model = make_model().cuda()
    x = make_data().cuda()
    reference = collect_statistics(model, x, batch_size=8, progress=False, checkpoint=tmp_path /
                                   "a.ckpt", checkpoint_every=2)

    def dies():
        for index, batch in enumerate(x.split(8)):
            if index == 3:
                raise RuntimeError("killed")
            yield batch

    with pytest.raises(RuntimeError, match="killed"):
        collect_statistics(model, dies(), progress=False, checkpoint=tmp_path / "b.ckpt",
                           checkpoint_every=2)
    resumed = collect_statistics(model, x, batch_size=8, progress=False,
                                 checkpoint=tmp_path / "b.ckpt", checkpoint_every=2, resume=True)
    assert resumed.images == reference.images
    for name in reference:
        for key, tensor in reference[name].tensors.items():
            assert resumed[name].tensors[key].is_cuda
            torch.testing.assert_close(resumed[name].tensors[key], tensor, rtol=1e-12, atol=0)
