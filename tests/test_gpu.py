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


# --- every method, evaluation, and the distributed path on CUDA -------------------------------

DETERMINISTIC = {
    "pattern_net": {"estimator": "filter"},
    "pattern_attribution": {"estimator": "filter"},
    "integrated_gradients": {"n_steps": 3},
}


@pytest.mark.parametrize("name", [n for n in pn.available_methods() if n != "smoothgrad"])
@pytest.mark.parametrize("net", ["vgg", "resnet"])
def test_cuda_every_method_matches_cpu(name: str, net: str) -> None:
    from baseline_models import images, resnet, vgg
    from patternnet.methods.registry import get_method

    cpu_model = {"vgg": vgg, "resnet": resnet}[net]()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x = images(n=3)
    expected = get_method(name, cpu_model, **DETERMINISTIC.get(name, {})).attribute(x, target=1)
    got = get_method(name, gpu_model, **DETERMINISTIC.get(name, {})).attribute(x.cuda(), target=1)
    assert got.is_cuda and got.shape == x.shape
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-8, atol=1e-10)


def test_cuda_smoothgrad_runs_on_the_device() -> None:
    from baseline_models import images, vgg

    x = images(n=2).cuda()
    result = pn.SmoothGrad(vgg().cuda(), n_samples=4, seed=0).attribute(x, target=1)
    assert result.is_cuda and result.shape == x.shape and torch.isfinite(result).all()
    assert result.abs().sum() > 0


def test_cuda_region_perturbation_matches_cpu() -> None:
    from baseline_models import images, vgg
    from patternnet.evaluate.perturbation import region_perturbation

    cpu_model = vgg()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x = images(n=4)
    heat = pn.Gradient(cpu_model).attribute(x, target=1)
    expected = region_perturbation(cpu_model, x, heat, k=2, steps=5, target=1)
    got = region_perturbation(gpu_model, x.cuda(), heat.cuda(), k=2, steps=5, target=1)
    torch.testing.assert_close(torch.as_tensor(got.scores).cpu(),
                               torch.as_tensor(expected.scores), rtol=1e-8, atol=1e-10)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_nccl_one_rank_fit_equals_plain_fit() -> None:
    """The NCCL all-reduce path (a one-rank group: one GPU here) changes nothing."""
    import torch.distributed as dist

    from patternnet.patterns import distributed

    model = make_model().double().cuda()
    x = make_data().double().cuda()
    plain = pn.fit_patterns(model, x, batch_size=8, progress=False)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        assert distributed.is_initialized() and dist.get_backend() == "nccl"
        fitted = pn.fit_patterns(model, x, batch_size=8, progress=False, distributed=True)
    finally:
        distributed.shutdown()
    assert_patterns_close(fitted, plain, 1e-12)


def _gloo_cuda_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    from patternnet.patterns import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed.init_from_env(backend="gloo", timeout_minutes=2)
    try:
        model = make_model().double().cuda()
        patterns = pn.fit_patterns(model, make_data().double(), batch_size=8, progress=False,
                                   device="cuda")
        if distributed.is_main_process():
            patterns.save(Path(out) / "gloo_cuda.safetensors")
    finally:
        distributed.shutdown()


def test_two_processes_on_one_gpu_equal_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gloo_cuda_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = pn.fit_patterns(make_model().double().cuda(), make_data().double(), batch_size=8,
                             progress=False, device="cuda")
    assert_patterns_close(pn.Patterns.load(tmp_path / "gloo_cuda.safetensors"), single, 1e-10)


def test_torchrun_cli_fit_on_cuda(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess
    import sys

    import numpy as np

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not available")
    model = make_model()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "netdef.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_gpu import make_model\n"
    )
    np.save(tmp_path / "inputs.npy", make_data().numpy())
    out = tmp_path / "cuda.safetensors"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "1", "-m", "patternnet", "fit",
         "--model", "netdef:make_model", "--weights", str(tmp_path / "weights.pt"),
         "--data", str(tmp_path / "inputs.npy"), "--out", str(out), "--batch-size", "8",
         "--device", "cuda", "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    on_gpu = pn.Patterns.load(out)
    on_cpu = pn.fit_patterns(model, make_data(), batch_size=8, progress=False)
    assert on_gpu.metadata["images"] == 48
    assert_patterns_close(on_gpu, on_cpu, 1e-4)


def _synchronisations(fn) -> int:
    """How many host-device synchronisations ``fn()`` makes (``perf/syncs.py``)."""
    from perf.syncs import synchronisations

    return synchronisations(fn)


@pytest.mark.parametrize("method", ["gradient", "pattern_net_plus", "pattern_attribution_plus",
                                    "pattern_net", "pattern_attribution"])
def test_cuda_explaining_waits_for_the_gpu_only_at_the_ends(method: str) -> None:
    """Checks of inputs, target and results read the GPU before/after, never between passes.

    With a₋ the logits layer (no ReLU after it) still asks once whether any inactive unit
    receives a gradient; every ReLU-gated layer is decided before the forward pass.
    """
    model = make_model().cuda()
    x = make_data(8).cuda()
    plus = pn.fit_patterns(model, make_data(), progress=False, negative=False)
    both = pn.fit_patterns(model, make_data(), progress=False)
    explainer = {
        "gradient": lambda: pn.Gradient(model),
        "pattern_net_plus": lambda: pn.PatternNet(model, plus),
        "pattern_attribution_plus": lambda: pn.PatternAttribution(model, plus),
        "pattern_net": lambda: pn.PatternNet(model, both),
        "pattern_attribution": lambda: pn.PatternAttribution(model, both),
    }[method]()
    explainer.attribute(x, target=1)  # warm-up (caches)
    # the inputs' finiteness before the forward pass; logits and result after the backward
    allowed = 3 if method in ("gradient", "pattern_net_plus", "pattern_attribution_plus") else 4
    assert _synchronisations(lambda: explainer.attribute(x, target=1)) <= allowed
    assert _synchronisations(lambda: explainer.attribute(x)) <= allowed


def test_cuda_target_tensor_out_of_range_is_a_clear_error() -> None:
    model = make_model().cuda()
    x = make_data(8).cuda()
    targets = torch.full((8,), 1, device="cuda")
    targets[3] = 7  # the model has 4 classes
    for method in (pn.Gradient(model), pn.PatternNet(model, estimator="filter")):
        with pytest.raises(ValueError, match="target 7 is out of range"):
            method.attribute(x, target=targets)
    # in range: one more synchronisation (the range check after the backward pass), no more
    targets[3] = 2
    gradient = pn.Gradient(model)
    gradient.attribute(x, target=targets)
    assert _synchronisations(lambda: gradient.attribute(x, target=targets)) <= 4
