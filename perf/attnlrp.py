"""ViT-B/16: explanation cost of AttnLRP (patternnet and lxt), PatternNet, Captum, × the gradient.

One process, one thread, batch 8 at 224², torchvision ``vit_b_16`` with random weights (seeded;
the zero-initialised head re-initialised, else every gradient is 0). Each round times the
plain autograd gradient of the top logit right before each method, in a rotating order, and
the table gives the median over rounds of (method time / that gradient time) with the range.
Times are CPU seconds of this process (:func:`perf.common.clock`).

``lxt`` (AttnLRP's reference package) replaces ``forward`` of ``nn.GELU``, ``nn.LayerNorm`` and
``nn.MultiheadAttention`` process-wide; here the patch is applied for each of its calls and
the original methods are restored right after (``lxt_patched`` of tests/lxt_reference.py), so
the other methods run unpatched.

Usage: python -m perf.attnlrp --rounds 3 [--batch 8] [--threads 1]
"""

from __future__ import annotations

import importlib.util
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import patternnet as pn

from .common import (
    ROOT,
    images,
    interleaved_ratios,
    machine,
    parse_args,
    top_logit_gradient,
    write_result,
)


def vit_b_16() -> nn.Module:
    """torchvision's ViT-B/16, random weights (seeded), random head, eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval()


def lxt_reference() -> Any:
    """tests/lxt_reference.py (lxt's patch maps and :func:`lxt_patched`, which restores the
    patched methods), loaded by path; None without lxt."""
    if importlib.util.find_spec("lxt") is None:
        return None
    spec = importlib.util.spec_from_file_location("lxt_reference",
                                                  ROOT / "tests" / "lxt_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def methods(model: nn.Module, target: torch.Tensor) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Name → function explaining a batch for ``target``."""
    reference = lxt_reference()

    def lxt_method(variant: str) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with reference.lxt_patched(variant):
                x = x.detach().requires_grad_(True)
                selected = model(x).gather(1, target[:, None]).sum()
                (grad,) = torch.autograd.grad(selected, x)
                return x * grad

        return run

    found: dict[str, Callable[[torch.Tensor], Any]] = {
        "patternnet lrp_attnlrp": lambda x: pn.get_method("lrp_attnlrp", model).attribute(
            x, target),
        "patternnet lrp_attnlrp_cp": lambda x: pn.get_method("lrp_attnlrp_cp", model).attribute(
            x, target),
    }
    if reference is not None:
        found["lxt AttnLRP (attention rule on MHA)"] = lxt_method("attnlrp")
        found["lxt as patched for torchvision ViT (CP-LRP in attention)"] = lxt_method("cp")
    try:
        from captum.attr import InputXGradient

        found["Captum InputXGradient"] = lambda x: InputXGradient(model).attribute(
            x.detach().requires_grad_(True), target=target)
    except ImportError:
        pass
    return found


def pattern_methods(model: nn.Module, x: torch.Tensor,
                    target: torch.Tensor) -> tuple[dict[str, Callable[[torch.Tensor], Any]],
                                                   dict[str, str]]:
    """PatternNet/PatternAttribution with patterns fitted on ``x`` when the model is
    supported; otherwise ``{}`` and the reason (the library's error message)."""
    try:
        patterns = pn.fit_patterns(model, [x])
    except Exception as error:  # report the refusal, do not hide it
        reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        return {}, {"PatternNet": reason, "PatternAttribution": reason}
    return {
        "PatternNet": lambda x: pn.PatternNet(model, patterns).attribute(x, target),
        "PatternAttribution": lambda x: pn.PatternAttribution(model, patterns).attribute(
            x, target),
    }, {}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(
        __doc__, argv, model="vit_b_16", batch=8, size=224, threads=1,
        extra=lambda parser: (
            parser.add_argument("--rounds", type=int, default=3),
            parser.add_argument("--no-patterns", action="store_true",
                                help="skip PatternNet/PatternAttribution (and their fit)"),
        ),
    )  # fmt: skip
    load_before = os.getloadavg()
    model = vit_b_16()
    x = images(args.batch, args.size)
    with torch.no_grad():
        target = model(x).argmax(1)

    gradient = top_logit_gradient(model, target)

    found = methods(model, target)
    patterned, refused = ({}, {"PatternNet, PatternAttribution": "skipped (--no-patterns)"}
                          ) if args.no_patterns else pattern_methods(model, x, target)
    found.update(patterned)
    gradient(x)  # warm-up; a method that fails is reported with its error, not timed
    for name in list(found):
        try:
            found[name](x)
        except Exception as error:
            refused[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            del found[name]
    ratios, floors = interleaved_ratios(
        {name: (lambda f=f: f(x)) for name, f in found.items()}, lambda: gradient(x), args.rounds
    )
    load_after = os.getloadavg()
    print(f"vit_b_16, batch {args.batch}, {args.size}², {args.threads} thread(s): autograd "
          f"gradient {statistics.median(floors):.2f} CPU s (median of {len(floors)}); load "
          f"{load_before} → {load_after}")
    table = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
             for name, v in ratios.items()}
    for name, row in table.items():
        print(f"  {name:<58} ×{row['median']:.2f}  ({row['min']:.2f}–{row['max']:.2f})")
    for name, reason in refused.items():
        print(f"  {name:<58} not measured: {reason}")
    result = {"model": "vit_b_16", "batch": args.batch, "size": args.size,
              "threads": args.threads, "rounds": args.rounds,
              "gradient_cpu_s": statistics.median(floors), "ratios": table,
              "ratios_all": ratios, "refused": refused, "load_before": load_before,
              "load_after": load_after, "machine": machine()}
    write_result("attnlrp_vit_b_16", result)
    return result


if __name__ == "__main__":
    main()
