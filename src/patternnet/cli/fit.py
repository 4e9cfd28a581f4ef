"""``patternnet fit``: fit the patterns of a model on data and save them."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from ..patterns import distributed
from ..patterns.fit import fit_patterns
from . import common

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``fit`` to the sub-commands."""
    fit = commands.add_parser(
        "fit",
        help="fit the patterns of a model on data and save them",
        description="One pass over DATA (model in eval mode, no gradients) accumulates "
        "float64 statistics for every Linear/Conv layer; the patterns are saved as "
        "safetensors. Under torchrun the data is sharded across processes and rank 0 writes.",
    )
    common.add_model(fit)
    common.add_data(fit)
    fit.add_argument("--out", required=True, metavar="FILE", help="patterns file to write")
    fit.add_argument(
        "--estimator",
        default="two_component",
        choices=("two_component", "linear", "filter", "identity"),
        help="signal estimator (default two_component: a+ and a-, the paper's S_a+-)",
    )
    fit.add_argument(
        "--no-negative",
        dest="negative",
        action="store_const",
        const=False,
        default="auto",
        help="two_component only: fit a+ only (by default a- is fitted where an inactive unit "
        "can receive a signal: not in layers read only through ReLUs)",
    )
    fit.add_argument(
        "--negative-everywhere",
        dest="negative",
        action="store_const",
        const=True,
        help="two_component only: fit a- in every layer, also where ReLUs make it unused",
    )
    fit.add_argument(
        "--precision",
        default=None,
        choices=("float64", "float32"),
        help="default float32: products of shifted data in float32, within 1e-5 of float64; "
        "float64: every product in float64 (the reference, several times slower); sums are "
        "always float64",
    )
    fit.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="save the running statistics here now and then, to resume an interrupted fit",
    )
    fit.add_argument(
        "--checkpoint-every", type=common.positive_int, metavar="N",
        help="checkpoint every N batches",
    )  # fmt: skip
    fit.add_argument(
        "--checkpoint-minutes",
        type=common.positive_float,
        metavar="M",
        help="checkpoint every M minutes (may be fractional; default with --checkpoint and "
        "without --checkpoint-every: 10)",
    )
    fit.add_argument(
        "--resume", action="store_true", help="continue the fit saved in --checkpoint"
    )
    common.add_preset(fit)
    common.add_quiet(fit)
    fit.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Fit patterns on DATA and save them to OUT.

    Launched by ``torchrun``, every process fits its shard of the data (on ``cuda:LOCAL_RANK``
    with ``--device cuda``), the statistics are all-reduced and rank 0 writes the file.
    """
    checkpointing = {
        "checkpoint_every": args.checkpoint_every,
        "checkpoint_minutes": args.checkpoint_minutes,
        "resume": args.resume or None,
    }
    if args.checkpoint is None:
        for name, value in checkpointing.items():
            if value is not None:
                flag = "--" + name.replace("_", "-")
                raise common.UsageError(f"{flag} needs --checkpoint FILE (where the statistics go)")
    # NCCL for a fit on GPUs, gloo for one on CPUs (even where CUDA is present).
    on_gpu = str(args.device).startswith("cuda")
    launched = distributed.init_from_env(backend="nccl" if on_gpu else "gloo")
    try:
        if launched and args.device == "cuda":
            args.device = str(distributed.local_device())
        model, _ = common.device_model(args)
        preset = common.preset(args)
        loader = common.loader(args, common.dataset(args, preset))
        options: dict[str, Any] = {
            "estimator": args.estimator,
            "negative": args.negative,
            "precision": args.precision,
            "progress": not args.quiet and distributed.is_main_process(),
            "limit": args.limit,
            "checkpoint": args.checkpoint,
            **{name: value for name, value in checkpointing.items() if value is not None},
        }
        start = time.perf_counter()
        with common.user_input(f"fit on --data {args.data}"):
            patterns = fit_patterns(model, loader, **options)
        seconds = time.perf_counter() - start
        if distributed.is_main_process():
            patterns.metadata.setdefault("preset", _preset_dict(preset))
            with common.user_input(f"--out {args.out}"):
                patterns.save(args.out)
            images = patterns.metadata.get("images", "?")
            common.log(args, f"fitted {args.estimator} patterns for {len(patterns)} layers on "
                             f"{images} samples in {seconds:.1f} s → {args.out}")  # fmt: skip
            _report_dead(args, patterns)
    finally:
        if launched:
            distributed.shutdown()
    return 0


def _preset_dict(preset: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(preset).items()}


def _report_dead(args: argparse.Namespace, patterns: Any) -> None:
    report = patterns.metadata.get("report", {})
    for name, entry in report.items():
        dead = entry.get("dead") or 0
        counts = dead if isinstance(dead, dict) else {"a": dead}
        for which, count in counts.items():
            if count:
                common.log(args, f"  note: layer {name}: {count} of {entry.get('units')} "
                                 f"units have no samples for {which} (their patterns are "
                                 "zero)")  # fmt: skip
        for which, count in (entry.get("fallback") or {}).items():
            if count:
                common.log(args, f"  note: layer {name}: {count} of {entry.get('units')} "
                                 f"units have an ill-conditioned {which} normaliser (they use "
                                 f"the {entry.get('fallback_to')} pattern)")  # fmt: skip
