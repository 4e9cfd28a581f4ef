"""Scaling: fit time per image as the data set grows, and 2 gloo processes against 1.

1. Growth: one process fits data sets of growing size (same model, same batch size), CPU
   seconds of ``fit_patterns`` (statistics and estimators); the marginal time per image (the
   cost of the images added since the previous size) must stay flat: no cost grows with the
   number of images seen, the sums have a fixed size. The total per image falls as the fixed
   costs (allocating the sums, the estimators) are shared by more images.
2. Processes: the same fit run by ``torchrun --nproc-per-node 2`` (gloo, one thread each)
   against one process (one thread); both time the fit call only (not the start-up), in wall
   seconds (the only meaningful clock for a speed-up, and a noisy one on a shared machine),
   and the patterns of the two runs are compared.

Usage: python -m perf.scaling --model resnet18 --size 64 --sizes 32 128 512
       python -m perf.scaling --worker OUT.json ...   (internal: one fit, under torchrun)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import patternnet as pn
from patternnet.patterns import distributed

from .common import RESULTS, ROOT, clock, images, machine, vision_model, write_result


def forward_seconds(model: torch.nn.Module, data: torch.Tensor, batch: int) -> float:
    start = clock()
    with torch.no_grad():
        for chunk in data.split(batch):
            model(chunk)
    return clock() - start


def growth(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = vision_model(args.model)
    rows = []
    pn.fit_patterns(model, images(args.batch, args.size), batch_size=args.batch,
                    negative=False, precision="float32", progress=False)  # warm-up
    previous = None
    for n in args.sizes:
        data = images(n, args.size, seed=n)
        forward = forward_seconds(model, data, args.batch)
        start = clock()
        pn.fit_patterns(model, data, batch_size=args.batch, negative=False,
                        precision="float32", progress=False)
        seconds = clock() - start
        # The cost of the images added since the previous size: no fixed costs in it.
        marginal = None if previous is None else (seconds - previous[1]) / (n - previous[0])
        previous = (n, seconds)
        rows.append({"images": n, "fit_s": seconds, "fit_per_image_s": seconds / n,
                     "marginal_per_image_s": marginal,
                     "forward_per_image_s": forward / n, "ratio_to_forward": seconds / forward})
        print(f"  {n:>5} images: {seconds / n * 1000:.1f} ms/image (marginal "
              f"{'-' if marginal is None else f'{marginal * 1000:.1f}'}), "
              f"×{seconds / forward:.2f} forward", flush=True)
    return rows


def worker(args: argparse.Namespace) -> None:
    """One fit (under torchrun: one rank of it); rank 0 writes its time and patterns."""
    torch.set_num_threads(1)
    distributed.init_from_env(backend="gloo")
    model = vision_model(args.model)
    data = images(args.images, args.size, seed=7)
    start = time.perf_counter()
    patterns = pn.fit_patterns(model, data, batch_size=args.batch, negative=False,
                               precision="float32", progress=False)
    seconds = time.perf_counter() - start
    if distributed.is_main_process():
        out = Path(args.worker)
        patterns.save(out.with_suffix(".safetensors"))
        out.write_text(json.dumps({"fit_s": seconds, "world_size": distributed.world_size()}))
    distributed.shutdown()


def processes(args: argparse.Namespace) -> dict[str, Any]:
    common = ["-m", __spec__.name, "--model", args.model, "--size", str(args.size), "--batch",
              str(args.batch), "--images", str(args.images)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    runs = {}
    for label, launcher in (
        ("1 process", [sys.executable]),
        ("2 processes (gloo)", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node", "2"]),
    ):
        out = RESULTS / f"scaling_worker_{label.split()[0]}.json"
        start = time.perf_counter()
        subprocess.run(launcher + common + ["--worker", str(out)], env=env, check=True,
                       cwd=ROOT)
        wall = time.perf_counter() - start
        runs[label] = dict(json.loads(out.read_text()), wall_s=wall, path=str(out))
        print(f"  {label}: fit {runs[label]['fit_s']:.1f} s (wall with start-up {wall:.1f} s)",
              flush=True)
    one, two = (pn.Patterns.load(Path(r["path"]).with_suffix(".safetensors"))
                for r in runs.values())
    error = max(
        float((one[n][k].double() - two[n][k].double()).norm() / one[n][k].double().norm())
        for n in one for k in one[n]
    )
    for r in runs.values():
        path = Path(r.pop("path"))
        path.with_suffix(".safetensors").unlink()
        path.unlink()
    return {"runs": runs, "speedup": runs["1 process"]["fit_s"] / runs["2 processes (gloo)"][
        "fit_s"], "max_relative_pattern_difference": error}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["vgg16", "resnet50", "resnet18"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--images", type=int, default=256, help="images of the process runs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    torch.set_num_threads(1)
    print(f"growth ({args.model}, {args.size}×{args.size}, batch {args.batch}, a₊, float32):")
    rows = growth(args)
    print(f"processes ({args.images} images):")
    procs = processes(args)
    result = {"benchmark": "scaling", "model": args.model, "size": args.size,
              "batch": args.batch, "machine": machine(), "growth": rows, "processes": procs}
    write_result(f"scaling_{args.model}", result)
    return result


if __name__ == "__main__":
    main()
