"""Relevance of a torchvision VisionTransformer by ``lxt`` (AttnLRP), run as a subprocess.

``lxt.efficient.monkey_patch`` replaces ``forward`` of torch.nn classes process-wide, so the
parity tests (tests/test_attnlrp.py) and the cost table (perf/attnlrp.py) call this script in
a process of its own::

    python tests/lxt_reference.py MODEL.pt INPUT.pt TARGET VARIANT OUT.pt

MODEL.pt holds ``{"config": kwargs of VisionTransformer, "state": state_dict}``; VARIANT is
``cp`` (lxt's own patch map for torchvision's vision_transformer: AttnLRP outside attention,
CP-LRP inside) or ``attnlrp`` (the same with lxt's AttnLRP attention rule, as lxt patches the
attention of Hugging Face models: the gradient at q, k, v divided by 4, 4, 2). OUT.pt gets the
relevance ``x ⊙ ∂y_target/∂x`` (lxt's gradient × input form).
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from lxt.efficient import monkey_patch
from lxt.efficient.models.vit_torch import cp_LRP
from lxt.efficient.patches import patch_method
from lxt.efficient.rules import divide_gradient
from torchvision.models import vision_transformer


def attnlrp_multi_head_attention_forward(self, query, key, value, *args, **kwargs):
    """lxt's AttnLRP attention rule (``wrap_attention_forward``) on nn.MultiheadAttention:
    the uniform rule on ``q kᵀ`` and ``A V`` after the softmax rule (the gradient)."""
    return self.original_forward(
        divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2),
        *args, **kwargs,
    )


def patch_map(variant: str) -> dict:
    if variant == "cp":
        return cp_LRP
    if variant == "attnlrp":
        return {
            **cp_LRP,
            vision_transformer.nn.MultiheadAttention: partial(
                patch_method, attnlrp_multi_head_attention_forward, keep_original=True
            ),
        }
    raise ValueError(f"unknown variant {variant!r}: cp or attnlrp")


def relevance(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x ⊙ ∂y_target/∂x`` through the patched model."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    selected = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(selected, x)
    return (x * grad).detach()


def main(argv: list[str]) -> None:
    model_path, input_path, target_path, variant, out_path = argv
    monkey_patch(vision_transformer, patch_map(variant))
    saved = torch.load(model_path)
    model = vision_transformer.VisionTransformer(**saved["config"])
    model.load_state_dict(saved["state"])
    model = model.to(saved["state"]["class_token"].dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.load(input_path)
    target = torch.load(target_path)
    torch.save(relevance(model, x, target), out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
