"""Shared helpers of the benchmarks: machine description, timing, models, image-like data."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patternnet.data import read_idx

RESULTS = Path(__file__).parent / "results"
#: The repository root: benchmarks that start processes run ``python -m perf.NAME`` from here.
ROOT = Path(__file__).parents[1]
#: Fashion-MNIST test images (Debian's dataset-fashion-mnist); PATTERNNET_FASHION overrides.
FASHION = Path(os.environ.get("PATTERNNET_FASHION",
                              "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"))


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU model, cores, load, versions)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def peak_gpu_gb() -> float | None:
    """Peak GPU memory allocated by torch so far, in GB (None without CUDA)."""
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def clock() -> float:
    """The benchmarks' clock: CPU seconds of this process on the CPU, wall seconds on a GPU.

    On a CPU shared with other work, the CPU time of a one-thread process counts the work done
    and not the time spent waiting for a core (wall-clock times varied 2-3× from one minute to
    the next while these benchmarks ran; CPU times far less). On a GPU the work is not on the
    CPU: wall time, synchronised.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds (see :func:`clock`) one call of ``fn`` takes."""
    start = clock()
    fn()
    return clock() - start


def top_logit_gradient(
    model: nn.Module, target: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain autograd gradient of each image's ``target`` logit: the benchmarks' floor."""

    def gradient(inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(inputs).gather(1, target[:, None]).sum(), inputs)
        return grad

    return gradient


def interleaved_ratios(
    found: dict[str, Callable[[], Any]], floor: Callable[[], Any], rounds: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Each method's time ÷ the floor's, timed right before it, for ``rounds`` rounds; the
    order of the methods rotates every round so that no method always follows another.

    Returns the ratios per method and every floor time."""
    ratios: dict[str, list[float]] = {name: [] for name in found}
    floors: list[float] = []
    for round_index in range(rounds):
        names = list(found)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            floors.append(timed(floor))
            ratios[name].append(timed(found[name]) / floors[-1])
    return ratios, floors


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def vision_model(name: str) -> nn.Module:
    """A torchvision model with random weights (seeded), in eval mode."""
    import torchvision

    torch.manual_seed(0)
    factory = {"vgg16": torchvision.models.vgg16, "resnet50": torchvision.models.resnet50,
               "resnet18": torchvision.models.resnet18}[name]
    return factory(weights=None).eval()


def images(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``n`` image-like inputs ``(n, 3, size, size)``: Fashion-MNIST resized, else smooth noise.

    Natural images have strongly correlated pixels, which is what makes ``E[xy] − E[x]E[y]``
    cancel (method.md §2); white noise would flatter float32.
    """
    generator = torch.Generator().manual_seed(seed)
    if FASHION.exists():
        raw = read_idx(FASHION)  # the library's one IDX reader (checks the header)
        index = torch.randperm(raw.shape[0], generator=generator)[:n]
        x = torch.from_numpy(raw[index.numpy()].astype(np.float32) / 255.0)[:, None]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()
    noise = torch.randn(n, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic")


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def parse_args(
    doc: str | None,
    argv: list[str] | None,
    *,
    model: str = "vgg16",
    batch: int = 8,
    size: int | None = 224,
    threads: int | None = None,
    extra: Any = None,
) -> Any:
    """The options every benchmark shares (--model, --batch, --size, --threads) plus ``extra``.

    ``extra(parser)`` adds a script's own options. The thread count is applied here.
    """
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--model", default=model, choices=["vgg16", "resnet50", "resnet18"])
    parser.add_argument("--batch", type=int, default=batch)
    if size is not None:
        parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timings: see clock())")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
