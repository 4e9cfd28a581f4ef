"""Relevance of a torchvision VisionTransformer by ``lxt`` (AttnLRP), run as a subprocess.

``lxt.efficient.monkey_patch`` replaces ``forward`` of torch.nn classes process-wide, so the
parity tests (tests/test_attnlrp.py) call this script in a process of its own, and
:func:`lxt_patched` restores the original methods after each use (perf/attnlrp.py uses it to
time lxt in the same process as the other methods)::

    python tests/lxt_reference.py MODEL.pt INPUT.pt TARGET.pt OUT.pt SPEC [SPEC ...]

MODEL.pt holds ``{"config": kwargs of VisionTransformer, "state": state_dict}``. Each SPEC is
``VARIANT`` or ``VARIANT:IDENTITY_EPS``: VARIANT ``cp`` is lxt's own patch map for torchvision's
vision_transformer (AttnLRP outside attention, CP-LRP inside), ``attnlrp`` the same with lxt's
AttnLRP attention rule, as lxt patches the attention of Hugging Face models (the gradient at
q, k, v divided by 4, 4, 2); IDENTITY_EPS replaces the ``1e-10`` that lxt's identity rule adds
to the activation's input (``f(x)/(x + 1e-10)``; 0 makes it the exact identity rule). OUT.pt
gets ``{SPEC: relevance}``, the relevance being ``x ⊙ ∂y_target/∂x`` (lxt's gradient × input
form).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from lxt.efficient import monkey_patch
from lxt.efficient.models.vit_torch import cp_LRP
from lxt.efficient.patches import patch_method
from lxt.efficient.rules import divide_gradient, identity_rule_implicit_fn
from torch import nn
from torchvision.models import vision_transformer

#: torch.nn classes whose ``forward`` lxt's patch map for torchvision's ViT replaces.
PATCHED = (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)


def attnlrp_multi_head_attention_forward(self: nn.Module, query: Any, key: Any, value: Any,
                                         *args: Any, **kwargs: Any) -> Any:
    """lxt's AttnLRP attention rule (``wrap_attention_forward``) on nn.MultiheadAttention:
    the uniform rule on ``q kᵀ`` and ``A V`` after the softmax rule (the gradient)."""
    return self.original_forward(
        divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2),
        *args, **kwargs,
    )


def patch_map(variant: str) -> dict:
    if variant == "cp":
        return dict(cp_LRP)
    if variant == "attnlrp":
        return {
            **cp_LRP,
            nn.MultiheadAttention: partial(
                patch_method, attnlrp_multi_head_attention_forward, keep_original=True
            ),
        }
    raise ValueError(f"unknown variant {variant!r}: cp or attnlrp")


@contextmanager
def lxt_patched(variant: str, identity_epsilon: float | None = None) -> Iterator[None]:
    """lxt's patches for ``variant`` applied; the original methods restored on exit."""
    saved = {cls: cls.__dict__["forward"] for cls in PATCHED}
    defaults = identity_rule_implicit_fn.forward.__defaults__
    try:
        if identity_epsilon is not None:
            identity_rule_implicit_fn.forward.__defaults__ = (identity_epsilon,)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monkey_patch(vision_transformer, patch_map(variant))
        yield
    finally:
        identity_rule_implicit_fn.forward.__defaults__ = defaults
        for cls, forward in saved.items():
            cls.forward = forward
            if "original_forward" in cls.__dict__:
                delattr(cls, "original_forward")


def relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x ⊙ ∂y_target/∂x`` through the (patched) model."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    selected = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(selected, x)
    return (x * grad).detach()


def main(argv: list[str]) -> None:
    model_path, input_path, target_path, out_path, *specs = argv
    saved = torch.load(model_path)
    model = vision_transformer.VisionTransformer(**saved["config"])
    model.load_state_dict(saved["state"])
    model = model.to(saved["state"]["class_token"].dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.load(input_path)
    target = torch.load(target_path)
    result = {}
    for spec in specs:
        variant, _, epsilon = spec.partition(":")
        with lxt_patched(variant, float(epsilon) if epsilon else None):
            result[spec] = relevance(model, x, target)
    torch.save(result, out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
