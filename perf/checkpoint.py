"""Checkpoint cost: writing, checksumming and resuming VGG16-sized statistics, and peak memory.

The statistics of a real fit are laid out for the model (default: VGG16 with the linear
estimator, 1.1 GB of float64 sums; ``--estimator two_component --no-negative``: 2.2 GB) and
filled with random numbers; no image is fitted, so the numbers are the checkpoint's own
cost. Each phase runs in a fresh process, since peak RSS is per process:

- ``save``: build the sums, then time the checksum alone, the file write alone (safetensors
  + fsync, no checksum) and the whole :func:`save_checkpoint`; peak RSS above the sums.
- ``load``: :func:`load_checkpoint` (read, checksum, validation); peak RSS above the sums.
- ``resume``: ``collect_statistics(..., resume=True)`` on the model with that checkpoint (the
  data is already consumed: it loads, checks, and writes the final checkpoint); peak RSS
  above model + sums.

Times are wall seconds (the write is I/O) and CPU seconds of this one-thread process, the
median of ``--repeat`` runs. The file is read back from the page cache (just written).

Usage: python -m perf.checkpoint [--estimator linear] [--dir /tmp/ckpt]
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from patternnet.patterns import checkpoint as checkpoint_mod
from patternnet.patterns.fit import DEFAULT_FLUSH_EVERY, collect_statistics, linear_layers
from patternnet.patterns.statistics import LayerStatistics, Statistics, required_sums
from patternnet.patterns.store import fingerprint

from .common import ROOT, machine, median, parse_args, vision_model, write_result

BATCH = 8


def rss_gb() -> float:
    """Current resident memory of this process, in GB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_gb() -> float:
    """Peak resident memory of this process so far, in GB (``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def summary(runs: list[tuple[float, float]]) -> dict[str, Any]:
    """Median wall and CPU seconds, and every run."""
    return {"wall": median([w for w, _ in runs]), "cpu": median([c for _, c in runs]),
            "runs": runs}  # fmt: skip


def both(fn: Any) -> tuple[float, float]:
    """(wall, CPU) seconds of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def context(model: torch.nn.Module, args: Any) -> dict[str, Any]:
    return {"fingerprint": fingerprint(model), "estimator": args.estimator,
            "negative": args.negative, "precision": "float64", "rank": 0, "world_size": 1,
            "flush_every": DEFAULT_FLUSH_EVERY}  # fmt: skip


def phase_save(args: Any, path: Path) -> dict[str, Any]:
    model = vision_model(args.model)
    sums = required_sums(args.estimator, args.negative)
    layout = {name: (m.weight.shape[0], getattr(m, "groups", 1), m.weight[0].numel())
              for name, m in linear_layers(model).items()}  # fmt: skip
    ctx = context(model, args)
    del model
    gc.collect()
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, (out, groups, patch) in layout.items():
        layer = LayerStatistics(out, groups, patch, sums)
        for tensor in layer.tensors.values():
            tensor.uniform_(-1, 1, generator=generator)
        layers[name] = layer
    stats = Statistics(layers, estimator=args.estimator, negative=args.negative, images=BATCH,
                       batches=1)  # fmt: skip
    tensors = stats.state_tensors()
    size = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    base = rss_gb()
    metadata = {"format": checkpoint_mod.CHECKPOINT_FORMAT, "statistics": "{}", "context": "{}"}
    scratch = path.with_name("scratch.safetensors")
    runs: dict[str, list[tuple[float, float]]] = {"checksum": [], "write": [], "save": []}
    for _ in range(args.repeat):  # interleaved, so that a busy minute hits all three
        runs["checksum"].append(both(lambda: checkpoint_mod.checksum(tensors, metadata)))
        runs["write"].append(both(lambda: checkpoint_mod.atomic_write(
            scratch, lambda tmp: checkpoint_mod._write_file(tensors, metadata, tmp))))  # fmt: skip
        runs["save"].append(both(
            lambda: checkpoint_mod.save_checkpoint(path, stats, dict(ctx, complete=True))))
    scratch.unlink()
    peak = peak_gb()
    return {"statistics_gb": size, "tensors": len(tensors), "rss_with_sums_gb": base,
            **{f"{k}_s": summary(v) for k, v in runs.items()},
            "peak_rss_gb": peak, "peak_above_sums_gb": peak - base}  # fmt: skip


def phase_load(args: Any, path: Path) -> dict[str, Any]:
    base = rss_gb()
    holder: list[Any] = []
    runs = []
    for _ in range(args.repeat):
        holder.clear()  # the previous copy is freed before the next load
        runs.append(both(lambda: holder.append(checkpoint_mod.load_checkpoint(path))))
    after, peak = rss_gb(), peak_gb()
    return {"load_checkpoint_s": summary(runs), "rss_before_gb": base, "rss_after_gb": after,
            "peak_rss_gb": peak, "peak_above_loaded_gb": peak - after}  # fmt: skip


def phase_resume(args: Any, path: Path) -> dict[str, Any]:
    model = vision_model(args.model)
    data = torch.zeros(BATCH, 3, 224, 224)  # one batch, already in the checkpoint
    base = rss_gb()
    holder: list[Any] = []
    seconds = both(lambda: holder.append(collect_statistics(
        model, data, estimator=args.estimator, negative=args.negative, batch_size=BATCH,
        progress=False, checkpoint=path, resume=True)))  # fmt: skip
    after, peak = rss_gb(), peak_gb()
    return {"resume_s": seconds, "rss_model_gb": base, "rss_after_gb": after,
            "peak_rss_gb": peak, "peak_above_model_and_sums_gb": peak - after}


def main(argv: list[str] | None = None) -> None:
    def extra(parser: Any) -> None:
        parser.add_argument("--estimator", default="linear",
                            choices=["linear", "two_component"])  # fmt: skip
        parser.add_argument("--no-negative", dest="negative", action="store_false")
        parser.add_argument("--dir", default=None, help="folder for the checkpoint file")
        parser.add_argument("--repeat", type=int, default=3, help="timed runs per step (3)")
        parser.add_argument("--phase", default=None, choices=["save", "load", "resume"])
        parser.add_argument("--path", default=None, help=argparse_hidden())

    args = parse_args(__doc__, argv, size=None, threads=1, extra=extra)
    if args.phase is not None:
        phase = {"save": phase_save, "load": phase_load, "resume": phase_resume}[args.phase]
        print(json.dumps(phase(args, Path(args.path))))
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="patternnet-ckpt-"))
    path = folder / "bench.ckpt"
    result: dict[str, Any] = {"model": args.model, "estimator": args.estimator,
                              "negative": args.negative,
                              "format_version": checkpoint_mod.CHECKPOINT_VERSION,
                              "machine": machine()}  # fmt: skip
    base = [sys.executable, "-m", __spec__.name, "--model", args.model, "--estimator",
            args.estimator, "--threads", "1", "--repeat", str(args.repeat), "--path", str(path)]
    base += [] if args.negative else ["--no-negative"]
    try:
        for phase in ("save", "load", "resume"):
            out = subprocess.run([*base, "--phase", phase], check=True, capture_output=True,
                                 text=True, cwd=ROOT).stdout  # fmt: skip
            result[phase] = json.loads(out.strip().splitlines()[-1])
            print(phase, json.dumps(result[phase]), flush=True)
    finally:
        for leftover in folder.glob("*"):
            leftover.unlink()
        if args.dir is None:
            folder.rmdir()
    name = f"checkpoint_{args.model}_{args.estimator}" + ("" if args.negative else "_plus")
    print(write_result(name, result))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
