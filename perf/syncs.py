"""Host-device synchronisations per explanation on a GPU, per method (VGG16, ResNet-50).

Each synchronisation makes the CPU wait until the GPU has finished everything queued: a check
between the forward and the backward pass, or one per layer, takes away the overlap of the
CPU's kernel launches with the GPU's work, which at small batches is most of the time
(`perf/README.md`, "On a GPU"). Counted with ``torch.cuda.set_sync_debug_mode("warn")``.

Usage: python -m perf.syncs --device cuda [--model vgg16]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .common import machine, parse_args, vision_model, write_result
from .explain import methods


def synchronisations(fn: Callable[[], Any]) -> int:
    """How many host-device synchronisations ``fn()`` makes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__, argv, size=224)
    if args.device.type != "cuda":
        raise SystemExit("syncs.py counts GPU synchronisations: run it with --device cuda")
    model = vision_model(args.model).to(args.device)
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    with torch.no_grad():
        target = model(x).argmax(1)
    found = methods(model, target)
    counts = {}
    for name, explain in found.items():
        explain(x)  # warm-up: caches filled
        counts[name] = synchronisations(lambda explain=explain: explain(x))
        print(f"  {name:<34} {counts[name]:4d} synchronisations", flush=True)
    result = {"benchmark": "syncs", "model": args.model, "batch": args.batch,
              "size": args.size, "machine": machine(), "counts": counts}
    write_result(f"syncs_{args.model}_cuda", result)
    return result


if __name__ == "__main__":
    main()
